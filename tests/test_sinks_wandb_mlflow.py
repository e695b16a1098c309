"""W&B (offline) and MLflow (local file store) sinks: write through a real Guard, read back what landed.

MLflow is read with ``MlflowClient`` on a ``file:`` URI in tmp_path; W&B with a
small reader of the offline run's ``.wandb`` file (LevelDB log format of
protobuf ``Record``s; wandb no longer ships a Python reader).
"""
from __future__ import annotations

import json
import logging
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.guard import GLOBAL_COLS
from gradguard.record import RunStore, open_recorder
from gradguard.sinks import MlflowSink, WandbSink

N_STEPS, NAN_STEP = 12, 5
LAYERS = [{"name": n, "shape": [1], "order": i} for i, n in enumerate(["a.weight", "b", "<img src=x>"])]


def _guard_run(tmp_path, sink):
    """12 steps of a 4-layer MLP (8 tensors), NaN loss at step 5. Returns (guard, per-step reference norms)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), log_dir=tmp_path / "runs", run_name="r",
                     sinks=[sink])
    ref = []
    for i in range(N_STEPS):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean() * (math.nan if i == NAN_STEP else 1.0)
        loss.backward()
        ref.append({n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters()})
        guard.step(loss=loss)
    guard.close()
    assert guard.recorder.failures == {}
    return guard, ref


def _awkward_rows():
    """Globals and norms with nan, +-inf, 1e30, 1e-30; layer 2 non-finite in rows 0 and 2."""
    G = len(GLOBAL_COLS)
    rows = np.ones((4, G + 3 * len(LAYERS)), np.float32)
    li = GLOBAL_COLS.index("loss")
    rows[:, li] = [np.nan, np.inf, -np.inf, 1e30]
    rows[:, G:G + 3] = [[1e-30, 2.0, np.nan], [1e30, 1.0, 3.0], [np.inf, 0.5, np.nan], [1.0, 2.0, 4.0]]
    rows[[0, 2], G + 3 + 2] = np.nan
    return rows


# --------------------------------------------------------------------------- MLflow
@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 keeps the file store behind a flag
    return (tmp_path / "mlruns").as_uri()


def _mlflow_run(uri, name="r"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("gradguard")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`gradguard.run_name` = '{name}'")
    return client, run


def test_mlflow_guard_run_read_back(tmp_path, mlflow_uri):
    _, ref = _guard_run(tmp_path, MlflowSink(mlflow_uri, top_k=3))
    client, run = _mlflow_run(mlflow_uri)
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    hist = lambda key: sorted((m.step, m.value) for m in client.get_metric_history(rid, key))  # noqa: E731
    stored = RunStore(tmp_path / "runs").steps("r")
    loss = hist("gradguard/loss")
    assert [s for s, _ in loss] == [i for i in range(N_STEPS) if i != NAN_STEP]    # NaN loss not written
    np.testing.assert_allclose([v for _, v in loss], stored["loss"][np.arange(N_STEPS) != NAN_STEP], rtol=1e-6)
    assert dict(hist("gradguard/skipped"))[NAN_STEP] == 1.0
    assert dict(hist("gradguard/nonfinite_layers"))[NAN_STEP] == 8
    for q, key in ((0.0, "min"), (0.5, "p50"), (0.9, "p90"), (1.0, "max")):
        want = np.quantile(np.array(list(ref[0].values())), q)
        assert dict(hist(f"gradguard/layer_norm_{key}"))[0] == pytest.approx(want, rel=1e-5)
    keys = set(run.data.metrics)
    top_keys = {k for k in keys if k.startswith("gradguard/top/")}
    top0 = {k[len("gradguard/top/"):] for k in top_keys if 0 in dict(hist(k))}
    assert top0 == set(sorted(ref[0], key=ref[0].get, reverse=True)[:3])
    assert len(top_keys) < 8                                   # summarised, not a metric per parameter
    assert dict(hist("gradguard/events"))[NAN_STEP] >= 1
    assert int(run.data.tags["gradguard.n_events"]) >= 1
    assert run.data.params["gradguard.layers"] == "8"
    art = Path(client.download_artifacts(rid, "gradguard/events.jsonl", str(tmp_path / "dl")))
    evs = [json.loads(line) for line in art.read_text().splitlines()]
    assert any(e["step"] == NAN_STEP and "nonfinite" in e["kind"] for e in evs)
    assert [e.step for e in RunStore(tmp_path / "runs").events("r")] == [e["step"] for e in evs]


def test_mlflow_awkward_values(mlflow_uri):
    rec = open_recorder(None, run_name="awk", layers=LAYERS, config={"lr": 0.1, "nested": {"x": [1, 2]}},
                        sinks=[MlflowSink(mlflow_uri, top_k=2)])
    rec.write_steps(np.arange(4), _awkward_rows(), GLOBAL_COLS)
    rec.close()
    assert rec.failures == {}
    client, run = _mlflow_run(mlflow_uri, "awk")
    h = lambda key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}  # noqa: E731
    assert h("gradguard/loss") == {3: pytest.approx(1e30, rel=1e-6)}             # nan/+-inf skipped
    assert h("gradguard/nonfinite_layers") == {0: 1, 1: 0, 2: 1, 3: 0}
    assert h("gradguard/layer_norm_min")[0] == pytest.approx(1e-30, rel=1e-6)     # NaN norm ignored
    assert h("gradguard/layer_norm_max") == {0: 2.0, 1: pytest.approx(1e30, rel=1e-6), 2: 0.5, 3: 4.0}
    assert h("gradguard/top/_img src_x_") == {1: 3.0, 3: 4.0}                   # name made metric-safe
    assert set(h("gradguard/top/a.weight")) == {0, 1}                        # inf norm is not ranked
    assert run.data.params["gradguard.nested"] == '{"x": [1, 2]}'


def test_mlflow_existing_run_left_open(mlflow_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    rid = client.create_run(client.create_experiment("mine")).info.run_id
    rec = open_recorder(None, run_name="x", layers=LAYERS, sinks=[MlflowSink(mlflow_uri, run_id=rid, every=2)])
    rec.write_steps(np.arange(4), np.ones((4, len(GLOBAL_COLS) + 9), np.float32), GLOBAL_COLS)
    rec.close()
    assert rec.failures == {}
    assert client.get_run(rid).info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(rid, "gradguard/global_norm")] == [0, 2]


def test_mlflow_refused_store_never_reaches_training(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    sink = MlflowSink((tmp_path / "mlruns").as_uri())
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="gradguard.record"):
        guard = gg.Guard(model, opt, log_dir=tmp_path / "runs", run_name="ok", sinks=[sink], flush_every=1)
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            guard.step()
            guard.recorder.flush()       # one sink call per step (the writer coalesces queued flushes)
        guard.close()
    assert guard.recorder.failures["mlflow"] >= 5                     # open + 4 writes (+ close)
    assert len([r for r in caplog.records if "mlflow failed" in r.getMessage()]) == 1
    assert len(RunStore(tmp_path / "runs").steps("ok")["step"]) == 4  # the store is unaffected


# ----------------------------------------------------------------------------- W&B
def _wandb_records(path: Path):
    """Protobuf records of a ``.wandb`` file: 7-byte header ``:W&B`` + magic + version, then
    LevelDB-log blocks of 32 KiB whose records carry (crc32, length, type) headers."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                       # block trailer padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        if pos + 7 + n > len(data):        # the writer is mid-record: the tail is not on disk yet
            return
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):                 # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _wandb_history(root: Path, name: str):
    """(history rows as dicts of decoded JSON, summary dict, run record) of the offline run ``name``."""
    from google.protobuf.message import DecodeError  # wandb's own dependency

    # wandb's service process writes the file: after finish() it can lag a moment behind.
    for _ in range(100):
        found = []
        for f in root.glob("wandb/offline-run-*/run-*.wandb"):
            try:
                recs = list(_wandb_records(f))
            except DecodeError:            # read while a record was half written: read again
                continue
            runs = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
            finished = any(r.WhichOneof("record_type") == "exit" for r in recs)
            if runs and runs[0].display_name == name and finished:  # the whole run is on disk
                found.append(recs)
        if found:
            break
        time.sleep(0.1)
    (recs,) = found
    rows, summary = [], {}
    for r in recs:
        t = r.WhichOneof("record_type")
        if t == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif t == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    return rows, summary, run


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_wandb_offline_guard_run_read_back(wandb_env):
    tmp_path = wandb_env
    _, ref = _guard_run(tmp_path, WandbSink("gg-test", top_k=3, dir=str(tmp_path)))
    rows, summary, run = _wandb_history(tmp_path, "r")
    assert json.loads(dict((u.key, u.value_json) for u in run.config.update)["gradguard_layers"]) == 8
    steps = [r for r in rows if "gradguard/nonfinite_layers" in r]     # one row per step
    assert [r["gradguard/step"] for r in steps] == list(range(N_STEPS))
    stored = RunStore(tmp_path / "runs").steps("r")
    ok = np.arange(N_STEPS) != NAN_STEP
    assert [("gradguard/loss" in r) for r in steps] == list(ok)                 # NaN loss not written
    np.testing.assert_allclose([r["gradguard/loss"] for r in steps if "gradguard/loss" in r],
                               stored["loss"][ok], rtol=1e-6)
    assert steps[NAN_STEP]["gradguard/skipped"] == 1.0
    assert steps[NAN_STEP]["gradguard/nonfinite_layers"] == 8
    r0 = steps[0]
    assert sum(r0["gradguard/layer_log10_norm/values"]) == 8
    bins = r0["gradguard/layer_log10_norm/bins"]
    assert bins[-1] == pytest.approx(math.log10(max(ref[0].values())), rel=1e-5)
    assert bins[0] == pytest.approx(math.log10(min(ref[0].values())), rel=1e-5)
    assert r0["gradguard/layer_norm_p50"] == pytest.approx(np.median(list(ref[0].values())), rel=1e-5)
    top0 = {k[len("gradguard/top/"):] for k in r0 if k.startswith("gradguard/top/")}
    assert top0 == set(sorted(ref[0], key=ref[0].get, reverse=True)[:3])
    for k in top0:
        assert r0[f"gradguard/top/{k}"] == pytest.approx(ref[0][k], rel=1e-5)
    assert max(len([k for k in r if k.startswith("gradguard/top/")]) for r in steps) == 3  # never per parameter
    ev = [r for r in rows if "gradguard/event" in r]
    assert ev and ev[0]["gradguard/step"] == NAN_STEP and "nonfinite" in ev[0]["gradguard/event"]
    assert summary["gradguard/n_events"] == len(RunStore(tmp_path / "runs").events("r"))
    assert any(r.get("gradguard/events/_type") == "table-file" for r in rows)  # closing events table


