"""Evaluators for EM runs: callables that map prior samples to a dict of scalar metrics.

:class:`DigitShare` classifies digit images with the cached digit classifier and reports the
share of samples classified as a target set of digits (e.g. 5-9 for the MNIST 0-4 -> 5-9 demo),
the classifier's mean confidence on them, and the share of each digit. :class:`SpiralShare`
does the same for galaxy images with the cached morphology classifier
(:mod:`hierprior.evaluation.morphology`): the shares of spirals (arms), armless disks and
ellipticals. :class:`ArmStrength` measures the arms themselves, with no classifier: the mean
deprojected log-spiral Fourier amplitude of the samples
(:func:`hierprior.evaluation.structure.arm_strength`), which size or pixel noise cannot fake.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ArmStrength", "DigitShare", "SpiralShare"]


class DigitShare:
    """Share of image samples (B, 1, R, R) classified as one of ``digits``.

    Arguments:
        digits: the target digits, e.g. (5, 6, 7, 8, 9).
        resolution: image resolution R (the classifier is trained at it and cached).
        value_range: the images' value range.
        cache_dir: where the classifier is cached (default: HIERPRIOR_CACHE or
            ~/.cache/hierprior).
        per_digit: also report the share of each digit 0-9.
        epochs: training epochs of the classifier when it is not cached yet (None: the
            loader's default).
    """

    def __init__(
        self,
        digits: Sequence[int],
        resolution: int = 28,
        value_range: Sequence[float] = (-1.0, 1.0),
        cache_dir: str | None = None,
        per_digit: bool = False,
        epochs: int | None = None,
    ):
        digits = [int(d) for d in digits]
        if not digits or any(d < 0 or d > 9 for d in digits):
            raise ValueError(f"digits must be a non-empty subset of 0-9, got {digits}")
        self.digits = digits
        self.resolution = int(resolution)
        self.value_range = tuple(float(v) for v in value_range)
        self.cache_dir = cache_dir
        self.per_digit = per_digit
        self.epochs = epochs
        self._classifier = None

    @property
    def name(self) -> str:
        return "share_" + "".join(str(d) for d in self.digits)

    def classifier(self):
        if self._classifier is None:
            from hierprior.evaluation.digits import load_digit_classifier

            self._classifier = load_digit_classifier(
                resolution=self.resolution,
                value_range=self.value_range,
                cache_dir=self.cache_dir,
                **({} if self.epochs is None else {"epochs": int(self.epochs)}),
            )
        return self._classifier

    def __call__(self, samples: Tensor) -> dict[str, float]:
        if samples.ndim != 4 or samples.shape[1] != 1:
            raise ValueError(f"DigitShare needs images (B, 1, R, R), got {tuple(samples.shape)}")
        clf = self.classifier()  # trained on first use (outside no_grad)
        with torch.no_grad():
            proba = clf.predict_proba(samples.float().cpu())
        labels = proba.argmax(-1)
        target = torch.isin(labels, torch.tensor(self.digits))
        out = {
            self.name: float(target.float().mean()),
            "classifier_confidence": float(proba.max(-1).values.mean()),
        }
        if self.per_digit:
            counts = torch.bincount(labels, minlength=10).float() / len(labels)
            out.update({f"digit_{d}": float(counts[d]) for d in range(10)})
        return out


class SpiralShare:
    """Shares of galaxy images (B, 1, R, R) classified as spiral, disk and elliptical.

    Only "spiral" (arms) counts as spiral; an armless disk does not (see
    :mod:`hierprior.evaluation.morphology` for the classes and what the classifier cannot see).

    Arguments:
        resolution: image resolution R (the classifier is trained at it and cached).
        value_range: the images' value range.
        cache_dir: where the classifier is cached (default: HIERPRIOR_CACHE or
            ~/.cache/hierprior).
        epochs: training epochs of the classifier when it is not cached yet (None: the
            loader's default).
    """

    name = "share_spiral"

    def __init__(
        self,
        resolution: int = 32,
        value_range: Sequence[float] = (0.0, 1.0),
        cache_dir: str | None = None,
        epochs: int | None = None,
    ):
        self.resolution = int(resolution)
        self.value_range = tuple(float(v) for v in value_range)
        self.cache_dir = cache_dir
        self.epochs = epochs
        self._classifier = None

    def classifier(self):
        if self._classifier is None:
            from hierprior.evaluation.morphology import load_morphology_classifier

            self._classifier = load_morphology_classifier(
                resolution=self.resolution,
                value_range=self.value_range,
                cache_dir=self.cache_dir,
                **({} if self.epochs is None else {"epochs": int(self.epochs)}),
            )
        return self._classifier

    def __call__(self, samples: Tensor) -> dict[str, float]:
        R = self.resolution
        if (
            samples.ndim == 4
            and samples.shape[1] == 1
            and samples.shape[-1] == samples.shape[-2]
            and samples.shape[-1] > R
            and samples.shape[-1] % R == 0
        ):
            # galaxies span the same field at any resolution: pool k R px images to R px
            samples = torch.nn.functional.avg_pool2d(samples.float(), samples.shape[-1] // R)
        if samples.ndim != 4 or samples.shape[1:] != (1, R, R) or len(samples) == 0:
            raise ValueError(
                f"SpiralShare needs images (B>0, 1, {R}, {R}) (or (B, 1, kR, kR), pooled to R), "
                f"got {tuple(samples.shape)}"
            )
        clf = self.classifier()  # trained on first use (outside no_grad)
        with torch.no_grad():
            proba = clf.predict_proba(samples.float().cpu())
        shares = torch.bincount(proba.argmax(-1), minlength=3).float() / len(proba)
        return {
            "share_spiral": float(shares[2]),
            "share_disk": float(shares[1]),
            "share_elliptical": float(shares[0]),
            "morphology_confidence": float(proba.max(-1).values.mean()),
        }


class ArmStrength:
    """Mean arm strength of galaxy images (B, 1, H, W): the deprojected log-spiral Fourier
    amplitude (:func:`hierprior.evaluation.structure.arm_strength`; spirals of the procedural
    generator score ~0.2, armless disks and ellipticals ~0.01), and the share of images above
    ``threshold``.

    Arguments:
        value_range: the images' value range (intensities are x - value_range[0]).
        threshold: the arm strength above which an image counts as armed (``share_armed``).
    """

    def __init__(self, value_range: Sequence[float] = (0.0, 1.0), threshold: float = 0.08):
        self.value_range = tuple(float(v) for v in value_range)
        self.threshold = float(threshold)

    def __call__(self, samples: Tensor) -> dict[str, float]:
        from hierprior.evaluation.structure import arm_strength

        a = arm_strength(samples, self.value_range)
        return {
            "arm_strength": float(a.mean()),
            "share_armed": float((a > self.threshold).float().mean()),
        }
