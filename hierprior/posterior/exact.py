r"""Closed-form posteriors of linear-Gaussian problems: the oracles of the samplers.

For a Gaussian prior :math:`\mathcal{N}(\mu, \Sigma)`, a linear forward model :math:`A_i`
(materialised as an M×D matrix) and Gaussian noise :math:`\Sigma_{y,i}` (any Gaussian noise
model: its dense ``covariance_matrix``), the posterior of
observation i is Gaussian,

.. math::
    \Sigma_{post} = (\Sigma^{-1} + A^\top \Sigma_y^{-1} A)^{-1}
                  = \Sigma - \Sigma A^\top K^{-1} A \Sigma, \qquad
    \mu_{post} = \Sigma_{post} (\Sigma^{-1} \mu + A^\top \Sigma_y^{-1} y)
               = \mu + \Sigma A^\top K^{-1} (y - A \mu),

with :math:`K = A \Sigma A^\top + \Sigma_y`; the Woodbury forms on the right are computed
(no inverse of :math:`\Sigma`), in float64, with a Cholesky factorisation of K.

For a Gaussian mixture prior :math:`\sum_k w_k \mathcal{N}(\mu_k, \Sigma_k)` the posterior is
again a mixture, with the per-component posteriors above and weights

.. math:: w_k' \propto w_k\, \mathcal{N}(y \mid A \mu_k, A \Sigma_k A^\top + \Sigma_y).

Observations whose K is not finite (e.g. NaN in their forward matrix) get NaN moments; the
others are unaffected.

:class:`ExactGaussian` (method ``"exact"``) is the posterior method built on the Gaussian
case: :math:`x^{(s)} = \mu_{post} + L z^{(s)}`, :math:`L L^\top = \Sigma_{post}` (Cholesky),
:math:`z^{(s)} \sim \mathcal{N}(0, I)`, i.e. exact posterior samples with no time
discretisation (the reference of EM with a Gaussian prior).

References:
    Bishop (2006), Pattern Recognition and Machine Learning, §2.3.3.
    Särkkä (2013), Bayesian Filtering and Smoothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.diffusion.analytic import GaussianMixturePrior, GaussianPrior
from hierprior.diffusion.denoiser import Denoiser
from hierprior.physics import DenseLinear, ForwardModel, NoiseModel
from hierprior.posterior.base import PosteriorMethod, register_method

__all__ = [
    "ExactGaussian",
    "forward_matrix",
    "noise_covariance",
    "exact_gaussian_posterior",
    "exact_gmm_posterior",
]


def forward_matrix(forward: ForwardModel, num_obs: int | None = None) -> Tensor:
    """The matrices of a linear forward model, with shape (N, M, D) (float64).

    M and D are the flattened output and input sizes. DenseLinear gives its matrices; any
    other linear model is applied to the identity basis. A shared model is repeated for
    ``num_obs`` observations (default 1).
    """
    if not isinstance(forward, ForwardModel):
        raise TypeError(f"forward must be a ForwardModel, got {type(forward).__name__}")
    if not forward.linear:
        raise TypeError(f"{type(forward).__name__} is not linear: no matrix to materialise")
    n = forward.num_obs if forward.num_obs is not None else (num_obs or 1)
    if forward.num_obs is not None and num_obs is not None and num_obs != forward.num_obs:
        raise ValueError(f"num_obs = {num_obs} but forward.num_obs = {forward.num_obs}")
    m = math.prod(forward.output_shape)
    if isinstance(forward, DenseLinear):
        A = forward.A.double()
        return A.expand(n, *A.shape[-2:]) if A.ndim == 2 else A
    d = math.prod(forward.input_shape)
    device = next(iter(forward.buffers()), torch.empty(0)).device
    basis = torch.eye(d, dtype=torch.float64, device=device).reshape(d, *forward.input_shape)
    with torch.no_grad():
        if forward.num_obs is None:
            cols = forward(basis).reshape(d, m)  # (D, M): column j = A e_j
            return cols.T.expand(n, m, d)
        cols = forward(basis.expand(n, *basis.shape)).reshape(n, d, m)
        return cols.mT


def noise_covariance(noise: NoiseModel, y: Tensor) -> Tensor:
    """Sigma_y of each observation, with shape (N, M, M) (float64), for y (N, *obs): the
    Gaussian noise model's ``covariance_matrix`` (diagonal or not)."""
    if not isinstance(noise, NoiseModel) or not noise.gaussian:
        raise TypeError(
            f"the closed-form posterior needs Gaussian noise, got {type(noise).__name__}"
        )
    return noise.covariance_matrix(y).to(device=y.device, dtype=torch.float64)


