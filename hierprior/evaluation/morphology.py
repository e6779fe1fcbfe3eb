r"""A small CNN morphology classifier, the yardstick of procedural-galaxy experiments.

Galaxy EM demos ask "which share of prior samples is a spiral galaxy?", where a diffusion prior
trained on ellipticals must learn that spirals exist. At 32 px an extended disk is easy to tell
from a compact elliptical, so a two-class "elliptical vs spiral" classifier could answer with
the galaxy's size alone. :class:`MorphologyClassifier` therefore has three classes, all drawn
by :func:`hierprior.data.make_galaxies`:

====  ==============  ==============================================================
k     name            training galaxies
====  ==============  ==============================================================
0     ``elliptical``  ``make_galaxies("elliptical")`` (Sersic profiles)
1     ``disk``        ``make_galaxies("spiral", params={"arm_contrast": 0.0})``: the
                      spiral generator (bulge + exponential disk + clumps) without arms
2     ``spiral``      ``make_galaxies("spiral")`` with its default arms
====  ==============  ==============================================================

Only class 2 counts as spiral: classes 1 and 2 share every size, shape and clump
distribution, so telling them apart takes the arms. In training the disks are even paired with
the spirals (the same generator seed, hence the same galaxies up to the arm contrast A).

The network maps the input from ``value_range`` to intensities :math:`u \in [0, 1]` and sees
two channels, :math:`u - \tfrac12` and an asinh stretch
:math:`s(u) = \operatorname{asinh}(u / \beta) / \operatorname{asinh}(1 / \beta) - \tfrac12`
with :math:`\beta = 0.1`, which lifts the faint arms next to the bright bulge (Lupton et al.
1999). Four conv-BN-ReLU stages with 2x2 max pooling between them and a global average pool
give logits :math:`f(x) \in \mathbb{R}^3` and :math:`p(k \mid x) = \operatorname{softmax}
(f(x))_k`. Training minimises the label-smoothed cross-entropy

.. math:: \mathcal{L} = -\sum_k \left[(1 - \epsilon)\, \delta_{k y} + \epsilon / 3\right]
    \log p(k \mid \tilde{x}), \qquad \epsilon = 0.05,

where :math:`\tilde{x}` is an augmented galaxy: a random element of the dihedral group
(rotations by multiples of 90 degrees and flips), with probability 1/2 an extra Gaussian blur
of width :math:`\sigma_b \sim U(0, 0.75)` px (at R = 32; scaled with R), a brightness factor
:math:`\sim U(0.7, 1)` of the peak, Gaussian pixel noise of standard deviation
:math:`\sim U(0, 0.05)` of the (unscaled) peak and a background offset :math:`\sim U(-0.01,
0.01)`; no clipping, so small negative values occur. This makes the classifier robust to the
imperfect samples of a diffusion prior (slightly noisy, slightly blurred, not clipped).

**Seeds.** Every epoch draws fresh galaxies with fixed integer seeds: epoch e uses seed
``7_000_001 + 2 e`` for its ellipticals and ``7_000_002 + 2 e`` for its disks and spirals
(paired). The held-out test set (200 galaxies per class, never paired) uses the seeds
``7_100_001`` (ellipticals), ``7_100_002`` (disks) and ``7_100_003`` (spirals). The datasets of
experiments use other seeds: ``conf/data/galaxies.yaml`` uses 0, and populations draw from
generators seeded by 63-bit :func:`hierprior.seeds.derive_seed` hashes (a collision with these
few seeds has probability ~1e-12). Initialisation, shuffling and augmentation use their own
generators, so training is deterministic given ``seed`` and leaves the global RNG untouched.

The weights are cached in ``<cache_dir>/morphology_classifier_r{R}.pt``, written atomically
(:func:`hierprior.io.atomic_save`) with the test accuracy, the per-class accuracy and the
confusion matrix, and loaded with ``torch.load(weights_only=True)``.

**What the yardstick cannot see.** It knows only the three morphology classes of this
generator: every image is forced into one of them, so irregulars, mergers, noise blobs or
galaxies outside the generator's parameter ranges get some label anyway (see the confidence).
It cannot tell a realistic spiral from a spiral-like artefact (any bright winding pattern
around a centre looks like arms), it does not check the arm count, pitch angle, profiles,
sizes or the population's parameter distributions, and it says nothing about sample quality
beyond the class. Faint arms under heavy noise or blur (pixel noise near 0.05 of the peak,
extra blur near 1 px at R = 32) are missed more often, so shares of such samples are biased
towards "disk". Ellipticals and armless disks overlap (a disk with a faint bulge and few clumps
resembles a Sersic n ~ 1 elliptical), which affects only the split of the non-spiral share.

References:
    LeCun, Bottou, Bengio and Haffner (1998), Gradient-Based Learning Applied to Document
    Recognition, Proc. IEEE 86(11).
    Lupton, Gunn and Szalay (1999), A modified magnitude system that produces well-behaved
    magnitudes, colors, and errors even for low signal-to-noise ratio measurements, AJ 118,
    1406 (asinh stretch).
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
from hierprior.data.galaxies import make_galaxies
from hierprior.data.mnist import check_value_range, from_value_range
from hierprior.evaluation.classifier import ImageClassifier
from hierprior.evaluation.digits import default_cache_dir
from hierprior.io import atomic_save

__all__ = ["CLASSES", "MorphologyClassifier", "load_morphology_classifier"]

#: the class names, in label order; only ``"spiral"`` (label 2) counts as spiral
CLASSES = ("elliptical", "disk", "spiral")

_FORMAT = 1
_KIND = "morphology_classifier"
_BETA = 0.1  # asinh softening of the second input channel
_TRAIN_SEED = 7_000_001  # epoch e: ellipticals 7_000_001 + 2 e, disks and spirals 7_000_002 + 2 e
_TEST_SEED = 7_100_001  # ellipticals, disks, spirals: 7_100_001, 7_100_002, 7_100_003
_MAX_EPOCHS = (_TEST_SEED - _TRAIN_SEED) // 2  # keeps training and test seeds disjoint
_PER_CLASS = 3000  # training galaxies per class and epoch
_TEST_PER_CLASS = 200
_BLUR_PX = 0.75  # largest extra blur sigma in pixels at R = 32 (scaled with R)
_NOISE = 0.05  # largest pixel noise sigma, in units of the peak
_BRIGHTNESS = (0.7, 1.0)
_OFFSET = 0.01
_DISK = {"arm_contrast": 0.0}


class MorphologyClassifier(ImageClassifier):
    r"""Small CNN that classifies (B, 1, R, R) galaxy images as elliptical, disk or spiral.

    Four conv-BN-ReLU stages (``width``, 2 ``width``, 4 ``width``, 4 ``width`` channels; 2x2
    max pooling between them), a global average pool and a two-layer head. Inputs are mapped
    from ``value_range`` to [0, 1] first, so one set of weights serves any value range; the
    network sees the intensities and their asinh stretch (see the module docstring).

    Arguments:
        resolution: The side R of the input images (R >= 8).
        value_range: The range (a, b) of the input pixel values.
        width: The number of channels of the first stage.
    """

    classes = CLASSES
    num_classes = len(CLASSES)

    def __init__(
        self,
        resolution: int = 32,
        value_range: Sequence[float] = (0.0, 1.0),
        width: int = 12,
    ):
        super().__init__()
        self.resolution = check_int(resolution, "resolution", 8)
        width = check_int(width, "width")
        self.value_range = check_value_range(value_range)
        self.width = width
        #: accuracy on the held-out test galaxies, set when trained or loaded (NaN if unknown)
        self.test_accuracy = math.nan
        #: accuracy per class name on the test galaxies (empty if unknown)
        self.class_accuracy: dict[str, float] = {}
        #: confusion matrix (true class, predicted class) of the test galaxies, int64 (3, 3)
        self.confusion = torch.zeros(3, 3, dtype=torch.long)
        #: wall-clock seconds the training took (NaN if unknown)
        self.train_seconds = math.nan

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            stage(2, width),
            nn.MaxPool2d(2),
            stage(width, 2 * width),
            nn.MaxPool2d(2),
            stage(2 * width, 4 * width),
            nn.MaxPool2d(2),
            stage(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * width, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, len(CLASSES)),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Returns the logits, with shape (B, 3), of images x with shape (B, 1, R, R)."""

        self._check(x)
        u = from_value_range(x.to(self.head[1].weight.dtype), self.value_range)
        stretched = torch.asinh(u / _BETA) / math.asinh(1 / _BETA)
        return self.head(self.features(torch.cat([u - 0.5, stretched - 0.5], dim=1)))


