"""Run-store benchmark: write throughput with 300 layers, and query latency at 1M x 300.

    python benchmarks/bench_store.py [--steps 1000000] [--layers 300] [--dir /tmp/x]

1. Training side: time spent inside ``recorder.write_steps`` per flush (what
   the training loop pays; the writing itself happens on the writer thread).
2. Writer throughput: rows per second until ``recorder.flush()`` returns.
3. Queries on the finished store: the dashboard's overview (2000-point
   global series + 400-bucket heatmap over all steps), a zoomed range, and
   the per-layer table.  Medians of 5.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gradguard.guard import GLOBAL_COLS
from gradguard.record import RunStore, open_recorder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=300)
    ap.add_argument("--flush", type=int, default=32, help="rows per write_steps call (the guard's flush_every)")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="gg_bench_store_"))
    G, L = len(GLOBAL_COLS), a.layers
    rng = np.random.default_rng(0)
    block = rng.lognormal(0, 1, (4096, G + 3 * L)).astype(np.float32)   # reused: content does not matter
    block[np.arange(4096) % 10 != 0, G + 2 * L:] = np.nan  # parameter norms: the guard's default 1 step in 10
    rec = open_recorder(root, run_name="big", layers=[{"name": f"block{i}.weight", "shape": [64, 64], "order": i}
                                                     for i in range(L)])
    call_times = []
    t0 = time.perf_counter()
    for s in range(0, a.steps, a.flush):
        k = min(a.flush, a.steps - s)
        off = s % (4096 - a.flush)
        c = time.perf_counter()
        rec.write_steps(np.arange(s, s + k), block[off:off + k], GLOBAL_COLS)
        call_times.append(time.perf_counter() - c)
        # Pace like a fast training loop would not; but never outrun the writer's
        # memory cap, so that every row lands (dropped rows would flatter the rate).
        if len(call_times) % 256 == 0:
            while rec._pending_bytes > 64 * 2 ** 20:
                time.sleep(0.005)
    rec.flush()
    wall = time.perf_counter() - t0
    rec.close()
    assert rec.dropped_rows == 0 and not rec.failures, (rec.dropped_rows, rec.failures)
    db = root / "big" / "gradguard.sqlite"
    print(f"rows {a.steps:,} x {L} layers, flush {a.flush}: writer {a.steps / wall:,.0f} rows/s "
          f"({wall:.1f} s), store {db.stat().st_size / 2 ** 30:.2f} GiB")
    ct = np.array(call_times) * 1e6
    print(f"write_steps (training side): median {np.median(ct):.1f} us, p99 {np.percentile(ct, 99):.1f} us "
          f"per call of {a.flush} rows")

    store = RunStore(root)

    def timed(fn, n=5):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    ov_steps = timed(lambda: store.steps("big", max_points=2000))
    ov_heat = timed(lambda: store.layer_norms("big", max_points=400))
    mid = a.steps // 2
    zoom = timed(lambda: (store.steps("big", mid, mid + 2000, 2000), store.layer_norms("big", mid, mid + 2000, 400)))
    table = timed(lambda: store.layer_summary("big"))
    print(f"overview: steps(max_points=2000) {ov_steps * 1e3:.0f} ms + layer_norms(max_points=400) "
          f"{ov_heat * 1e3:.0f} ms = {(ov_steps + ov_heat) * 1e3:.0f} ms")
    print(f"zoom 2000 steps (raw): {zoom * 1e3:.0f} ms; layer table: {table * 1e3:.0f} ms")
    if a.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
