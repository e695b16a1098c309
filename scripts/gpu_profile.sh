#!/usr/bin/env bash
# A device call for diagnosis: CUDA tests and where a guarded step spends its time.
set -u
export PYTHONPATH="$PWD/src"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_stats.py tests/test_lane.py > "$OUT/pytest_cuda.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_cuda.txt"
timeout 150 python3 benchmarks/profile_gpu_step.py --out "$OUT" > "$OUT/profile.log" 2>&1
echo "profile rc=$?" >> "$OUT/profile.log"
tail -n 3 "$OUT/pytest_cuda.txt"; cat "$OUT/profile.log"
