r"""Populations for latent-mass-map EM: lensed images of known sources through perturbed lenses.

:func:`simulate_mass_map_population` simulates N observations

.. math:: y_i = P * \big[s_i(\boldsymbol\theta - \boldsymbol\alpha_{\text{macro},i}
    - \boldsymbol\alpha_{\text{pert},i})\big] + n_i

where the perturbation (subhalos + multipoles, :class:`~hierprior.populations.PerturbedLenses`)
is analytic, and returns them as a :class:`~hierprior.em.Population` whose forward model is
the *latent* model :class:`~hierprior.physics.lensing.LatentMassMap` (macro model and source
known, the pixelated δκ unknown). The truth of observation i is its perturbation's convergence
averaged over each δκ pixel (``truth_supersample``² points per pixel), divided by
``kappa_scale`` (the latent's unit): for evaluation only. A pixelated δκ cannot reproduce the
analytic perturbation exactly (cusps below the pixel scale, mass outside the grid), so even the
true δκ leaves a small residual; :func:`truth_residual_chi2` measures it.

Random streams: lenses (seed, "lens"), sources (seed, "source"), noise (seed, "noise").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hierprior.checks import check_int
from hierprior.em.population import Population
from hierprior.physics import GaussianNoise, NoiseModel
from hierprior.physics.lensing import Lensing
from hierprior.physics.lensing.latent import LatentMassMap
from hierprior.populations.perturbed_lenses import PerturbedLenses
from hierprior.populations.truths import GalaxyImages
from hierprior.seeds import derived_generator

__all__ = ["simulate_mass_map_population", "true_kappa_map"]


def true_kappa_map(
    perturbation, kappa_size: int, kappa_fov: float, supersample: int = 4
) -> Tensor:
    """The perturbation's convergence averaged over each pixel of the δκ grid: (N, 1, n, n)
    (float64), from supersample x supersample points per pixel."""
    m = kappa_size * supersample
    step = kappa_fov / m
    c = (torch.arange(m, dtype=torch.float64) + 0.5) * step - kappa_fov / 2
    n_obs = perturbation.num_obs
    x = c[None, :].expand(m, m)
    y = c[:, None].expand(m, m)
    if n_obs is not None:
        x, y = x.expand(n_obs, m, m), y.expand(n_obs, m, m)
    k = perturbation.convergence(x, y).reshape(-1, 1, m, m)
    return torch.nn.functional.avg_pool2d(k, supersample)


def simulate_mass_map_population(
    num_obs: int,
    seed: int = 0,
    lenses: PerturbedLenses | None = None,
    source: Callable[[int, torch.Generator], Tensor] | None = None,
    noise: NoiseModel | None = None,
    kappa_size: int = 24,
    kappa_fov: float = 3.84,
    kappa_scale: float = 0.05,
    image_size: int = 48,
    pixel_scale: float = 0.08,
    source_fov: float = 2.0,
    supersample: int = 1,
    psf_fwhm: float | None = 0.1,
    truth_supersample: int = 4,
    dtype: str = "float32",
) -> Population:
    """Simulates a latent-mass-map population (see the module docstring).

    Arguments:
        num_obs: N.
        seed: the population's seed.
        lenses: the lens generator (default: ``PerturbedLenses()``).
        source: the source generator ``source(n, generator) -> (n, 1, R, R)`` in [0, 1]
            (default: 32 px spirals); the sources are known to the E-step.
        noise: the noise model (default: ``GaussianNoise(0.02)``).
        kappa_size, kappa_fov, kappa_scale: the δκ grid (n pixels over kappa_fov arcsec) and
            the latent's unit (x = δκ / kappa_scale).
        image_size, pixel_scale, source_fov, supersample, psf_fwhm: the imaging (as
            :class:`~hierprior.physics.lensing.Lensing`).
        truth_supersample: points per δκ pixel side for the true maps.
        dtype: of the observations and the forward model ("float32" or "float64").
    """
    check_int(num_obs, "num_obs")
    lenses = lenses if lenses is not None else PerturbedLenses()
    source = source if source is not None else GalaxyImages("spiral", 32, (0.0, 1.0))
    noise = noise if noise is not None else GaussianNoise(0.02)
    if not isinstance(noise, NoiseModel):
        raise TypeError(f"noise must be a hierprior NoiseModel; got {type(noise).__name__}")
    dt = {"float32": torch.float32, "float64": torch.float64}.get(dtype)
    if dt is None:
        raise ValueError(f"dtype must be 'float32' or 'float64'; got {dtype!r}")
    draw = lenses(num_obs, derived_generator(seed, "lens"))
    src = source(num_obs, derived_generator(seed, "source")).to(torch.float64)
    if src.dim() != 4 or src.shape[1] != 1 or src.shape[0] != num_obs:
        raise ValueError(f"the source generator must return (N, 1, R, R); got {tuple(src.shape)}")
    true_lens = Lensing(
        draw.mass(), image_size, pixel_scale, src.shape[-1], source_fov, supersample, psf_fwhm
    )
    with torch.no_grad():
        clean = true_lens(src).to(dt)
    y = clean + noise.sample(
        tuple(clean.shape), generator=derived_generator(seed, "noise"), dtype=dt
    )
    truth = true_kappa_map(draw.perturbation(), kappa_size, kappa_fov, truth_supersample)
    forward = LatentMassMap(
        draw.macro(),
        src.to(dt),
        kappa_size,
        kappa_fov,
        image_size,
        pixel_scale,
        source_fov,
        supersample,
        psf_fwhm,
        kappa_scale,
    )
    meta = {
        "seed": seed,
        "num_subhalos": [int(v) for v in draw["num_subhalos"].tolist()],
        "kappa_scale": kappa_scale,
    }
    return Population(
        y=y, forward=forward, noise=noise, truth=(truth / kappa_scale).to(dt), meta=meta
    )
