r"""Analytic priors with exact denoisers: the oracles of every test.

For a Gaussian prior :math:`x \sim \mathcal{N}(\mu, \Sigma)` and
:math:`x_t = \alpha_t x + \sigma_t \varepsilon`, with :math:`\Sigma = U \Lambda U^\top`,

.. math::
    E[x \mid x_t] = \mu + \alpha_t \Sigma (\alpha_t^2 \Sigma + \sigma_t^2 I)^{-1}
                    (x_t - \alpha_t \mu), \qquad
    \mathrm{Cov}[x \mid x_t] = \sigma_t^2 \Sigma (\alpha_t^2 \Sigma + \sigma_t^2 I)^{-1},

both diagonal in the eigenbasis :math:`U`, so a batch with one time per row costs two
matrix products.

For a mixture :math:`\sum_k w_k \mathcal{N}(\mu_k, \Sigma_k)`, the marginal at time t is
:math:`\sum_k w_k \mathcal{N}(\alpha_t \mu_k, \alpha_t^2 \Sigma_k + \sigma_t^2 I)`; with the
responsibilities :math:`r_k(x_t)` and the per-component posterior moments
:math:`(m_k, C_k)` above,

.. math::
    E[x \mid x_t] = \sum_k r_k m_k, \qquad
    \mathrm{Cov}[x \mid x_t] = \sum_k r_k (C_k + m_k m_k^\top) - E[x|x_t] E[x|x_t]^\top.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierprior.diffusion.denoiser import Denoiser, expand_time
from hierprior.diffusion.schedule import Schedule, VPSchedule

__all__ = ["GaussianPrior", "GaussianMixturePrior", "check_covariance"]


def check_covariance(cov: Tensor, name: str = "cov", rtol: float = 1e-5) -> Tensor:
    """Raises a ValueError unless cov (with shape (..., D, D)) is symmetric positive definite."""
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"{name} must be square with shape (..., D, D), got {tuple(cov.shape)}")
    if not torch.isfinite(cov).all():
        raise ValueError(f"{name} holds NaN or Inf")
    scale = cov.abs().amax().clamp_min(1e-30)
    asym = (cov - cov.mT).abs().amax()
    if asym > rtol * scale:
        raise ValueError(f"{name} is not symmetric (max |C - C^T| = {float(asym):.3g})")
    _, info = torch.linalg.cholesky_ex(cov.double())
    if (info != 0).any():
        raise ValueError(f"{name} is not positive definite")
    return (cov + cov.mT) / 2


def _check_time_shape(t: Tensor, x: Tensor) -> Tensor:
    return expand_time(t, x).to(torch.float64)


class GaussianPrior(Denoiser):
    """Gaussian prior N(mean, cov) over vectors, with the exact denoiser.

    Arguments:
        mean: prior mean, with shape (D,).
        cov: prior covariance, symmetric positive definite, with shape (D, D).
        schedule: noise schedule of the diffusion (default VP).
    """

    def __init__(self, mean: Tensor, cov: Tensor, schedule: Schedule | None = None):
        super().__init__()
        mean = torch.as_tensor(mean)
        cov = torch.as_tensor(cov, dtype=mean.dtype if mean.is_floating_point() else None)
        if not mean.is_floating_point():
            mean = mean.float()
            cov = cov.float()
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,), got {tuple(mean.shape)}")
        if not torch.isfinite(mean).all():
            raise ValueError("mean holds NaN or Inf")
        if cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"cov must have shape ({mean.shape[0]}, {mean.shape[0]}) to match mean, "
                f"got {tuple(cov.shape)}"
            )
        cov = check_covariance(cov)
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)
        lam, u = torch.linalg.eigh(cov.double())
        self.register_buffer("_lam", lam.clamp_min(0).to(mean.dtype))
        self.register_buffer("_u", u.to(mean.dtype))
        self.register_buffer("_chol", torch.linalg.cholesky(cov.double()).to(mean.dtype))
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.event_shape = (mean.shape[0],)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _gains(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """alpha (B, 1), and the eigenvalue gains of the posterior mean and covariance (B, D)."""
        t = _check_time_shape(t, x)
        if len(t) > 1 and bool((t == t[0]).all()):  # one time for the batch (the usual case)
            t = t[:1]
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = alpha[:, None], sigma[:, None]
        lam = self._lam.double()[None]
        denom = alpha**2 * lam + sigma**2
        gain_mean = alpha * lam / denom
        gain_cov = sigma**2 * lam / denom
        dt = x.dtype
        return alpha.to(dt), gain_mean.to(dt), gain_cov.to(dt)

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        self.check_event(x_t, "x_t")
        shape = x_t.shape
        x = x_t.reshape(-1, self.dim)
        if x.shape[0] != shape[0]:
            raise ValueError(f"x_t must have shape (B, {self.dim}), got {tuple(shape)}")
        alpha, gain, _ = self._gains(t, x)
        u = self._u.to(x.dtype)
        mu = self.mean.to(x.dtype)
        r = (x - alpha * mu) @ u
        return mu + (gain * r) @ u.T

    def tweedie_cov(self, x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        """Exact Cov[x | x_t] v, with x_t and v with shape (B, D)."""
        self.check_event(x_t, "x_t")
        _, _, gain = self._gains(t, x_t)
        u = self._u.to(v.dtype)
        return (gain * (v @ u)) @ u.T

    def posterior_cov(self, t: Tensor | float, x_t: Tensor) -> Tensor:
        """Exact Cov[x | x_t] as matrices, with shape (B, D, D)."""
        _, _, gain = self._gains(t, x_t)
        u = self._u.to(x_t.dtype)
        gain = gain.expand(x_t.shape[0], -1)
        return (u[None] * gain[:, None, :]) @ u.T[None]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples, with shape (n, D)."""
        device = self.mean.device
        eps = torch.randn(n, self.dim, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + eps @ self._chol.T

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density, with shape (B,) for x with shape (B, D)."""
        dist = torch.distributions.MultivariateNormal(self.mean, scale_tril=self._chol)
        return dist.log_prob(x)

    def fit(self, samples: Tensor, min_eigenvalue: float = 0.0) -> GaussianPrior:
        """Maximum-likelihood Gaussian of samples (shape (n, D) or (n, S, D)).

        Returns a new prior with the same schedule (the M-step of Gaussian EM). The
        covariance is the biased (1/n) estimate; ``min_eigenvalue`` floors its spectrum to
        keep it positive definite when n <= D.
        """
        x = samples.reshape(-1, self.dim).to(self.mean.dtype)
        if x.shape[0] < 2:
            raise ValueError("fit needs at least 2 samples")
        if not torch.isfinite(x).all():
            raise ValueError("samples hold NaN or Inf")
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / x.shape[0]
        cov = (cov + cov.T) / 2
        if min_eigenvalue > 0:
            lam, u = torch.linalg.eigh(cov)
            cov = (u * lam.clamp_min(min_eigenvalue)) @ u.T
            cov = (cov + cov.T) / 2
        return GaussianPrior(mean, cov, schedule=self.schedule)


class GaussianMixturePrior(Denoiser):
    """Mixture of Gaussians sum_k w_k N(mean_k, cov_k) over vectors, with the exact denoiser.

    Arguments:
        weights: mixture weights, positive, with shape (K,) (normalised here).
        means: component means, with shape (K, D).
        covs: component covariances, symmetric positive definite, with shape (K, D, D).
        schedule: noise schedule of the diffusion (default VP).
    """

    def __init__(
        self, weights: Tensor, means: Tensor, covs: Tensor, schedule: Schedule | None = None
    ):
        super().__init__()
        means = torch.as_tensor(means)
        if not means.is_floating_point():
            means = means.float()
        weights = torch.as_tensor(weights, dtype=means.dtype)
        covs = torch.as_tensor(covs, dtype=means.dtype)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights <= 0).any():
            raise ValueError("weights must be finite and positive")
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}), got {tuple(covs.shape)}")
        if not torch.isfinite(means).all():
            raise ValueError("means hold NaN or Inf")
        covs = check_covariance(covs, "covs")
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        lam, u = torch.linalg.eigh(covs.double())
        self.register_buffer("_lam", lam.clamp_min(0))  # float64 (K, D)
        self.register_buffer("_u", u)  # float64 (K, D, D)
        self.register_buffer("_chol", torch.linalg.cholesky(covs.double()).to(means.dtype))
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.event_shape = (d,)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _moments(self, x_t: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Responsibilities (B, K), component posterior means (B, K, D), cov gains (B, K, D).

        Computed in float64; the cov gains are in each component's eigenbasis.
        """
        self.check_event(x_t, "x_t")
        x = x_t.double()
        alpha, sigma = self.schedule.alpha_sigma(_check_time_shape(t, x))
        alpha, sigma = alpha[:, None, None], sigma[:, None, None]  # (B, 1, 1)
        lam = self._lam[None]  # (1, K, D)
        denom = alpha**2 * lam + sigma**2  # (B, K, D)
        r = torch.einsum(
            "bkd,kde->bke", x[:, None, :] - alpha * self.means.double()[None], self._u
        )  # residual in each eigenbasis
        log_det = torch.log(denom).sum(-1)
        maha = (r**2 / denom).sum(-1)
        logits = torch.log(self.weights.double())[None] - 0.5 * (maha + log_det)
        resp = torch.softmax(logits, dim=-1)
        gain_mean = alpha * lam / denom
        m = self.means.double()[None] + torch.einsum("bke,kde->bkd", gain_mean * r, self._u)
        gain_cov = sigma**2 * lam / denom
        return resp, m, gain_cov

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        resp, m, _ = self._moments(x_t, t)
        return (resp[..., None] * m).sum(1).to(x_t.dtype)

    def tweedie_cov(self, x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        """Exact Cov[x | x_t] v, with x_t and v with shape (B, D)."""
        resp, m, gain = self._moments(x_t, t)
        vv = v.double()
        cv = torch.einsum("bke,kde->bkd", gain * torch.einsum("bd,kde->bke", vv, self._u), self._u)
        mean = (resp[..., None] * m).sum(1)
        second = (resp[..., None] * (cv + m * (m * vv[:, None]).sum(-1, keepdim=True))).sum(1)
        return (second - mean * (mean * vv).sum(-1, keepdim=True)).to(v.dtype)

    def sample(
        self, n: int, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Exact samples, with shape (n, D) (and the component labels, with shape (n,))."""
        device = self.means.device
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, device=device, dtype=self.means.dtype)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self._chol[labels], eps)
        return (x, labels) if return_labels else x

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density, with shape (B,) for x with shape (B, D)."""
        comps = torch.distributions.MultivariateNormal(self.means, scale_tril=self._chol)
        lp = comps.log_prob(x[:, None, :]) + torch.log(self.weights)[None]
        return torch.logsumexp(lp, dim=-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities of clean samples x (shape (B, D)) -> (B, K)."""
        comps = torch.distributions.MultivariateNormal(self.means, scale_tril=self._chol)
        lp = comps.log_prob(x[:, None, :]) + torch.log(self.weights)[None]
        return torch.softmax(lp, dim=-1)
