"""The seeds' experiment: images read row by row by a recurrent network.

Seed 001 trains an LSTM that reads each Fashion-MNIST image as a sequence of
28 rows with plain SGD, then again with value clipping 0.5.  Here the shipped
default is the UCI 8x8 digits as scikit-learn bundles them, copied into this
package (``data/digits.npz``, written by ``scripts/make_digits_data.py``) so
that no download and no scikit-learn is needed; real Fashion-MNIST is read
from the standard IDX files in a local directory.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

DIGITS_FILE = Path(__file__).parent / "data" / "digits.npz"

__all__ = ["read_idx", "load_fashion_mnist", "load_digits", "SequenceClassifier", "FASHION_FILES", "irnn_case"]

# IDX type codes -> numpy big-endian dtypes (the format of LeCun's MNIST files).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array.

    Args:
        path: file path; a ``.gz`` suffix is decompressed.
    Returns:
        the array with the shape stored in the header.
    Raises:
        ValueError: the header is not IDX or the payload size does not match it.

    Example:
        >>> images = read_idx("data/train-images-idx3-ubyte.gz")   # (60000, 28, 28) uint8
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = data[4 + 4 * ndim:]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(payload) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), "
                         f"file holds {len(payload)} bytes")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory} (expected the standard "
                            "Fashion-MNIST IDX files, e.g. from its GitHub release)")


def load_fashion_mnist(directory, split: str = "train") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST (or MNIST) from the standard IDX files in ``directory``.

    Args:
        directory: folder holding ``train-images-idx3-ubyte[.gz]`` etc.
        split: ``"train"`` or ``"test"``.
    Returns:
        ``(x, y)``: x ``(N, 28, 28)`` float32 in [0, 1] (row t is time step t), y ``(N,)`` long.

    Example:
        >>> x, y = load_fashion_mnist("~/data/fashion", "test")
    """
    if split not in FASHION_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_FILES)}, got {split!r}")
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"--data directory {directory} does not exist")
    img_stem, lab_stem = FASHION_FILES[split]
    images = read_idx(_find(directory, img_stem))
    labels = read_idx(_find(directory, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"images {images.shape} and labels {labels.shape} do not pair up")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_digits(split: str = "train", test_fraction: float = 0.2,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """The 8x8 digits (1,797 images; scikit-learn's ``load_digits``), as 8 rows of 8 pixels.

    Args:
        split: ``"train"`` or ``"test"``; a fixed shuffled split.
        test_fraction: share of images held out for ``"test"``.
        seed: seed of the split.
    Returns:
        ``(x, y)``: x ``(N, 8, 8)`` float32 in [0, 1], y ``(N,)`` long.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    with np.load(DIGITS_FILE) as d:
        images, target = d["images"], d["target"]
    x = torch.from_numpy(images.astype(np.float32) / 16.0)
    y = torch.from_numpy(target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return x[idx], y[idx]


class SequenceClassifier(nn.Module):
    """A recurrent net that reads a sequence (e.g. image rows) and classifies it.

    Args:
        input_size: features per time step (pixels per row).
        hidden_size: recurrent units.
        num_classes: output classes (or regression outputs).
        cell: ``"lstm"`` (the seed's model), ``"gru"``, ``"rnn"`` (tanh), or
            ``"irnn"`` (ReLU RNN with identity recurrent init, Le et al. 2015).
        init_scale: multiplies the recurrent weight after init (>1 pushes the
            spectral radius up; the way to make a run explode on purpose).
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, cell: str = "lstm",
                 init_scale: float = 1.0):
        super().__init__()
        cells = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "irnn": nn.RNN}
        if cell not in cells:
            raise ValueError(f"cell must be one of {sorted(cells)}, got {cell!r}")
        kw = {"nonlinearity": "relu"} if cell == "irnn" else {}
        self.rnn = cells[cell](input_size, hidden_size, batch_first=True, **kw)
        self.head = nn.Linear(hidden_size, num_classes)
        if cell == "irnn":
            with torch.no_grad():
                self.rnn.weight_hh_l0.copy_(torch.eye(hidden_size))
                self.rnn.bias_hh_l0.zero_()
                self.rnn.bias_ih_l0.zero_()
                nn.init.normal_(self.rnn.weight_ih_l0, 0.0, 0.001)
        if init_scale != 1.0:
            with torch.no_grad():
                self.rnn.weight_hh_l0.mul_(init_scale)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def irnn_case(length: int = 100):
    """``gradguard diagnose gradguard.tools.tasks.digits:irnn_case``: an IRNN on the addition problem."""
    import torch.nn.functional as F

    from .pascanu import addition

    torch.manual_seed(0)
    model = SequenceClassifier(2, 50, 1, "irnn")
    return model, addition(20, length, torch.Generator().manual_seed(0)), F.mse_loss
