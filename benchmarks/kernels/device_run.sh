#!/usr/bin/env bash
# One device call: build kestrel (kernels for sm_90a), run the kernel + ops tests, then the
# kernel benchmarks. Logs and JSON go to ${OUT:-out}. Usage: bash benchmarks/kernels/device_run.sh
# [pytest args...]; set SKIP_TESTS=1 or SKIP_BENCH=1 to skip a part, BENCH_ONLY to pass --only.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KESTREL_CUDA_ARCHS=${KESTREL_CUDA_ARCHS:-90a}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(($(date +%s) - start)) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  start=$(date +%s)
  python3 -m pytest tests/kernels tests/ops -q -p no:cacheprovider -rf "$@" 2>&1 \
    | tee "$OUT/tests.log" | tail -40
  echo "tests: $(($(date +%s) - start)) s"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 benchmarks/kernels/bench_kernels.py --out "$OUT/kernels.json" \
    --only "${BENCH_ONLY:-elementwise,decode,prefill}" 2>&1 | tee "$OUT/bench.log"
fi
if [ "${SASS:-0}" = 1 ]; then  # which tensor-core instructions the prefill kernels use
  so=$(python3 -c "import kestrel._kernels as k; print(k.__file__)")
  cuobjdump -sass "$so" > "$OUT/kernels.sass" 2>/dev/null
  echo "HGMMA: $(grep -c HGMMA "$OUT/kernels.sass")  HMMA: $(grep -c HMMA "$OUT/kernels.sass")"
fi
if [ "${NCU:-0}" = 1 ]; then  # Nsight Compute on one prefill launch (the second call)
  ncu --launch-skip 1 --launch-count 1 -k regex:prefill_attention \
    --section SpeedOfLight --section Occupancy --section ComputeWorkloadAnalysis \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio|sm__pipe_tensor_op_.*cycles_active\.avg\.pct_of_peak_sustained_active" \
    python3 benchmarks/kernels/prefill_once.py > "$OUT/ncu.txt" 2>&1
  grep -E "prefill_attention|Duration|Compute \(SM\)|Issue Slots|Achieved Active|tensor_op|stalled" \
    "$OUT/ncu.txt" | awk '$NF+0 > 0.05 || !/stalled/' | head -40
fi
