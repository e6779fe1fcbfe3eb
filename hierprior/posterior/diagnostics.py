r"""Accuracy diagnostics of posterior samples: Gaussian W2 and expected coverage.

- :func:`gaussian_w2`, the 2-Wasserstein distance between Gaussians,

  .. math::
      W_2^2 = \|m_1 - m_2\|^2 + \mathrm{tr}\big(C_1 + C_2
              - 2 (C_2^{1/2} C_1 C_2^{1/2})^{1/2}\big),

  with matrix square roots by symmetric eigendecomposition (negative round-off eigenvalues
  clamped to 0), in float64. :func:`gaussian_fit` gives the moments of samples.
- Expected coverage. For observation i with truth :math:`x_i^*` and posterior samples, rank
  :math:`x_i^*` among the samples by the squared Mahalanobis distance under a Gaussian
  :math:`(m_i, C_i)` (given, e.g. the exact posterior, or fitted to the samples): the
  credibility level :math:`f_i` of the smallest such ellipsoid containing :math:`x_i^*` is the
  fraction of samples closer than :math:`x_i^*`. Over an ensemble of truths drawn from the
  prior, calibrated samples give :math:`f_i \sim U(0, 1)`, so the expected coverage
  probability :math:`\mathrm{ECP}(\alpha) = P(f \le \alpha)` equals :math:`\alpha`
  (:func:`expected_coverage`; :func:`coverage_error` is :math:`\max_\alpha |ECP - \alpha|`).
  :func:`gaussian_coverage` is the same with the exact :math:`\chi^2_D` level
  :math:`f_i = F_{\chi^2_D}(d_i^2)` of a Gaussian posterior (no samples).

References:
    Givens & Shortt (1984), A class of Wasserstein metrics for probability distributions.
    Lemos, Coogan, Hezaveh & Perreault-Levasseur (2023), Sampling-Based Accuracy Testing of
    Posterior Estimators for General Inference (TARP), arXiv 2302.03026.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "gaussian_fit",
    "gaussian_w2",
    "expected_coverage",
    "gaussian_coverage",
    "coverage_error",
]


def _sqrtm(c: Tensor) -> Tensor:
    lam, u = torch.linalg.eigh(c)
    return (u * lam.clamp_min(0).sqrt()[..., None, :]) @ u.mT


def gaussian_fit(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (1/S) covariance of samples with shape (*, S, D) -> (*, D), (*, D, D)."""
    if samples.ndim < 2 or samples.shape[-2] < 2:
        raise ValueError(f"samples must have shape (*, S, D) with S >= 2, got {samples.shape}")
    x = samples.double()
    mean = x.mean(-2)
    xc = x - mean[..., None, :]
    cov = xc.mT @ xc / x.shape[-2]
    return mean, (cov + cov.mT) / 2


def gaussian_w2(m1: Tensor, c1: Tensor, m2: Tensor, c2: Tensor) -> Tensor:
    """W2 between N(m1, c1) and N(m2, c2); means (*, D), covariances (*, D, D) -> shape (*).

    Leading dims broadcast. Computed in float64.
    """
    m1, c1, m2, c2 = (v.double() for v in (m1, c1, m2, c2))
    dims = {m1.shape[-1], m2.shape[-1], c1.shape[-1], c1.shape[-2], c2.shape[-1], c2.shape[-2]}
    if len(dims) != 1:
        raise ValueError("means (*, D) and covariances (*, D, D) must share D")
    r2 = _sqrtm(c2)
    cross = _sqrtm(r2 @ c1 @ r2)
    tr = torch.diagonal(c1 + c2 - 2 * cross, dim1=-2, dim2=-1).sum(-1)
    w2sq = ((m1 - m2) ** 2).sum(-1) + tr
    return w2sq.clamp_min(0).sqrt()


def _mahalanobis(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """Squared Mahalanobis distances of x (N, *, D) under N(mean (N, D), cov (N, D, D))."""
    L = torch.linalg.cholesky(cov)
    diff = x - mean.reshape(mean.shape[0], *([1] * (x.ndim - 2)), mean.shape[-1])
    flat = diff.reshape(x.shape[0], -1, x.shape[-1]).mT  # (N, D, K)
    z = torch.linalg.solve_triangular(L, flat, upper=False)
    return (z**2).sum(-2).reshape(x.shape[:-1])


def _levels(levels: Tensor | None) -> Tensor:
    if levels is None:
        return torch.linspace(0, 1, 101, dtype=torch.float64)
    return torch.as_tensor(levels, dtype=torch.float64)


def expected_coverage(
    samples: Tensor,
    truth: Tensor,
    mean: Tensor | None = None,
    cov: Tensor | None = None,
    levels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Expected coverage of ellipsoidal (HPD-of-a-Gaussian) credible regions.

    Arguments:
        samples: posterior samples, with shape (N, S, D).
        truth: the true signals, with shape (N, D).
        mean, cov: the Gaussian that defines the ellipsoids, with shapes (N, D) and
            (N, D, D); default the Gaussian fit of the samples.
        levels: credibility levels alpha (default 101 levels on [0, 1]).

    Returns:
        The levels alpha, with shape (L,), and ECP(alpha), with shape (L,).
    """
    if samples.ndim != 3 or truth.shape != (samples.shape[0], samples.shape[2]):
        raise ValueError(
            f"samples must have shape (N, S, D) and truth (N, D); got {tuple(samples.shape)} "
            f"and {tuple(truth.shape)}"
        )
    x = samples.double()
    if mean is None or cov is None:
        mean, cov = gaussian_fit(x)
    mean, cov = mean.double(), cov.double()
    d_samples = _mahalanobis(x, mean, cov)  # (N, S)
    d_truth = _mahalanobis(truth.double()[:, None], mean, cov)  # (N, 1)
    f = (d_samples < d_truth).double().mean(-1)  # (N,)
    alpha = _levels(levels)
    ecp = (f[None, :] <= alpha[:, None]).double().mean(-1)
    return alpha, ecp


def gaussian_coverage(
    mean: Tensor, cov: Tensor, truth: Tensor, levels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Expected coverage of the credible ellipsoids of Gaussian posteriors N(mean_i, cov_i).

    Arguments:
        mean: posterior means, with shape (N, D).
        cov: posterior covariances, with shape (N, D, D).
        truth: the true signals, with shape (N, D).
        levels: credibility levels alpha (default 101 levels on [0, 1]).

    Returns:
        The levels, with shape (L,), and the fraction of truths inside each level's
        ellipsoid, with shape (L,).
    """
    d2 = _mahalanobis(truth.double()[:, None], mean.double(), cov.double())[:, 0]
    dim = torch.tensor(mean.shape[-1] / 2, dtype=torch.float64)
    f = torch.special.gammainc(dim, d2 / 2)  # chi^2_D CDF
    alpha = _levels(levels)
    ecp = (f[None, :] <= alpha[:, None]).double().mean(-1)
    return alpha, ecp


def coverage_error(alpha: Tensor, ecp: Tensor) -> float:
    """max over levels of |ECP(alpha) - alpha|."""
    return float((ecp - alpha).abs().max())