def _galaxies(seeds: Sequence[int], n: int, resolution: int) -> tuple[Tensor, Tensor]:
    """n ellipticals, n disks and n spirals in (0, 1) with labels 0, 1, 2 (int64)."""

    images = torch.cat(
        [
            make_galaxies("elliptical", n, resolution, seed=seeds[0], value_range=(0, 1)),
            make_galaxies(
                "spiral", n, resolution, seed=seeds[1], value_range=(0, 1), params=_DISK
            ),
            make_galaxies("spiral", n, resolution, seed=seeds[2], value_range=(0, 1)),
        ]
    )
    return images, torch.arange(len(CLASSES)).repeat_interleave(n)


def _blur(u: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of images u (B, 1, R, R), one width sigma (B,) in px each."""

    B, R = len(u), u.shape[-1]
    half = max(1, math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-half, half + 1, dtype=u.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    z = F.conv2d(
        F.pad(u.reshape(1, B, R, R), (half, half, 0, 0)), kernel[:, None, None, :], groups=B
    )
    z = F.conv2d(F.pad(z, (0, 0, half, half)), kernel[:, None, :, None], groups=B)
    return z.reshape(B, 1, R, R)


def _augment(u: Tensor, generator: torch.Generator) -> Tensor:
    """Random dihedral copy, extra blur, brightness, noise and offset of u (B, 1, R, R)."""

    B, R = len(u), u.shape[-1]

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(B, *shape, generator=generator)

    turns = torch.randint(0, 4, (B,), generator=generator)
    rotated = torch.stack([torch.rot90(u, k, (2, 3)) for k in range(4)])
    u = rotated[turns, torch.arange(B)]
    flip = torch.rand(B, generator=generator) < 0.5
    u = torch.where(flip[:, None, None, None], u.flip(-1), u)
    sigma = uniform(0.0, _BLUR_PX * R / 32) * (torch.rand(B, generator=generator) < 0.5)
    u = _blur(u, sigma)
    u = u * uniform(*_BRIGHTNESS, 1, 1, 1)
    u = u + uniform(0.0, _NOISE, 1, 1, 1) * torch.randn(u.shape, generator=generator)
    return u + uniform(-_OFFSET, _OFFSET, 1, 1, 1)


def _train(resolution: int, seed: int, epochs: int, width: int, log: bool) -> MorphologyClassifier:
    """Trains a classifier (value range (0, 1)) on fresh procedural galaxies, on the CPU."""

    generator = torch.Generator().manual_seed(seed)
    batch_size = 128
    steps = epochs * math.ceil(len(CLASSES) * _PER_CLASS / batch_size)
    start = time.perf_counter()
    # initialisation uses the global RNG: fork it so the caller's state survives
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MorphologyClassifier(resolution, (0.0, 1.0), width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.2
        )
        model.train()
        for epoch in range(epochs):
            paired = _TRAIN_SEED + 2 * epoch + 1
            x, y = _galaxies((_TRAIN_SEED + 2 * epoch, paired, paired), _PER_CLASS, resolution)
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
                    f"morphology classifier r{resolution}: epoch {epoch + 1}/{epochs}, "
                    f"loss {loss.item():.3f}, {elapsed:.0f} s"
                )
    model.eval()
    seeds = (_TEST_SEED, _TEST_SEED + 1, _TEST_SEED + 2)
    x_test, y_test = _galaxies(seeds, _TEST_PER_CLASS, resolution)
    predicted = model.classify(x_test)
    confusion = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    confusion.index_put_((y_test, predicted), torch.ones_like(y_test), accumulate=True)
    model.confusion = confusion
    model.test_accuracy = (predicted == y_test).float().mean().item()
    model.class_accuracy = {
        name: (confusion[k, k] / confusion[k].sum()).item() for k, name in enumerate(CLASSES)
    }
    if log:
        print(
            f"morphology classifier r{resolution}: test accuracy {model.test_accuracy:.3f}, "
            f"{time.perf_counter() - start:.0f} s"
        )
    return model


def load_morphology_classifier(
    resolution: int = 32,
    value_range: Sequence[float] = (0.0, 1.0),
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int = 12,
    retrain: bool = False,
    log: bool = False,
) -> MorphologyClassifier:
    """Loads the cached morphology classifier for a resolution, training and caching it if absent.

    Training (on the CPU, about 40 s at 32 px on 2 idle cores, much longer on busy ones; the
    time grows like R^2) is deterministic given ``seed`` and leaves the global RNG state and
    torch's thread count as they were (it runs on at most 2 threads). ``seed``, ``epochs`` and
    ``retrain`` only matter when training; an existing cache file is loaded as is.

    Arguments:
        resolution: The side R of the images to classify.
        value_range: The value range of the images to classify.
        cache_dir: The cache folder; default
            :func:`hierprior.evaluation.digits.default_cache_dir`.
        seed: Seed of initialisation, shuffling and augmentation (the galaxies have fixed
            seeds, see the module docstring).
        epochs: Training epochs, each over 9,000 fresh galaxies (3,000 per class).
        retrain: Train (and overwrite the cache) even if a cache file exists.
        log: Print the training progress.

    Returns:
        The classifier in eval mode, on the CPU, with ``test_accuracy``, ``class_accuracy``
        and ``confusion`` set.

    Example:
        >>> clf = load_morphology_classifier(resolution=32, value_range=(0, 1))
        >>> x = make_galaxies("spiral", 100, 32, seed=1, value_range=(0, 1))
        >>> share = (clf.classify(x) == CLASSES.index("spiral")).float().mean()  # about 1
    """

    resolution = check_int(resolution, "resolution", 8)
    epochs = check_int(epochs, "epochs", 1, _MAX_EPOCHS)
    seed = check_int(seed, "seed", None)
    value_range = check_value_range(value_range)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"morphology_classifier_r{resolution}.pt"

    if path.exists() and not retrain:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise RuntimeError(
                f"could not read the morphology classifier cache {str(path)!r} ({error}); "
                "delete it or pass retrain=True"
            ) from error
        if (
            not isinstance(state, dict)
            or state.get("kind") != _KIND
            or state.get("format") != _FORMAT
            or state.get("resolution") != resolution
        ):
            raise RuntimeError(
                f"{str(path)!r} is not a morphology classifier checkpoint for resolution "
                f"{resolution}; delete it or pass retrain=True"
            )
        try:
            model = MorphologyClassifier(resolution, value_range, int(state["width"]))
            model.load_state_dict(state["state_dict"])
            model.test_accuracy = float(state["test_accuracy"])
            model.class_accuracy = {k: float(v) for k, v in state["class_accuracy"].items()}
            model.confusion = torch.as_tensor(state["confusion"], dtype=torch.long)
            model.train_seconds = float(state["train_seconds"])
        except Exception as error:
            raise RuntimeError(
                f"the morphology classifier cache {str(path)!r} is damaged ({error}); delete "
                "it or pass retrain=True"
            ) from error
        return model.eval()

    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(min(threads, 2))  # tiny convolutions: more threads do not pay
        with torch.inference_mode(False), torch.enable_grad():  # callers may hold no_grad
            model = _train(resolution, seed, epochs, width=12, log=log)
    finally:
        torch.set_num_threads(threads)
    model.train_seconds = time.perf_counter() - start
    state = {
        "kind": _KIND,
        "format": _FORMAT,
        "resolution": resolution,
        "classes": list(CLASSES),
        "width": model.width,
        "seed": seed,
        "epochs": epochs,
        "train_seconds": model.train_seconds,
        "test_accuracy": model.test_accuracy,
        "class_accuracy": model.class_accuracy,
        "confusion": model.confusion,
        "state_dict": model.state_dict(),
    }
    atomic_save(state, path)
    model.value_range = value_range
    return model.eval()
