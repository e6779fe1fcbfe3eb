r"""Diffusion Posterior Sampling (DPS).

DPS replaces the likelihood score by the gradient of the residual norm at the denoised
estimate :math:`\hat x = E[x \mid x_t]`,

.. math::
    \nabla_{x_t} \log p_t(y \mid x_t) \approx -\zeta\, \nabla_{x_t} \|y - A(\hat x)\|_2,

with the norm taken **per (observation, sample) row** (azula 0.11.1 takes one norm over the
whole batch, which weakens the guidance of every observation as the batch grows; DESIGN.md
§4). Through Tweedie's formula the posterior denoiser is

.. math::
    E[x \mid x_t, y] \approx \hat x + \frac{\sigma_t^2}{\alpha_t}\, \zeta\,
        J_{\hat x}^\top J_A^\top \frac{y - A(\hat x)}{\|y - A(\hat x)\|},

one VJP through the denoiser and the forward model per step; any differentiable A works.
Here :math:`\zeta` scales a likelihood *score* (units 1/length), not a sampler step: matching
the Gaussian score :math:`J^\top \Sigma_y^{-1} r` at :math:`\|r\| \approx \sigma_y \sqrt{M}`
suggests :math:`\zeta \approx \sqrt{M} / \sigma_y`. DPS is biased for every :math:`\zeta`.

With a non-Gaussian :class:`~hierprior.physics.LearnedNoise` (SLIC), the unit residual
:math:`r / \|r\|` becomes the unit likelihood cotangent :math:`-s(r) / \|s(r)\|`, with
:math:`s = \nabla \log Q` the learned noise score: the direction of
:math:`\nabla_{\hat x} \log Q(y - A(\hat x))`. For white Gaussian noise
:math:`-s(r) = r / \sigma_y^2` and the two agree, so :math:`\zeta` keeps its meaning
(:math:`\zeta \approx \|s(r)\|` at a typical residual matches the likelihood score).

:class:`DPS` is the posterior method; :class:`DPSDenoiser` is its denoiser.

References:
    Chung et al. (2023), Diffusion Posterior Sampling for General Noisy Inverse Problems,
    arXiv 2209.14687.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierprior.checks import check_float
from hierprior.diffusion.denoiser import Denoiser
from hierprior.physics import NoiseModel
from hierprior.posterior.base import (
    DenoiserMethod,
    Observation,
    PosteriorDenoiser,
    register_method,
)

__all__ = ["DPS", "DPSDenoiser"]


class DPSDenoiser(PosteriorDenoiser):
    """DPS posterior denoiser.

    Arguments:
        prior: the prior's denoiser.
        observation: the likelihood of the N observations.
        num_samples: samples per observation in each batch (S).
        zeta: guidance strength (>= 0; 0 gives the prior).
    """

    def __init__(
        self, prior: Denoiser, observation: Observation, num_samples: int, zeta: float = 1.0
    ):
        super().__init__(prior, observation, num_samples)
        self.zeta = check_float(zeta, "zeta", 0.0)

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:
        obs = self.observation
        leaf, d = self.denoise(x, t, graph=True)
        y_hat = obs.predict(d)
        residual = (obs.expand_y(y_hat) - y_hat).detach()
        if not obs.gaussian:  # learned noise: the direction of the likelihood score
            residual = obs.likelihood_cotangent(residual)
        norm = residual.flatten(2).norm(dim=-1)  # (N, S): one norm per row
        tiny = torch.finfo(norm.dtype).tiny
        unit = residual / norm.clamp_min(tiny).reshape(norm.shape + (1,) * (residual.ndim - 2))
        guidance = self.vjp(leaf, y_hat, unit)  # = -grad ||y - A(x_hat)|| w.r.t. x_t
        alpha, sigma = self.coefficients(t, x)
        return d.detach() + sigma**2 / alpha * self.zeta * guidance


@register_method
class DPS(DenoiserMethod):
    """Diffusion posterior sampling, run by an unconditional sampler.

    Takes Gaussian noise or a :class:`~hierprior.physics.LearnedNoise` (see the module
    docstring).

    Arguments:
        steps: time steps of the sampler (>= 1).
        zeta: guidance strength (>= 0; 0 gives the prior; about sqrt(M) / sigma_y matches
            the Gaussian likelihood score).
        sampler: ``"ddpm"``, ``"ddim"``, ``"heun"``, ``"dpm2m"``, ``"dpm3m"`` or ``"unipc"``.
        eta: stochasticity in [0, 1] (ddim and the multistep samplers only).
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"``; None: the sampler's
            own (``"logsnr"`` for the multistep solvers, ``"edm"`` for the others).
        batch_size: observations per chunk, or None.
    """

    name = "dps"
    denoiser = DPSDenoiser

    def __init__(
        self,
        steps: int = 256,
        *,
        zeta: float = 1.0,
        sampler: str = "ddpm",
        eta: float = 0.0,
        spacing: str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(steps, sampler=sampler, eta=eta, spacing=spacing, batch_size=batch_size)
        self.zeta = check_float(zeta, "zeta", 0.0)

    def check_noise(self, noise: NoiseModel, opts: dict) -> None:
        """Any noise model: DPS needs only the direction of the likelihood score."""
