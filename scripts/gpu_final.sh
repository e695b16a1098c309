#!/usr/bin/env bash
# A short device call: the CUDA tests and the sync / step sections of the GPU benchmark.
set -u
export PYTHONPATH="$PWD/src"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_stats.py tests/test_lane.py tests/test_honest_skips.py tests/test_watch.py > "$OUT/pytest_final.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_final.txt"
timeout 150 python3 benchmarks/bench_gpu.py --out "$OUT" --only P2g,P4g --budget 120 > "$OUT/bench_final.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench_final.log"
tail -n 3 "$OUT/pytest_final.txt"; grep -A6 "P2g\|syncs after" "$OUT/gpu_section.md" | head -30
