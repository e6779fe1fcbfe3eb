r"""Non-Gaussian image noise: spatially correlated Gaussian noise plus cosmic rays.

Real detector noise is rarely white. Two effects dominate astronomical images:

- **correlated noise** (resampling, drizzling, read-out electronics): here a stationary
  Gaussian field with unit marginal variance, a white part plus a smooth part,

  .. math::
      n = \sqrt{w}\, \varepsilon_1 + \sqrt{1 - w}\, (k * \varepsilon_2), \qquad
      k(\delta) \propto \exp(-|\delta|^2 / 2\ell^2), \quad \|k\|_2 = 1,

  with :math:`w` the white fraction of the variance and :math:`\ell` the correlation length
  in pixels. The convolution is done by FFT on a grid padded by :math:`\lceil 4\ell \rceil`
  pixels on each side (periodic there) and cropped, so the field is stationary and not
  periodic on the image; its covariance :math:`\mathrm{Cov}[n_p, n_q] = w\, \delta_{pq} + (1 -
  w) (k \star k)(p - q)` is computed exactly by :func:`correlated_noise_covariance`.
- **cosmic rays**: sparse, bright, positive tracks. Each image gets
  :math:`K \sim \mathrm{Poisson}(\lambda)` tracks; a track starts at a uniform pixel, runs
  1 to ``track_length`` pixels in one of the 8 grid directions and adds a constant amplitude
  :math:`a \sim U(a_{lo}, a_{hi})` (in units of the Gaussian part's standard deviation) to
  each pixel it crosses (pixels that leave the image are dropped).

:func:`noise_realisations` is a data target for prior training (``conf/data/slic_noise.yaml``):
a noise dataset is just another dataset for :func:`~hierprior.training.fit_prior`, whose
diffusion model then gives the noise score used by
:class:`~hierprior.physics.LearnedNoise` (SLIC).

All functions take a ``torch.Generator`` (or a seed) and never touch the global RNG.

References:
    Legin, Adam, Hezaveh & Perreault-Levasseur (2023), Beyond Gaussian Noise: A Generalized
    Approach to Likelihood Analysis with Non-Gaussian Noise, arXiv 2302.03046.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.checks import check_float, check_int, check_positive
from hierprior.diffusion.analytic import GaussianPrior
from hierprior.physics.learned_noise import LearnedNoise

__all__ = [
    "correlated_noise",
    "correlated_noise_covariance",
    "correlated_learned_noise",
    "cosmic_rays",
    "noise_realisations",
]

# the 8 grid directions of a cosmic-ray track (row step, column step)
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, -1), (-1, 0), (-1, -1), (-1, 1))


def _generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None: {generator!r}")
    return torch.Generator().manual_seed(generator)


def _check(n: int, size: int, white_fraction: float, correlation_length: float) -> None:
    check_int(n, "n")
    check_int(size, "size")
    check_float(white_fraction, "white_fraction", 0.0, maximum=1.0)
    check_positive(correlation_length, "correlation_length")


def _kernel_fft(size: int, correlation_length: float) -> tuple[Tensor, int]:
    """FFT of the unit-norm Gaussian kernel on the padded (L, L) grid, and the padding p."""
    pad = math.ceil(4 * correlation_length)
    length = size + 2 * pad
    idx = torch.arange(length, dtype=torch.float64)
    d = torch.minimum(idx, length - idx)  # periodic distance to pixel 0
    k1 = torch.exp(-0.5 * (d / correlation_length) ** 2)
    kernel = k1[:, None] * k1[None, :]
    kernel = kernel / kernel.square().sum().sqrt()
    return torch.fft.rfft2(kernel), pad


def correlated_noise(
    n: int,
    size: int,
    *,
    white_fraction: float = 0.5,
    correlation_length: float = 1.0,
    generator: torch.Generator | int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Stationary correlated Gaussian noise with unit marginal variance, shape (n, size, size).

    Arguments:
        n: number of realisations.
        size: image side in pixels.
        white_fraction: w, the white fraction of the variance, in [0, 1].
        correlation_length: l, the standard deviation of the Gaussian kernel in pixels (> 0).
        generator: a ``torch.Generator`` (CPU) or an int seed.
        dtype: output dtype (computed in float64).
    """
    _check(n, size, white_fraction, correlation_length)
    g = _generator(generator)
    kernel_ft, pad = _kernel_fft(size, correlation_length)
    length = size + 2 * pad
    eps = torch.randn(n, length, length, generator=g, dtype=torch.float64)
    smooth = torch.fft.irfft2(torch.fft.rfft2(eps) * kernel_ft, s=(length, length))
    smooth = smooth[:, pad : pad + size, pad : pad + size]
    white = torch.randn(n, size, size, generator=g, dtype=torch.float64)
    w = float(white_fraction)
    return (w**0.5 * white + (1 - w) ** 0.5 * smooth).to(dtype)


