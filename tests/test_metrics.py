"""Tests for hierprior.metrics: PQMass, TARP and residual chi2 (peers pqm 0.6.3, tarp 0.1.1)."""

from __future__ import annotations

import contextlib
import io
import itertools

import deprecation  # noqa: F401  (tarp 0.1.1 imports it without declaring it)
import numpy as np
import pytest
import torch
from pqm import pqm_chi2
from pqm.utils import _compute_counts_numpy
from scipy import stats
from scipy.stats import chi2, chi2_contingency
from tarp import get_tarp_coverage

from hierprior.metrics import PQMassResult, TARPResult, pqmass, residual_chi2, tarp
from hierprior.metrics.pqmass import chi2_isf_log, chi2_logsf

torch.set_num_threads(1)


@pytest.fixture
def np_seed():
    """Seed numpy's global RNG (pqm draws references from it) and restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(1234)
    yield
    np.random.set_state(state)


def gaussians(n_x, n_y, dim, shift, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_x, dim, generator=g, dtype=dtype)
    y = torch.randn(n_y, dim, generator=g, dtype=dtype) + shift
    return x, y


def pqm_reference_chi2(x, y, refs, num_refs):
    """pqm 0.6.3's per-tessellation computation: counts, drop empty cells, chi2, rescale."""
    cx, cy = _compute_counts_numpy(x, y, refs, num_refs)
    filled = (cx > 0) | (cy > 0)
    _, p, _, _ = chi2_contingency(np.stack([cx[filled], cy[filled]]), correction=False)
    return cx, cy, chi2.isf(p, num_refs - 1), filled.sum()


def quiet_pqm_chi2(*args, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()):  # pqm's tqdm bars
        return np.asarray(pqm_chi2(*args, **kwargs), dtype=np.float64)


# ----------------------------------------------------------------------------- PQMass


def test_pqmass_matches_pqm_with_injected_references():
    # pqm's draw: references taken out of x and y, the rest counted. Three references sit far
    # away so their cells are empty and the dof rescaling path runs too.
    x, y = gaussians(400, 300, 6, 0.3, seed=0)
    g = torch.Generator().manual_seed(1)
    t, k = 4, 30
    refs, xs, ys = [], x[60:], y[60:]
    for i in range(t):
        pick = torch.randperm(60, generator=g)
        r = torch.cat([x[pick[:15]], y[pick[15:30]]])
        r[:3] = 50.0 + i
        refs.append(r)
    refs = torch.stack(refs)
    result = pqmass(xs, ys, refs=refs, dtype=torch.float64)
    assert isinstance(result, PQMassResult)
    assert result.dof == k - 1 and result.chi2_per_tessellation.shape == (t,)
    for i in range(t):
        cx, cy, chi2_pqm, filled = pqm_reference_chi2(xs.numpy(), ys.numpy(), refs[i].numpy(), k)
        assert filled <= k - 3  # the far cells are empty: rescaled chi2
        assert np.array_equal(result.counts[i, 0].numpy(), cx)
        assert np.array_equal(result.counts[i, 1].numpy(), cy)
        # Same table, same formulas; the two dof maps differ only by float round-off.
        assert result.chi2_per_tessellation[i].item() == pytest.approx(chi2_pqm, rel=1e-9)
    assert result.chi2 == pytest.approx(result.chi2_per_tessellation.mean().item(), rel=1e-12)


def test_pqmass_float32_counts_match_pqm():
    # float32 matmul distances vs scipy's float64 cdist: with this fixed seed no sample is
    # within rounding error of a Voronoi boundary, so counts agree exactly.
    x, y = gaussians(500, 500, 16, 0.2, seed=3, dtype=torch.float32)
    refs = gaussians(40, 0, 16, 0.0, seed=4, dtype=torch.float32)[0]
    result = pqmass(x, y, refs=refs)
    cx, cy, chi2_pqm, _ = pqm_reference_chi2(
        x.double().numpy(), y.double().numpy(), refs.double().numpy(), 40
    )
    assert np.array_equal(result.counts[0, 0].numpy(), cx)
    assert np.array_equal(result.counts[0, 1].numpy(), cy)
    assert result.chi2 == pytest.approx(chi2_pqm, rel=1e-9)