def test_wandb_awkward_values_and_existing_run(wandb_env):
    import wandb

    tmp_path = wandb_env
    mine = wandb.init(project="gg-test", name="mine", dir=str(tmp_path), reinit="create_new")
    rec = open_recorder(None, run_name="awk", layers=LAYERS, sinks=[WandbSink(run=mine, top_k=1, hist_bins=0)])
    rec.write_steps(np.arange(4), _awkward_rows(), GLOBAL_COLS)
    rec.close()
    assert rec.failures == {}
    mine.log({"own": 1.0})            # still open: the sink does not finish a run it was given
    mine.finish()
    rows, _, _ = _wandb_history(tmp_path, "mine")
    steps = [r for r in rows if "gradguard/step" in r]
    assert [r.get("gradguard/loss") for r in steps] == [None, None, None, pytest.approx(1e30, rel=1e-6)]
    assert [r["gradguard/nonfinite_layers"] for r in steps] == [1, 0, 1, 0]
    assert steps[0]["gradguard/layer_norm_min"] == pytest.approx(1e-30, rel=1e-6)
    assert [next(k for k in r if k.startswith("gradguard/top/")) for r in steps] == \
        ["gradguard/top/b", "gradguard/top/a.weight", "gradguard/top/b", "gradguard/top/<img src=x>"]
    assert not any("gradguard/layer_log10_norm/values" in r for r in rows)       # hist_bins=0
    assert rows[-1]["own"] == 1.0


