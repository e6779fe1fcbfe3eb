r"""Gaussian random fields: smooth convergence maps (the wrong round-0 population of δκ priors).

:func:`make_gaussian_random_fields` draws white Gaussian noise on an R x R grid, smooths it with
a Gaussian of standard deviation ``scale`` pixels (periodic, by FFT), i.e. a field with power
spectrum :math:`P(k) \propto \exp(-k^2 \ell^2)`, and rescales every field to standard
deviation ``amplitude`` over the population (one factor for all fields, so amplitudes still
vary between them). Deterministic per ``seed``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.checks import check_float, check_int

__all__ = ["make_gaussian_random_fields"]


def make_gaussian_random_fields(
    n: int,
    resolution: int = 16,
    amplitude: float = 0.05,
    scale: float = 2.0,
    seed: int = 0,
    mean: float = 0.0,
    val_fraction: float = 0.0,
) -> Tensor:
    """n Gaussian random fields, float32 with shape (n, 1, resolution, resolution).

    Arguments:
        n: the number of fields.
        resolution: R, pixels per side.
        amplitude: the fields' standard deviation (over all pixels of all fields).
        scale: the correlation length, in pixels (the Gaussian smoothing's sigma; 0: white).
        seed: the data set's seed.
        mean: a constant added to every field.
        val_fraction: accepted for the data-config convention; unused here.
    """
    check_int(n, "make_gaussian_random_fields: n")
    check_int(resolution, "make_gaussian_random_fields: resolution")
    check_float(amplitude, "make_gaussian_random_fields: amplitude")
    check_float(scale, "make_gaussian_random_fields: scale")
    g = torch.Generator().manual_seed(int(seed))
    white = torch.randn(n, 1, resolution, resolution, generator=g, dtype=torch.float64)
    if scale > 0:
        k = torch.fft.fftfreq(resolution, dtype=torch.float64) * 2 * math.pi
        k2 = k[:, None] ** 2 + k[None, :] ** 2
        field = torch.fft.ifft2(torch.fft.fft2(white) * torch.exp(-0.5 * k2 * scale**2)).real
    else:
        field = white
    field = field * (amplitude / field.std().clamp_min(1e-300)) + mean
    return field.to(torch.float32)
