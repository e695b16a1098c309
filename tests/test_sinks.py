"""TensorBoard sink: write through a real Guard, read back with tensorboard's EventAccumulator."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.guard import GLOBAL_COLS
from gradguard.record import RunStore, open_recorder
from gradguard.sinks import TensorBoardSink

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _load(path):
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_guard_run_read_back(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), log_dir=tmp_path / "runs", run_name="tb")
    guard.recorder.add_sink(TensorBoardSink(tmp_path / "tb", top_k=3))
    ref = []
    for i in range(12):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean() * (math.nan if i == 5 else 1.0)
        loss.backward()
        ref.append({n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters()})
        guard.step(loss=loss)
    guard.close()
    assert guard.recorder.failures == {}
    acc = _load(tmp_path / "tb" / "tb")
    tags = acc.Tags()
    loss = acc.Scalars("gradguard/loss")
    assert [e.step for e in loss] == [i for i in range(12) if i != 5]       # NaN loss not written
    np.testing.assert_allclose([e.value for e in loss], RunStore(tmp_path / "runs").steps("tb")["loss"][
        np.arange(12) != 5], rtol=1e-6)
    assert [e.value for e in acc.Scalars("gradguard/skipped")][5] == 1.0
    assert acc.Scalars("gradguard/nonfinite_layers")[5].value == 8
    hist = acc.Histograms("gradguard/layer_log10_norm")
    assert len(hist) == 11 and hist[0].histogram_value.num == 8
    assert hist[0].histogram_value.max == pytest.approx(math.log10(max(ref[0].values())), rel=1e-5)
    top = sorted(ref[0], key=ref[0].get, reverse=True)[:3]
    tops = {t[len("gradguard/top/"):] for t in tags["scalars"] if t.startswith("gradguard/top/")
            and acc.Scalars(t)[0].step == 0}
    assert tops == set(top)
    per_param = [t for t in tags["scalars"] if t.startswith("gradguard/top/")]
    assert len(per_param) < 8 * 12                                              # summarised, not per step
    (text,) = acc.Tensors("gradguard/events/text_summary")
    assert text.step == 5 and b"nonfinite" in text.tensor_proto.string_val[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        TensorBoardSink("x", top_k=-1)
    with pytest.raises(ValueError, match="every"):
        TensorBoardSink("x", every=0)


def test_sink_without_store(tmp_path):
    sink = TensorBoardSink(tmp_path, top_k=1, every=2)
    rec = open_recorder(None, run_name="only", layers=[{"name": "w", "shape": [1], "order": 0}], sinks=[sink])
    rows = np.ones((4, len(GLOBAL_COLS) + 2), np.float32)
    rec.write_steps(np.arange(4), rows, GLOBAL_COLS)
    rec.close()
    assert rec.path is None and rec.failures == {}
    assert [e.step for e in _load(tmp_path / "only").Scalars("gradguard/global_norm")] == [0, 2]


def test_guard_sinks_argument_without_log_dir(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, sinks=[TensorBoardSink(tmp_path, top_k=1)], run_name="tbonly")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        guard.step()
    guard.close()
    assert guard.recorder.path is None
    assert [e.step for e in _load(tmp_path / "tbonly").Scalars("gradguard/global_norm")] == [0, 1, 2]