class _BrokenRun:
    def define_metric(self, *a, **k):
        pass

    def log(self, *a, **k):
        raise ConnectionError("wandb backend gone")


def test_wandb_failing_run_never_reaches_training(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="gradguard.record"):
        guard = gg.Guard(model, opt, log_dir=tmp_path / "runs", run_name="ok",
                         sinks=[WandbSink(run=_BrokenRun())], flush_every=1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            guard.step()
            guard.recorder.flush()       # one sink call per step (the writer coalesces queued flushes)
        guard.close()
    assert guard.recorder.failures["wandb"] == 3
    assert len([r for r in caplog.records if "wandb failed" in r.getMessage()]) == 1
    assert len(RunStore(tmp_path / "runs").steps("ok")["step"]) == 3


# ------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("make, match", [
    (lambda: WandbSink(top_k=-1), "top_k"), (lambda: WandbSink(every=0), "every"),
    (lambda: WandbSink(every=True), "every"), (lambda: WandbSink(hist_bins=-1), "hist_bins"),
    (lambda: WandbSink(project=3), "project"), (lambda: MlflowSink(top_k=1.5), "top_k"),
    (lambda: MlflowSink(every=-2), "every"), (lambda: MlflowSink(experiment=""), "experiment"),
    (lambda: MlflowSink(tracking_uri=Path("x")), "tracking_uri"), (lambda: MlflowSink(run_id=7), "run_id"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
