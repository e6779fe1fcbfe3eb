r"""Decoupled annealing posterior sampling (DAPS): variable splitting with noise annealing.

DAPS walks a decreasing time grid :math:`t_0 = 1 > t_1 > \dots > t_{n-1}` and, at each time,
decouples the prior and the likelihood:

1. **prior step** — from :math:`x_{t_i}`, estimate a clean signal :math:`\hat x_0` by solving
   the probability-flow ODE from :math:`t_i` towards 0 with ``ode_steps`` DDIM (η = 0) steps
   (``ode_steps=1`` is the Tweedie mean :math:`E[x \mid x_{t_i}]`), and model
   :math:`p(x_0 \mid x_{t_i}) \approx \mathcal{N}(\hat x_0, r_i^2 I)` with
   :math:`r_i = s_{t_i} = \sigma_{t_i}/\alpha_{t_i}` (the paper's :math:`r_t = \sigma_t`, in
   the rescaled variable). The default here is ``ode_steps=1``: the paper uses 5-10 ODE
   steps, but with r_t modelling the spread around the *mean*, the ODE end point (a sharper,
   sample-like point) double-counts the spread: on the Gaussian test problem (D=8, M=4,
   64 steps) W2 to the exact posterior was 0.34 with 1 step and 0.89 with 5;
2. **likelihood step** — draw :math:`x_0^{(y)} \propto \mathcal{N}(x_0 \mid \hat x_0, r_i^2 I)
   \, p(y \mid x_0)`. For linear A this Gaussian is sampled *exactly* by perturbation and
   optimisation: with :math:`z_1 \sim \mathcal{N}(\hat x_0, r^2 I)` and
   :math:`z_2 \sim \mathcal{N}(y, \Sigma_y)`,
   :math:`x_0^{(y)} = z_1 + r^2 A^\top (\Sigma_y + r^2 A A^\top)^{-1} (z_2 - A z_1)` has mean
   :math:`\hat x_0 + r^2 A^\top C^{-1} (y - A \hat x_0)` and covariance
   :math:`r^2 I - r^4 A^\top C^{-1} A`, the Gaussian posterior (solve by guarded CG). For any
   differentiable A, ``likelihood_step="langevin"`` runs unadjusted Langevin dynamics from
   :math:`z_1` with per-observation step
   :math:`\eta = \mathrm{lr} / (r^{-2} + \min_j \sigma_{y,j}^{-2})`. The Langevin step also
   takes a non-Gaussian :class:`~hierprior.physics.LearnedNoise` (SLIC): the likelihood
   gradient is then :math:`-J^\top s(y - A x)` with the learned noise score s, and
   :math:`\sigma_{y}^{-2}` becomes its curvature bound :math:`1/(\mathrm{scale}\, s_{t})^2`
   (safe but small steps: raise ``lr`` or ``langevin_steps``);
3. **re-noise** — :math:`x_{t_{i+1}} = \alpha_{t_{i+1}} x_0^{(y)} + \sigma_{t_{i+1}}
   \varepsilon`. The last :math:`x_0^{(y)}` is the sample.

Each time step costs ``ode_steps`` denoiser calls (no VJP through the network). DAPS is biased
(the Gaussian model of :math:`p(x_0 \mid x_t)` is a heuristic) but robust. :class:`DAPS` is
the posterior method (options checked at construction); :func:`daps_sample` is its loop.

References:
    Zhang, Chu, Berner, Zheng, Cheng, Zhou, Aziz & Song (2024), Improving Diffusion Inverse
    Problem Solving with Decoupled Noise Annealing, arXiv 2407.01521.
    Papandreou & Yuille (2010), Gaussian sampling by local perturbations (perturb-and-MAP).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierprior.checks import check_choice, check_float, check_int, check_optional_int
from hierprior.diffusion.denoiser import Denoiser
from hierprior.diffusion.sampling import ddim_sampler
from hierprior.io import progress_bar
from hierprior.physics import ForwardModel, NoiseModel
from hierprior.posterior.base import (
    Observation,
    PosteriorMethod,
    default_iterations,
    register_method,
)
from hierprior.posterior.linalg import solve

__all__ = ["DAPS", "daps_sample", "LIKELIHOOD_STEPS"]

LIKELIHOOD_STEPS = ("exact", "langevin")


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _exact_step(
    observation: Observation,
    x0: Tensor,
    r2: float,
    iterations: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    obs = observation
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    z1 = x0 + r2**0.5 * eps
    y_z = obs.predict(z1)
    z2 = obs.expand_y(y_z) + obs.noise.sample(
        tuple(y_z.shape), generator=generator, device=y_z.device, dtype=y_z.dtype
    )
    A, At = obs.forward, obs.forward.adjoint

    def system(u: Tensor) -> Tensor:
        return obs.cov(u) + r2 * A(At(u))

    w, fallback = solve(system, z2 - y_z, "cg", iterations)
    return z1 + r2 * At(w), int(fallback.sum())


def _langevin_step(
    observation: Observation,
    x0: Tensor,
    r2: float,
    steps: int,
    lr: float,
    generator: torch.Generator | None,
) -> Tensor:
    obs = observation
    curvature = obs.curvature()  # (N,): the noise model's bound (Gaussian: 1 / min sigma^2)
    eta = _bcast(lr / (1.0 / r2 + curvature), x0)
    x = x0 + r2**0.5 * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    for _ in range(steps):
        y_hat = obs.predict(x)
        _, grad_lik = obs.forward.vjp(x, obs.likelihood_cotangent(obs.expand_y(y_hat) - y_hat))
        grad = (x0 - x) / r2 + grad_lik
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + eta * grad + (2 * eta) ** 0.5 * noise
    return x


@torch.no_grad()
def daps_sample(
    prior: Denoiser,
    observation: Observation,
    x_init: Tensor,
    timesteps: Tensor,
    generator: torch.Generator | None = None,
    ode_steps: int = 1,
    likelihood_step: str = "exact",
    langevin_steps: int = 50,
    lr: float = 0.1,
    iterations: int = 32,
    progress: bool = False,
) -> tuple[Tensor, dict]:
    """Runs DAPS for N observations at once.

    Arguments:
        prior: the prior's denoiser.
        observation: the likelihood of the N observations.
        x_init: x at timesteps[0], with shape (N, S, *event).
        timesteps: decreasing time grid (steps + 1,); the annealing visits timesteps[:-1].
        generator: source of all randomness.
        ode_steps: DDIM steps of the probability-flow ODE in the prior step.
        likelihood_step: ``"exact"`` (linear A) or ``"langevin"``.
        langevin_steps: Langevin iterations per likelihood step.
        lr: Langevin step size relative to the stiffest curvature (see module docstring).
        iterations: CG iterations of the exact likelihood step.

    Returns:
        Samples with shape (N, S, *event), and diagnostics (``"fallbacks"``: CG rows that
        fell back to GMRES).
    """
    n, s = x_init.shape[:2]
    event = x_init.shape[2:]
    x = x_init
    fallbacks = 0
    steps = len(timesteps) - 1
    for i in progress_bar(range(steps), progress, "daps"):
        t = float(timesteps[i])
        a_t, s_t = prior.schedule.coefficients(t)
        grid = torch.linspace(t, 0.0, ode_steps + 1, dtype=torch.float64, device=x.device)
        x0 = ddim_sampler(prior, x.reshape(n * s, *event), grid, eta=0.0).reshape(x.shape)
        r2 = (s_t / a_t) ** 2
        if likelihood_step == "exact":
            x0y, fb = _exact_step(observation, x0, r2, iterations, generator)
            fallbacks += fb
        else:
            with torch.enable_grad():
                x0y = _langevin_step(observation, x0, r2, langevin_steps, lr, generator)
            x0y = x0y.detach()
        if i == steps - 1:
            return x0y, {"fallbacks": fallbacks}
        a_r, s_r = prior.schedule.coefficients(timesteps[i + 1])
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = a_r * x0y + s_r * eps
    raise AssertionError("unreachable")  # pragma: no cover


@register_method
class DAPS(PosteriorMethod):
    """Decoupled annealing posterior sampling (its own loop, :func:`daps_sample`).

    Arguments:
        steps: annealing steps (>= 1).
        ode_steps: DDIM steps of the probability-flow ODE in each prior step (1: the Tweedie
            mean, the default; see the module docstring).
        likelihood_step: ``"exact"`` (linear A and Gaussian noise only), ``"langevin"`` (any
            differentiable A; Gaussian or learned noise), or None: "exact" for a linear
            forward model, else "langevin" (resolved when sampling).
        langevin_steps: Langevin iterations per likelihood step.
        lr: Langevin step size relative to the stiffest curvature (> 0).
        iterations: CG iterations of the exact likelihood step; None: min(M, 32).
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"`` (None: ``"edm"``).
        batch_size: observations per chunk, or None.
    """

    name = "daps"

    def __init__(
        self,
        steps: int = 256,
        *,
        ode_steps: int = 1,
        likelihood_step: str | None = None,
        langevin_steps: int = 50,
        lr: float = 0.1,
        iterations: int | None = None,
        spacing: str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(steps, spacing=spacing, batch_size=batch_size)
        self.ode_steps = check_int(ode_steps, "ode_steps")
        if likelihood_step is not None:
            check_choice(likelihood_step, "likelihood_step", LIKELIHOOD_STEPS)
        self.likelihood_step = likelihood_step
        self.langevin_steps = check_int(langevin_steps, "langevin_steps")
        self.lr = check_float(lr, "lr", 0.0, strict=True)
        self.iterations = check_optional_int(iterations, "iterations")

    def check(self, prior: Denoiser, forward: ForwardModel) -> None:
        super().check(prior, forward)
        if self.likelihood_step == "exact" and not forward.linear:
            raise ValueError(
                "likelihood_step='exact' needs a linear forward model; use 'langevin'"
            )

    def check_noise(self, noise: NoiseModel, opts: dict) -> None:
        if not noise.gaussian and opts["likelihood_step"] != "langevin":
            raise ValueError(
                f"daps with a non-Gaussian {type(noise).__name__} needs "
                "likelihood_step='langevin' (the exact step assumes Gaussian noise)"
            )

    def _defaults(self, forward: ForwardModel, num_samples: int) -> dict:
        step = self.likelihood_step
        if step is None:
            step = "exact" if forward.linear else "langevin"
        return {
            "likelihood_step": step,
            "iterations": default_iterations(self.iterations, forward),
        }

    def _sample_chunk(
        self, prior, observation, state, timesteps, num_samples, generator, opts, progress
    ):
        return daps_sample(
            prior,
            observation,
            state,
            timesteps,
            generator,
            ode_steps=self.ode_steps,
            likelihood_step=opts["likelihood_step"],
            langevin_steps=self.langevin_steps,
            lr=self.lr,
            iterations=opts["iterations"],
            progress=progress,
        )
