"""NanOrigin: the module that produced a NaN/Inf, found by re-running the poisoned step."""
from functools import partial
import math

import pytest
import torch
from torch import nn

from gradguard.nan_origin import NanOrigin

from _helpers import mlp


_mlp = partial(mlp, 4, 8, 8, 2, act=("relu", "tanh"))


def _closure(model, x):
    return lambda: model(x).pow(2).mean()


@pytest.mark.parametrize("layer", ["0", "2", "4"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_forward_output_producer_is_named_not_its_propagators(layer, bad):
    model = _mlp()

    def hook(mod, inp, out):
        out = out.clone()
        out[0, 0] = bad
        return out
    model.get_submodule(layer).register_forward_hook(hook)
    x = torch.randn(3, 4)
    got = NanOrigin(model).locate(_closure(model, x))
    assert got == {"module": layer, "type": "Linear", "where": "forward", "param": f"{layer}.weight"}


def test_non_finite_weight_is_named_as_parameter():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[1, 1] = math.nan
    got = NanOrigin(model).locate(_closure(model, torch.randn(3, 4)))
    assert (got["module"], got["where"]) == ("2", "parameter")


def test_gradient_only_nan_names_its_tensor():
    model = _mlp()
    model[2].weight.register_hook(lambda g: g * math.nan)
    got = NanOrigin(model).locate(_closure(model, torch.randn(3, 4)))
    assert (got["module"], got["where"], got["param"]) == ("2", "gradient", "2.weight")


def test_backward_producer():
    """A module whose backward makes Inf from a finite output gradient (sqrt at 0)."""
    class Sqrt(nn.Module):
        def forward(self, x):
            return x.clamp(min=0).sqrt()
    model = nn.Sequential(nn.Linear(4, 4), Sqrt(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    got = NanOrigin(model).locate(lambda: model(torch.randn(2, 4)).sum())
    assert (got["module"], got["where"]) == ("1", "backward")


def test_finite_step_gives_none_and_gradients_and_rng_are_restored():
    model = _mlp()
    x = torch.randn(3, 4)
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    state = torch.random.get_rng_state()
    assert NanOrigin(model).locate(lambda: nn.functional.dropout(model(x), 0.5).sum()) is None
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    assert torch.equal(state, torch.random.get_rng_state())
    # no hook is left behind
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("bad", [None, 3, "model"])
def test_bad_arguments_name_them(bad):
    with pytest.raises(TypeError, match="model"):
        NanOrigin(bad)
    with pytest.raises(TypeError, match="closure"):
        NanOrigin(_mlp()).locate(bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_batch_is_named_as_input(bad):
    model = _mlp()
    x = torch.randn(3, 4)
    x[1, 2] = bad
    got = NanOrigin(model).locate(_closure(model, x))
    assert got == {"module": "", "type": "Sequential", "where": "input", "param": None}


def test_buffers_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[2].register_forward_hook(lambda m, i, o: o * math.nan)
    got = NanOrigin(model).locate(_closure(model, torch.randn(5, 4)))
    assert got["module"] == "2"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
