"""Training-loop helpers (gradguard.training): penalty() against the formula; tbptt chunking and detachment against full BPTT."""
from functools import partial
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.training import detach_hidden, penalty, tbptt

from _helpers import mlp


model = partial(mlp, 3, 4, 2, act="layernorm")


def test_penalty_matches_formula_and_excludes_biases_and_norms():
    m = model()
    ws = [m[0].weight, m[2].weight]
    ref = 0.1 * sum(w.abs().sum() for w in ws) + 0.01 * sum((w ** 2).sum() for w in ws)
    assert torch.allclose(penalty(m, l1=0.1, l2=0.01, exclude=("*bias", "1.*")), ref)
    everything = sum((p ** 2).sum() for p in m.parameters())
    assert torch.allclose(penalty(m, l2=1.0, exclude=()), everything)
    assert penalty(m) == 0
    penalty(m, l2=1.0).backward()
    assert torch.allclose(m[0].weight.grad, 2 * m[0].weight) and m[0].bias.grad is None


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True])
def test_penalty_rejects_bad_coefficients(bad):
    with pytest.raises(ValueError, match="l2"):
        penalty(model(), l2=bad)


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_tbptt_run_equals_full_forward_and_cuts_gradients(cls):
    torch.manual_seed(0)
    rnn = cls(2, 5, batch_first=True)
    x = torch.randn(3, 10, 2, requires_grad=True)
    full, h_full = rnn(x)
    out, h = tbptt.run(rnn, x, k=4)
    assert torch.allclose(out, full, atol=1e-6)  # same values: only the graph is cut
    assert len(tbptt(x, 4)) == 3
    # the last chunk's output depends on no input before the last boundary
    out[:, -1].sum().backward()
    assert torch.all(x.grad[:, :8] == 0) and x.grad[:, 8:].abs().sum() > 0


def test_tbptt_user_loop_detaches_hidden_between_chunks():
    torch.manual_seed(0)
    cell = nn.RNN(2, 4, batch_first=False)
    x = torch.randn(9, 2, 2)
    it = tbptt(x, k=3, dim=0)
    seen = []
    for chunk, h in it:
        seen.append((chunk.shape[0], None if h is None else h.requires_grad))
        out, it.hidden = cell(chunk, h)
    assert seen == [(3, None), (3, False), (3, False)]


def test_detach_hidden_nested_and_errors():
    h = (torch.ones(2, requires_grad=True) * 2, torch.ones(2, requires_grad=True) * 3)
    d = detach_hidden(h)
    assert isinstance(d, tuple) and not any(t.requires_grad for t in d)
    with pytest.raises(TypeError, match="hidden"):
        detach_hidden("h")
    with pytest.raises(ValueError, match="k"):
        tbptt(torch.ones(2, 3), k=0)
    with pytest.raises(ValueError, match="dim"):
        tbptt(torch.ones(2, 3), k=1, dim=5)


def test_guard_trains_with_penalty_and_tbptt():
    torch.manual_seed(0)
    rnn = nn.GRU(2, 4, batch_first=True)
    opt = torch.optim.SGD(rnn.parameters(), lr=0.01)
    guard = gg.Guard(rnn, opt)
    x = torch.randn(2, 12, 2)

    def train_chunk(out, i):
        opt.zero_grad()
        loss = out.pow(2).mean() + penalty(rnn, l2=1e-3)
        loss.backward()
        guard.step(loss)

    tbptt.run(rnn, x, k=4, on_chunk=train_chunk)
    assert guard.steps == 3
