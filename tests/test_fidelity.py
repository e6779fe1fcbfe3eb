"""Prior fidelity: the structure statistics (pixel noise, arms, compact peaks), the oracle
and fidelity columns of the monitor, and the stop rule's long-lag tests."""

from __future__ import annotations

import math

import pytest
import torch

from hierprior.data import make_galaxies
from hierprior.diffusion import GaussianPrior
from hierprior.em import EStep, GaussianMStep, Monitor, StopRule, run_em
from hierprior.em.monitor import fidelity_columns
from hierprior.em.stop import LONG_TESTS, STOP_STATISTIC, long_lag_round
from hierprior.evaluation import ArmStrength, arm_strength, compact_peaks, noise_level
from hierprior.evaluation.structure import WHITE_NOISE_GAIN, median_filter3
from hierprior.physics import GaussianNoise
from hierprior.populations import GaussianSignals, RandomProjection, simulate_population


@pytest.fixture(scope="module")
def galaxies():
    """64 spirals, the same galaxies without arms, and 64 ellipticals at 32 px."""
    kw = dict(n=64, resolution=32, value_range=(0, 1))
    spirals = make_galaxies("spiral", seed=11, **kw)
    disks = make_galaxies("spiral", seed=11, params={"arm_contrast": 0.0}, **kw)
    ellipticals = make_galaxies("elliptical", seed=12, **kw)
    return spirals, disks, ellipticals


def _auc(a, b):
    return float((a[:, None] > b[None, :]).float().mean())


# ---------------------------------------------------------------------------- pixel noise


def test_white_noise_gain_is_the_median_filter_residual_scale():
    g = torch.Generator().manual_seed(0)
    n = torch.randn(200, 64, 64, generator=g, dtype=torch.float64)
    r = (n - median_filter3(n)).flatten()
    scale = 1.4826 * (r - r.median()).abs().median()
    assert float(scale) == pytest.approx(WHITE_NOISE_GAIN, rel=0.01)


@pytest.mark.parametrize("sigma", [0.003, 0.01, 0.03])
def test_noise_level_reads_white_noise_in_units_of_the_peak(galaxies, sigma):
    spirals = galaxies[0]
    g = torch.Generator().manual_seed(1)
    noisy = spirals + sigma * torch.randn(spirals.shape, generator=g)
    peak = (noisy - 0.0).flatten(1).amax(1)
    measured = noise_level(noisy) * peak  # back to absolute units
    assert float(measured.mean()) == pytest.approx(sigma, rel=0.12)


def test_noise_level_of_smooth_galaxies_is_near_zero(galaxies):
    for x in galaxies:
        assert float(noise_level(x).mean()) < 1e-3