def test_pqmass_mean_chi2_agrees_with_pqm(np_seed):
    # Given the data the tessellations are i.i.d., so each mean over T has Monte-Carlo error
    # sd/sqrt(T); the means must agree within 4 standard errors of their difference. (pqm draws
    # the x/y split of the references from a multinomial, we draw from the pool: same law up
    # to O(1/n), far below this error.)
    x, y = gaussians(600, 600, 8, 0.3, seed=5)
    t = 100
    ours = pqmass(x, y, num_refs=50, re_tessellations=t, generator=0).chi2_per_tessellation
    peer = quiet_pqm_chi2(x.numpy(), y.numpy(), num_refs=50, re_tessellation=t)
    se = np.sqrt(ours.var().item() / t + peer.var() / t)
    assert abs(ours.mean().item() - peer.mean()) < 4 * se
    assert ours.mean().item() > 2 * 49  # a clear shift: chi2 ~ 135 against dof 49


def test_pqmass_null_mean_is_dof():
    # Same distribution: E[mean chi2] = K - 1. The variance of one dataset's mean is at most
    # Var chi2(K-1) = 2(K-1) = 38 (tessellations are positively correlated, not more
    # dispersed), so the grand mean of 200 datasets has sd <= sqrt(38/200) = 0.44; allow 4 sd.
    k = 20
    means = [
        pqmass(*gaussians(300, 300, 4, 0.0, seed=s), k, 5, generator=s).chi2 for s in range(200)
    ]
    assert abs(np.mean(means) - (k - 1)) < 4 * np.sqrt(2 * (k - 1) / 200)


@pytest.mark.parametrize("seed", range(4))
def test_pqmass_detects_small_shift_in_784_dims(seed):
    x, y = gaussians(1000, 1000, 784, 0.1, seed=seed, dtype=torch.float32)
    result = pqmass(x, y, 100, 20, generator=seed)
    assert result.pvalue < 1e-3 and result.log_pvalue < np.log(1e-3)


def test_pqmass_log_pvalue_finite_where_pqm_overflows(np_seed):
    x, y = gaussians(1000, 1000, 10, 4.0, seed=7)
    peer = quiet_pqm_chi2(x.numpy(), y.numpy(), num_refs=100, re_tessellation=3)
    assert np.isinf(peer).all()  # pqm 0.6.3: chi2.isf of an underflowed p-value
    result = pqmass(x, y, 100, 3, generator=0)
    assert np.isfinite(result.chi2) and result.chi2 > 1810
    assert result.pvalue == 0.0
    assert np.isfinite(result.log_pvalue) and result.log_pvalue < -700


def test_chi2_log_tail_matches_scipy_and_inverts():
    x = np.array([5.0, 50.0, 99.0, 300.0, 800.0, 1290.0])
    # Where scipy's tail is representable the two must agree to float round-off.
    np.testing.assert_allclose(chi2_logsf(x, 99), np.log(chi2.sf(x, 99)), rtol=1e-10)
    big = np.array([150.0, 1000.0, 1800.0, 5000.0, 1e5])
    logp = chi2_logsf(big, 99)
    assert np.isfinite(logp).all() and (np.diff(logp) < 0).all()
    # Inverse to a relative 1e-9 (brentq tolerance 1e-14 plus log-space conditioning).
    np.testing.assert_allclose(chi2_isf_log(logp, 99), big, rtol=1e-9)
    # Asymptotics: log Q(a, x) ~ -x + (a - 1) log x - lgamma(a) for x >> a; at x = 5e4 the
    # next term is O(a/x) = 1e-3 in absolute value.
    a, h = 49.5, 5e4
    from scipy.special import gammaln

    assert logp[-1] == pytest.approx(-h + (a - 1) * np.log(h) - gammaln(a), abs=2e-3)


def test_pqmass_reference_samples_left_out_of_counts():
    x, y = gaussians(120, 80, 3, 0.0, seed=8)
    result = pqmass(x, y, 25, 6, generator=0)
    assert result.counts.shape == (6, 2, 25)
    assert (result.counts.sum((1, 2)) == 200 - 25).all()
    # References split between x and y, so each row loses between 0 and 25 samples.
    assert ((result.counts[:, 0].sum(1) <= 120) & (result.counts[:, 0].sum(1) >= 95)).all()