def _conditioning(
    mean: Tensor, cov: Tensor, A: Tensor, cov_y: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Posterior mean (N, *, D), cov (N, *, D, D), log evidence (N, *) of N(mean, cov).

    mean (*, D) and cov (*, D, D) broadcast against A (N, 1.., M, D), cov_y (N, 1.., M, M)
    and y (N, 1.., M).
    """
    AS = A @ cov  # (.., M, D)
    K = AS @ A.mT + cov_y
    # a non-finite K (NaN in one observation's A or noise) gives that observation NaN moments
    # instead of failing the whole batch's factorisation
    bad = ~torch.isfinite(K).flatten(-2).all(-1)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    L = torch.linalg.cholesky(torch.where(bad[..., None, None], eye, K))
    resid = y - (A @ mean.unsqueeze(-1)).squeeze(-1)
    gain_t = torch.cholesky_solve(AS, L)  # K^{-1} A Sigma, (.., M, D)
    post_mean = mean + (gain_t.mT @ resid.unsqueeze(-1)).squeeze(-1)
    post_cov = cov - AS.mT @ gain_t
    post_cov = (post_cov + post_cov.mT) / 2
    alpha = torch.cholesky_solve(resid.unsqueeze(-1), L).squeeze(-1)
    log_det = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    m = y.shape[-1]
    log_evidence = -0.5 * ((resid * alpha).sum(-1) + log_det + m * math.log(2 * math.pi))
    if bool(bad.any()):
        post_mean = torch.where(bad[..., None], float("nan"), post_mean)
        post_cov = torch.where(bad[..., None, None], float("nan"), post_cov)
        log_evidence = torch.where(bad, float("nan"), log_evidence)
    return post_mean, post_cov, log_evidence


def _check(prior, prior_type, forward, noise, y) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(prior, prior_type):
        raise TypeError(f"prior must be a {prior_type.__name__}, got {type(prior).__name__}")
    if not isinstance(forward, ForwardModel) or not forward.linear:
        raise TypeError("the closed-form posterior needs a linear ForwardModel")
    if tuple(forward.input_shape) != tuple(prior.event_shape):
        raise ValueError(
            f"forward.input_shape {forward.input_shape} != prior.event_shape {prior.event_shape}"
        )
    if not isinstance(y, Tensor) or tuple(y.shape[1:]) != tuple(forward.output_shape):
        raise ValueError(
            f"y must have shape (N, *{tuple(forward.output_shape)}), "
            f"got {tuple(getattr(y, 'shape', ()))}"
        )
    n = y.shape[0]
    A = forward_matrix(forward, n)
    if A.shape[0] != n:
        raise ValueError(f"y has N = {n} observations but forward.num_obs = {A.shape[0]}")
    cov_y = noise_covariance(noise, y)
    return A, cov_y, y.double().reshape(n, -1)


def exact_gaussian_posterior(
    prior: GaussianPrior, forward: ForwardModel, noise: NoiseModel, y: Tensor
) -> tuple[Tensor, Tensor]:
    """Exact posterior N(mean_i, cov_i) of each observation under a Gaussian prior.

    Arguments:
        prior: the Gaussian prior N(mu, Sigma) over vectors of size D.
        forward: a linear forward model (per-observation or shared).
        noise: the Gaussian noise model.
        y: the observations, with shape (N, *forward.output_shape).

    Returns:
        The posterior means, with shape (N, D), and covariances, with shape (N, D, D), both
        float64.
    """
    A, cov_y, yf = _check(prior, GaussianPrior, forward, noise, y)
    mean, cov, _ = _conditioning(prior.mean.double(), prior.cov.double(), A, cov_y, yf)
    return mean, cov


def exact_gmm_posterior(
    prior: GaussianMixturePrior, forward: ForwardModel, noise: NoiseModel, y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact posterior mixture of each observation under a Gaussian mixture prior.

    Arguments:
        prior: the mixture prior with K components over vectors of size D.
        forward: a linear forward model (per-observation or shared).
        noise: the Gaussian noise model.
        y: the observations, with shape (N, *forward.output_shape).

    Returns:
        The posterior weights, with shape (N, K), component means, with shape (N, K, D), and
        component covariances, with shape (N, K, D, D), all float64. The posterior mean is
        ``(weights[..., None] * means).sum(1)``.
    """
    A, cov_y, yf = _check(prior, GaussianMixturePrior, forward, noise, y)
    mean, cov, log_ev = _conditioning(
        prior.means.double(), prior.covs.double(), A[:, None], cov_y[:, None], yf[:, None]
    )
    logits = torch.log(prior.weights.double()) + log_ev
    return torch.softmax(logits, dim=-1), mean, cov


def _cholesky(cov: Tensor) -> Tensor:
    """Factors L with L L^T = cov, shape (N, D, D): Cholesky, or eigh where it fails.

    Round-off can leave a tiny negative eigenvalue in a nearly singular posterior covariance;
    those rows use U diag(sqrt(max(lambda, 0))). Non-finite rows stay NaN.
    """
    L, info = torch.linalg.cholesky_ex(cov)
    finite = torch.isfinite(cov).flatten(-2).all(-1)
    retry = (info != 0) & finite
    if bool(retry.any()):
        lam, u = torch.linalg.eigh(cov[retry])
        L[retry] = u * lam.clamp_min(0).sqrt()[..., None, :]
    return torch.where(finite[..., None, None], L, float("nan"))


@register_method
class ExactGaussian(PosteriorMethod):
    """Exact posterior samples of a GaussianPrior under a linear forward model (``"exact"``).

    Arguments:
        steps: accepted for a uniform interface and ignored (no time discretisation).
        spacing: accepted and ignored.
        batch_size: observations per chunk (each chunk materialises its (n, D, D) posterior
            covariances), or None.

    The mean and covariance come from :func:`exact_gaussian_posterior`; the standard normal
    z, with shape (N, S, D), is drawn from the generator in one call, so the samples of an
    observation do not depend on batch_size. ``x_init`` is refused (there is no initial
    noise). :meth:`check` refuses any prior other than :class:`GaussianPrior` and non-linear
    forward models.
    """

    name = "exact"

    def __init__(
        self, steps: int = 256, *, spacing: str | None = None, batch_size: int | None = None
    ):
        super().__init__(steps, spacing=spacing, batch_size=batch_size)

    def check(self, prior: Denoiser, forward: ForwardModel) -> None:
        super().check(prior, forward)
        if not isinstance(prior, GaussianPrior):
            raise ValueError(
                "method 'exact' samples the closed-form posterior of a GaussianPrior, got a "
                f"{type(prior).__name__} prior; use a diffusion posterior method (e.g. 'mmps')"
            )
        if not forward.linear:
            raise ValueError(
                f"method 'exact' needs a linear forward model, got {type(forward).__name__}"
            )

    def _initial(self, prior, shape, x_init, generator, device, dtype):
        if x_init is not None:
            raise ValueError("method 'exact' draws its samples in closed form and takes no x_init")
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def _sample_chunk(
        self, prior, observation, state, timesteps, num_samples, generator, opts, progress
    ):
        obs = observation
        mean, cov = exact_gaussian_posterior(prior, obs.forward, obs.noise, obs.y)
        L = _cholesky(cov)
        out = mean[:, None, :] + torch.einsum("nij,nsj->nsi", L, state.double())
        return out.to(state.dtype), {}