def test_noise_level_rejects_bad_input():
    with pytest.raises(ValueError, match="images"):
        noise_level(torch.zeros(4, 2, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        noise_level(torch.full((2, 1, 8, 8), float("nan")))


# ---------------------------------------------------------------------------- arms


@pytest.fixture(scope="module")
def arms(galaxies):
    """arm_strength of the galaxies, clean and under white noise of 0.01 of the peak."""
    g = torch.Generator().manual_seed(2)
    out = {}
    for sigma in (0.0, 0.01):
        noisy = [x + sigma * torch.randn(x.shape, generator=g) for x in galaxies]
        out[sigma] = [arm_strength(x, return_details=True) for x in noisy]
    return out


@pytest.mark.parametrize("sigma", [0.0, 0.01])
def test_arm_strength_separates_spirals_from_armless_disks_and_ellipticals(arms, sigma):
    """Noisy armless disks stay far below spirals: the checkerboard halves' cross-measurement
    removes the maximum-over-modes bias of pixel noise."""
    (a_s, _), (a_d, _), (a_e, _) = arms[sigma]
    assert float(a_s.mean()) > 0.18
    assert float(a_d.mean()) < 0.03 and float(a_e.mean()) < 0.03
    assert _auc(a_s, a_d) > 0.99 and _auc(a_s, a_e) > 0.99


def test_arm_strength_of_a_noisy_blob_is_near_zero():
    g = torch.Generator().manual_seed(3)
    blob = torch.exp(-((torch.arange(32.0) - 15.5) ** 2) / 40)
    blobs = (blob[:, None] * blob[None, :]).expand(16, 1, 32, 32)
    noisy = blobs + 0.01 * torch.randn(blobs.shape, generator=g)
    assert float(arm_strength(noisy).mean()) < 0.03


def test_arm_strength_recovers_the_arm_count(arms):
    _, params = make_galaxies("spiral", n=64, resolution=32, seed=11, value_range=(0, 1),
                              return_params=True)  # fmt: skip
    a, details = arms[0.0][0]
    strong = a > 0.15
    agree = (details["m"] == params["n_arms"])[strong].float().mean()
    assert float(agree) > 0.6  # the dominant multiplicity is usually the arm count


def test_arm_strength_does_not_depend_on_chunks(galaxies):
    x = galaxies[0][:8]
    assert torch.equal(arm_strength(x, chunk=3), arm_strength(x, chunk=32))


def test_arm_strength_evaluator_reports_mean_and_share(galaxies):
    out = ArmStrength((0.0, 1.0))(torch.cat([galaxies[0][:16], galaxies[2][:16]]))
    assert 0.4 < out["share_armed"] <= 0.5
    assert out["arm_strength"] > 0.09


# ---------------------------------------------------------------------------- compact peaks


def test_compact_peaks_counts_and_weighs_planted_bumps():
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    maps = torch.zeros(2, 24, 24)
    for b, (cy, cx, amp) in enumerate([(5, 5, 1.0), (12, 18, 2.0)]):
        maps[b] += amp * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.7**2))
    maps[1] += 0.5 * torch.exp(-((yy - 4) ** 2 + (xx - 20) ** 2) / (2 * 0.7**2))
    counts, masses = compact_peaks(maps, threshold=0.2, radius=3.0)
    assert counts.tolist() == [1, 2]
    total = 2 * math.pi * 0.7**2
    assert float(masses[0][0]) == pytest.approx(total, rel=0.02)
    assert sorted(masses[1].tolist()) == pytest.approx([0.5 * total, 2 * total], rel=0.02)


# ---------------------------------------------------------------------------- fidelity


def test_fidelity_columns():
    first = {"truth_chi2": 100.0, "share": 0.1}
    row = {"truth_chi2": 40.0, "oracle_truth_chi2": 20.0, "share": 0.5, "oracle_share": 0.9}
    out = fidelity_columns(row, first, ["share"])
    assert out["fidelity"] == pytest.approx(0.75)
    assert out["fidelity_share"] == pytest.approx(0.5)
    same = fidelity_columns({**row, "oracle_truth_chi2": 100.0}, first)
    assert math.isnan(same["fidelity"])