def test_pqmass_reproducible_and_shape_agnostic():
    x, y = gaussians(200, 200, 16, 0.3, seed=9, dtype=torch.float32)
    a = pqmass(x, y, 20, 8, generator=torch.Generator().manual_seed(3), permutations=5)
    b = pqmass(x.view(200, 1, 4, 4), y.view(200, 1, 4, 4), 20, 8, generator=3, permutations=5)
    c = pqmass(x, y, 20, 8, generator=3, permutations=5, chunk_size=7)
    d = pqmass(x, y, 20, 8, generator=4, permutations=5)
    for other in (b, c):
        assert torch.equal(a.chi2_per_tessellation, other.chi2_per_tessellation)
        assert torch.equal(a.null_chi2, other.null_chi2)
    assert not torch.equal(a.chi2_per_tessellation, d.chi2_per_tessellation)


def test_pqmass_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    pqmass(*gaussians(100, 100, 3, 0.0, seed=0), 10, 3, generator=1, permutations=3)
    assert torch.equal(before, torch.get_rng_state())


def test_permutation_null_calibrated_under_h0():
    # Under H0 the permutation p-value is (discrete) uniform on {1, ..., P+1}/(P+1): mean
    # 0.5125 for P = 39, sd 0.29 each, so the mean of 40 has sd 0.046; allow 4 sd.
    pvals = []
    for s in range(40):
        r = pqmass(*gaussians(150, 150, 3, 0.0, seed=100 + s), 10, 5, generator=s, permutations=39)
        assert r.null_chi2.shape == (39,)
        pvals.append(r.perm_pvalue)
    assert abs(np.mean(pvals) - 0.5125) < 4 * 0.046
    # The mean of the permutation null sits near K - 1 = 9 (within its own spread).
    assert abs(r.null_chi2.mean().item() - 9) < 3


def test_permutation_pvalue_under_shift_is_minimal():
    r = pqmass(*gaussians(300, 300, 5, 1.0, seed=11), 20, 5, generator=0, permutations=49)
    assert r.perm_pvalue == pytest.approx(1 / 50)
    assert r.null_chi2.max().item() < r.chi2


@pytest.mark.parametrize(
    "k, shift, n, dim",
    [
        (2, 0.0, 100, 3),
        (10, 0.0, 200, 4),
        (10, 0.4, 200, 4),
        (30, 0.5, 300, 6),
        (20, 1.5, 400, 4),
        (10, 2.5, 850, 2),  # p ~ 2e-301: past the 1e-280 switch to the continued fraction
    ],
)
def test_pqmass_pvalues_match_scipy(k, shift, n, dim):
    r = pqmass(*gaussians(n, n, dim, shift, seed=1), k, 5, generator=0)
    assert r.dof == k - 1
    assert r.pvalue == pytest.approx(chi2.sf(r.chi2, k - 1), rel=1e-6, abs=0)
    assert np.isfinite(chi2.logsf(r.chi2, k - 1))
    assert r.log_pvalue == pytest.approx(chi2.logsf(r.chi2, k - 1), rel=1e-6)
    if shift == 2.5:
        assert 0 < r.pvalue < 1e-280


# Permutation-null calibration: P permutations give p-values on the grid {1, ..., P+1}/(P+1),
# uniform on it under H0. Subtracting U/(P+1), U ~ U(0, 1) from a seeded generator, makes them
# exactly U(0, 1), so a KS test applies.
PERMS = 99


def _ks_uniform(pvalues: np.ndarray, seed: int = 0) -> float:
    jitter = np.random.default_rng(seed).random(len(pvalues)) / (PERMS + 1)
    return stats.kstest(np.asarray(pvalues) - jitter, "uniform").pvalue


@pytest.fixture(scope="module")
def null_unequal_sizes():
    """H0, n_x = 120 != n_y = 80, 5-d, K = 10, T = 10: (pvalue, perm_pvalue, chi2) x 300."""
    rows = []
    for s in range(300):
        r = pqmass(
            *gaussians(120, 80, 5, 0.0, seed=1000 + s), 10, 10, generator=s, permutations=PERMS
        )
        rows.append((r.pvalue, r.perm_pvalue, r.chi2))
    return np.array(rows)


def test_permutation_null_uniform_with_unequal_sizes(null_unequal_sizes, report):
    # Kills a null built from one tessellation (chi2_t[:, 0] instead of the mean over T): that
    # null is much wider than the observed mean's law and the p-values bunch up mid-range.
    perm = null_unequal_sizes[:, 1]
    ks = _ks_uniform(perm)
    share = float(np.mean(perm < 0.05))
    report(
        f"PQMass permutation null, H0, 120 vs 80, K=10, T=10, P={PERMS}, 300 data sets: "
        f"KS p = {ks:.3f}, share p < 0.05 = {share:.3f}"
    )
    assert ks > 1e-3
    # binomial sd of the share: sqrt(0.05 * 0.95 / 300) = 0.0126; allow ~3 sd
    assert abs(share - 0.05) < 0.04


