"""benchmarks/bench_gpu.py in --smoke mode (tiny model, CPU): it runs, writes both
outputs after every section, survives a failing section and honours its time budget."""
import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
SECTIONS = ["P1g", "P2g", "P3g", "P4g"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_subprocess(tmp_path, fresh_python):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = fresh_python.run_script(SCRIPT, "--smoke", "--out", tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["smoke"] is True and list(res["sections"]) == SECTIONS
    for name, sec in res["sections"].items():
        assert "error" not in sec and "skipped" not in sec, (name, sec)
    p1 = res["sections"]["P1g"]
    assert p1["tensors"] == 2 + 12 * 2 + 2  # the smoke GPT: 2 layers of 12 tensors, tied head
    for dt in ("float32", "bfloat16"):
        rows = p1["dtypes"][dt]["rows"]
        assert {"one read (flat sum)", "gg.grad_stats", "torch._foreach_norm(2)",
                "clip_grad_norm_(foreach)"} <= set(rows)
        assert rows["one read (flat sum)"]["x_one_read"] == pytest.approx(1.0)
        assert all(r["median_ms"] > 0 and r["rounds"] >= 3 for r in rows.values())
    assert set(res["sections"]["P3g"]["rows"]) == {
        "plain (fused AdamW)", "torch clip_grad_norm_", "gradguard defaults (store)",
        "gradguard flush_every=1", "gradguard monitoring only (clip=None)", "naive .norm().item() + clip"}
    p4 = res["sections"]["P4g"]
    assert len(p4["syncs_per_step"]) == p4["steps"] == 6
    md = (tmp_path / "gpu_section.md").read_text()
    assert md.startswith("## GPU") and all(f"### {s}" in md for s in SECTIONS)
    assert "smoke run" in md and "| gg.grad_stats |" in md


def test_failing_section_is_recorded_and_the_next_runs(bench, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(bench, "section_p2g", boom)
    assert bench.main(["--smoke", "--out", str(tmp_path), "--only", "P2g,P4g"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert "injected failure" in res["sections"]["P2g"]["error"]
    assert "syncs_per_step" in res["sections"]["P4g"]
    md = (tmp_path / "gpu_section.md").read_text()
    assert "injected failure" in md and "### P4g" in md


def test_budget_skips_sections(bench, tmp_path):
    assert bench.main(["--smoke", "--budget", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert all("time budget" in res["sections"][s]["skipped"] for s in SECTIONS)
    assert "Skipped" in (tmp_path / "gpu_section.md").read_text()


def test_sync_counter_records_step_and_frame(bench):
    with bench.SyncCounter(cuda=False) as sc:
        sc.step = 3
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")  # not a sync: ignored
        sc.step = 4
        warnings.warn("called a synchronizing CUDA operation")
    assert [h["step"] for h in sc.hits] == [3, 4]
    assert not any(h["in_gradguard"] for h in sc.hits)
    assert all("test_bench_gpu.py" in h["where"] for h in sc.hits)


def test_paired_ratio_and_json(bench):
    assert bench.paired([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    assert bench.clean({"a": float("nan"), "b": [float("inf"), 1.0]}) == {"a": "NaN", "b": ["Inf", 1.0]}
