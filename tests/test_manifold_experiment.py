"""The DiEM manifold experiment's pieces (experiments/manifold) compose and run one tiny round.

- SmoothManifold: a deterministic function of its seed, points on one curve in value_range,
  only the given generator's stream drawn;
- RandomProjection(normalize=True): rows on the sphere of radius ``scale``;
- the closed-form Gaussian EM of run.py recovers a Gaussian population's moments from rank-2
  views;
- SinkhornEvaluator: its columns, the floor, and the order truth < Gaussian fit;
- run.py: one tiny EM round with each E-step method writes the Sinkhorn columns; a rerun with
  more rounds continues the run; ``--rounds`` is checked; the paper-size config builds the same
  pieces (not run: it is GPU-sized).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from hierprior.diffusion import GaussianPrior
from hierprior.evaluation import SinkhornEvaluator
from hierprior.physics import GaussianNoise
from hierprior.populations import (
    GaussianSignals,
    RandomProjection,
    SmoothManifold,
    simulate_population,
)
from hierprior.posterior import posterior_method

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1] / "experiments" / "manifold"


def load_run_module():
    spec = importlib.util.spec_from_file_location("manifold_run", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smooth_manifold_is_a_seeded_curve():
    state = torch.get_rng_state()
    m = SmoothManifold(features=5, seed=3)
    x = m(2000, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never used
    assert x.shape == (2000, 5) and x.dtype == torch.get_default_dtype()
    assert m.harmonics == 10  # ceil(1e-3 ** (-1 / 3))
    assert x.min() >= -2 - 1e-4 and x.max() <= 2 + 1e-4
    assert torch.allclose(x.amin(0), torch.full((5,), -2.0), atol=0.05)
    assert torch.allclose(x.amax(0), torch.full((5,), 2.0), atol=0.05)
    same = SmoothManifold(features=5, seed=3)(2000, torch.Generator().manual_seed(0))
    other = SmoothManifold(features=5, seed=4)(2000, torch.Generator().manual_seed(0))
    assert torch.equal(x, same) and not torch.allclose(x, other)
    # one curve: the points are the images of their latent coordinate
    z = torch.rand((2000, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(m.from_latent(z), x)
    # a 1-D manifold: a fine walk along z moves little, far points differ
    curve = m.from_latent(torch.linspace(0, 1, 10001, dtype=torch.float64)[:, None])
    assert curve.diff(dim=0).norm(dim=1).max() < 0.05
    with pytest.raises(ValueError, match="value_range"):
        SmoothManifold(value_range=(1, 1))
    with pytest.raises(ValueError, match="features"):
        SmoothManifold(features=0)


def test_random_projection_normalize():
    op = RandomProjection(2, scale=1.5, normalize=True, dtype="float64")
    a = op(100, (5,), torch.Generator().manual_seed(0)).A
    assert a.shape == (100, 2, 5)
    assert torch.allclose(a.norm(dim=-1), torch.full((100, 2), 1.5, dtype=torch.float64))
    plain = RandomProjection(2, dtype="float64")(100, (5,), torch.Generator().manual_seed(0)).A
    assert not torch.allclose(plain.norm(dim=-1), torch.ones(100, 2, dtype=torch.float64))


def test_gaussian_fit_recovers_moments():
    run = load_run_module()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    cov = a @ a.T / 5 + 0.3 * torch.eye(5, dtype=torch.float64)
    mean = torch.randn(5, generator=g, dtype=torch.float64)
    population = simulate_population(
        GaussianSignals(mean, cov),
        RandomProjection(2, normalize=True, dtype="float64"),
        GaussianNoise(0.01),
        num_obs=4000,
        seed=0,
    )
    fit, history = run.gaussian_fit(population, 100)
    assert isinstance(fit, GaussianPrior) and len(history) == 100
    truth = population.truth
    emp_mean, emp_cov = truth.mean(0), torch.cov(truth.T)
    assert (fit.mean - emp_mean).norm() < 0.05 * emp_mean.norm() + 0.05
    assert (fit.cov - emp_cov).norm() < 0.1 * emp_cov.norm()
    assert history[-1]["cov_change"] < history[0]["cov_change"]


def test_sinkhorn_evaluator():
    m = SmoothManifold(seed=0, dtype="float64")
    reference = m(400, torch.Generator().manual_seed(1))
    truth = m(200, torch.Generator().manual_seed(2))
    fit = GaussianPrior(truth.mean(0), torch.cov(truth.T))
    gauss = fit.sample(200, torch.Generator().manual_seed(3))
    ev = SinkhornEvaluator(reference, epsilon=1e-2, num_points=200, transport_cost=True)
    out = ev(samples=truth[:, None], prior_samples=gauss)
    keys = {"sinkhorn_floor", "sinkhorn_prior", "sinkhorn_posterior"}
    assert keys | {"sinkhorn_prior_cost", "sinkhorn_posterior_cost"} == set(out)
    assert all(math.isfinite(v) for v in out.values())
    assert 0 < out["sinkhorn_posterior"] < out["sinkhorn_prior"]
    assert out["sinkhorn_floor"] < out["sinkhorn_prior"]
    with pytest.raises(ValueError, match="R >= 400"):
        SinkhornEvaluator(reference[:300], num_points=200)
    with pytest.raises(ValueError, match="dtype"):
        SinkhornEvaluator(reference, dtype="float16")


def tiny_config(run):
    cfg = run.load_config(ROOT / "cpu.yaml")
    cfg["population"]["num_obs"] = 128
    cfg["gaussian_fit"]["iterations"] = 3
    cfg["initial"].update(samples=256, steps=10, batch_size=32)
    cfg["em"].update(rounds=1, estep_batch_size=128)
    cfg["mstep"].update(steps=5, batch_size=32)
    for options in cfg["samplers"].values():
        options["steps"] = 4
    cfg["samplers"]["dps"]["zeta"] = 1.0  # 4 steps cannot carry the strong guidance
    cfg["monitor"].update(
        num_prior_samples=64, steps=4, tarp_observations=8, tarp_samples=4, permutations=10
    )
    cfg["sinkhorn"].update(epsilon=0.01, num_points=64, reference=128)
    return cfg


@pytest.mark.parametrize(
    "sampler",
    [
        "mmps",
        pytest.param("pigdm", marks=pytest.mark.slow),
        pytest.param("dps", marks=pytest.mark.slow),
    ],
)
def test_one_tiny_round(tmp_path, sampler):
    run = load_run_module()
    cfg = tiny_config(run)
    summary = run.run(cfg, sampler, tmp_path)
    assert summary["sampler"] == sampler
    rows = run.read_metrics(tmp_path / sampler / "em")
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        for key in ("sinkhorn_prior", "sinkhorn_posterior", "sinkhorn_floor"):
            assert math.isfinite(row[key]) and row[key] > -1e-6
        assert "stop_pvalue" in row or row["round"] == 0
    assert "sinkhorn_posterior" in (tmp_path / sampler / "table.md").read_text()
    assert (tmp_path / "initial" / "prior.ckpt").exists()
    if sampler == "mmps":  # the yardstick and the figures of --report
        out = run.oracle(cfg, tmp_path)
        assert out["train_steps"] == 5
        for name in ("oracle", "gaussian_fit"):
            assert math.isfinite(out[name]["sinkhorn_prior"])
        run.report(cfg, tmp_path, tmp_path / "figures")
        assert (tmp_path / "figures" / "divergence.png").exists()
        assert (tmp_path / "figures" / "scatter_mmps.png").exists()
        # more rounds continue the run (the stop rule's options do not depend on rounds)
        cfg["em"]["rounds"] = 2
        run.run(cfg, sampler, tmp_path)
        longer = run.read_metrics(tmp_path / sampler / "em")
        assert [r["round"] for r in longer] == [0, 1, 2]
        assert longer[:2] == rows


def test_rounds_option_is_checked(capsys):
    run = load_run_module()
    with pytest.raises(SystemExit):
        run.main(["--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_initial_prior_is_cached_per_config(tmp_path):
    run = load_run_module()
    cfg = tiny_config(run)
    cfg["initial"]["steps"] = 2
    gauss = GaussianPrior(torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64))
    first = run.initial_prior(cfg, gauss, tmp_path)
    again = run.initial_prior(cfg, gauss, tmp_path)  # loaded, not retrained
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    cfg["initial"]["steps"] = 3
    with pytest.raises(ValueError, match="another configuration"):
        run.initial_prior(cfg, gauss, tmp_path)


def test_paper_config_builds():
    run = load_run_module()
    cpu, paper = run.load_config(ROOT / "cpu.yaml"), run.load_config(ROOT / "paper.yaml")
    assert set(cpu) == set(paper)
    for key in cpu:
        if isinstance(cpu[key], dict):
            assert set(cpu[key]) == set(paper[key]), key
    assert paper["population"]["num_obs"] == 65536 and paper["sinkhorn"]["num_points"] == 16384
    for options in paper["samplers"].values():
        posterior_method(dict(options))


def test_mstep_support_leaves_out_samples(tmp_path, caplog):
    from hierprior.diffusion import EDMDenoiser
    from hierprior.em import NetworkMStep
    from hierprior.nn import MLP

    prior = EDMDenoiser(MLP(2, hidden=(16,), emb_dim=8), (2,))
    bank = torch.randn(40, 1, 2, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    bank[:10] = 100.0  # far outliers
    step = NetworkMStep(steps=2, batch_size=8, support=(-3, 3))
    assert step.options()["support"] == [-3.0, 3.0]
    assert "support" not in NetworkMStep().options()  # older run directories stay valid
    with caplog.at_level("INFO", logger="hierprior.em.mstep"):
        new, _ = step(prior, bank, tmp_path / "a", seed=0, round_index=1)
    assert "10 of 40 bank samples outside the support" in caplog.text
    assert isinstance(new, EDMDenoiser)
    with pytest.raises(ValueError, match="no bank sample"):
        step(prior, bank[:10], tmp_path / "b", seed=0, round_index=1)
    with pytest.raises(ValueError, match="support"):
        NetworkMStep(support=(1, -1))


def test_sinkhorn_evaluator_support():
    reference = SmoothManifold(seed=0, dtype="float64")(200, torch.Generator().manual_seed(1))
    prior = reference[:100].clone()
    prior[:20] = 50.0
    ev = SinkhornEvaluator(reference, epsilon=0.05, num_points=100, floor=False, support=(-3, 3))
    out = ev(prior_samples=prior)
    assert out["sinkhorn_prior_outside"] == pytest.approx(0.2)
    plain = SinkhornEvaluator(reference, epsilon=0.05, num_points=100, floor=False)(
        prior_samples=prior
    )
    assert out["sinkhorn_prior"] < 1.0 < plain["sinkhorn_prior"]  # an outlier dominates S
