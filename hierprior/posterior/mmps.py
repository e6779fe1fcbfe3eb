r"""Moment Matching Posterior Sampling (MMPS).

MMPS approximates :math:`p(x \mid x_t)` by the Gaussian with the exact first two moments
(Tweedie), :math:`\mathcal{N}(\hat x, \Sigma_t)` with :math:`\hat x = E[x \mid x_t]` and
:math:`\Sigma_t = \mathrm{Cov}[x \mid x_t] = (\sigma_t^2/\alpha_t)\, \partial \hat x /
\partial x_t`. Then :math:`p(y \mid x_t) \approx \mathcal{N}(y \mid A \hat x, \Sigma_y +
A \Sigma_t A^\top)` and the posterior denoiser is

.. math::
    E[x \mid x_t, y] \approx \hat x + \Sigma_t A^\top
        (\Sigma_y + A \Sigma_t A^\top)^{-1} (y - A \hat x),

solved matrix-free with k CG (or GMRES) iterations, where every product with
:math:`\Sigma_t` is one VJP through the denoiser (or the prior's closed form). For a Gaussian
prior and a linear-Gaussian likelihood it is exact once k reaches the rank of the system.
Non-linear forward models are linearised at :math:`\hat x` (:math:`A \to J_A(\hat x)`, with
the residual :math:`y - A(\hat x)`).

:class:`MMPS` is the posterior method (options checked at construction, run by an
unconditional sampler); :class:`MMPSDenoiser` is its denoiser.

The CG solve is guarded: rows (observation, sample) that meet non-positive curvature — a
learned denoiser's Jacobian need not be symmetric — are re-solved by GMRES (see
:mod:`hierprior.posterior.linalg`); ``denoiser.fallbacks`` counts them.

References:
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712.
"""

from __future__ import annotations

from torch import Tensor

from hierprior.checks import check_choice, check_int
from hierprior.diffusion.denoiser import Denoiser
from hierprior.posterior.base import (
    DenoiserMethod,
    Observation,
    PosteriorDenoiser,
    register_method,
)
from hierprior.posterior.linalg import SOLVERS, solve

__all__ = ["MMPS", "MMPSDenoiser"]


class MMPSDenoiser(PosteriorDenoiser):
    """MMPS posterior denoiser.

    Arguments:
        prior: the prior's denoiser.
        observation: the likelihood of the N observations.
        num_samples: samples per observation in each batch (S).
        solver: ``"cg"`` (guarded, falls back to GMRES) or ``"gmres"``.
        iterations: solver iterations k (each costs one VJP through the denoiser, or one
            closed-form product for analytic priors, plus one JVP/VJP of the forward model).
    """

    def __init__(
        self,
        prior: Denoiser,
        observation: Observation,
        num_samples: int,
        solver: str = "cg",
        iterations: int = 4,
    ):
        super().__init__(prior, observation, num_samples)
        self.solver = check_choice(solver, "solver", SOLVERS)
        self.iterations = check_int(iterations, "iterations")

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:
        obs = self.observation
        leaf, d = self.denoise(x, t, graph=not self._analytic_cov)
        d0 = d.detach()
        y_hat = obs.predict(d0)
        A, At = obs.linearize(d0)

        def cov_x(v: Tensor) -> Tensor:
            return self.prior_cov(leaf, d, t, v)

        def system(u: Tensor) -> Tensor:
            return obs.cov(u) + A(cov_x(At(u)))

        residual = obs.expand_y(y_hat) - y_hat
        w, fallback = solve(system, residual, self.solver, self.iterations)
        self.fallbacks += int(fallback.sum())
        return d0 + cov_x(At(w))


@register_method
class MMPS(DenoiserMethod):
    """Moment-matching posterior sampling, run by an unconditional sampler.

    Arguments:
        steps: time steps of the sampler (>= 1).
        solver: ``"cg"`` (guarded, falls back to GMRES) or ``"gmres"``.
        iterations: solver iterations k per step (exact for a Gaussian prior and linear A
            once k >= the rank of A).
        sampler: ``"ddpm"``, ``"ddim"``, ``"heun"``, ``"dpm2m"``, ``"dpm3m"`` or ``"unipc"``.
        eta: stochasticity in [0, 1] (ddim and the multistep samplers only).
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"``; None: the sampler's
            own (``"logsnr"`` for the multistep solvers, ``"edm"`` for the others).
        batch_size: observations per chunk, or None.
    """

    name = "mmps"
    denoiser = MMPSDenoiser

    def __init__(
        self,
        steps: int = 256,
        *,
        solver: str = "cg",
        iterations: int = 4,
        sampler: str = "ddpm",
        eta: float = 0.0,
        spacing: str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(steps, sampler=sampler, eta=eta, spacing=spacing, batch_size=batch_size)
        self.solver = check_choice(solver, "solver", SOLVERS)
        self.iterations = check_int(iterations, "iterations")
