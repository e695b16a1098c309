"""Flight recorder dumps and `gradguard replay`: the op and module that made the first NaN are named."""
import torch
from torch import nn

import gradguard as gg
from gradguard import cli
from gradguard.remedies import FlightRecorder, Remedies
from gradguard.tools.replay import replay


class LogLayer(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


class DivLayer(nn.Module):
    def forward(self, x):
        return x / (x - x)  # division by zero


class SqrtLayer(nn.Module):
    def forward(self, x):
        return torch.sqrt(x.abs() * 0)  # finite forward, Inf gradient at 0 -> NaN downstream


def make(bad):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), bad, nn.Linear(4, 1))


def mse(model, batch):  # module level: pickles into the dump
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _dump(model, tmp_path, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = FlightRecorder(tmp_path, loss_fn=mse, **kw)
    guard = gg.Guard(model, opt, remedies={"critical": rec}, detectors=[])
    batch = (torch.randn(8, 4), torch.randn(8, 1))
    loss = mse(model, batch)
    loss.backward()
    guard.step(loss, batch=batch)
    guard.flush()
    assert len(rec.dumps) == 1, guard.events
    ev = guard.events[0]
    assert ev.kind == "nonfinite" and any("flight record" in a for a in ev.data["actions"])
    return rec.dumps[0]


def test_replay_names_log_of_negative(tmp_path, capsys):
    path = _dump(make(LogLayer()), tmp_path)
    res = replay(path, trust_pickle=True)
    assert res["phase"] == "forward" and res["op"] == "log" and res["module"] == "1"
    assert res["module_type"] == "LogLayer"
    assert cli.main(["replay", path, "--trust-pickle"]) == 1
    out = capsys.readouterr().out
    assert "op log in module 1 (LogLayer)" in out


def test_replay_names_division_by_zero(tmp_path):
    res = replay(_dump(make(DivLayer()), tmp_path), trust_pickle=True)
    assert res["phase"] == "forward" and res["module_type"] == "DivLayer"
    assert res["op"] in ("div", "__truediv__")


def test_replay_backward_only_nan(tmp_path):
    res = replay(_dump(make(SqrtLayer()), tmp_path), trust_pickle=True)
    # sqrt'(0) = Inf, times the 0 of the product: NaN in the backward of SqrtLayer's ops
    assert res["phase"] == "backward" and res["op"] in ("MulBackward0", "SqrtBackward0")
    assert res["module"] == "1" and res["module_type"] == "SqrtLayer"


def test_dump_contents(tmp_path):
    model = make(LogLayer())
    path = _dump(model, tmp_path, keep=3)
    d = torch.load(path, weights_only=True)  # a genuine dump needs no unpickling of code
    assert d["step"] == 0 and d["exact"] is True and d["rows"].shape[0] == 1
    assert d["names"] == [n for n, _ in model.named_parameters()]
    for k, v in model.state_dict().items():
        assert torch.equal(d["model"][k], v)
    assert isinstance(d["batch"], tuple) and d["batch"][0].shape == (8, 4)
    assert d["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_replay_clean_step_and_missing_batch(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = FlightRecorder(tmp_path)
    guard = gg.Guard(model, opt, detectors=[])
    ctx = guard.remedies.ctx
    guard.remedies = Remedies({"critical": rec}, ctx)
    batch = torch.randn(3, 4)
    from gradguard.events import Event
    rec.on_step(0, batch)
    rec(Event(0, "spike", "critical", [], "m"), ctx)
    res = replay(rec.dumps[0], trust_pickle=True)
    assert res["phase"] is None and "no NaN" in str(res)
    rec2 = FlightRecorder(tmp_path / "b")
    rec2.bind(ctx)
    rec2(Event(1, "spike", "critical", [], "m"), ctx)
    assert cli.main(["replay", rec2.dumps[0]]) == 2


def test_dump_rows_are_the_rows_logged_not_a_reused_buffer(tmp_path):
    """The dump's rows are the last ``keep`` rows exactly as each flush logged them: rows kept
    from earlier flushes must not alias a buffer that later flushes overwrite."""
    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = FlightRecorder(tmp_path, keep=10)
    guard = gg.Guard(model, opt, remedies={"critical": rec}, detectors=[], flush_every=4)
    logged = []
    guard.add_row_observer(lambda steps, rows: logged.extend(
        zip(np.asarray(steps).tolist(), np.array(rows, copy=True))))
    g = torch.Generator().manual_seed(0)
    for i in range(11):  # flushes after steps 3 and 7, then step 10 is poisoned
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g) * (i + 1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i == 10:
            model[0].weight.grad[0, 0] = float("nan")
        guard.step(loss)
    guard.flush()
    assert len(rec.dumps) == 1
    d = torch.load(rec.dumps[0], weights_only=True)
    assert d["steps"] == list(range(1, 11))
    want = np.stack([r for s, r in logged if s >= 1])
    assert d["rows"].shape == want.shape
    # bitwise: every row distinct (the targets grow each step), so an alias shows
    assert np.array_equal(d["rows"].numpy().view(np.uint32), want.view(np.uint32))
    assert len({r.tobytes() for r in want}) == len(want)
