r"""Noise schedules of the forward (noising) process.

A schedule maps a diffusion time :math:`t \in [0, 1]` to the coefficients of

.. math:: x_t = \alpha_t x + \sigma_t \varepsilon, \qquad \varepsilon \sim \mathcal{N}(0, I).

Samplers and denoisers also use the *noise-to-signal ratio* :math:`s_t = \sigma_t / \alpha_t`,
the noise level of the rescaled variable :math:`x_t / \alpha_t = x + s_t \varepsilon` (EDM's
:math:`\sigma`). Every schedule here has :math:`s_t` strictly increasing in :math:`t`, so it can
be inverted (:meth:`Schedule.t_from_ratio`) and time grids can be laid out in :math:`s`.

- :class:`VPSchedule` (variance preserving, DDPM's linear :math:`\beta`):
  :math:`\log \alpha_t = -\tfrac14 t^2 (\beta_1 - \beta_0) - \tfrac12 t \beta_0`,
  :math:`\sigma_t = \sqrt{1 - \alpha_t^2}`.
- :class:`VESchedule` (variance exploding): :math:`\alpha_t = 1`,
  :math:`\sigma_t = \sigma_{min} (\sigma_{max} / \sigma_{min})^t`.

Time grids are laid out here and nowhere else (:meth:`Schedule.timesteps`); their names are
:data:`SPACINGS`. Which grid a sampler uses by default is
:func:`hierprior.diffusion.sampling.default_spacing`.

References:
    Ho et al. (2020), Denoising Diffusion Probabilistic Models, arXiv 2006.11239.
    Song et al. (2021), Score-Based Generative Modeling through SDEs, arXiv 2011.13456.
    Karras et al. (2022), Elucidating the Design Space of Diffusion Models, arXiv 2206.00364.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.checks import check_choice, check_int

__all__ = ["Schedule", "VPSchedule", "VESchedule", "get_schedule", "SPACINGS", "check_spacing"]

#: the time grids of :meth:`Schedule.timesteps`: uniform in t, EDM's (uniform in s^(1/rho)),
#: uniform in log s (the log-SNR: the multistep solvers' grid)
SPACINGS = ("edm", "uniform", "logsnr")


def check_spacing(spacing: object) -> str:
    """One of :data:`SPACINGS`, or a one-line ValueError."""
    return check_choice(spacing, "time spacing", SPACINGS)


class Schedule:
    """Base class: subclasses implement :meth:`alpha_sigma` for times with any shape."""

    #: smallest time used by training and samplers (the grid ends at exactly 0)
    t_min: float = 1e-3

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (alpha_t, sigma_t), each with the shape of t."""
        raise NotImplementedError

    def config(self) -> dict:
        """Plain keyword arguments that rebuild this schedule (checkpoints, configs)."""
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Tensor) -> Tensor:
        return self.alpha_sigma(t)[1]

    def coefficients(self, t: Tensor | float) -> tuple[float, float]:
        """(alpha_t, sigma_t) at one time t, computed in float64, as Python floats."""
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t).double())
        return float(alpha), float(sigma)

    def ratio(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio s_t = sigma_t / alpha_t, with the shape of t."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_from_ratio(self, s: Tensor, iterations: int = 60) -> Tensor:
        """Inverts s_t = sigma_t / alpha_t by bisection on [0, 1]; s with any shape."""
        s = torch.as_tensor(s, dtype=torch.float64)
        lo = torch.zeros_like(s)
        hi = torch.ones_like(s)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            above = self.ratio(mid) > s
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        return (lo + hi) / 2

    def timesteps(
        self,
        steps: int,
        spacing: str = "edm",
        rho: float = 7.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """Decreasing time grid for a sampler, with shape (steps + 1,).

        The grid starts at t = 1, visits ``steps - 1`` intermediate times down to ``t_min``
        and ends at exactly 0, where a sampler returns the denoised estimate. ``spacing`` is
        ``"uniform"`` (uniform in t), ``"edm"`` (uniform in s^(1/rho), Karras et al. 2022),
        which concentrates steps at low noise, or ``"logsnr"`` (uniform in log s, i.e. in the
        log-SNR, the variable of the multistep solvers: DPM-Solver++'s grid).
        """
        check_int(steps, "steps")
        check_spacing(spacing)
        if steps == 1:
            return torch.tensor([1.0, 0.0], device=device, dtype=dtype)
        if spacing == "uniform":
            grid = torch.linspace(1.0, self.t_min, steps, dtype=torch.float64)
        else:  # a grid in the noise level s, inverted to times
            s_max = float(self.ratio(torch.tensor(1.0, dtype=torch.float64)))
            s_min = float(self.ratio(torch.tensor(self.t_min, dtype=torch.float64)))
            u = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
            if spacing == "edm":
                s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            else:  # logsnr
                s = torch.exp(math.log(s_max) + u * (math.log(s_min) - math.log(s_max)))
            grid = self.t_from_ratio(s)
            grid[0] = 1.0
        grid = torch.cat([grid, grid.new_zeros(1)])
        return grid.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class VPSchedule(Schedule):
    """Variance-preserving schedule with DDPM's linear beta(t) = beta_0 + t (beta_1 - beta_0)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t)
        log_alpha = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2 * log_alpha))
        return alpha, sigma

    def config(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


class VESchedule(Schedule):
    """Variance-exploding schedule: alpha_t = 1, sigma_t geometric from sigma_min to sigma_max."""

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 100.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t)
        sigma = self.sigma_min * torch.exp(t * math.log(self.sigma_max / self.sigma_min))
        return torch.ones_like(sigma), sigma

    def t_from_ratio(self, s: Tensor, iterations: int = 60) -> Tensor:
        s = torch.as_tensor(s, dtype=torch.float64)
        t = torch.log(s / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return t.clamp(0.0, 1.0)

    def config(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


_SCHEDULES = {"vp": VPSchedule, "ve": VESchedule}


def get_schedule(name: str | Schedule, **kwargs) -> Schedule:
    """Returns a schedule by name (``"vp"`` or ``"ve"``), or the schedule itself."""
    if isinstance(name, Schedule):
        return name
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(_SCHEDULES)}")
    return _SCHEDULES[name](**kwargs)
