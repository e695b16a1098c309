"""Task generators against methods.md §5 (written independently here), the IDX loader on
files this test writes, and the deep MLPs' gradient profiles."""
import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradguard.tools.tasks import (SequenceClassifier, addition, exploding_mlp, get_task, load_fashion_mnist,
                             multiplication, read_idx, regression_batch, temporal_order, vanishing_mlp)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("L", [10, 11, 50, 100, 237])
@pytest.mark.parametrize("fn,combine", [(addition, lambda a, b: (a + b) / 2), (multiplication, lambda a, b: a * b)])
def test_two_marker_tasks_match_definition(L, fn, combine):
    for seed in range(5):
        x, y = fn(64, L, gen(seed))
        l = x.shape[1]
        assert x.shape == (64, l, 2) and y.shape == (64, 1)
        assert L <= l < L + max(1, int(0.1 * L))          # l = L + U[0, 0.1L)
        values, marker = x[..., 0], x[..., 1]
        assert ((values >= 0) & (values <= 1)).all()
        assert set(marker.unique().tolist()) <= {0.0, 1.0}
        assert (marker.sum(1) == 2).all()                  # exactly two markers per sequence
        pos = marker.nonzero()[:, 1].view(64, 2)
        p0, p1 = pos[:, 0], pos[:, 1]
        assert (p0 >= 0).all() and (p0 < max(1, int(0.1 * l))).all()          # p0 in [0, 0.1 l)
        assert (p1 >= int(0.1 * l)).all() and (p1 < int(0.5 * l)).all()       # p1 in [0.1 l, 0.5 l)
        rows = torch.arange(64)
        torch.testing.assert_close(y[:, 0], combine(values[rows, p0], values[rows, p1]))


def test_lengths_vary_and_positions_cover_their_ranges():
    lengths = {addition(4, 100, gen(s))[0].shape[1] for s in range(60)}
    assert lengths == set(range(100, 110))
    x, _ = addition(5000, 100, gen(1))
    p = x[..., 1].nonzero()[:, 1].view(5000, 2)
    l = x.shape[1]
    assert set(p[:, 0].tolist()) == set(range(int(0.1 * l)))
    assert set(p[:, 1].tolist()) == set(range(int(0.1 * l), int(0.5 * l)))


@pytest.mark.parametrize("L", [10, 50, 100, 333])
def test_temporal_order_matches_definition(L):
    x, y = temporal_order(256, L, gen(L))
    assert x.shape == (256, L, 6) and y.shape == (256,) and y.dtype == torch.long
    assert (x.sum(-1) == 1).all()                         # one-hot
    sym = x.argmax(-1)
    is_ab = sym < 2
    assert (is_ab.sum(1) == 2).all()                      # exactly two of A/B
    pos = is_ab.nonzero()[:, 1].view(256, 2)
    lo0, hi0 = int(0.1 * L), max(int(0.1 * L) + 1, int(0.2 * L))
    lo1, hi1 = int(0.5 * L), max(int(0.5 * L) + 1, int(0.6 * L))
    assert ((pos[:, 0] >= lo0) & (pos[:, 0] < hi0)).all()
    assert ((pos[:, 1] >= lo1) & (pos[:, 1] < hi1)).all()
    rows = torch.arange(256)
    first, second = sym[rows, pos[:, 0]], sym[rows, pos[:, 1]]
    expected = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3}  # AA AB BA BB
    assert [expected[(a, b)] for a, b in zip(first.tolist(), second.tolist())] == y.tolist()
    assert set(y.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("fn", [addition, multiplication, temporal_order])
def test_generators_are_seeded(fn):
    a, b = fn(8, 40, gen(3)), fn(8, 40, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = fn(8, 40, gen(4))
    assert not torch.equal(a[0], c[0]) if a[0].shape == c[0].shape else True


@pytest.mark.parametrize("bad", [0, -1, 9, 2.5, True, None])
def test_bad_length_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="length"):
        addition(4, bad)


def test_task_error_rules():
    add = get_task("addition")
    y = torch.tensor([[0.5], [0.5]])
    out = torch.tensor([[0.5 + 0.19], [0.5 + 0.21]])     # squared errors 0.0361, 0.0441
    assert add.errors(out, y).tolist() == [False, True]
    to = get_task("temporal-order")
    assert to.errors(torch.tensor([[0., 1, 0, 0], [1., 0, 0, 0]]), torch.tensor([1, 2])).tolist() == [False, True]
    nan, inf = float("nan"), float("inf")
    assert add.errors(torch.tensor([[nan], [inf], [0.5]]), torch.full((3, 1), 0.5)).tolist() == [True, True, False]
    assert to.errors(torch.tensor([[nan, 9., 0, 0], [0., 9, 0, 0]]), torch.tensor([1, 1])).tolist() == [True, False]
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("copy")


# ------------------------------------------------------------------ IDX loader
def write_idx(path, array: np.ndarray, code: int, compress: bool):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_idx_loader(tmp_path, compress):
    rng = np.random.default_rng(0)
    sfx = ".gz" if compress else ""
    for split, n in (("train", 7), ("t10k", 3)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{sfx}", imgs, 0x08, compress)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{sfx}", labs, 0x08, compress)
        x, y = load_fashion_mnist(tmp_path, "test" if split == "t10k" else "train")
        assert x.shape == (n, 28, 28) and x.dtype == torch.float32
        torch.testing.assert_close(x, torch.from_numpy(imgs.astype(np.float32) / 255))
        assert y.tolist() == labs.tolist()


@pytest.mark.parametrize("code,dtype", [(0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_other_types(tmp_path, code, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    write_idx(tmp_path / "a.idx", a, code, False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x12\x34\x08\x01abc")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros(10, np.uint8), 0x08, False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError):
        load_fashion_mnist(tmp_path, "train")


# ------------------------------------------------------------------ models
def test_digits_and_sequence_classifier():
    from gradguard.tools.tasks import load_digits
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert xtr.shape[1:] == (8, 8) and len(xtr) + len(xte) == 1797
    assert 0 <= xtr.min() and xtr.max() <= 1
    for cell in ("lstm", "gru", "rnn", "irnn"):
        m = SequenceClassifier(8, 16, 10, cell)
        assert m(xtr[:5]).shape == (5, 10)
    irnn = SequenceClassifier(2, 16, 1, "irnn")
    assert torch.equal(irnn.rnn.weight_hh_l0, torch.eye(16))


def _layer_grad_norms(model):
    x, y = regression_batch()
    F.mse_loss(model(x), y).backward()
    return [m.weight.grad.norm().item() for m in model if isinstance(m, torch.nn.Linear)]


def test_deep_mlps_explode_and_vanish():
    ex = _layer_grad_norms(exploding_mlp())
    va = _layer_grad_norms(vanishing_mlp())
    assert ex[0] > 100 * ex[-1]       # first layers get the largest gradients
    assert va[0] < 1e-6 * va[-1]      # first layers get almost nothing
