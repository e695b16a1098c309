#!/usr/bin/env bash
# One device call: the CUDA tests and the GPU benchmark; results under $OUT.
# Run from the repository root on a CUDA machine with torch (+ Triton) and pytest.
set -u
export PYTHONPATH="$PWD/src"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda); import triton; print('triton', triton.__version__)"; } > "$OUT/machine.txt" 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_stats.py > "$OUT/pytest_cuda.txt" 2>&1
echo "pytest cuda rc=$?" >> "$OUT/pytest_cuda.txt"
timeout 280 python3 benchmarks/bench_gpu.py --out "$OUT" --budget 230 > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
timeout 100 python3 benchmarks/profile_gpu_step.py --out "$OUT" > "$OUT/profile.log" 2>&1
echo "profile rc=$?" >> "$OUT/profile.log"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_lane.py tests/test_guard.py > "$OUT/pytest_core.txt" 2>&1
echo "pytest core rc=$?" >> "$OUT/pytest_core.txt"
tail -n 3 "$OUT/pytest_cuda.txt" "$OUT/bench.log" "$OUT/pytest_core.txt"; cat "$OUT/profile.log"
