r"""Pseudoinverse-guided diffusion models (ΠGDM).

ΠGDM approximates :math:`p(x \mid x_t) \approx \mathcal{N}(\hat x, r_t^2 I)` around the
denoised estimate :math:`\hat x = E[x \mid x_t]`, which gives

.. math::
    p_t(y \mid x_t) \approx \mathcal{N}(y \mid A \hat x,\; \Sigma_y + r_t^2 A A^\top), \qquad
    \nabla_{x_t} \log p_t \approx J_{\hat x}^\top A^\top
        (\Sigma_y + r_t^2 A A^\top)^{-1} (y - A \hat x),

the Jacobian of the denoiser entering by one VJP (the covariance is held fixed). For data with
variance :math:`v` per coordinate (default 1), :math:`r_t^2 = \mathrm{Var}[x \mid x_t]` of
the prior :math:`\mathcal{N}(0, v I)`, i.e. :math:`r_t^2 = v s_t^2 / (v + s_t^2)` with
:math:`s_t = \sigma_t / \alpha_t`; for the VP schedule and :math:`v = 1` this is the paper's
:math:`r_t^2 = \sigma_t^2 / (\alpha_t^2 + \sigma_t^2) = \sigma_t^2`. The posterior denoiser
is :math:`\hat x + (\sigma_t^2/\alpha_t) \nabla_{x_t} \log p_t(y \mid x_t)`. The solve with
the symmetric positive definite matrix is done by guarded CG; non-linear forward models are
linearised at :math:`\hat x`. ΠGDM equals MMPS when :math:`\mathrm{Cov}[x \mid x_t] =
r_t^2 I` (an isotropic Gaussian prior with variance v).

:meth:`PiGDMDenoiser.guidance` also returns :math:`(y - A\hat x)^\top C^{-1} (y - A \hat x)`,
the quadratic form of the log-likelihood that the twisted SMC sampler uses as its twist.
:class:`PiGDM` is the posterior method; :class:`PiGDMDenoiser` is its denoiser.

References:
    Song, Vahdat, Mardani & Kautz (2023), Pseudoinverse-Guided Diffusion Models for Inverse
    Problems, ICLR 2023 (openreview 9_gsMA8MRKQ).
"""

from __future__ import annotations

from torch import Tensor

from hierprior.checks import check_float, check_int, check_optional_int
from hierprior.diffusion.denoiser import Denoiser
from hierprior.physics import ForwardModel
from hierprior.posterior.base import (
    DenoiserMethod,
    Observation,
    PosteriorDenoiser,
    default_iterations,
    register_method,
)
from hierprior.posterior.linalg import batch_dot, solve

__all__ = ["PiGDM", "PiGDMDenoiser"]


class PiGDMDenoiser(PosteriorDenoiser):
    """ΠGDM posterior denoiser.

    Arguments:
        prior: the prior's denoiser.
        observation: the likelihood of the N observations.
        num_samples: samples per observation in each batch (S).
        iterations: CG iterations for the solve with Sigma_y + r_t^2 A A^T.
        data_variance: v, the per-coordinate prior variance assumed by r_t^2 (> 0).
    """

    def __init__(
        self,
        prior: Denoiser,
        observation: Observation,
        num_samples: int,
        iterations: int = 32,
        data_variance: float = 1.0,
    ):
        super().__init__(prior, observation, num_samples)
        self.iterations = check_int(iterations, "iterations")
        self.data_variance = check_float(data_variance, "data_variance", 0.0, strict=True)

    def r2(self, t: Tensor, like: Tensor) -> Tensor:
        """r_t^2 = v s_t^2 / (v + s_t^2), with shape (N, S, 1, ..., 1) to broadcast like."""
        alpha, sigma = self.coefficients(t, like)
        s2 = (sigma / alpha) ** 2
        return self.data_variance * s2 / (self.data_variance + s2)

    def guidance(self, x: Tensor, t: Tensor, r2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        r"""Denoised estimate, likelihood score and quadratic form of the ΠGDM likelihood.

        Arguments:
            x: x_t, with shape (N, S, *event).
            t: times, with shape (N, S).
            r2: :math:`r_t^2` with shape (N, S, 1, ..., 1) (observation-space rank), or None
                for the plain likelihood :math:`\mathcal{N}(y \mid A \hat x, \Sigma_y)`
                (solved exactly, the noise being diagonal).

        Returns:
            :math:`\hat x` (shape of x), :math:`\nabla_{x_t} \log p_t(y \mid x_t)` (shape of
            x) and :math:`r^\top C^{-1} r` (shape (N, S)).
        """
        obs = self.observation
        leaf, d = self.denoise(x, t, graph=True)
        y_hat = obs.predict(d)
        residual = (obs.expand_y(y_hat) - y_hat).detach()
        if r2 is None:
            w = obs.inv_cov(residual)
        else:
            A, At = obs.linearize(d.detach())

            def system(u: Tensor) -> Tensor:
                return obs.cov(u) + r2 * A(At(u))

            w, fallback = solve(system, residual, "cg", self.iterations)
            self.fallbacks += int(fallback.sum())
        score = self.vjp(leaf, y_hat, w)
        return d.detach(), score, batch_dot(residual, w)

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:
        y_like = self.observation.y.unsqueeze(1)
        r2 = self.r2(t, y_like.expand(x.shape[0], x.shape[1], *y_like.shape[2:]))
        d, score, _ = self.guidance(x, t, r2)
        alpha, sigma = self.coefficients(t, x)
        return d + sigma**2 / alpha * score


@register_method
class PiGDM(DenoiserMethod):
    """Pseudoinverse-guided posterior sampling (ΠGDM), run by an unconditional sampler.

    Arguments:
        steps: time steps of the sampler (>= 1).
        iterations: CG iterations for the solve with Sigma_y + r_t^2 A A^T; None:
            min(M, 32) (resolved when sampling).
        data_variance: v, the per-coordinate prior variance assumed by r_t^2 (> 0).
        sampler: ``"ddpm"``, ``"ddim"``, ``"heun"``, ``"dpm2m"``, ``"dpm3m"`` or ``"unipc"``.
        eta: stochasticity in [0, 1] (ddim and the multistep samplers only).
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"``; None: the sampler's
            own (``"logsnr"`` for the multistep solvers, ``"edm"`` for the others).
        batch_size: observations per chunk, or None.
    """

    name = "pigdm"
    denoiser = PiGDMDenoiser

    def __init__(
        self,
        steps: int = 256,
        *,
        iterations: int | None = None,
        data_variance: float = 1.0,
        sampler: str = "ddpm",
        eta: float = 0.0,
        spacing: str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(steps, sampler=sampler, eta=eta, spacing=spacing, batch_size=batch_size)
        self.iterations = check_optional_int(iterations, "iterations")
        self.data_variance = check_float(data_variance, "data_variance", 0.0, strict=True)

    def _defaults(self, forward: ForwardModel, num_samples: int) -> dict:
        return {"iterations": default_iterations(self.iterations, forward)}
