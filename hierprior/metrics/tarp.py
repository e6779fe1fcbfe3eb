r"""TARP: coverage test of posterior samples with random reference points.

For simulations i = 1..N with true parameters :math:`\theta_i` and posterior samples
:math:`\theta_{i,1}, \dots, \theta_{i,S} \sim \hat p(\theta \mid y_i)`, draw a reference point
:math:`r_i` and let

.. math:: f_i = \frac{1}{S} \sum_{s=1}^S \mathbb{1}\big[\|\theta_{i,s} - r_i\| <
          \|\theta_i - r_i\|\big],

the posterior mass of the ball around :math:`r_i` that reaches the truth. If
:math:`\hat p = p` then :math:`\theta_i` is exchangeable with the samples and :math:`f_i` is
uniform (on :math:`\{0, 1/S, \dots, 1\}`), so the expected coverage probability

.. math:: \mathrm{ECP}(\alpha) = \frac{1}{N} \sum_i \mathbb{1}[f_i < \alpha]

equals :math:`\alpha` up to :math:`1/(S+1)` (Lemos et al. 2023 show the converse for random
references: ECP = alpha for all alpha and reference distributions iff the posterior is right).
ECP is evaluated on the fixed grid ``alpha = linspace(0, 1, num_alpha)`` (tarp 0.1.1 histograms
f over its data-dependent range, so its alpha can leave [0, 1]). With R references per
simulation, ECP averages over all N·R pairs.

Summaries: ``atc`` = :math:`\int_0^1 (\mathrm{ECP}(\alpha) - \alpha)\, d\alpha` (signed,
trapezoid rule: > 0 means under-confident / conservative regions, < 0 over-confident or
biased), ``atc_abs`` = :math:`\int_0^1 |\mathrm{ECP}(\alpha) - \alpha|\, d\alpha` and
``ks_stat`` = :math:`\max_\alpha |\mathrm{ECP}(\alpha) - \alpha|` on the grid. An over-confident
posterior makes f pile up at 0 and 1 (the truth lies outside the sample cloud), so the signed
area can nearly cancel: judge calibration by ``atc_abs`` or ``ks_stat``.

Uncertainty: a real bootstrap over simulations: each replicate resamples the N simulations
with replacement (with their f values) and recomputes the ECP; every replicate uses fresh
generator draws.

Normalisation (``norm=True``): every feature is z-scored with the truths' mean and standard
deviation (zero-variance features are only centred) before distances are taken, so all
features count on the same scale. Default references are uniform over the bounding box of the
(normalised) truths.

References:
    Lemos, Coogan, Hezaveh & Perreault-Levasseur (2023), "Sampling-based accuracy testing of
    posterior estimators for general inference", arXiv 2302.03026.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hierprior.checks import check_int
from hierprior.metrics.pqmass import as_generator

__all__ = ["TARPResult", "tarp"]

# Elements of one distance block (simulations x samples x features).
_BLOCK_ELEMENTS = 2**24


@dataclass
class TARPResult:
    """Outcome of :func:`tarp`.

    Attributes:
        alpha: Credibility levels linspace(0, 1, A), with shape (A,).
        ecp: Expected coverage probability at each alpha, with shape (A,).
        ecp_std: Bootstrap standard deviation of the ECP, with shape (A,), or None.
        ecp_bootstrap: Bootstrap replicates of the ECP, with shape (bootstrap, A), or None.
        atc: Signed area between ECP and the diagonal, integral of (ECP - alpha).
        atc_abs: Unsigned area, integral of abs(ECP - alpha).
        ks_stat: max over the grid of abs(ECP - alpha).
        f: Posterior mass closer to each reference than the truth, with shape (N, R).
    """

    alpha: Tensor
    ecp: Tensor
    ecp_std: Tensor | None
    ecp_bootstrap: Tensor | None
    atc: float
    atc_abs: float
    ks_stat: float
    f: Tensor


def samples_and_truth(samples, truth, min_event_dims: int = 0) -> tuple[Tensor, Tensor]:
    """Tensors of posterior ``samples`` (N, S, *event) and ``truth`` (N, *event), checked.

    Raises a one-line ValueError when the shapes do not pair (or the event has fewer than
    ``min_event_dims`` dimensions), TypeError for what is not an array.
    """
    samples = _as_tensor("samples", samples)
    truth = _as_tensor("truth", truth)
    if truth.ndim < 1 + min_event_dims or samples.ndim != truth.ndim + 1:
        event = "a non-empty event shape" if min_event_dims else "(N, *event)"
        raise ValueError(
            f"samples must have shape (N, S, *event) and truth (N, *event), with {event}; "
            f"got samples {tuple(samples.shape)} and truth {tuple(truth.shape)}"
        )
    n, event = samples.shape[0], tuple(truth.shape[1:])
    if truth.shape[0] != n or tuple(samples.shape[2:]) != event:
        raise ValueError(
            f"samples {tuple(samples.shape)} do not match truth {tuple(truth.shape)}: expected "
            f"samples of shape ({truth.shape[0]}, S, {', '.join(map(str, event))})"
        )
    return samples, truth


def _as_tensor(name: str, value) -> Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value)}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return value


@torch.no_grad()
def tarp(
    samples: Tensor,
    truth: Tensor,
    num_refs: int = 1,
    references: Tensor | None = None,
    num_alpha: int = 101,
    bootstrap: int = 100,
    generator: torch.Generator | int | None = None,
    norm: bool = True,
    dtype: torch.dtype = torch.float32,
) -> TARPResult:
    r"""TARP expected coverage of posterior samples.

    Args:
        samples: Posterior samples, with shape (N, S, *event): S samples for each of N
            simulations (the posterior sampler's "(N, num_samples, *x_shape)" layout).
        truth: True values, with shape (N, *event).
        num_refs: Number R of random reference points per simulation (ignored when
            ``references`` is given).
        references: Explicit reference points in the data's units, with shape (N, *event)
            (R = 1) or (N, R, *event); normalised together with the samples when ``norm``.
            Default: uniform over the bounding box of the (normalised) truths.
        num_alpha: Number A of credibility levels in linspace(0, 1, A).
        bootstrap: Number of bootstrap replicates over simulations (0: none).
        generator: ``torch.Generator``, integer seed or None (fresh entropy); drives the
            references and the bootstrap.
        norm: Z-score features by the truths' mean and standard deviation first.
        dtype: Floating dtype of the distance computation.

    Returns:
        A :class:`TARPResult`: alpha and ecp with shape (A,), bootstrap spread and replicates,
        the areas ``atc`` (signed) and ``atc_abs``, ``ks_stat`` and f with shape (N, R).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mean = torch.randn(500, 3, generator=g)
        >>> truth = mean + torch.randn(500, 3, generator=g)
        >>> samples = mean[:, None] + torch.randn(500, 200, 3, generator=g)
        >>> r = tarp(samples, truth, generator=g)
        >>> r.ks_stat < 0.1
        True
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
    samples, truth = samples_and_truth(samples, truth)
    n, s = samples.shape[0], samples.shape[1]
    event = tuple(truth.shape[1:])
    if n < 2 or s < 1:
        raise ValueError(f"need at least 2 simulations and 1 sample each, got N={n}, S={s}")
    check_int(num_alpha, "num_alpha", 2)
    check_int(bootstrap, "bootstrap", 0)
    if samples.device != truth.device:
        raise ValueError(
            f"samples and truth are on different devices: {samples.device}, {truth.device}"
        )
    device = truth.device
    dim = math.prod(event)
    theta = truth.reshape(n, dim).to(dtype)

    shift = theta.mean(0) if norm else torch.zeros(dim, dtype=dtype, device=device)
    scale = torch.ones(dim, dtype=dtype, device=device)
    if norm:
        scale = theta.std(0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    theta = (theta - shift) / scale

    g = None
    if references is None or bootstrap > 0:
        g = as_generator(generator, device)
    if references is None:
        check_int(num_refs, "num_refs")
        low, high = theta.min(0).values, theta.max(0).values
        u = torch.rand((n, num_refs, dim), generator=g, device=g.device, dtype=dtype)
        refs = low + (high - low) * u.to(device)
    else:
        references = _as_tensor("references", references).to(device)
        if tuple(references.shape) == (n, *event):
            references = references[:, None]
        if (
            references.ndim != truth.ndim + 1
            or references.shape[0] != n
            or tuple(references.shape[2:]) != event
        ):
            raise ValueError(
                f"references must have shape {(n, *event)} or (N, R, *event) with N={n}, got "
                f"{tuple(references.shape)}"
            )
        refs = (references.reshape(n, -1, dim).to(dtype) - shift) / scale
    num_r = refs.shape[1]

    chunk = max(1, _BLOCK_ELEMENTS // max(s * dim, num_r * s))
    f = torch.empty((n, num_r), dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        post = (samples[start:stop].reshape(stop - start, s, dim).to(dtype) - shift) / scale
        r = refs[start:stop]
        # Exact (non-matmul) distances: the strict comparison below must not flip on rounding.
        mode = "donot_use_mm_for_euclid_dist"
        d_post = torch.cdist(r, post, compute_mode=mode)  # (c, R, S)
        d_truth = torch.cdist(r, theta[start:stop, None], compute_mode=mode)  # (c, R, 1)
        f[start:stop] = (d_post < d_truth).sum(-1).double() / s

    alpha = torch.linspace(0.0, 1.0, num_alpha, dtype=torch.float64, device=device)
    below = (f[:, :, None] < alpha).sum(1).double()  # (N, A): refs with f < alpha per sim
    ecp = below.sum(0) / (n * num_r)

    ecp_boot = ecp_std = None
    if bootstrap > 0:
        idx = torch.randint(n, (bootstrap, n), generator=g, device=g.device).to(device)
        weights = torch.zeros((bootstrap, n), dtype=torch.float64, device=device)
        weights.scatter_add_(1, idx, torch.ones_like(weights))
        ecp_boot = weights @ below / (n * num_r)
        ecp_std = ecp_boot.std(0) if bootstrap > 1 else torch.zeros_like(ecp)

    gap = ecp - alpha
    return TARPResult(
        alpha=alpha,
        ecp=ecp,
        ecp_std=ecp_std,
        ecp_bootstrap=ecp_boot,
        atc=float(torch.trapezoid(gap, alpha)),
        atc_abs=float(torch.trapezoid(gap.abs(), alpha)),
        ks_stat=float(gap.abs().max()),
        f=f,
    )
