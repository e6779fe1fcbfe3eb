r"""A small CNN digit classifier, the yardstick of MNIST experiments.

Experiments ask questions such as "which share of prior samples looks like a 5-9?". The
:class:`DigitClassifier` answers them: a three-stage CNN on (B, 1, R, R) images in the
hierprior value range, with logits :math:`f(x) \in \mathbb{R}^{10}` and class probabilities
:math:`p(k \mid x) = \operatorname{softmax}(f(x))_k`.

:func:`load_digit_classifier` loads the weights from
``<cache_dir>/digit_classifier_r{R}.pt`` (``_r{R}_pad.pt`` for padded digits) or, when absent,
trains them on the bundled MNIST ``"train"`` split (4,500 digits, all ten classes, see
:mod:`hierprior.data.mnist`) by minimising the label-smoothed cross-entropy

.. math:: \mathcal{L} = -\sum_k \left[(1 - \epsilon)\, \delta_{k y} + \epsilon / 10\right]
    \log p(k \mid \tilde{x}),

where :math:`\tilde{x}` is a randomly rotated (up to 12 degrees), scaled (0.9-1.1), sheared and
shifted (up to 10% of the width) copy of the digit with a little Gaussian pixel noise; this
makes the classifier robust to the imperfect digits a diffusion prior generates. The weights
are saved atomically (a temporary file in the same folder, then :func:`os.replace`) with the
accuracy on the bundled ``"test"`` split, and loaded with ``torch.load(weights_only=True)``.

References:
    LeCun, Bottou, Bengio and Haffner (1998), Gradient-Based Learning Applied to Document
    Recognition, Proc. IEEE 86(11).
    Szegedy et al. (2016), Rethinking the Inception Architecture for Computer Vision,
    arXiv 1512.00567 (label smoothing).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hierprior.checks import check_int
from hierprior.data.mnist import check_value_range, from_value_range, load_mnist
from hierprior.evaluation.classifier import ImageClassifier
from hierprior.io import atomic_save

__all__ = ["DigitClassifier", "default_cache_dir", "load_digit_classifier"]

_FORMAT = 1


class DigitClassifier(ImageClassifier):
    r"""Small CNN that classifies (B, 1, R, R) digit images in a given value range.

    Three conv-BN-ReLU stages (``width``, 2 ``width``, 4 ``width`` channels; 2x2 max pooling
    between them), adaptive average pooling to 3x3, and a two-layer head. Inputs are mapped from
    ``value_range`` to [0, 1] first, so one set of weights serves any value range.

    Arguments:
        resolution: The side R of the input images (R >= 8).
        value_range: The range (a, b) of the input pixel values.
        width: The number of channels of the first stage.
    """

    num_classes = 10

    def __init__(
        self,
        resolution: int = 28,
        value_range: Sequence[float] = (-1.0, 1.0),
        width: int = 16,
    ):
        super().__init__()
        self.resolution = check_int(resolution, "resolution", 8)
        width = check_int(width, "width")
        self.value_range = check_value_range(value_range)
        self.width = width
        #: accuracy on the bundled test split, set when trained or loaded (NaN if unknown)
        self.test_accuracy = math.nan

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            stage(1, width),
            nn.MaxPool2d(2),
            stage(width, 2 * width),
            nn.MaxPool2d(2),
            stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(3),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * width * 9, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(128, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Returns the logits, with shape (B, 10), of images x with shape (B, 1, R, R)."""

        self._check(x)
        u = from_value_range(x.to(self.head[1].weight.dtype), self.value_range)
        return self.head(self.features(u - 0.5))

    def share(self, images: Tensor, digits: Sequence[int], batch_size: int = 1024) -> float:
        """Fraction of the images classified as one of ``digits`` (e.g. 5-9).

        Arguments:
            images: Images in ``value_range``, with shape (B, 1, R, R), B >= 1.
            digits: The digits that count.
            batch_size: Images per forward pass.
        """

        digits = sorted({int(d) for d in digits})
        if not digits or digits[0] < 0 or digits[-1] > 9:
            raise ValueError(f"digits must be a non-empty subset of 0-9, got {digits}")
        if len(images) == 0:
            raise ValueError("share needs at least one image")
        labels = self.classify(images, batch_size)
        return torch.isin(labels, torch.tensor(digits, device=labels.device)).float().mean().item()


def default_cache_dir() -> Path:
    """The cache folder: ``$HIERPRIOR_CACHE`` if set, else ``~/.cache/hierprior``."""

    env = os.environ.get("HIERPRIOR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hierprior"


def _augment(u: Tensor, generator: torch.Generator) -> Tensor:
    """Random small affine warps plus pixel noise of unit-intensity digits (B, 1, R, R)."""

    B = len(u)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(B, generator=generator)

    angle = uniform(-12.0, 12.0) * math.pi / 180
    scale = uniform(0.9, 1.1)
    shear = uniform(-0.15, 0.15)
    shift = uniform(-0.1, 0.1), uniform(-0.1, 0.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, shift[0] * 2], -1),
            torch.stack([sin, cos + shear * sin, shift[1] * 2], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(u.shape), align_corners=False)
    warped = F.grid_sample(u, grid, align_corners=False, padding_mode="zeros")
    noise = uniform(0.0, 0.08)[:, None, None, None]
    warped = warped + noise * torch.randn(warped.shape, generator=generator)
    return warped.clamp_(0.0, 1.0)


