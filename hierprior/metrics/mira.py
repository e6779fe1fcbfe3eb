r"""MIRA: accuracy of a candidate conditional distribution from joint samples.

For observations i = 1..N with one true value :math:`y^*_i` (a joint draw
:math:`(x^*_i, y^*_i)`) and S candidate samples :math:`y_{i,1}, \dots, y_{i,S} \sim
\hat p(y \mid x^*_i)`, each random region is the ball

.. math:: \mathcal R = \{y : d(y, c) \le d(y_r, c)\},

with a random centre :math:`c \sim p(c)` and its radius set by a random candidate sample
:math:`y_r` (one of the S, drawn uniformly; d is the Euclidean distance). The other
:math:`M = S - 1` samples give the count :math:`n = \#\{j \ne r : d(y_j, c) \le d(y_r, c)\}` and
the truth the indicator :math:`k = \mathbb 1[d(y^*, c) \le d(y_r, c)]`. If
:math:`\hat p = p`, the candidate mass of the ball is uniform on [0, 1] (it is the probability
integral transform of :math:`d(y_r, c)`) and equals the true mass, so the probability of k given n
is Laplace's rule of succession, the *Mira statistic*

.. math:: P = \frac{n + 1}{M + 2}\ \text{if}\ k = 1, \qquad
          P = \frac{M - n + 1}{M + 2}\ \text{if}\ k = 0.

The *Mira score* is the mean of P over the N observations and R regions per observation (fresh
centre and radius sample for each region; the paper's Algorithm 1). Under a correct candidate
the ranks of the truth and of :math:`y_r` among the S + 1 distances to c are a uniform pair of
distinct ranks, whatever the distributions, centres or dimension, so (S + 1) P takes
v = 1..S with probability 2v/(S(S + 1)) (a discrete Beta(2, 1)) and, per region,

.. math:: \mathbb E P = \frac{2S + 1}{3(S + 1)} \to \frac23, \qquad
          \operatorname{Var} P = \frac{(S + 2)(S - 1)}{18 (S + 1)^2} \to \frac{1}{18}.

For any candidate the expected score is at least 1/2 (approached for disjoint supports).
Over-confident candidates (too narrow, or biased) score below ``expected``, under-confident (too
wide) ones above it.

Ties. Where distances tie (discrete data, duplicated points) the statistic is averaged over a
uniformly random order of the tied points: with B counted samples strictly inside and E tied
with :math:`y_r`, P = (B + E/2 + 1)/(M + 2) if the truth is strictly inside,
(M - B - E/2 + 1)/(M + 2) if strictly outside and 1/2 + E/(6(M + 2)) if it ties. This equals the
paper's P wherever nothing ties (almost surely for continuous data) and keeps ``expected`` exact
on discrete data, where counting ties as inside (the paper's ``<=``) biases the score.

Standard errors. ``std_one_region`` is :math:`\sqrt{\operatorname{Var} P / N}`, the paper's band
(:math:`\sqrt{1/(18L)}` for large S). It is exact for one region per observation but too wide for
the mean over R > 1 regions: the regions of one observation share the truth and the samples,
yet their statistics are far from identical. For large S and R the per-observation variance
falls from 1/18 to at most 1/180 (the variance of :math:`\mathbb E[P \mid \text{truth rank } J]
= 1/2 + J(1 - J)`), so the band narrows by at least sqrt(10) ~ 3.2x as R grows (measured at
R = 100, N = 200, S = 32: 3.0x in 1-d, 4.3x in 3-d, 5.7x in 8-d Gaussians). ``std`` is the
null standard error of the R-region score: given the S + 1 points of an observation and the
centres, a correct candidate makes the truth a uniformly random one of the S + 1 points and each
radius sample a uniformly random one of the other S, and the conditional mean of an
observation's value is then the constant ``expected``; its null variance is therefore the mean
of the conditional variance, which is computed exactly from the ranks of the S + 1 distances to
every centre (closed-form sums over the radius rank) and averaged over observations. For R = 1
it equals ``std_one_region``; for R > 1 it matched the spread of Monte-Carlo scores to 1% (3000
data sets). ``stderr`` is the standard error of the mean of the per-observation values, valid
under any candidate (the analogue of the paper's bootstrap over observations).

Regions. As in the paper's experiments (and ``mira_score.mira(..., norm=True)``), by default
each feature is min-max scaled by the truths' range (zero-range features only shifted) and the
centres are uniform on the unit box, i.e. uniform over the truths' bounding box. The box depends
on the extreme truths, which perturbs the null formulas by O(D/N) (not measurable in the tests);
``centers`` takes explicit centres in data units instead, e.g. truth-independent ones, or the
observation-dependent centres :math:`c = x^* + \epsilon` the paper uses to catch an
uninformative candidate :math:`\hat p(y \mid x) = p(y)`, to which random centres are blind.

The reference package ``mira-score`` 0.1.7 (same regions replayed: same per-run means to float32
rounding once its rescaling is undone) has defects that change the numbers:

- it divides the statistic by its maximum (M + 1)/(M + 2), which the paper does not, so a
  correct candidate scores (2S + 1)/(3S) instead of (2S + 1)/(3(S + 1)): at S = 10 it gave
  0.702 (T = 1000, 100 runs), 4.7 of the paper's bands above 2/3, on the side the paper reads
  as under-confidence;
- its second output is the spread of per-run means (0.0075 there), not the standard error of
  its score (0.0022 across data sets); NaN for ``num_runs=1``;
- it counts samples with ``<`` but the truth with ``<=``: on Binomial(4, p) data (S = 20) its
  score, rescaling undone, was 0.6440 against the exact 0.6508 (mean of 3 data sets, -5.4
  standard errors; here 0.6505);
- ``reference_choice`` raises UnboundLocalError (``masked_dists`` is never set);
- ``norm`` min-max scales by the truths (its docstring says z-score) with a ``+ 1e-8`` that
  magnifies zero-range features by 1e8; it draws from the global RNG and materialises the
  (models, N, S, D) difference tensor.

References:
    Sharief, Zeghal, Barco, Lemos, Hezaveh & Perreault-Levasseur (2026), "MIRA: A Score for
    Conditional Distribution Accuracy and Model Comparison", arXiv 2605.02014.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hierprior.checks import check_int, check_optional_int
from hierprior.metrics.pqmass import as_generator
from hierprior.metrics.tarp import _as_tensor, samples_and_truth

__all__ = ["MIRAResult", "mira", "mira_null_moments"]

# Elements of one block (observations x regions x (S + 1), or x features); each element costs
# ~40 bytes of temporaries (distances, sort order, ranks, float64 rank moments).
_BLOCK_ELEMENTS = {"cpu": 2**20, "cuda": 2**25}


@dataclass(frozen=True)
class MIRAResult:
    """Outcome of :func:`mira`.

    Attributes:
        score: Mira score, the mean of the Mira statistic over observations and regions.
        expected: Its expectation under a correct candidate, (2S + 1)/(3(S + 1)) (-> 2/3).
        std: Standard error of ``score`` under a correct candidate for these N, S, R and
            regions (exact: the mean conditional null variance of the observations, see the
            module docstring); equals ``std_one_region`` when R = 1.
        std_one_region: sqrt(Var P / N) with Var P = (S + 2)(S - 1)/(18 (S + 1)^2) (-> 1/18):
            the null standard error with one region per observation (the paper's band); an
            upper bound of ``std``.
        stderr: Standard deviation of ``values`` over sqrt(N): the standard error of ``score``
            under any candidate (observations are independent).
        z: (score - expected) / std.
        values: Mira statistic of every observation averaged over its regions, with shape (N,).
        statistic: Mira statistic of every region, with shape (N, R).
        inside: Whether the truth lies in each region (k = 1), with shape (N, R).
    """

    score: float
    expected: float
    std: float
    std_one_region: float
    stderr: float
    z: float
    values: Tensor
    statistic: Tensor
    inside: Tensor


def mira_null_moments(num_samples: int) -> tuple[float, float]:
    """Mean and variance of the Mira statistic of one region under a correct candidate.

    With S = ``num_samples`` candidate samples (one sets the radius, M = S - 1 are counted):
    mean (2S + 1)/(3(S + 1)) and variance (S + 2)(S - 1)/(18 (S + 1)^2), tending to 2/3 and
    1/18 (the moments of Beta(2, 1)).
    """
    s = check_int(num_samples, "num_samples", 2)
    return (2 * s + 1) / (3 * (s + 1)), (s + 2) * (s - 1) / (18 * (s + 1) ** 2)


def _rank_moments(num_samples: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Mean and variance of the statistic given the truth's rank, over a uniform radius rank.

    Ranks a = 1..S+1 of the truth among the S + 1 distances to a centre; the radius sample has
    a uniform rank b != a and the statistic is (b - 1)/(S + 1) if b > a (truth inside), else
    (S + 1 - b)/(S + 1). Returns two float64 tensors with shape (S + 1,), indexed by a - 1.
    """
    s = num_samples
    a = torch.arange(1, s + 2, dtype=torch.float64, device=device)

    def tri(m):  # 1 + ... + m
        return m * (m + 1) / 2

    def sq(m):  # 1^2 + ... + m^2
        return m * (m + 1) * (2 * m + 1) / 6

    # b > a contributes (b - 1) = a..S; b < a contributes (S + 1 - b) = S + 2 - a..S.
    first = (2 * tri(s) - tri(a - 1) - tri(s + 1 - a)) / (s * (s + 1))
    second = (2 * sq(s) - sq(a - 1) - sq(s + 1 - a)) / (s * (s + 1) ** 2)
    return first, (second - first * first).clamp_min(0.0)


@torch.no_grad()
def mira(
    samples: Tensor,
    truth: Tensor,
    generator: torch.Generator | int | None = None,
    num_regions: int = 100,
    *,
    centers: Tensor | None = None,
    radius_index: Tensor | None = None,
    norm: bool = True,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
) -> MIRAResult:
    r"""Mira score of candidate conditional samples against one true value per observation.

    Args:
        samples: Candidate samples, with shape (N, S, *event): S >= 2 samples of the candidate
            conditional for each of N observations (the posterior sampler's layout).
        truth: True values, with shape (N, *event): one joint draw per observation.
        generator: ``torch.Generator`` (any device), integer seed or None (fresh entropy);
            drives the centres and the radius samples. The global RNG is never used.
        num_regions: Number R of random regions per observation (ignored when ``centers`` has
            an R axis).
        centers: Explicit centres in the data's units, with shape (N, *event) (R = 1) or
            (N, R, *event); scaled together with the data when ``norm``. Default: uniform over
            the truths' per-feature bounding box.
        radius_index: Index in 0..S-1 of the sample that sets each region's radius, an integer
            tensor with shape (N, R) (R from ``centers`` or ``num_regions``). Default: uniform.
        norm: Min-max scale every feature by the truths' range first (zero-range features only
            shifted), so all features count on the same scale, as in the paper.
        dtype: Floating dtype of the distance computation (float64 for bit-stable counts).
        chunk_size: Observations per block; None bounds a block by ~2**20 elements on CPU
            (2**25 on CUDA). Results do not depend on it.

    Returns:
        A :class:`MIRAResult`: ``score``, its null ``expected`` value and standard error
        ``std`` (the band is ``expected`` +- 3 ``std``), ``std_one_region``, ``stderr``,
        ``z``, per-observation ``values`` (N,), per-region ``statistic`` and ``inside`` (N, R).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mean = 3 * torch.randn(200, 2, generator=g)
        >>> truth = mean + torch.randn(200, 2, generator=g)
        >>> samples = mean[:, None] + torch.randn(200, 50, 2, generator=g)
        >>> r = mira(samples, truth, generator=0)
        >>> abs(r.score - r.expected) < 3 * r.std
        True
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
    if not isinstance(norm, bool):
        raise TypeError(f"norm must be a bool, got {norm!r}")
    samples, truth = samples_and_truth(samples, truth, min_event_dims=1)
    n, s = samples.shape[0], samples.shape[1]
    event = tuple(truth.shape[1:])
    if n < 2 or s < 2:
        raise ValueError(
            f"need at least 2 observations and 2 samples each (one sets the radius), got "
            f"N={n}, S={s}"
        )
    if samples.device != truth.device:
        raise ValueError(
            f"samples and truth are on different devices: {samples.device}, {truth.device}"
        )
    check_optional_int(chunk_size, "chunk_size")
    device = truth.device
    dim = math.prod(event)
    if dim == 0:
        raise ValueError(f"truth has an empty event shape {event}")
    theta = truth.reshape(n, dim).to(dtype)

    low = theta.min(0).values
    shift = low if norm else torch.zeros(dim, dtype=dtype, device=device)
    scale = torch.ones(dim, dtype=dtype, device=device)
    if norm:
        span = theta.max(0).values - low
        scale = torch.where(span > 0, span, torch.ones_like(span))
    theta = (theta - shift) / scale

    if centers is None:
        num_r = check_int(num_regions, "num_regions")
    else:
        centers = _as_tensor("centers", centers).to(device)
        if tuple(centers.shape) == (n, *event):
            centers = centers[:, None]
        if (
            centers.ndim != truth.ndim + 1
            or centers.shape[0] != n
            or tuple(centers.shape[2:]) != event
            or centers.shape[1] < 1
        ):
            raise ValueError(
                f"centers must have shape {(n, *event)} or (N, R, *event) with N={n}, got "
                f"{tuple(centers.shape)}"
            )
        num_r = centers.shape[1]
        centers = (centers.reshape(n, num_r, dim).to(dtype) - shift) / scale
    if radius_index is not None:
        if not isinstance(radius_index, Tensor):
            raise TypeError(
                f"radius_index must be an integer torch.Tensor, got {type(radius_index)}"
            )
        if radius_index.dtype.is_floating_point or radius_index.is_complex():
            raise TypeError(f"radius_index must be an integer tensor, got {radius_index.dtype}")
        if radius_index.dtype == torch.bool:
            raise TypeError("radius_index must be an integer tensor, got torch.bool")
        if tuple(radius_index.shape) != (n, num_r):
            raise ValueError(
                f"radius_index must have shape ({n}, {num_r}), got {tuple(radius_index.shape)}"
            )
        if bool((radius_index < 0).any() | (radius_index >= s).any()):
            raise ValueError(f"radius_index must lie in 0..{s - 1}")
        radius_index = radius_index.to(device=device, dtype=torch.long)

    if centers is None or radius_index is None:
        g = as_generator(generator, device)
        if centers is None:
            # Uniform on the unit box in scaled units = uniform over the truths' bounding box.
            u = torch.rand((n, num_r, dim), generator=g, device=g.device, dtype=dtype)
            box_low, box_high = theta.min(0).values, theta.max(0).values  # [0, 1] when norm
            centers = box_low + (box_high - box_low) * u.to(device)
        if radius_index is None:
            radius_index = torch.randint(s, (n, num_r), generator=g, device=g.device).to(device)

    if chunk_size is None:
        budget = _BLOCK_ELEMENTS.get(device.type, 2**20)
        chunk_size = max(1, budget // max(s * dim, num_r * (s + 1), num_r * dim))
    mean_p, var_p = mira_null_moments(s)
    g_rank, h_rank = _rank_moments(s, device) if num_r > 1 else (None, None)
    denom = float(s + 1)  # M + 2 with M = S - 1 counted samples

    values = torch.empty(n, dtype=torch.float64, device=device)
    null_var = torch.empty(n, dtype=torch.float64, device=device)
    statistic = torch.empty((n, num_r), dtype=torch.float64, device=device)
    inside = torch.empty((n, num_r), dtype=torch.bool, device=device)
    # Exact (non-matmul) distances: the <= comparisons must not flip on rounding.
    mode = "donot_use_mm_for_euclid_dist"
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        c = stop - start
        post = (samples[start:stop].reshape(c, s, dim).to(dtype) - shift) / scale
        ctr = centers[start:stop]
        d_post = torch.cdist(ctr, post, compute_mode=mode)  # (c, R, S)
        d_truth = torch.cdist(ctr, theta[start:stop, None], compute_mode=mode)[..., 0]  # (c, R)
        d_rad = d_post.gather(2, radius_index[start:stop, :, None])  # (c, R, 1)
        below = (d_post < d_rad).sum(-1).double()  # (c, R)
        tied = (d_post == d_rad).sum(-1).double() - 1.0  # the radius sample is not counted
        d_rad = d_rad[..., 0]
        # Paper's statistic, averaged over a uniformly random order of tied points (the same
        # as the paper's where nothing ties, i.e. almost surely for continuous data).
        p = torch.where(
            d_truth < d_rad,
            below + 0.5 * tied + 1.0,
            torch.where(d_truth > d_rad, s - below - 0.5 * tied, 0.5 * denom + tied / 6.0),
        )
        p = p / denom
        statistic[start:stop], inside[start:stop] = p, d_truth <= d_rad
        values[start:stop] = p.mean(1)
        if num_r > 1:
            # Null: the truth is any of the S + 1 points with probability 1/(S + 1), each radius
            # sample any of the other S. Rank every point among the S + 1 distances per region.
            d_all = torch.cat([d_post, d_truth[..., None]], dim=2)  # (c, R, S + 1)
            order = d_all.argsort(dim=2)
            ranks = torch.empty_like(order)
            ranks.scatter_(2, order, torch.arange(s + 1, device=device).expand_as(order))
            cond_mean = g_rank[ranks].mean(1)  # (c, S + 1): E[value | truth = point t]
            cond_var = h_rank[ranks].sum(1) / num_r**2  # (c, S + 1): Var[value | truth = t]
            null_var[start:stop] = cond_var.mean(1) + cond_mean.var(1, unbiased=False)
    if num_r == 1:
        null_var.fill_(var_p)

    score = float(values.mean())
    std = math.sqrt(float(null_var.mean()) / n)
    return MIRAResult(
        score=score,
        expected=mean_p,
        std=std,
        std_one_region=math.sqrt(var_p / n),
        stderr=float(values.std()) / math.sqrt(n),
        z=(score - mean_p) / std if std > 0 else 0.0,
        values=values,
        statistic=statistic,
        inside=inside,
    )
