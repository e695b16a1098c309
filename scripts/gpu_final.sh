#!/usr/bin/env bash
# A short device call: the CUDA-relevant tests, then the statistics / step / sync sections of
# the GPU benchmark within a small budget.  Results go to $OUT (or benchmarks/results/gpu).
set -u
export PYTHONPATH="$PWD/src"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/machine_final.txt" 2>&1
timeout 80 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_dead_run.py \
    tests/test_triton_stats.py tests/test_lane.py tests/test_honest_skips.py > "$OUT/pytest_final.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_final.txt"
timeout "${BENCH_S:-70}" python3 benchmarks/bench_gpu.py --out "$OUT" --only "${ONLY:-P1g,P2g,P4g}" \
    --budget "$(( ${BENCH_S:-70} - 15 ))" > "$OUT/bench_final.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench_final.log"
tail -n 3 "$OUT/pytest_final.txt"; tail -n 2 "$OUT/bench_final.log"
grep -A12 "P1g\|P2g\|syncs after" "$OUT/gpu_section.md" 2>/dev/null | head -60