def _train(
    resolution: int,
    resize: str,
    seed: int,
    epochs: int,
    width: int,
    log: bool,
) -> DigitClassifier:
    """Trains a classifier (value range (0, 1)) on the bundled train split, on the CPU."""

    def split(name: str) -> tuple[Tensor, Tensor]:
        return load_mnist(
            range(10), resolution, source="bundled", split=name, value_range=(0, 1), resize=resize
        )

    x, y = split("train")
    x_test, y_test = split("test")
    generator = torch.Generator().manual_seed(seed)
    batch_size = 64
    steps = epochs * math.ceil(len(x) / batch_size)
    start = time.perf_counter()
    # initialisation and dropout use the global RNG: fork it so the caller's state survives
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(resolution, (0.0, 1.0), width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.2
        )
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for index in order.split(batch_size):
                logits = model(_augment(x[index], generator))
                loss = F.cross_entropy(logits, y[index], label_smoothing=0.05)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if log:
                elapsed = time.perf_counter() - start
                print(
                    f"digit classifier r{resolution}: epoch {epoch + 1}/{epochs}, "
                    f"loss {loss.item():.3f}, {elapsed:.0f} s"
                )
    model.eval()
    model.test_accuracy = (model.classify(x_test) == y_test).float().mean().item()
    return model


def load_digit_classifier(
    resolution: int = 28,
    value_range: Sequence[float] = (-1.0, 1.0),
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    resize: str = "interpolate",
    epochs: int = 12,
    retrain: bool = False,
    log: bool = False,
) -> DigitClassifier:
    """Loads the cached digit classifier for a resolution, training and caching it if absent.

    Training (on the CPU, about 30-60 s at 28 px on 2 cores) is deterministic given ``seed``
    and leaves the global RNG state as it was. ``seed``, ``epochs`` and ``retrain`` only
    matter when training; an existing cache file is loaded as is.

    Arguments:
        resolution: The side R of the images to classify.
        value_range: The value range of the images to classify.
        cache_dir: The cache folder; default :func:`default_cache_dir`.
        seed: Seed of initialisation, shuffling, augmentation and dropout.
        resize: How the training digits reach R ("interpolate" or "pad", as in
            :func:`hierprior.data.load_mnist`); match it to the data being classified.
        epochs: Training epochs over the 4,500 training digits.
        retrain: Train (and overwrite the cache) even if a cache file exists.
        log: Print the training progress.

    Returns:
        The classifier in eval mode, on the CPU, with ``test_accuracy`` set.

    Example:
        >>> clf = load_digit_classifier(resolution=28)
        >>> x, _ = load_mnist(digits=(5, 6, 7, 8, 9), split="test", source="bundled")
        >>> share = clf.share(x, digits=range(5, 10))  # about 0.99
    """

    resolution = check_int(resolution, "resolution", 8)
    if resize not in ("interpolate", "pad"):
        raise ValueError(f"resize must be 'interpolate' or 'pad', got {resize!r}")
    if resize == "pad" and resolution < 28:
        raise ValueError(f"resize='pad' needs resolution >= 28, got {resolution}")
    epochs = check_int(epochs, "epochs")
    value_range = check_value_range(value_range)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = "_pad" if resize == "pad" else ""
    path = folder / f"digit_classifier_r{resolution}{suffix}.pt"

    if path.exists() and not retrain:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise RuntimeError(
                f"could not read the digit classifier cache {str(path)!r} ({error}); delete it "
                "or pass retrain=True"
            ) from error
        if (
            not isinstance(state, dict)
            or state.get("format") != _FORMAT
            or state.get("resolution") != resolution
        ):
            raise RuntimeError(
                f"{str(path)!r} is not a digit classifier checkpoint for resolution "
                f"{resolution}; delete it or pass retrain=True"
            )
        model = DigitClassifier(resolution, value_range, int(state["width"]))
        model.load_state_dict(state["state_dict"])
        model.test_accuracy = float(state["test_accuracy"])
        return model.eval()

    with torch.inference_mode(False), torch.enable_grad():  # callers may hold no_grad
        model = _train(resolution, resize, seed, epochs, width=16, log=log)
    state = {
        "format": _FORMAT,
        "resolution": resolution,
        "resize": resize,
        "width": model.width,
        "seed": seed,
        "epochs": epochs,
        "test_accuracy": model.test_accuracy,
        "state_dict": model.state_dict(),
    }
    atomic_save(state, path)
    model.value_range = value_range
    return model.eval()
