"""SLIC: hierprior.physics.LearnedNoise, the posterior samplers with it, hierprior.likelihood."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from hierprior.diffusion import EDMDenoiser, GaussianPrior
from hierprior.likelihood import (
    correlated_noise,
    correlated_noise_covariance,
    cosmic_rays,
    langevin,
    noise_realisations,
)
from hierprior.nn import MLP
from hierprior.physics import (
    DenseLinear,
    GaussianNoise,
    LearnedNoise,
    NonLinear,
    likelihood_score,
    noise_score,
)
from hierprior.posterior import sample_posterior
from hierprior.posterior.base import PosteriorSamplingError

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def ar1_cov(m: int, rho: float = 0.6) -> torch.Tensor:
    idx = torch.arange(m, dtype=F64)
    return rho ** (idx[:, None] - idx[None, :]).abs()


def gaussian_posterior(A, cov_y, y, prior_var=1.0):
    """Exact posterior of eta ~ N(0, prior_var I), y = A eta + n, n ~ N(0, cov_y)."""
    d = A.shape[-1]
    prec_y = torch.linalg.inv(cov_y)
    prec = torch.eye(d, dtype=F64) / prior_var + A.T @ prec_y @ A
    cov = torch.linalg.inv(prec)
    mean = (cov @ A.T @ prec_y @ y.T).T
    return mean, cov


# ----------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def trained(one_thread):
    """An MLP noise score model trained by PriorModule on AR(1) Gaussian noise (M = 8)."""
    import pytorch_lightning as pl

    from hierprior.training import PriorModule, TensorDataModule

    m = 8
    cov = ar1_cov(m)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(20_000, m, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T).float()
    denoiser = EDMDenoiser(MLP(m, hidden=(128, 128), emb_dim=32), (m,), sigma_data=1.0)
    module = PriorModule(denoiser, lr=2e-3, warmup_steps=50, ema_decay=0.995, seed=0)
    trainer = pl.Trainer(
        max_steps=2000,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        trainer.fit(module, datamodule=TensorDataModule(data, batch_size=256, seed=0))
    return module.sampling_prior().double(), cov


def test_learned_score_matches_gaussian_score(trained, report):
    prior, cov = trained
    scale, s = 0.5, 0.15
    noise = LearnedNoise(prior, scale=scale, smoothing=s)
    g = torch.Generator().manual_seed(1)
    n = scale * torch.randn(2000, 8, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    learned = noise.score(n)
    smoothed = -torch.linalg.solve(scale**2 * (cov + s**2 * torch.eye(8, dtype=F64)), n.T).T
    exact = -torch.linalg.solve(scale**2 * cov, n.T).T
    rel = (learned - smoothed).norm(dim=1) / smoothed.norm(dim=1)
    rel_exact = (learned - exact).norm(dim=1) / exact.norm(dim=1)
    report(
        f"SLIC score (MLP, AR(1) noise, s={s}): median relative error {rel.median():.3f} to the "
        f"smoothed Gaussian score, {rel_exact.median():.3f} to the unsmoothed one"
    )
    assert rel.median() <= 0.10
    assert rel_exact.median() <= 0.15  # the smoothing's bias (AR(1) noise: min eigenvalue 0.25)


def test_learned_likelihood_posterior_matches_gaussian(trained, report):
    prior, cov = trained
    scale = 0.5
    noise = LearnedNoise(prior, scale=scale, smoothing=0.15)
    g = torch.Generator().manual_seed(2)
    n_obs, d = 40, 2
    A = torch.randn(8, d, generator=g, dtype=F64)
    forward = DenseLinear(A)
    eta = torch.randn(n_obs, d, generator=g, dtype=F64)
    chol = torch.linalg.cholesky(scale**2 * cov)
    y = forward(eta) + torch.randn(n_obs, 8, generator=g, dtype=F64) @ chol.T
    eta_prior = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), torch.eye(d))
    samples = langevin(
        forward,
        noise,
        y,
        eta_prior,
        torch.zeros(n_obs, 4, d, dtype=F64),
        num_samples=150,
        burn_in=100,
        thin=2,
        step_size=0.1,
        preconditioner=torch.ones(d, dtype=F64),
        adapt=2,
        generator=3,
    )
    mean, post = gaussian_posterior(A, scale**2 * cov, y)
    sd = post.diagonal().sqrt()
    mean_err = ((samples.mean(1) - mean) / sd).abs().mean()
    sd_ratio = (samples.std(1) / sd).mean(0)
    report(
        f"SLIC eta posterior (learned AR(1) likelihood): mean error {mean_err:.3f} sd, "
        f"sd ratio {sd_ratio.tolist()}"
    )
    assert mean_err < 0.25
    assert ((sd_ratio - 1).abs() < 0.12).all()


# ----------------------------------------------------------------------------- analytic oracle


def test_analytic_learned_noise_is_the_smoothed_gaussian():
    cov = ar1_cov(5)
    s, scale = 0.2, 0.3
    noise = LearnedNoise(GaussianPrior(torch.zeros(5, dtype=F64), cov), scale=scale, smoothing=s)
    assert noise.num_obs is None and noise.obs_shape == (5,) and 0 < noise.t < 0.1
    n = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = -torch.linalg.solve(scale**2 * (cov + s**2 * torch.eye(5, dtype=F64)), n.mT).mT
    torch.testing.assert_close(noise.score(n), expected, rtol=1e-6, atol=1e-9)
    # log_prob: the smoothed Gaussian log-density up to one constant
    y, y_pred = n[:, 0], n[:, 1:]
    lp = noise.log_prob(y, y_pred)
    full = torch.distributions.MultivariateNormal(
        torch.zeros(5, dtype=F64), scale**2 * (cov + s**2 * torch.eye(5, dtype=F64))
    ).log_prob(y[:, None] - y_pred)
    assert lp.shape == (3, 6)
    torch.testing.assert_close(lp - full, (lp - full)[0, 0].expand(3, 6), rtol=0, atol=1e-8)
    # samples: the Gaussian's covariance
    x = noise.sample((4000, 5), generator=torch.Generator().manual_seed(1))
    emp = x.T @ x / len(x)
    assert (emp - scale**2 * cov).abs().max() < 0.1 * scale**2


def test_per_observation_scale_and_selection():
    prior = GaussianPrior(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    noise = LearnedNoise(prior, scale=scale, smoothing=0.05)
    assert noise.num_obs == 3 and len(noise) == 3
    n = torch.ones(3, 4, 3, dtype=F64)
    score = noise.score(n)
    torch.testing.assert_close(score[:, 0, 0], -1 / (scale**2 * (1 + 0.05**2)))
    sub = noise[[2, 0]]
    assert sub.num_obs == 2
    torch.testing.assert_close(sub.score(n[[2, 0]]), score[[2, 0]])
    torch.testing.assert_close(sub.curvature(), 1 / (scale[[2, 0]] * 0.05) ** 2)
    with pytest.raises(ValueError, match="3 observations"):
        noise.score(torch.ones(2, 3, dtype=F64))
    x = noise.sample((3, 2000, 3), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 2000, 3)
    torch.testing.assert_close(x.std(dim=(1, 2)), scale, rtol=0.06, atol=0)


def test_noise_and_likelihood_score_of_gaussian_noise():
    A = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    forward = DenseLinear(A)
    noise = GaussianNoise(0.5)
    y = torch.randn(4, 6, dtype=F64)
    x = torch.randn(4, 3, 2, dtype=F64)
    r = y[:, None] - forward(x)
    torch.testing.assert_close(noise_score(noise, r), -r / 0.25)
    torch.testing.assert_close(likelihood_score(forward, noise, y, x), (r / 0.25) @ A)
    with pytest.raises(TypeError, match="noise must be a hierprior NoiseModel"):
        noise_score(object(), r)


# ----------------------------------------------------------------------------- Langevin


def test_langevin_matches_exact_gaussian_posterior(report):
    g = torch.Generator().manual_seed(0)
    n_obs, m, d, sigma = 30, 6, 2, 0.3
    A = torch.randn(n_obs, m, d, generator=g, dtype=F64)  # per-observation models
    forward = DenseLinear(A)
    noise = GaussianNoise(torch.full((n_obs,), sigma, dtype=F64))
    eta = torch.randn(n_obs, d, generator=g, dtype=F64)
    y = forward(eta) + noise.sample((n_obs, m), generator=g, dtype=F64)
    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(d, dtype=F64), torch.ones(d, dtype=F64)), 1
    )
    tau = 0.1
    samples, info = langevin(
        forward,
        noise,
        y,
        prior,
        torch.randn(n_obs, 4, d, generator=g, dtype=F64),
        num_samples=250,
        burn_in=100,
        thin=4,
        step_size=tau,
        preconditioner=torch.ones(d, dtype=F64),
        adapt=3,
        generator=torch.Generator().manual_seed(1),
        return_info=True,
    )
    assert samples.shape == (n_obs, 1000, d) and info["preconditioner"].shape == (n_obs, 4, d, d)
    means, sds = [], []
    for i in range(n_obs):
        mean, cov = gaussian_posterior(A[i], sigma**2 * torch.eye(m, dtype=F64), y[i : i + 1])
        means.append(mean[0])
        sds.append(cov.diagonal().sqrt())
    mean, sd = torch.stack(means), torch.stack(sds)
    mean_err = ((samples.mean(1) - mean) / sd).abs().mean()
    sd_ratio = (samples.std(1) / sd).mean()
    report(
        f"Langevin vs exact Gaussian posterior: mean error {mean_err:.3f} sd, "
        f"sd ratio {sd_ratio:.3f}"
    )
    assert mean_err < 0.15
    # ULA with P = posterior covariance: stationary variance / (1 - tau / 2)
    assert abs(sd_ratio - (1 - tau / 2) ** -0.5) < 0.04
    # the same seed gives the same chains
    again = langevin(
        forward,
        noise,
        y,
        prior,
        torch.zeros(n_obs, d, dtype=F64),
        num_samples=3,
        burn_in=2,
        generator=5,
    )
    torch.testing.assert_close(
        again,
        langevin(
            forward,
            noise,
            y,
            prior,
            torch.zeros(n_obs, d, dtype=F64),
            num_samples=3,
            burn_in=2,
            generator=5,
        ),
    )


def test_langevin_errors():
    forward = DenseLinear(torch.randn(6, 2, dtype=F64))
    noise = GaussianNoise(0.5)
    y = torch.randn(3, 6, dtype=F64)
    prior = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), torch.eye(2))
    init = torch.zeros(3, 2, 2, dtype=F64)

    def run(**kw):
        args = {"forward": forward, "noise": noise, "y": y, "prior": prior, "init": init}
        args.update(kw)
        return langevin(**args, num_samples=2, burn_in=4)

    bad = y.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in observations \[1\]"):
        run(y=bad)
    with pytest.raises(ValueError, match="y must have shape"):
        run(y=y[:, :5])
    with pytest.raises(ValueError, match="obs_shape"):
        learned = LearnedNoise(GaussianPrior(torch.zeros(5, dtype=F64), torch.eye(5)))
        run(noise=learned)
    with pytest.raises(ValueError, match="noise.num_obs"):
        run(noise=GaussianNoise(torch.ones(4, dtype=F64)))
    with pytest.raises(ValueError, match="init must have shape"):
        run(init=torch.zeros(3, 2, 3, dtype=F64))
    with pytest.raises(ValueError, match="init holds NaN"):
        run(init=torch.full((3, 2), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="preconditioner must have shape"):
        run(preconditioner=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="positive definite"):
        run(preconditioner=-torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="step_size"):
        run(step_size=0.0)
    with pytest.raises(ValueError, match="burn_in >= 4"):
        langevin(forward, noise, y, prior, init, burn_in=3, adapt=2)
    with pytest.raises(ValueError, match="Independent"):
        run(prior=torch.distributions.Normal(torch.zeros(2, dtype=F64), 1.0))
    with pytest.raises(TypeError, match="prior"):
        run(prior=3.0)
    with pytest.raises(TypeError, match="noise must be a hierprior NoiseModel"):
        run(noise=0.5)
    nan_on_1 = torch.tensor([1.0, float("nan"), 1.0], dtype=F64)[:, None]
    with pytest.raises(PosteriorSamplingError, match=r"observations \[1\]"):
        run(prior=lambda e: -0.5 * (e**2).sum(-1) * nan_on_1)
    # the tamed drift keeps even absurd steps finite
    assert torch.isfinite(run(step_size=1e6, preconditioner=torch.full((2,), 1e6))).all()


# ----------------------------------------------------------------------------- posterior samplers


def linear_problem(n=3, d=4, m=3, sigma=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    prior = GaussianPrior(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    forward = DenseLinear(torch.randn(n, m, d, generator=g, dtype=F64) / d**0.5)
    x = prior.sample(n, generator=g)
    y = forward(x) + sigma * torch.randn(n, m, generator=g, dtype=F64)
    white = LearnedNoise(
        GaussianPrior(torch.zeros(m, dtype=F64), torch.eye(m, dtype=F64)), sigma, smoothing=1e-3
    )
    return prior, forward, y, GaussianNoise(sigma), white


def test_dps_with_learned_white_noise_equals_gaussian_dps():
    prior, forward, y, gauss, learned = linear_problem()
    x_init = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    opts = {"steps": 16, "zeta": 5.0, "sampler": "ddim", "num_samples": 5, "x_init": x_init}
    a = sample_posterior(prior, forward, gauss, y, "dps", **opts)
    b = sample_posterior(prior, forward, learned, y, "dps", **opts)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_tds_with_learned_white_noise_equals_gaussian_tds():
    prior, forward, y, gauss, learned = linear_problem()

    def run(noise):
        g = torch.Generator().manual_seed(2)
        return sample_posterior(
            prior, forward, noise, y, "tds", steps=12, num_samples=16, generator=g, twist="dps"
        )

    torch.testing.assert_close(run(gauss), run(learned), rtol=1e-4, atol=1e-4)


def test_daps_langevin_runs_with_learned_noise():
    prior, forward, y, _, _ = linear_problem()
    noise = LearnedNoise(GaussianPrior(torch.zeros(3, dtype=F64), torch.eye(3)), 0.3, 0.1)
    xs = sample_posterior(
        prior,
        forward,
        noise,
        y,
        "daps",
        steps=8,
        num_samples=4,
        generator=torch.Generator().manual_seed(0),
        likelihood_step="langevin",
        langevin_steps=5,
    )
    assert xs.shape == (3, 4, 4) and torch.isfinite(xs).all()


def test_gaussian_only_methods_refuse_learned_noise():
    prior, forward, y, _, learned = linear_problem()
    for method in ("mmps", "cla", "pigdm", "exact"):
        with pytest.raises(TypeError, match=f"^{method} assumes Gaussian noise"):
            sample_posterior(prior, forward, learned, y, method, steps=2, num_samples=1)
    with pytest.raises(ValueError, match="likelihood_step='langevin'"):
        sample_posterior(prior, forward, learned, y, "daps", steps=2, num_samples=1)
    with pytest.raises(ValueError, match="twist='dps'"):
        sample_posterior(prior, forward, learned, y, "tds", steps=2, num_samples=1)
    with pytest.raises(ValueError, match="obs_shape"):
        wrong = LearnedNoise(GaussianPrior(torch.zeros(4, dtype=F64), torch.eye(4)))
        sample_posterior(prior, forward, wrong, y, "dps", steps=2, num_samples=1)
    with pytest.raises(ValueError, match="unknown posterior method"):
        sample_posterior(prior, forward, learned, y, "nope", steps=2, num_samples=1)


def test_learned_noise_errors():
    prior = GaussianPrior(torch.zeros(4, dtype=F64), torch.eye(4))
    with pytest.raises(TypeError, match="Denoiser"):
        LearnedNoise(torch.nn.Identity())
    with pytest.raises(ValueError, match="unknown sampler"):
        LearnedNoise(prior, sampler="nope")
    with pytest.raises(ValueError, match="smoothing"):
        LearnedNoise(prior, smoothing=0.0)
    with pytest.raises(ValueError, match="scale"):
        LearnedNoise(prior, scale=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="has 6 values"):
        LearnedNoise(prior, obs_shape=(2, 3))
    noise = LearnedNoise(prior, obs_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="obs_shape"):
        noise.score(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="same N"):
        noise.log_prob(torch.zeros(3, 1, 2, 2), torch.zeros(2, 1, 2, 2))


# ----------------------------------------------------------------------------- simulators


def test_noise_simulators():
    cov = correlated_noise_covariance(8, white_fraction=0.4, correlation_length=1.2)
    torch.testing.assert_close(cov.diagonal(), torch.ones(64, dtype=F64))
    x = correlated_noise(
        20_000, 8, white_fraction=0.4, correlation_length=1.2, generator=0, dtype=F64
    ).reshape(20_000, 64)
    assert ((x.T @ x / len(x)) - cov).abs().max() < 0.05
    cr = cosmic_rays(4000, 16, rate=1.5, amplitude=(5.0, 6.0), track_length=1, generator=1)
    per_image = (cr > 0).sum((1, 2)).double()
    assert abs(per_image.mean() - 1.5) < 0.1  # single-pixel tracks, few overlaps
    assert cr[cr > 0].min() >= 5.0
    n = noise_realisations(10, 16, seed=3)
    assert n.shape == (10, 1, 16, 16) and n.dtype == torch.float32
    torch.testing.assert_close(n, noise_realisations(10, 16, seed=3))
    assert noise_realisations(10, 16, flatten=True).shape == (10, 256)
    with pytest.raises(ValueError, match="white_fraction"):
        correlated_noise(2, 8, white_fraction=1.5)


def test_slic_noise_data_config_builds():
    from hydra import compose, initialize_config_dir

    from hierprior.config import CONF_DIR
    from hierprior.training.datamodule import load_training_tensors

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_prior", overrides=["experiment=slic_noise", "data.n=32"])
    train, val = load_training_tensors(cfg.data, seed=0)
    assert train.shape == (32, 1, 16, 16) and val is None
    assert cfg.prior.backbone.image_size == 16


def test_blob_langevin_with_nonlinear_model():
    """A non-linear image model: the likelihood score goes through the model's VJP."""
    grid = torch.arange(8, dtype=F64) - 3.5

    def blob(eta):
        amp, x0 = eta.unbind(-1)
        img = amp[:, None, None] * torch.exp(
            -((grid[None, None] - x0[:, None, None]) ** 2 + grid[None, :, None] ** 2) / 4
        )
        return img.unsqueeze(1)

    forward = NonLinear(blob, (2,), (1, 8, 8))
    noise = LearnedNoise(
        GaussianPrior(torch.zeros(64, dtype=F64), torch.eye(64, dtype=F64)),
        0.1,
        0.05,
        obs_shape=(1, 8, 8),
    )
    eta = torch.tensor([[1.0, 0.5], [2.0, -1.0]], dtype=F64)
    y = forward(eta) + 0.1 * torch.randn(
        2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(2, dtype=F64), 2 * torch.ones(2, dtype=F64)), 1
    )
    samples = langevin(
        forward,
        noise,
        y,
        prior,
        torch.zeros(2, 2, 2, dtype=F64),
        num_samples=100,
        burn_in=100,
        thin=2,
        preconditioner=4 * torch.ones(2, dtype=F64),
        adapt=3,
        generator=0,
    )
    z = (samples.mean(1) - eta) / samples.std(1)
    assert z.abs().max() < 4 and (samples.std(1) < 0.2).all()
    assert math.isfinite(float(samples.sum()))


