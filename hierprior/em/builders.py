"""Populations built from configuration: dataset + forward model + noise + seed.

:func:`make_mnist_population` is the population of the MNIST demo: digits (e.g. 5-9) observed
through a per-observation random mask and additive Gaussian noise,
:math:`y_i = m_i \\odot x_i + \\sigma \\varepsilon_i`. Masks are either independent pixels
(``mask="pixels"``: each pixel hidden with probability ``missing_fraction``) or one random
square patch per observation (``mask="patch"``: a square covering ``missing_fraction`` of the
image). Everything is drawn from a generator seeded by ``seed``, so the same config gives the
same population.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hierprior.em.population import Population
from hierprior.physics import GaussianNoise, Mask

__all__ = ["make_mnist_population", "random_masks"]


def random_masks(
    n: int, shape: tuple[int, ...], kind: str, missing_fraction: float, generator: torch.Generator
) -> Tensor:
    """Observation masks (1 = observed), with shape (n, *shape) for images shape (C, H, W)."""
    if not 0.0 <= missing_fraction < 1.0:
        raise ValueError(f"missing_fraction must lie in [0, 1), got {missing_fraction}")
    c, h, w = shape
    if kind == "pixels":
        keep = torch.rand((n, 1, h, w), generator=generator) >= missing_fraction
    elif kind == "patch":
        side = int(round((missing_fraction * h * w) ** 0.5))
        keep = torch.ones((n, 1, h, w), dtype=torch.bool)
        if side > 0:
            top = torch.randint(0, h - side + 1, (n,), generator=generator)
            left = torch.randint(0, w - side + 1, (n,), generator=generator)
            for i in range(n):
                keep[i, :, top[i] : top[i] + side, left[i] : left[i] + side] = False
    else:
        raise ValueError(f"unknown mask kind {kind!r}; expected 'pixels' or 'patch'")
    return keep.expand(n, c, h, w).float()


def make_mnist_population(
    digits: Sequence[int] = (5, 6, 7, 8, 9),
    num_obs: int = 1000,
    resolution: int = 16,
    mask: str = "pixels",
    missing_fraction: float = 0.5,
    noise_sigma: float = 0.2,
    seed: int = 0,
    source: str = "auto",
    root: str | None = None,
    split: str = "all",
    value_range: Sequence[float] = (-1.0, 1.0),
) -> Population:
    """A population of corrupted MNIST digits (truth kept for evaluation only)."""
    from hierprior.data import load_mnist

    images, labels = load_mnist(
        digits=tuple(digits),
        resolution=resolution,
        root=root,
        source=source,
        split=split,
        value_range=tuple(value_range),
    )
    g = torch.Generator().manual_seed(int(seed))
    if num_obs > len(images):
        raise ValueError(
            f"num_obs={num_obs} but only {len(images)} images of digits "
            f"{list(digits)} are available"
        )
    pick = torch.randperm(len(images), generator=g)[:num_obs]
    truth, labels = images[pick], labels[pick]
    masks = random_masks(num_obs, tuple(truth.shape[1:]), mask, missing_fraction, g)
    forward = Mask(masks)
    noise = GaussianNoise(float(noise_sigma))
    y = forward(truth) + noise.sample(truth.shape, generator=g, dtype=truth.dtype)
    meta = {
        "dataset": "mnist",
        "digits": list(digits),
        "labels": labels.tolist(),
        "mask": mask,
        "missing_fraction": missing_fraction,
        "noise_sigma": noise_sigma,
        "seed": int(seed),
    }
    return Population(y=y, forward=forward, noise=noise, truth=truth, meta=meta)