def test_chi2_pvalue_is_conservative_under_h0(null_unequal_sizes, report):
    # The mean of T positively correlated chi2(K-1) values has mean K-1 but less spread than
    # chi2(K-1), so its chi2(K-1) p-value rarely falls below 0.05 under H0 (module docstring).
    pvals, means = null_unequal_sizes[:, 0], null_unequal_sizes[:, 2]
    share = float(np.mean(pvals < 0.05))
    sd_ratio = float(means.std(ddof=1) / np.sqrt(2 * 9))
    report(
        f"PQMass chi2 p-value, same H0 data sets: share p < 0.05 = {share:.3f}; sd of the mean "
        f"chi2 / sd of chi2(9) = {sd_ratio:.2f}; mean chi2 = {means.mean():.2f} (K-1 = 9)"
    )
    assert share < 0.01
    assert sd_ratio < 0.7
    assert abs(means.mean() - 9) < 0.5  # 4 standard errors of the grand mean (sd ~ 1.6)


def correlated_pairs(seed, n=100, dim=5, noise=0.3, shift=0.0):
    """x_j = z_j + e_j, y_j = z_j + e'_j (+ shift): strongly correlated pairs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = z + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = z + noise * torch.randn(n, dim, generator=g, dtype=torch.float64) + shift
    return x, y


def correlated_blocks(seed, blocks=30, size=5, dim=5, spread=0.5, noise=0.3):
    """Blocks of `size` pairs: x_{b,s} = z_b + u_b + e, y_{b,s} = z_b + v_b + e'. Pairs of one
    block share u_b (x side) and v_b (y side), so only whole blocks are exchangeable."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    z = draw(blocks, 1, dim)
    u = draw(blocks, 1, dim, scale=spread)
    v = draw(blocks, 1, dim, scale=spread)
    x = (z + u + draw(blocks, size, dim, scale=noise)).reshape(blocks * size, dim)
    y = (z + v + draw(blocks, size, dim, scale=noise)).reshape(blocks * size, dim)
    return x, y, torch.arange(blocks).repeat_interleave(size)


def test_paired_null_calibrated_where_unpaired_is_conservative(report):
    paired, unpaired = [], []
    for s in range(300):
        x, y = correlated_pairs(2000 + s)
        kw = dict(num_refs=10, re_tessellations=10, generator=s, permutations=PERMS)
        paired.append(pqmass(x, y, paired=True, **kw).perm_pvalue)
        unpaired.append(pqmass(x, y, **kw).perm_pvalue)
    paired, unpaired = np.array(paired), np.array(unpaired)
    ks = _ks_uniform(paired)
    report(
        f"PQMass paired null, H0 correlated pairs (100 pairs, 5-d, K=10, T=10, 300 sets): "
        f"KS p = {ks:.3f}, share p < 0.05 = {np.mean(paired < 0.05):.3f}; unpaired null on "
        f"the same data: share p < 0.05 = {np.mean(unpaired < 0.05):.3f}, "
        f"mean p = {unpaired.mean():.3f}"
    )
    assert ks > 1e-3 and abs(np.mean(paired < 0.05) - 0.05) < 0.04
    # label shuffles break the pairs: the null is far too wide, p-values pile up near 1
    assert np.mean(unpaired < 0.05) < 0.01 and unpaired.mean() > 0.9


def test_paired_null_has_power_where_unpaired_has_none(report):
    paired, unpaired = [], []
    for s in range(60):
        x, y = correlated_pairs(3000 + s, shift=0.15)
        kw = dict(num_refs=10, re_tessellations=10, generator=s, permutations=PERMS)
        paired.append(pqmass(x, y, paired=True, **kw).perm_pvalue < 0.05)
        unpaired.append(pqmass(x, y, **kw).perm_pvalue < 0.05)
    report(
        f"PQMass, shift 0.15 of correlated pairs (60 sets): rejected at 5% by the paired null "
        f"{np.mean(paired):.2f}, by the unpaired null {np.mean(unpaired):.2f}"
    )
    # measured 0.63 vs 0.00 over 100 sets; a binomial sd at 60 sets is ~0.06
    assert np.mean(paired) > 0.35 and np.mean(paired) > np.mean(unpaired) + 0.3


