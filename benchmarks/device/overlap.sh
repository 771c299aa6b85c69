#!/usr/bin/env bash
# One device call for overlap scheduling (issue 12 item 3): build, the engine tests on the GPU and
# the CUDA suite, a scan for hidden synchronizations, TPOT with and without --async-scheduling,
# serving vs offline on the 0.5B GGUF. Needs: the server wheels (fastapi, uvicorn, pydantic,
# pyzmq, msgspec, llguidance, gguf ...) in .whl/ and make_gguf.py + a vocabulary GGUF in .peers/
# (../shared/peers/README.md); OUT set by the device tool. SKIP_TESTS=1, SKIP_SERVE=1, BATCHES.
set -uo pipefail
export PYTHONUNBUFFERED=1 KESTREL_CUDA_ARCHS=90a
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
python3 -m pytest -q -p no:cacheprovider -x tests/engine/test_overlap_scheduling.py tests/engine/test_greedy_parity.py tests/engine/test_structured_outputs.py tests/engine/test_prompt_logprobs.py 2>&1 | tee $OUT/engine_gpu.log | tail -3
python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels tests/gpu tests/engine tests/structured 2>&1 | tee $OUT/cuda_tests.log | tail -2
fi
python3 benchmarks/sync_points.py 2>&1 | grep -v "it/s\]" | tail -30 | tee $OUT/sync.log
for m in qwen2.5-7b qwen2.5-0.5b; do for b in ${BATCHES-1 64}; do for a in async-scheduling no-async-scheduling; do
  echo "== latency $m b$b --$a"
  python3 benchmarks/latency.py --model $m --batch-size $b --output-len 128 --$a --json $OUT/lat_${m}_b${b}_$a.json 2>&1 | grep -v "it/s\]" | tail -1
done; done; done
[ "${SKIP_SERVE:-0}" = 1 ] && exit 0
python3 .peers/make_gguf.py .peers/ggml-vocab-qwen2.gguf /tmp/q05.gguf qwen05b > $OUT/gguf.log 2>&1 || { tail $OUT/gguf.log; exit 1; }
python3 -m kestrel_server.cli serve /tmp/q05.gguf --port 8011 --max-num-seqs 256 --max-model-len 4096 --log-level warning > $OUT/server.log 2>&1 &
pid=$!
for i in $(seq 1 240); do curl -sf localhost:8011/health >/dev/null && break; kill -0 $pid 2>/dev/null || { echo "server died"; tail -5 $OUT/server.log; exit 1; }; sleep 0.5; done
python3 benchmarks/serving.py --base-url http://127.0.0.1:8011 --num-prompts 512 --input-len 128 --output-len 128 --request-rate inf --max-concurrency 16 64 256 --num-clients 4 --out $OUT/serving.json > $OUT/bench_serve.log 2>&1
echo "== serving (core process, overlap)"; tail -6 $OUT/bench_serve.log
kill -TERM $pid; wait $pid
for c in 16 64 256; do
  echo "== offline c$c"
  python3 benchmarks/offline_throughput.py --model qwen2.5-0.5b --num-prompts 512 --min-input 128 --max-input 128 --output-len 128 --max-num-seqs $c --json $OUT/offline_c$c.json 2>&1 | grep -v "it/s\]" | tail -1
done
