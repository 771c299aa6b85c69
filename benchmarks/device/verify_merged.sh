#!/usr/bin/env bash
# The device calls that verify what was merged without a GPU (overlap scheduling, the grammar
# bitmask kernel, GGUF kernels, FP8, loading to the device, speculation) and measure it.
# One call per PART (each fits the 10-minute limit): PART=1 tests, PART=2 engine benchmarks,
# PART=3 kernels / FP8 / loading, PART=4 serving vs offline (benchmarks/device/overlap.sh).
# Needs .whl/ (fastapi, uvicorn, pydantic(+core), starlette, typing-*, annotated-*, pyzmq,
# msgspec, llguidance, gguf, pyyaml, opentelemetry-api) and .peers/ (make_gguf.py and
# ggml-vocab-qwen2.gguf, see ../shared/peers/README.md), carried to the device; OUT is set there.
# After PART=1 passes, take the verified ops off python/kestrel/ops/_dispatch.py UNVERIFIED_OPS
# and flip EngineConfig.async_scheduling's default if PART=2 shows the gain.
set -uo pipefail
export PYTHONUNBUFFERED=1 KESTREL_CUDA_ARCHS=90a
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
case "${PART:-1}" in
1)
  python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m cuda tests 2>&1 | tee $OUT/cuda_tests.log | tail -8
  python3 -m pytest -q -p no:cacheprovider tests/engine/test_overlap_scheduling.py tests/engine/test_spec_decode.py 2>&1 | tee $OUT/engine_gpu.log | tail -3
  ;;
2)
  python3 benchmarks/sync_points.py 2>&1 | grep -v "it/s\]" | tail -30 | tee $OUT/sync.log
  for m in qwen2.5-7b qwen2.5-0.5b; do for b in 1 64; do for a in --async-scheduling ""; do
    echo "== latency $m b$b ${a:-sync}"
    python3 benchmarks/latency.py --model $m --batch-size $b --output-len 128 $a --json $OUT/lat_${m}_b${b}${a:-_sync}.json 2>&1 | grep -v "it/s\]" | tail -1
  done; done; done
  KESTREL_UNVERIFIED_KERNELS=1 python3 benchmarks/structured_overhead.py --tokenizer .peers/ggml-vocab-qwen2.gguf --device cuda --batch 1 64 --json $OUT/structured.json 2>&1 | tail -3
  ;;
3)
  (cd benchmarks/kernels && KESTREL_UNVERIFIED_KERNELS=1 python3 bench_kernels.py --only gguf --out $OUT/gguf.json 2>&1 | tail -30)
  python3 benchmarks/latency.py --model qwen2.5-7b --quantization fp8 --compare-unquantized --json $OUT/lat_fp8.json 2>&1 | grep -v "it/s\]" | tail -3
  python3 .peers/make_gguf.py .peers/ggml-vocab-qwen2.gguf /tmp/q7b-bf16.gguf qwen7b > $OUT/gguf7b.log 2>&1 || tail -3 $OUT/gguf7b.log
  python3 benchmarks/make_quant_gguf.py /tmp/q7b-bf16.gguf /tmp/q7b-q4_k_m.gguf --scheme q4_k_m >> $OUT/gguf7b.log 2>&1 || tail -3 $OUT/gguf7b.log
  python3 benchmarks/load_time.py /tmp/q7b-bf16.gguf /tmp/q7b-q4_k_m.gguf --engine --repeat 2 --json $OUT/load.json 2>&1 | tail -8
  KESTREL_UNVERIFIED_KERNELS=1 python3 benchmarks/latency.py --model /tmp/q7b-q4_k_m.gguf --output-len 128 --json $OUT/lat_q4km.json 2>&1 | grep -v "it/s\]" | tail -2
  ;;
4)
  SKIP_TESTS=1 BATCHES="" bash benchmarks/device/overlap.sh
  ;;
esac