def test_paired_null_with_groups_calibrated_for_block_correlated_pairs(report):
    grouped, per_pair = [], []
    for s in range(200):
        x, y, groups = correlated_blocks(4000 + s)
        kw = dict(num_refs=10, re_tessellations=10, generator=s, permutations=PERMS)
        grouped.append(pqmass(x, y, paired=True, groups=groups, **kw).perm_pvalue)
        per_pair.append(pqmass(x, y, paired=True, **kw).perm_pvalue)
    grouped, per_pair = np.array(grouped), np.array(per_pair)
    ks = _ks_uniform(grouped)
    report(
        f"PQMass paired null with groups, H0 blocks of 5 pairs (30 blocks, 200 sets): KS p = "
        f"{ks:.3f}, share p < 0.05 = {np.mean(grouped < 0.05):.3f}; one coin per pair "
        f"instead: share p < 0.05 = {np.mean(per_pair < 0.05):.3f}"
    )
    # binomial sd of the share at 200 sets: 0.015
    assert ks > 1e-3 and abs(np.mean(grouped < 0.05) - 0.05) < 0.045
    # swapping pairs one by one ignores the shared block offsets: far too narrow a null
    assert np.mean(per_pair < 0.05) > 0.5


def test_paired_null_values_are_those_of_pair_swaps():
    # With explicit references the null statistic of a swap pattern is the observed statistic
    # of the swapped data. 5 pairs: 32 patterns; a pattern and its complement give the same
    # table up to the row order, so each value class has probability (multiplicity)/32.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64) + 0.5
    refs = torch.tensor(
        [[[-1.0, 0.0], [1.0, 0.0]], [[0.0, -1.0], [0.0, 1.5]]], dtype=torch.float64
    )

    def swap_stat(mask):
        m = torch.tensor(mask, dtype=torch.bool)[:, None]
        return pqmass(torch.where(m, y, x), torch.where(m, x, y), refs=refs).chi2

    def classes(patterns):
        values = np.array([swap_stat(m) for m in patterns])
        return np.unique(np.round(values, 9), return_counts=True)

    def nearest_class(null, values):
        """Index of the class of every null value; each must be a pattern's statistic."""
        dist = np.abs(np.asarray(null)[:, None] - values[None])
        assert (dist.min(1) < 1e-8 * np.maximum(1.0, values.max())).all()
        return dist.argmin(1)

    base = pqmass(x, y, refs=refs)
    perms = 2000
    for groups, patterns in (
        (None, list(itertools.product([0, 1], repeat=5))),
        (torch.tensor([7, 7, 3, 3, 3]), [(a, a, b, b, b) for a in (0, 1) for b in (0, 1)]),
    ):
        values, mult = classes(patterns)
        r = pqmass(x, y, refs=refs, paired=True, groups=groups, permutations=perms, generator=0)
        # the observed statistic and its chi2 p-values do not depend on the null
        assert (r.chi2, r.pvalue, r.log_pvalue) == (base.chi2, base.pvalue, base.log_pvalue)
        seen = np.bincount(nearest_class(r.null_chi2.numpy(), values), minlength=len(values))
        # fair coins: class counts are multinomial with probabilities multiplicity / #patterns
        expected = perms * mult / mult.sum()
        assert stats.chisquare(seen, expected).pvalue > 1e-3, (seen, expected)
    # the unpaired null shuffles all 10 labels, which reaches tables no pair swap gives
    values, _ = classes(list(itertools.product([0, 1], repeat=5)))
    unpaired = pqmass(x, y, refs=refs, permutations=200, generator=0).null_chi2.numpy()
    assert np.abs(unpaired[:, None] - values[None]).min(1).max() > 1e-3


