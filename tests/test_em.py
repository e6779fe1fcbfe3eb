"""Tests of hierprior.em: population, sample bank, Gaussian EM against closed form, outputs."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hierprior.diffusion import GaussianPrior, load_prior
from hierprior.em import Population, SampleBank, run_em
from hierprior.em.loop import _stop_reason
from hierprior.physics import DenseLinear, GaussianNoise, Identity


def gaussian_population(n=300, d=4, m=2, sigma=0.1, seed=0):
    """Truths from N(mu*, Sigma*), per-observation random rank-m projections, Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    mean = 2 * torch.randn(d, generator=g, dtype=torch.float64)
    truth = GaussianPrior(mean, cov).sample(n, g)
    A = torch.randn(n, m, d, generator=g, dtype=torch.float64) / d**0.5
    forward, noise = DenseLinear(A), GaussianNoise(sigma)
    y = forward(truth) + noise.sample((n, m), generator=g, dtype=torch.float64)
    return Population(y=y, forward=forward, noise=noise, truth=truth), mean, cov


def closed_form_em_step(prior: GaussianPrior, pop: Population):
    """One exact Gaussian EM update: mu' = mean m_i, Sigma' = mean (C_i + (m_i-mu')(m_i-mu')^T)."""
    A = pop.forward.A
    sigma2 = float(pop.noise.sigma) ** 2
    prec = torch.linalg.inv(prior.cov)[None] + A.mT @ A / sigma2
    C = torch.linalg.inv(prec)
    rhs = (torch.linalg.solve(prior.cov, prior.mean))[None] + (A.mT @ pop.y[..., None])[
        ..., 0
    ] / sigma2
    m = (C @ rhs[..., None])[..., 0]
    mu = m.mean(0)
    dm = m - mu
    return mu, (C + dm[:, :, None] * dm[:, None, :]).mean(0)


