"""`gradguard diagnose` on models whose problems are known by construction."""
import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradguard.cli import main
from gradguard.tools.diagnose import diagnose
from gradguard.tools.tasks.deep import deep_mlp, exploding_case, healthy_case, regression_batch, vanishing_case
from gradguard.tools.tasks.digits import SequenceClassifier, irnn_case


def kinds(d):
    return {f.kind: f for f in d.findings}


def test_deep_sigmoid_mlp_reports_vanishing_in_first_layers():
    model, batch, loss_fn = vanishing_case()
    d = diagnose(model, batch, loss_fn)
    v = kinds(d)["vanishing"]
    assert v.severity == "critical" and d.critical
    assert v.layers[0] == "0"                 # the first Linear is the worst off
    assert "2" in v.layers and "46" not in v.layers   # ... early layers, not the output layer
    # Flow chart numbers are the true per-layer gradient norms, first to last.
    linears = [m for m in model if isinstance(m, nn.Linear)]
    ref = [math.sqrt(m.weight.grad.pow(2).sum().item() + m.bias.grad.pow(2).sum().item()) for m in linears]
    assert [l.grad_norm for l in d.layers] == pytest.approx(ref, rel=1e-6)
    assert [l.name for l in d.layers] == [str(i) for i in range(0, 48, 2)]
    assert d.depth == 24
    chart = d.flow_chart()
    assert chart.index("  0 ") < chart.index("  46 ") and "loss =" in chart


def test_exploding_mlp_reports_exploding_and_large_init():
    d = diagnose(*exploding_case())
    k = kinds(d)
    assert k["exploding"].severity == "critical" and k["exploding"].layers[0] == "0"
    init = k["init_scale"]
    assert "He" in init.message and "0" in init.layers
    assert any("clip" in a.lower() for a in k["exploding"].advice)


def test_irnn_names_recurrent_spectral_radius():
    model, batch, loss_fn = irnn_case()
    d = diagnose(model, batch, loss_fn)
    sr = kinds(d)["spectral_radius"]
    assert sr.layers == ["rnn.weight_hh_l0"]
    assert "spectral radius of rnn.weight_hh_l0 is 1" in sr.message
    assert sr.data["spectral_radius"] == pytest.approx(1.0)
    assert sr.data["seq_len"] == batch[0].shape[1]
    assert any("LSTM" in a for a in sr.advice)


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_spectral_radius_matches_eigvals(scale):
    torch.manual_seed(0)
    m = SequenceClassifier(3, 12, 2, "rnn", init_scale=scale)
    d = diagnose(m, (torch.randn(4, 30, 3), torch.tensor([0, 1, 0, 1])), F.cross_entropy)
    sr = kinds(d)["spectral_radius"]
    ref = torch.linalg.eigvals(m.rnn.weight_hh_l0.detach().double()).abs().max().item()
    assert sr.data["spectral_radius"] == pytest.approx(ref)
    assert sr.severity == "warning"          # 0.3x: vanishing over time; 2x: exploding


def test_lstm_spectral_radius_per_gate():
    torch.manual_seed(0)
    m = SequenceClassifier(3, 8, 2, "lstm")
    d = diagnose(m, (torch.randn(4, 5, 3), torch.tensor([0, 1, 0, 1])), F.cross_entropy)
    sr = kinds(d)["spectral_radius"]
    w = m.rnn.weight_hh_l0.detach().double()
    ref = {g: torch.linalg.eigvals(w[i * 8:(i + 1) * 8]).abs().max().item() for i, g in enumerate("ifgo")}
    assert sr.data["gates"] == pytest.approx(ref)


def test_dead_relus_and_saturated_tanh():
    lin = nn.Linear(4, 8)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(-1.0)                   # every unit negative for every input: all dead
    d = diagnose(nn.Sequential(lin, nn.ReLU(), nn.Linear(8, 1)), (torch.randn(16, 4), torch.randn(16, 1)),
                 F.mse_loss)
    dead = kinds(d)["dead_relu"]
    assert dead.severity == "critical" and dead.layers == ["1"] and dead.data["fractions"]["1"] == 1.0
    assert d.layers[0].dead == 1.0 and d.layers[1].dead is None   # attributed to the Linear before it
    tanh_net = deep_mlp(3, 32, "tanh", 20.0, generator=torch.Generator().manual_seed(0))
    d2 = diagnose(tanh_net, regression_batch(), F.mse_loss)
    sat = kinds(d2)["saturation"]
    # saturated = slope 1 - tanh^2 below 5% of its maximum, computed independently here
    x, _ = regression_batch()
    with torch.no_grad():
        ref = (1 - torch.tanh(tanh_net[0](x)) ** 2 < 0.05).float().mean().item()
    assert sat.data["fractions"]["1"] == pytest.approx(ref)


def test_healthy_model_has_no_critical_finding():
    d = diagnose(*healthy_case())
    assert not d.critical and d.worst() is None
    assert "No problems found" in d.render()


def test_nonfinite_is_critical():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    x = torch.tensor([[float("nan"), 1.0]])
    d = diagnose(model, (x, torch.zeros(1, 1)), F.mse_loss)
    assert kinds(d)["nonfinite"].severity == "critical"


def test_weights_untouched_and_bad_arguments():
    model, batch, loss_fn = healthy_case()
    before = [p.detach().clone() for p in model.parameters()]
    diagnose(model, batch, loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="model"):
        diagnose("not a model", batch, loss_fn)
    with pytest.raises(TypeError, match="loss_fn"):
        diagnose(model, batch, None)
    with pytest.raises(ValueError, match="scalar"):
        diagnose(model, batch, lambda out, y: (out - y) ** 2)


@pytest.mark.parametrize("target,code", [
    ("gradguard.tools.tasks.deep:vanishing_case", 1),
    ("gradguard.tools.tasks.deep:exploding_case", 1),
    ("gradguard.tools.tasks.deep:healthy_case", 0),
    ("gradguard.tools.tasks.digits:irnn_case", 0),
    ("gradguard.tools.tasks.deep", 2),
    ("gradguard.tools.tasks.deep:nope", 2),
    ("no_such_module_xyz:f", 2),
])
def test_cli_exit_status(target, code, capsys):
    assert main(["diagnose", target]) == code


def test_cli_fail_on_warning_and_local_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "mycase.py").write_text(textwrap.dedent("""
        from gradguard.tools.tasks.digits import irnn_case
        def make():
            return irnn_case(60)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["diagnose", "mycase:make"]) == 0
    assert "spectral radius of rnn.weight_hh_l0" in capsys.readouterr().out
    assert main(["diagnose", "mycase:make", "--fail-on", "warning"]) == 1
    capsys.readouterr()
    assert main(["diagnose", "mycase:make", "--json"]) == 0
    import json
    data = json.loads(capsys.readouterr().out)
    assert any(f["kind"] == "spectral_radius" for f in data["findings"])