def correlated_noise_covariance(
    size: int, *, white_fraction: float = 0.5, correlation_length: float = 1.0
) -> Tensor:
    """The exact covariance of :func:`correlated_noise`, float64 with shape (size², size²).

    Pixels are flattened row-major (pixel (i, j) is entry i * size + j).
    """
    _check(1, size, white_fraction, correlation_length)
    kernel_ft, pad = _kernel_fft(size, correlation_length)
    length = size + 2 * pad
    auto = torch.fft.irfft2(kernel_ft.abs() ** 2, s=(length, length))  # (k * k)(delta), periodic
    i = torch.arange(size)
    di = (i[:, None] - i[None, :]) % length  # (size, size) row offsets
    c = auto[di[:, None, :, None], di[None, :, None, :]]  # [i, j, i', j'], (size,) * 4
    cov = c.reshape(size * size, size * size)
    w = float(white_fraction)
    return w * torch.eye(size * size, dtype=torch.float64) + (1 - w) * cov


def correlated_learned_noise(
    sigma: float,
    resolution: int,
    *,
    white_fraction: float = 0.5,
    correlation_length: float = 1.0,
    smoothing: float = 0.1,
    **options,
) -> LearnedNoise:
    r"""Correlated Gaussian image noise as a SLIC noise model with a *known* score.

    A :class:`~hierprior.physics.LearnedNoise` of unit ``scale = sigma`` whose denoiser is the
    exact :class:`~hierprior.diffusion.GaussianPrior` :math:`\mathcal{N}(0, C)` of
    :func:`correlated_noise` (C: :func:`correlated_noise_covariance`, unit marginal
    variance): the noise :math:`n = \sigma u`, :math:`u \sim \mathcal{N}(0, C)`, on images of
    shape (1, resolution, resolution). Every SLIC code path runs (Tweedie score of the smoothed
    density, line-integral log-density, diffusion sampling of realisations), but no network is
    trained, so a run with it measures EM with a non-Gaussian-interface likelihood, not the
    quality of a noise network; the posterior methods that need ``noise.gaussian`` refuse it
    as they refuse a trained one. A trained SLIC model is built with
    ``LearnedNoise(load_prior(...), scale)`` instead (``hierprior-train-prior
    experiment=slic_noise``).

    Arguments:
        sigma: the marginal standard deviation of the noise (its unit ``scale``), > 0.
        resolution: the image side in pixels.
        white_fraction, correlation_length: of :func:`correlated_noise`.
        smoothing: :class:`~hierprior.physics.LearnedNoise`'s ``smoothing`` s.
        options: further :class:`~hierprior.physics.LearnedNoise` options (``sampler``,
            ``steps``, ``batch_size``, ...).
    """
    check_positive(sigma, "sigma")
    cov = correlated_noise_covariance(
        resolution, white_fraction=white_fraction, correlation_length=correlation_length
    ).float()
    denoiser = GaussianPrior(torch.zeros(resolution**2), cov)
    return LearnedNoise(denoiser, float(sigma), smoothing, (1, resolution, resolution), **options)