def test_population_validation():
    pop, _, _ = gaussian_population(n=10)
    assert len(pop[2:5]) == 3
    with pytest.raises(ValueError, match="NaN"):
        y = pop.y.clone()
        y[3, 0] = float("nan")
        Population(y=y, forward=pop.forward, noise=pop.noise)
    with pytest.raises(ValueError, match="observation shape"):
        Population(y=pop.y[:, :1], forward=pop.forward, noise=pop.noise)
    with pytest.raises(ValueError, match="prior's samples have shape"):
        pop.check_prior(
            GaussianPrior(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
        )
    with pytest.raises(ValueError, match="10 observations"):
        Population(y=pop.y[:5], forward=pop.forward, noise=GaussianNoise(torch.ones(10)))


def test_sample_bank_atomic_shards_and_quarantine(tmp_path):
    bank = SampleBank(tmp_path / "bank", num_obs=10, num_samples=3, event_shape=(2,))
    bank.write(torch.arange(0, 4), torch.randn(4, 3, 2))
    bank.write(torch.arange(4, 8), torch.randn(4, 3, 2))
    assert bank.missing().tolist() == [8, 9] and not bank.is_complete()
    with pytest.raises(RuntimeError, match="incomplete"):
        bank.load()
    with pytest.raises(ValueError, match="shape"):
        bank.write(torch.arange(8, 10), torch.randn(2, 2, 2))
    # a torn shard (killed mid-write by something that bypassed the atomic rename) is
    # quarantined on reopening and its observations are recomputed
    files = sorted((tmp_path / "bank").glob("shard_*.pt"))
    files[1].write_bytes(files[1].read_bytes()[:50])
    reopened = SampleBank(tmp_path / "bank", num_obs=10, num_samples=3, event_shape=(2,))
    assert reopened.missing().tolist() == [4, 5, 6, 7, 8, 9]
    assert (tmp_path / "bank" / "quarantine" / files[1].name).exists()
    reopened.write(torch.arange(4, 10), torch.ones(6, 3, 2))
    assert reopened.load().shape == (10, 3, 2)


def test_gaussian_em_agrees_with_closed_form_and_approaches_the_population(tmp_path, report):
    pop, mean_star, cov_star = gaussian_population(n=300, d=4, m=2)
    prior0 = GaussianPrior(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    S = 200
    result = run_em(
        prior0,
        pop,
        rounds=8,
        sampler={"method": "exact"},
        run_dir=tmp_path / "run",
        seed=3,
        num_samples=S,
        estep_batch_size=100,
        monitor={"num_prior_samples": 500},
        stop={"patience": 100},
        logger=None,
    )
    assert len(result.priors) == 9
    # one-step agreement with the closed-form iterate from the same previous prior. Monte-Carlo
    # error: mean of N*S samples -> SE sqrt(Sigma'_jj / (N S)), covariance entries SE
    # sqrt((Sigma'_ii Sigma'_jj + Sigma'_ij^2) / (N S)); samples of one observation share m_i so
    # the effective count is lower: we allow 6 SE computed with N alone for the between-obs part
    # plus 6 SE with N*S for the within-obs part.
    n = len(pop)
    worst = 0.0
    for k in range(1, 9):
        mu, cov = closed_form_em_step(result.priors[k - 1], pop)
        got = result.priors[k]
        var = torch.diagonal(cov)
        se_mu = torch.sqrt(var / (n * S))
        err_mu = (got.mean - mu).abs()
        assert (err_mu <= 6 * se_mu + 1e-9).all(), (k, err_mu, se_mu)
        se_cov = torch.sqrt((var[:, None] * var[None] + cov**2) / (n * S))
        err_cov = (got.cov - cov).abs()
        assert (err_cov <= 6 * se_cov).all(), (k, err_cov, se_cov)
        worst = max(worst, float((err_mu / se_mu).max()), float((err_cov / se_cov).max()))
    # the learned prior approaches the population's moments (sample moments of the truths)
    t = pop.truth
    pop_mean, pop_cov = t.mean(0), torch.cov(t.T, correction=0)
    d0 = (torch.linalg.norm(prior0.mean - pop_mean), torch.linalg.norm(prior0.cov - pop_cov))
    last = result.priors[-1]
    d1 = (torch.linalg.norm(last.mean - pop_mean), torch.linalg.norm(last.cov - pop_cov))
    report(
        f"Gaussian EM (N=300, D=4, rank-2 projections, 8 rounds, exact E-step, S={S}): "
        f"max |hierprior - closed form| {worst:.2f} SE; |mu - mu_pop| {d0[0]:.3f} -> "
        f"{d1[0]:.3f}, |Sigma - Sigma_pop|_F {d0[1]:.3f} -> {d1[1]:.3f}"
    )
    assert d1[0] < 0.25 * d0[0] and d1[1] < 0.5 * d0[1]
    # outputs exist and hold the logged values
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 9
    for k in (0, 5, 8):
        logged = json.loads((tmp_path / "run" / f"round_{k:03d}" / "metrics.json").read_text())
        assert float(rows[k]["truth_chi2"]) == pytest.approx(logged["truth_chi2"])
        assert logged == result.metrics[k]
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    assert result.metrics[-1]["truth_chi2"] < result.metrics[0]["truth_chi2"]
    assert load_prior(tmp_path / "run" / "round_008" / "prior.ckpt").mean.shape == (4,)


def test_em_rerun_continues_and_refuses_a_different_config(tmp_path):
    pop, _, _ = gaussian_population(n=50, d=3, m=2, seed=1)
    prior0 = GaussianPrior(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    kwargs = dict(
        sampler={"method": "exact"},
        run_dir=tmp_path / "run",
        seed=0,
        num_samples=8,
        monitor={"num_prior_samples": 200, "re_tessellations": 5, "num_refs": 10},
        stop={"patience": 100},
        logger=None,
    )
    first = run_em(prior0, pop, rounds=2, **kwargs)
    again = run_em(prior0, pop, rounds=4, **kwargs)  # continues from round 2
    assert again.metrics[:3] == first.metrics
    torch.testing.assert_close(again.priors[2].cov, first.priors[2].cov)
    assert len(again.priors) == 5
    fresh = run_em(prior0, pop, rounds=4, **{**kwargs, "run_dir": tmp_path / "fresh"})
    assert fresh.metrics == again.metrics  # a continued run equals an uninterrupted one
    with pytest.raises(ValueError, match="num_samples: 8 .* vs 9"):
        run_em(prior0, pop, rounds=4, **{**kwargs, "num_samples": 9})
    with pytest.raises(ValueError, match="population"):
        other, _, _ = gaussian_population(n=50, d=3, m=2, seed=2)
        run_em(prior0, other, rounds=4, **kwargs)


def test_em_bad_input_is_refused_before_any_round(tmp_path):
    pop, _, _ = gaussian_population(n=20, d=4, m=2)
    wrong = GaussianPrior(torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="prior's samples have shape"):
        run_em(wrong, pop, rounds=1, sampler={"method": "exact"}, run_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    prior = GaussianPrior(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown sampler method"):
        run_em(prior, pop, rounds=1, sampler={"method": "magic"}, run_dir=tmp_path / "b")
    # a run directory that cannot be created (its parent is a file; root ignores chmod bits)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(PermissionError, match="not writable"):
        run_em(prior, pop, rounds=1, sampler={"method": "exact"}, run_dir=blocker / "run")


def test_stop_rule():
    stop = {"pvalue": 0.05, "patience": 2, "min_rounds": 1}
    rows = [{"round": 0}, {"round": 1, "drift_pvalue": 1e-9}, {"round": 2, "drift_pvalue": 0.3}]
    assert _stop_reason(rows, stop) is None
    rows.append({"round": 3, "drift_pvalue": 0.2})
    assert "converged" in _stop_reason(rows, stop)
    rows.append({"round": 4, "drift_pvalue": 0.01})
    assert _stop_reason(rows, stop) is None


def test_population_identity_forward_on_images():
    x = torch.randn(6, 1, 8, 8)
    pop = Population(y=x + 0.1, forward=Identity((1, 8, 8)), noise=GaussianNoise(0.1), truth=x)
    assert pop.signal_shape == (1, 8, 8)
    assert len(pop.fingerprint()) == 16


# ------------------------------------------------------------------------------ resume

JOB = Path(__file__).parent / "scripts" / "em_job.py"


def _job(run_dir: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(JOB), str(run_dir)] + (["--kill", kill] if kill else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("em_uninterrupted")
    proc = _job(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("kill", ["estep", "mstep"])
def test_em_killed_by_a_signal_resumes_without_losing_work(kill, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    killed = _job(run_dir, kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if kill == "estep":  # round 1 is complete, round 2's bank holds exactly 2 shards
        assert (run_dir / "round_001" / "metrics.json").exists()
        assert len(list((run_dir / "round_002" / "bank").glob("shard_*.pt"))) == 2
        kept = {
            f.name: f.stat().st_mtime_ns for f in (run_dir / "round_002" / "bank").glob("*.pt")
        }
    else:  # killed inside round 1's M-step after its step-10 checkpoint
        assert (run_dir / "round_001" / "mstep" / "checkpoints" / "last.ckpt").exists()
        assert not (run_dir / "round_001" / "prior.ckpt").exists()
    resumed = _job(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if kill == "estep":  # completed shards were reused, not recomputed
        for name, mtime in kept.items():
            assert (run_dir / "round_002" / "bank" / name).stat().st_mtime_ns == mtime
    for k in (1, 2):
        bank = SampleBank(run_dir / f"round_{k:03d}" / "bank", 48, 2, (4,))
        ref = SampleBank(uninterrupted / f"round_{k:03d}" / "bank", 48, 2, (4,))
        assert bank.is_complete()
        # a resumed round equals an uninterrupted one under the same seeds
        torch.testing.assert_close(bank.load(), ref.load(), rtol=1e-5, atol=1e-5)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    final = load_prior(run_dir / "round_002" / "prior.ckpt")
    ref_final = load_prior(uninterrupted / "round_002" / "prior.ckpt")
    for a, b in zip(final.state_dict().values(), ref_final.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_em_logs_to_an_offline_wandb_run_in_the_run_dir(tmp_path):
    pop, _, _ = gaussian_population(n=20, d=3, m=2)
    prior0 = GaussianPrior(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    run_dir = tmp_path / "run"
    result = run_em(
        prior0,
        pop,
        rounds=1,
        sampler={"method": "exact"},
        run_dir=run_dir,
        num_samples=4,
        monitor={"num_prior_samples": 50, "num_refs": 5, "re_tessellations": 3},
        logger="wandb",
        logger_options={"mode": "offline", "project": "test"},
    )
    assert len(result.metrics) == 2
    state = json.loads((run_dir / "em_state.json").read_text())
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{state['wandb_id']}"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