def _gaussian_problem(n=200, seed=0, d=4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    population = simulate_population(
        GaussianSignals(mean, cov), RandomProjection(2, dtype="float64"), GaussianNoise(0.1),
        num_obs=n, seed=seed,
    )  # fmt: skip
    return population, mean, cov


def test_run_em_with_an_oracle_reports_fidelity(tmp_path):
    population, mean, cov = _gaussian_problem()
    d = len(mean)
    prior = GaussianPrior(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    oracle = GaussianPrior(mean, cov)
    monitor = Monitor(num_prior_samples=200, permutations=20, re_tessellations=5, num_refs=10,
                      tarp_observations=0)  # fmt: skip
    result = run_em(
        prior, population, estep=EStep({"method": "exact"}, num_samples=2, batch_size=200),
        mstep=GaussianMStep(), monitor=monitor, stop=StopRule(min_rounds=9, level=0.1,
        permutations=49, num_refs=10, re_tessellations=2),
        rounds=2, run_dir=tmp_path / "run", seed=0, logger=None, oracle=oracle,
    )  # fmt: skip
    rows = result.metrics
    assert all("oracle_truth_chi2" in r and "truth_chi2_null" in r for r in rows)
    assert rows[0]["fidelity"] == pytest.approx(0.0)
    assert rows[2]["fidelity"] > 0.5  # EM from N(0, I) moves most of the way to the oracle
    assert rows[0]["oracle_truth_chi2"] < rows[0]["truth_chi2"]
    assert (tmp_path / "run" / "reference.json").exists()
    # the oracle is part of the run's identity
    with pytest.raises(ValueError, match="different configuration"):
        run_em(prior, population, estep=EStep({"method": "exact"}, num_samples=2),
               mstep=GaussianMStep(), monitor=monitor, stop=StopRule(min_rounds=9, level=0.1,
               permutations=49, num_refs=10, re_tessellations=2),
               rounds=2, run_dir=tmp_path / "run", seed=0, logger=None)  # fmt: skip


# ---------------------------------------------------------------------------- stop rule


def test_long_lag_round():
    assert [long_lag_round(k) for k in range(1, 9)] == [None, None, 1, 2, 2, 3, 3, 4]


def test_stop_rule_sees_drift_that_accumulates_over_rounds():
    """Banks that move by a small step per round: rounds k and k-1 are indistinguishable,
    rounds k and k // 2 are not. Only the long-lag tests see it."""
    g = torch.Generator().manual_seed(0)
    n, s, d, k = 400, 2, 3, 8
    base = torch.randn(n, s, d, generator=g, dtype=torch.float64)

    def bank(j):  # round j: shifted by 0.02 per round, fresh noise per round
        return base + 0.02 * j + 0.3 * torch.randn(n, s, d, generator=g, dtype=torch.float64)

    banks = {j: bank(j) for j in (k // 2, k - 1, k)}
    prior_x = banks[k - 1][:, 0]
    rule = StopRule(num_refs=20, re_tessellations=10, permutations=499)
    short = StopRule(num_refs=20, re_tessellations=10, permutations=499, long_lag=False)
    args = (banks[k], banks[k - 1], prior_x)
    with_long = rule.test(*args, seed=0, round_index=k, earlier_bank=banks[k // 2])
    without = short.test(*args, seed=0, round_index=k, earlier_bank=banks[k // 2])
    assert all(f"{t}_pvalue" in with_long for t in LONG_TESTS)
    assert not any(f"{t}_pvalue" in without for t in LONG_TESTS)
    assert without[STOP_STATISTIC] > rule.level  # one round's change: below the resolution
    assert with_long["fixedpoint_long_diff_pvalue"] <= rule.level / 5
    assert with_long[STOP_STATISTIC] <= rule.level


def test_stop_rule_needs_permutations_for_five_tests():
    with pytest.raises(ValueError, match="use at least 499 permutations"):
        StopRule(level=0.01, permutations=400)
    StopRule(level=0.01, permutations=400, long_lag=False)  # three tests: 299 suffice


def test_mass_map_structure_recovers_a_multipole_and_counts_subhalos():
    from hierprior.evaluation import MassMapStructure
    from hierprior.physics.lensing.substructure import Multipole

    n, fov, scale = 24, 3.84, 0.05
    h = fov / n
    c = (torch.arange(n, dtype=torch.float64) + 0.5) * h - fov / 2
    x, y = c[None, :].expand(n, n), c[:, None].expand(n, n)
    kappa = Multipole(3, 0.02, 0.3).convergence(x, y) + Multipole(4, -0.01, 1.0).convergence(x, y)
    ev = MassMapStructure(kappa_scale=scale, kappa_fov=fov, threshold=0.05)
    out = ev((kappa / scale)[None, None].expand(3, 1, n, n))
    # the pixels of the annulus are not an exact quadrature: cross-talk between m of ~3e-4
    assert out["multipole_m3"] == pytest.approx(0.02, rel=1e-3)
    assert out["multipole_m4"] == pytest.approx(0.01, rel=1e-3)
    bumps = torch.zeros(2, 1, n, n, dtype=torch.float64)
    bumps[0, 0, 5, 5] = bumps[1, 0, 18, 4] = bumps[1, 0, 10, 20] = 0.2 / scale
    out = ev(bumps)
    assert out["peaks_per_map"] == pytest.approx(1.5)
    assert out["peak_mass_median"] == pytest.approx(0.2 * h * h)