def test_paired_null_reproducible_and_leaves_global_rng_alone():
    x, y = correlated_pairs(6, n=60)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = pqmass(x, y, 8, 4, paired=True, permutations=20, generator=3)
    b = pqmass(
        x, y, 8, 4, paired=True, permutations=20, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(a.null_chi2, b.null_chi2) and a.null_chi2.shape == (20,)
    c = pqmass(x, y, 8, 4, permutations=20, generator=3)
    assert (a.chi2, a.pvalue) == (c.chi2, c.pvalue) and not torch.equal(a.null_chi2, c.null_chi2)


def test_paired_bad_input():
    x, y = correlated_pairs(0, n=40)
    with pytest.raises(ValueError, match="as many x as y"):
        pqmass(x, y[:30], 5, 2, paired=True, permutations=5, generator=0)
    with pytest.raises(ValueError, match="groups is only used by the paired null"):
        pqmass(x, y, 5, 2, groups=torch.arange(40), permutations=5, generator=0)
    with pytest.raises(ValueError, match=r"groups must have shape \(40,\)"):
        pqmass(x, y, 5, 2, paired=True, groups=torch.arange(39), permutations=5, generator=0)
    with pytest.raises(ValueError, match=r"groups must have shape \(40,\)"):
        pqmass(
            x,
            y,
            5,
            2,
            paired=True,
            groups=torch.zeros(40, 1, dtype=torch.long),
            permutations=5,
            generator=0,
        )
    with pytest.raises(TypeError, match="integer"):
        pqmass(x, y, 5, 2, paired=True, groups=torch.zeros(40), permutations=5, generator=0)
    with pytest.raises(ValueError, match="permutations > 0"):
        pqmass(x, y, 5, 2, paired=True, generator=0)
    with pytest.raises(TypeError, match="paired must be a bool"):
        pqmass(x, y, 5, 2, paired=1, permutations=5, generator=0)


def test_pqmass_normalize_guards_constant_features():
    x, y = gaussians(200, 200, 5, 0.0, seed=12)
    x[:, 0] = 0.5
    y[:, 0] = 0.5  # a constant "pixel": pqm's z_score_norm divides by zero here
    r = pqmass(x, y, 10, 4, generator=0, normalize=True)
    assert np.isfinite(r.chi2)
    # Scaling every feature leaves the normalised statistic unchanged (float64 round-off).
    scaled = pqmass(x * 7.0, y * 7.0, 10, 4, generator=0, normalize=True)
    assert torch.allclose(r.chi2_per_tessellation, scaled.chi2_per_tessellation, rtol=1e-9)


def test_pqmass_bad_input():
    x, y = gaussians(50, 50, 4, 0.0, seed=0)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pqmass(bad, y, 10, 2, generator=0)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pqmass(x, bad, 10, 2, generator=0)
    with pytest.raises(ValueError, match="features"):
        pqmass(x, y[:, :3], 10, 2, generator=0)
    with pytest.raises(ValueError, match="num_refs"):
        pqmass(x, y, 99, 2, generator=0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        pqmass(x[:1], y, 10, 2, generator=0)
    with pytest.raises(ValueError, match="num_refs"):
        pqmass(x, y, 1, 2, generator=0)
    with pytest.raises(ValueError, match="re_tessellations"):
        pqmass(x, y, 10, 0, generator=0)
    with pytest.raises(ValueError, match="refs must have shape"):
        pqmass(x, y, refs=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="permutations"):
        pqmass(x, y, 10, 2, generator=0, permutations=-1)
    with pytest.raises(TypeError, match="generator"):
        pqmass(x, y, 10, 2, generator="seed")
    with pytest.raises(TypeError, match="x must be"):
        pqmass([[0.0]], y)
    with pytest.raises(ValueError, match="only one Voronoi cell"):
        pqmass(torch.zeros(30, 2), torch.zeros(30, 2), 5, 2, generator=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pqmass_cuda_matches_cpu():
    x, y = gaussians(2000, 2000, 64, 0.1, seed=13)
    refs = gaussians(3 * 50, 0, 64, 0.0, seed=14)[0].view(3, 50, 64)
    cpu = pqmass(x, y, refs=refs, dtype=torch.float64)
    gpu = pqmass(x.cuda(), y.cuda(), refs=refs.cuda(), dtype=torch.float64)
    assert torch.equal(cpu.counts, gpu.counts)
    g = torch.Generator(device="cuda").manual_seed(0)
    r = pqmass(x.cuda().float(), y.cuda().float(), 100, 20, generator=g, permutations=10)
    assert r.pvalue < 1e-3 and r.null_chi2.shape == (10,)


# ----------------------------------------------------------------------------- TARP


def gaussian_posteriors(n, s, dim, scale, seed, bias=0.0):
    """Truth ~ N(m, I) and posterior samples ~ N(m + bias, scale^2 I), m random per sim."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, dim, generator=g, dtype=torch.float64) * 2
    truth = mean + torch.randn(n, dim, generator=g, dtype=torch.float64)
    samples = (
        mean[:, None] + bias + scale * torch.randn(n, s, dim, generator=g, dtype=torch.float64)
    )
    return samples, truth, mean


@pytest.mark.parametrize("norm", [False, True])
def test_tarp_matches_package(norm):
    n, s, dim = 300, 97, 3
    samples, truth, mean = gaussian_posteriors(n, s, dim, 1.0, seed=0)
    g = torch.Generator().manual_seed(1)
    refs = mean + 3 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    # Pin tarp's data-dependent histogram range to [0, 1]: f = 0 when the reference is the
    # truth, f = 1 when the truth lies beyond the whole posterior as seen from the reference.
    refs[0] = truth[0]
    truth[1], refs[1] = mean[1] + 20.0, mean[1] - 20.0
    ours = tarp(
        samples, truth, references=refs, num_alpha=101, bootstrap=0, norm=norm, dtype=torch.float64
    )
    assert ours.f.min() == 0.0 and ours.f.max() == 1.0
    if norm:  # ours z-scores with the truths' mean/std; hand tarp the same transformed data
        m, sd = truth.mean(0), truth.std(0)
        samples, truth, refs = (samples - m) / sd, (truth - m) / sd, (refs - m) / sd
    # tarp's layout is (num_samples, num_sims, dim); it modifies nothing without bootstrap.
    ecp, alpha = get_tarp_coverage(
        samples.transpose(0, 1).numpy(),
        truth.numpy(),
        references=refs.numpy(),
        num_alpha_bins=100,
        norm=False,
    )
    # 100 bins over [0, 1] have edges linspace(0, 1, 101) = our grid (float round-off), and
    # with S = 97 no f = j/97 falls on an interior edge, so histogram and strict counts agree.
    np.testing.assert_allclose(alpha, ours.alpha.numpy(), atol=1e-15)
    np.testing.assert_allclose(ecp[:-1], ours.ecp[:-1].numpy(), atol=1e-12)
    # Last point: tarp's cumulative histogram is 1 by construction; ours counts f < 1 strictly.
    assert ecp[-1] == pytest.approx(1.0)
    assert ours.ecp[-1].item() == pytest.approx(1.0 - (ours.f == 1).double().mean().item())


def test_tarp_calibrated_posterior_follows_diagonal():
    # Calibrated: the f_i are i.i.d. uniform on {0, 1/S, ..., 1}, so ECP is an empirical CDF
    # of N = 1000 values. KS 99.9% quantile 1.95/sqrt(1000) = 0.062, plus 1/(S+1) = 0.01 of
    # discreteness: tolerance 0.08.
    samples, truth, _ = gaussian_posteriors(1000, 100, 3, 1.0, seed=2)
    r = tarp(samples, truth, generator=0, bootstrap=20)
    assert isinstance(r, TARPResult)
    assert r.ks_stat < 0.08
    assert abs(r.atc) < 0.03 and r.atc_abs < 0.04


def test_tarp_detects_miscalibration():
    over, truth, _ = gaussian_posteriors(1000, 100, 3, 0.5, seed=3)
    r = tarp(over, truth, generator=0, bootstrap=0)
    # Over-confident: f piles up at 0 and 1; the measured KS is ~0.2, 3x the calibrated bound.
    assert r.ks_stat > 0.15 and r.atc < 0
    under, truth, _ = gaussian_posteriors(1000, 100, 3, 2.0, seed=4)
    r = tarp(under, truth, generator=0, bootstrap=0)
    assert r.ks_stat > 0.15 and r.atc > 0.05  # under-confident: ECP above the diagonal


def test_tarp_alpha_grid_and_bootstrap():
    samples, truth, _ = gaussian_posteriors(400, 50, 2, 1.0, seed=5)
    r = tarp(samples, truth, num_alpha=51, bootstrap=64, generator=7)
    assert torch.equal(r.alpha, torch.linspace(0, 1, 51, dtype=torch.float64))
    assert r.ecp[0] == 0 and (r.ecp.diff() >= 0).all() and (r.ecp <= 1).all()
    assert r.ecp_bootstrap.shape == (64, 51) and r.ecp_std.shape == (51,)
    # A real bootstrap: every replicate differs (tarp 0.1.1 with a seed gives 2 distinct rows).
    assert torch.unique(r.ecp_bootstrap, dim=0).shape[0] == 64
    # Spread of an ECP value ~ sqrt(a(1-a)/N) = 0.025 at a = 0.5 for N = 400 (within 30%
    # for 64 replicates), and the replicates centre on the estimate (4 standard errors).
    assert 0.7 * 0.025 < r.ecp_std[25].item() < 1.3 * 0.025
    assert (r.ecp_bootstrap.mean(0) - r.ecp).abs().max() < 4 * r.ecp_std.max() / 8
    same = tarp(samples, truth, num_alpha=51, bootstrap=64, generator=7)
    other = tarp(samples, truth, num_alpha=51, bootstrap=64, generator=8)
    assert torch.equal(same.ecp_bootstrap, r.ecp_bootstrap)
    assert not torch.equal(other.ecp_bootstrap, r.ecp_bootstrap)


def test_tarp_event_shapes_and_many_references():
    samples, truth, _ = gaussian_posteriors(200, 40, 16, 1.0, seed=6)
    flat = tarp(samples, truth, num_refs=3, generator=0, bootstrap=0)
    image = tarp(
        samples.view(200, 40, 1, 4, 4),
        truth.view(200, 1, 4, 4),
        num_refs=3,
        generator=0,
        bootstrap=0,
    )
    assert flat.f.shape == (200, 3)
    assert torch.equal(flat.f, image.f)
    refs = torch.zeros(200, 2, 1, 4, 4, dtype=torch.float64)
    assert tarp(
        samples.view(200, 40, 1, 4, 4), truth.view(200, 1, 4, 4), references=refs, bootstrap=0
    ).f.shape == (200, 2)


def test_tarp_bad_input():
    samples, truth, _ = gaussian_posteriors(20, 10, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="do not match"):
        tarp(samples, truth[:, :2], generator=0)
    with pytest.raises(ValueError, match="do not match"):
        tarp(samples[:10], truth, generator=0)
    with pytest.raises(ValueError, match=r"\(N, S, \*event\)"):
        tarp(samples[0], truth, generator=0)
    bad = samples.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tarp(bad, truth, generator=0)
    with pytest.raises(ValueError, match="at least 2 simulations"):
        tarp(samples[:1], truth[:1], generator=0)
    with pytest.raises(ValueError, match="num_alpha"):
        tarp(samples, truth, num_alpha=1, generator=0)
    with pytest.raises(ValueError, match="references must have shape"):
        tarp(samples, truth, references=torch.zeros(20, 2), generator=0)


# ----------------------------------------------------------------------------- residual chi2


def test_residual_chi2_values_and_shapes():
    y = torch.zeros(4, 16)
    assert torch.allclose(residual_chi2(y, y + 0.2, 0.1), torch.full((4,), 4.0))
    # Pure Gaussian noise: M chi2 ~ chi2(M) with M = 256, so the mean of 64 reduced chi2 has
    # sd sqrt(2/256/64) = 0.011; allow 4 sd.
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(64, 1, 16, 16, generator=g)
    sigma = 0.05 + 0.1 * torch.rand(1, 1, 16, 16, generator=g)
    noisy = clean + sigma * torch.randn(64, 1, 16, 16, generator=g)
    value = residual_chi2(noisy, clean, sigma)
    assert value.shape == (64,)
    assert abs(value.mean().item() - 1.0) < 4 * 0.011
    # (N, S) form: S predictions per observation against a shared observation.
    preds = clean[:, None] + torch.zeros(64, 3, 1, 16, 16)
    per_sample = residual_chi2(noisy[:, None], preds, sigma[:, None], batch_dims=2)
    assert per_sample.shape == (64, 3)
    assert torch.allclose(per_sample, value[:, None].expand(64, 3))


def test_residual_chi2_bad_input():
    y = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="positive"):
        residual_chi2(y, y, 0.0)
    with pytest.raises(ValueError, match="positive"):
        residual_chi2(y, y, -torch.ones(8))
    with pytest.raises(ValueError, match="same number of dims"):
        residual_chi2(y, y[0], 1.0)
    with pytest.raises(ValueError, match="do not broadcast"):
        residual_chi2(y, torch.zeros(4, 7), 1.0)
    with pytest.raises(ValueError, match="enlarge"):
        residual_chi2(y, y, torch.ones(2, 4, 8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        residual_chi2(y, torch.full((4, 8), float("nan")), 1.0)
    with pytest.raises(TypeError, match="sigma"):
        residual_chi2(y, y, "1")