# ----------------------------------------------------------------------------- EM


def slic_population(n: int = 16, m: int = 6, d: int = 4, seed: int = 0):
    """Random 6x4 projections of 4-d signals with AR(1)-correlated noise, known to EM only
    through a LearnedNoise (its analytic GaussianPrior denoiser: the exact SLIC score)."""
    from hierprior.em import Population

    g = torch.Generator().manual_seed(seed)
    cov = ar1_cov(m).float()
    noise = LearnedNoise(GaussianPrior(torch.zeros(m), cov), scale=0.3, smoothing=0.1)
    forward = DenseLinear(torch.randn(n, m, d, generator=g) / d**0.5)
    truth = 1.0 + torch.randn(n, d, generator=g)
    n_true = torch.randn(n, m, generator=g) @ torch.linalg.cholesky(cov).T
    return Population(y=forward(truth) + 0.3 * n_true, forward=forward, noise=noise, truth=truth)


def test_em_with_learned_noise_runs_end_to_end(tmp_path):
    """A shrunk EM run whose likelihood is a SLIC noise model: DPS E-step (and the monitor's
    own TARP E-step), M-step, monitor residuals in units of the noise, two rounds; a method
    that needs Gaussian noise is refused before any round."""
    from test_em import cheap_monitor, never_stop

    from hierprior.em import EStep, NetworkMStep, run_em

    pop = slic_population()
    torch.manual_seed(0)  # the network's initialisation (outside run_em)
    prior = EDMDenoiser(MLP(4, hidden=(16,)), (4,), sigma_data=1.0)
    pieces = dict(
        mstep=NetworkMStep(steps=2, batch_size=8, checkpoint_every=1),
        monitor=cheap_monitor(num_prior_samples=16, tarp_observations=4, tarp_samples=4),
        stop=never_stop(),
        rounds=1,
        logger=None,
    )
    with pytest.raises(TypeError, match="^mmps assumes Gaussian noise and cannot use a Learned"):
        run_em(
            prior,
            pop,
            estep=EStep({"method": "mmps", "steps": 4}),
            run_dir=tmp_path / "x",
            **pieces,
        )
    assert not (tmp_path / "x" / "round_000").exists()
    estep = EStep({"method": "dps", "steps": 4, "zeta": 5.0}, num_samples=2, batch_size=8)
    result = run_em(prior, pop, estep=estep, run_dir=tmp_path / "run", **pieces)
    assert [row["round"] for row in result.metrics] == [0, 1]
    for row in result.metrics:
        for key in ("residual_chi2_nu", "tarp_atc", "posterior_mean_rmse"):
            assert math.isfinite(row[key]), (key, row)


def test_population_fingerprint_identifies_a_neural_noise_model_by_its_weights():
    from hierprior.em import Population

    pop = slic_population()

    def learned(seed: int) -> LearnedNoise:
        torch.manual_seed(seed)
        return LearnedNoise(EDMDenoiser(MLP(6, hidden=(8,)), (6,), sigma_data=1.0), 0.3)

    def fingerprint(noise) -> str:
        return Population(y=pop.y, forward=pop.forward, noise=noise).fingerprint()

    assert fingerprint(learned(0)) == fingerprint(learned(0))
    assert fingerprint(learned(0)) != fingerprint(learned(1))  # same buffers, other weights
    # models without parameters digest as before (run directories stay valid)
    gauss = GaussianNoise(0.3)
    assert fingerprint(gauss) == pop_fingerprint_of_buffers(pop.y, pop.forward, gauss)


def pop_fingerprint_of_buffers(y, forward, noise) -> str:
    from hierprior.em.population import tensor_fingerprint

    tensors = [y]
    for module in (forward, noise):
        tensors += [b for _, b in sorted(module.named_buffers(), key=lambda kv: kv[0])]
    return tensor_fingerprint(*tensors)
