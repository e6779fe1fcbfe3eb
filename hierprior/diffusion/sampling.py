r"""Unconditional samplers: plain functions of a denoiser, a time grid and a generator.

All samplers walk a decreasing time grid :math:`1 = t_0 > t_1 > \dots > t_{n} = 0`
(:meth:`~hierprior.diffusion.schedule.Schedule.timesteps`) from
:math:`x_{t_0} = \sigma_{t_0} \varepsilon` and return the denoised estimate at the end.
With :math:`\hat x = D(x_t, t)` and a step from t to r < t:

- **DDPM** (ancestral): draw from :math:`q(x_r \mid x_t, x = \hat x)`, with
  :math:`\alpha_{t|r} = \alpha_t / \alpha_r`, :math:`\sigma_{t|r}^2 = \sigma_t^2 -
  \alpha_{t|r}^2 \sigma_r^2`, mean
  :math:`\frac{\alpha_{t|r} \sigma_r^2}{\sigma_t^2} x_t + \frac{\alpha_r \sigma_{t|r}^2}
  {\sigma_t^2} \hat x` and variance :math:`\sigma_{t|r}^2 \sigma_r^2 / \sigma_t^2`.
- **DDIM** (eta): :math:`x_r = \alpha_r \hat x + \sqrt{\sigma_r^2 - c^2}\, \hat\varepsilon
  + c z` with :math:`\hat\varepsilon = (x_t - \alpha_t \hat x)/\sigma_t` and
  :math:`c = \eta \sigma_{t|r} \sigma_r / \sigma_t` (eta = 1 is DDPM, eta = 0 deterministic).
- **Heun** (EDM's second-order probability-flow ODE solver) in the rescaled variable
  :math:`z = x_t / \alpha_t` with noise level :math:`s = \sigma_t / \alpha_t`:
  :math:`dz/ds = (z - D)/s`.

DDPM and DDIM use one denoiser evaluation per step; Heun uses two (one on the last step).

References:
    Ho et al. (2020), arXiv 2006.11239; Song, Meng & Ermon (2021), DDIM, arXiv 2010.02502;
    Karras et al. (2022), EDM, arXiv 2206.00364.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hierprior.diffusion.denoiser import Denoiser
from hierprior.io import device_dtype

__all__ = ["sample", "ddpm_sampler", "ddim_sampler", "heun_sampler", "SAMPLERS", "initial_noise"]


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _coeffs(denoiser: Denoiser, t: Tensor) -> tuple[float, float]:
    alpha, sigma = denoiser.schedule.alpha_sigma(t.double())
    return float(alpha), float(sigma)


def initial_noise(
    denoiser: Denoiser,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """x at t = 1: sigma_1 * eps, with shape (n, *event_shape)."""
    _, sigma = _coeffs(denoiser, torch.tensor(1.0))
    eps = torch.randn((n, *denoiser.event_shape), generator=generator, device=device, dtype=dtype)
    return sigma * eps


def ddpm_sampler(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling from x at timesteps[0]; x with shape (B, *event_shape)."""
    return ddim_sampler(denoiser, x, timesteps, generator=generator, eta=1.0, progress=progress)


def ddim_sampler(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    progress: bool = False,
) -> Tensor:
    """DDIM sampling with stochasticity eta in [0, 1]; x with shape (B, *event_shape)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    n = len(timesteps) - 1
    for i in _progress(range(n), progress, "ddim" if eta < 1 else "ddpm"):
        t, r = timesteps[i], timesteps[i + 1]
        x_hat = denoiser(x, t)
        if i == n - 1:
            return x_hat
        a_t, s_t = _coeffs(denoiser, t)
        a_r, s_r = _coeffs(denoiser, r)
        a_tr = a_t / a_r
        var_tr = max(s_t**2 - a_tr**2 * s_r**2, 0.0)
        c = eta * (var_tr**0.5) * s_r / s_t
        eps_hat = (x - a_t * x_hat) / s_t
        x = a_r * x_hat + max(s_r**2 - c**2, 0.0) ** 0.5 * eps_hat
        if c > 0:
            x = x + c * _randn_like(x, generator)
    return x


def heun_sampler(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Heun's method on the probability-flow ODE; x with shape (B, *event_shape).

    Deterministic given x; ``generator`` is accepted for a uniform signature.
    """
    n = len(timesteps) - 1
    a, _ = _coeffs(denoiser, timesteps[0])
    z = x / a
    for i in _progress(range(n), progress, "heun"):
        t, r = timesteps[i], timesteps[i + 1]
        a_t, s_t = _coeffs(denoiser, t)
        d = (z - denoiser(a_t * z, t)) / (s_t / a_t)
        if i == n - 1:
            return z - (s_t / a_t) * d  # Euler step to s = 0: the denoised estimate
        a_r, s_r = _coeffs(denoiser, r)
        ds = s_r / a_r - s_t / a_t
        z_euler = z + ds * d
        d_r = (z_euler - denoiser(a_r * z_euler, r)) / (s_r / a_r)
        z = z + ds * (d + d_r) / 2
    return z


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sampler,
    "ddim": ddim_sampler,
    "heun": heun_sampler,
}


@torch.no_grad()
def sample(
    prior: Denoiser,
    n: int,
    method: str = "ddpm",
    steps: int = 256,
    generator: torch.Generator | None = None,
    *,
    spacing: str = "edm",
    eta: float = 0.0,
    progress: bool = False,
    batch_size: int | None = None,
    x_init: Tensor | None = None,
) -> Tensor:
    """Draws n samples from a diffusion prior, with shape (n, *prior.event_shape).

    Arguments:
        prior: any :class:`~hierprior.diffusion.denoiser.Denoiser` (analytic, neural, or a
            posterior wrapper).
        n: number of samples.
        method: ``"ddpm"``, ``"ddim"`` (with ``eta``) or ``"heun"``.
        steps: number of time steps (>= 1).
        generator: source of all randomness (on the prior's device).
        spacing: time grid, ``"edm"`` or ``"uniform"`` (see ``Schedule.timesteps``).
        batch_size: split the n samples into batches of this size (memory).
        x_init: optional initial noise at t = 1, with shape (n, *event_shape).
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if method != "ddim" and eta != 0.0:
        raise ValueError(f"eta is a DDIM option; method {method!r} does not take it")
    device, dtype = device_dtype(prior)
    timesteps = prior.schedule.timesteps(steps, spacing=spacing, device=device)
    if x_init is None:
        x_init = initial_noise(prior, n, generator=generator, device=device, dtype=dtype)
    elif tuple(x_init.shape) != (n, *prior.event_shape):
        raise ValueError(f"x_init must have shape {(n, *prior.event_shape)}, got {x_init.shape}")
    kwargs = {"eta": eta} if method == "ddim" else {}
    fn = SAMPLERS[method]
    if batch_size is None or batch_size >= n:
        return fn(prior, x_init, timesteps, generator=generator, progress=progress, **kwargs)
    out = [
        fn(prior, chunk, timesteps, generator=generator, progress=progress, **kwargs)
        for chunk in x_init.split(batch_size)
    ]
    return torch.cat(out)