def cosmic_rays(
    n: int,
    size: int,
    *,
    rate: float = 1.0,
    amplitude: tuple[float, float] = (5.0, 25.0),
    track_length: int = 3,
    generator: torch.Generator | int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sparse cosmic-ray tracks, shape (n, size, size) (zero where no track passes).

    Arguments:
        n: number of images.
        size: image side in pixels.
        rate: lambda, the mean number of tracks per image (>= 0).
        amplitude: (a_lo, a_hi), the range of the uniform track amplitude (0 <= a_lo <= a_hi).
        track_length: the longest track in pixels (lengths are uniform in 1..track_length).
        generator: a ``torch.Generator`` (CPU) or an int seed.
        dtype: output dtype.
    """
    _check(n, size, 0.0, 1.0)
    check_float(rate, "rate")
    lo, hi = (float(a) for a in amplitude)
    if not (0 <= lo <= hi and math.isfinite(hi)):
        raise ValueError(f"amplitude must be (lo, hi) with 0 <= lo <= hi, got {amplitude!r}")
    check_int(track_length, "track_length")
    g = _generator(generator)
    counts = torch.poisson(torch.full((n,), float(rate), dtype=torch.float64), generator=g)
    image = torch.repeat_interleave(torch.arange(n), counts.long())
    k = image.numel()
    rows = torch.randint(size, (k,), generator=g)
    cols = torch.randint(size, (k,), generator=g)
    lengths = torch.randint(1, track_length + 1, (k,), generator=g)
    direction = torch.tensor(_DIRECTIONS)[torch.randint(len(_DIRECTIONS), (k,), generator=g)]
    amp = lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)
    out = torch.zeros(n, size, size, dtype=torch.float64)
    for step in range(track_length):
        r = rows + step * direction[:, 0]
        c = cols + step * direction[:, 1]
        keep = (step < lengths) & (r >= 0) & (r < size) & (c >= 0) & (c < size)
        out.index_put_((image[keep], r[keep], c[keep]), amp[keep], accumulate=True)
    return out.to(dtype)


def noise_realisations(
    n: int = 50_000,
    resolution: int = 16,
    *,
    white_fraction: float = 0.5,
    correlation_length: float = 1.0,
    cosmic_ray_rate: float = 1.0,
    amplitude: tuple[float, float] | list[float] = (5.0, 25.0),
    track_length: int = 3,
    flatten: bool = False,
    seed: int = 0,
    value_range: tuple[float, float] | list[float] | None = None,
) -> Tensor:
    """Noise realisations for training a noise score model: correlated noise + cosmic rays.

    In units of the Gaussian part's standard deviation. A data ``_target_`` of
    ``hierprior-train-prior`` (``conf/data/slic_noise.yaml``).

    Arguments:
        n: number of realisations.
        resolution: image side in pixels.
        white_fraction, correlation_length: see :func:`correlated_noise`.
        cosmic_ray_rate, amplitude, track_length: see :func:`cosmic_rays` (rate 0: none).
        flatten: return vectors (n, resolution²) (for an MLP score model) instead of images
            (n, 1, resolution, resolution).
        seed: the seed of the realisations.
        value_range: the display range of the training sample grids (read by the training
            callbacks from the data config; unused here).

    Returns:
        float32 realisations with shape (n, 1, resolution, resolution), or (n, resolution²)
        with ``flatten``.
    """
    g = torch.Generator().manual_seed(int(seed))
    noise = correlated_noise(
        n,
        resolution,
        white_fraction=white_fraction,
        correlation_length=correlation_length,
        generator=g,
        dtype=torch.float64,
    )
    if cosmic_ray_rate > 0:
        noise = noise + cosmic_rays(
            n,
            resolution,
            rate=cosmic_ray_rate,
            amplitude=tuple(amplitude),
            track_length=track_length,
            generator=g,
            dtype=torch.float64,
        )
    noise = noise.float()
    return noise.reshape(n, resolution**2) if flatten else noise.unsqueeze(1)
