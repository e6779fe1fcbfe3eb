r"""Convolved likelihood approximation (CLA).

With :math:`z = x_t / \alpha_t = x + s_t \varepsilon`, :math:`s_t = \sigma_t / \alpha_t`,
treat :math:`x \approx z - s_t \varepsilon` as independent of :math:`\varepsilon`, so that
:math:`y = A x + n` gives the *convolved* likelihood

.. math::
    p_t(y \mid x_t) \approx \mathcal{N}\big(y \mid A x_t / \alpha_t,\;
        \Sigma_y + s_t^2 A A^\top\big),

whose score is :math:`\nabla_{x_t} \log p_t = \alpha_t^{-1} A^\top C_t^{-1}
(y - A x_t/\alpha_t)`, :math:`C_t = \Sigma_y + s_t^2 A A^\top`. No VJP through the network is
needed; the solve with :math:`C_t` (symmetric positive definite) is done by guarded CG
(exact for diagonal :math:`A A^\top` in one iteration, and for any A after as many iterations
as the rank). The posterior denoiser is :math:`\hat x + (\sigma_t^2/\alpha_t)
\nabla_{x_t} \log p_t(y \mid x_t)`. Non-linear forward models are linearised at
:math:`x_t / \alpha_t`.

:class:`CLA` is the posterior method; :class:`CLADenoiser` is its denoiser.

References:
    Adam et al. (2022), Posterior samples of source galaxies in strong gravitational lenses
    with score-based priors, arXiv 2211.03812.
"""

from __future__ import annotations

from torch import Tensor

from hierprior.checks import check_int, check_optional_int
from hierprior.diffusion.denoiser import Denoiser
from hierprior.physics import ForwardModel
from hierprior.posterior.base import (
    DenoiserMethod,
    Observation,
    PosteriorDenoiser,
    default_iterations,
    register_method,
)
from hierprior.posterior.linalg import solve

__all__ = ["CLA", "CLADenoiser"]


class CLADenoiser(PosteriorDenoiser):
    """Convolved-likelihood posterior denoiser.

    Arguments:
        prior: the prior's denoiser.
        observation: the likelihood of the N observations.
        num_samples: samples per observation in each batch (S).
        iterations: CG iterations for the solve with C_t.
    """

    def __init__(
        self, prior: Denoiser, observation: Observation, num_samples: int, iterations: int = 32
    ):
        super().__init__(prior, observation, num_samples)
        self.iterations = check_int(iterations, "iterations")

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:
        obs = self.observation
        alpha, sigma = self.coefficients(t, x)
        z = x / alpha
        _, d = self.denoise(x, t)
        y_z = obs.predict(z)
        A, At = obs.linearize(z)
        s2 = (sigma / alpha) ** 2
        s2 = s2.reshape(s2.shape[:2] + (1,) * (y_z.ndim - 2))

        def system(u: Tensor) -> Tensor:
            return obs.cov(u) + s2 * A(At(u))

        w, fallback = solve(system, obs.expand_y(y_z) - y_z, "cg", self.iterations)
        self.fallbacks += int(fallback.sum())
        return d + sigma**2 / alpha**2 * At(w)


@register_method
class CLA(DenoiserMethod):
    """Convolved-likelihood approximation, run by an unconditional sampler.

    Arguments:
        steps: time steps of the sampler (>= 1).
        iterations: CG iterations for the solve with C_t; None: min(M, 32), M the values
            per observation (resolved when sampling).
        sampler: ``"ddpm"``, ``"ddim"``, ``"heun"``, ``"dpm2m"``, ``"dpm3m"`` or ``"unipc"``.
        eta: stochasticity in [0, 1] (ddim and the multistep samplers only).
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"``; None: the sampler's
            own (``"logsnr"`` for the multistep solvers, ``"edm"`` for the others).
        batch_size: observations per chunk, or None.
    """

    name = "cla"
    denoiser = CLADenoiser

    def __init__(
        self,
        steps: int = 256,
        *,
        iterations: int | None = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        spacing: str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(steps, sampler=sampler, eta=eta, spacing=spacing, batch_size=batch_size)
        self.iterations = check_optional_int(iterations, "iterations")

    def _defaults(self, forward: ForwardModel, num_samples: int) -> dict:
        return {"iterations": default_iterations(self.iterations, forward)}
