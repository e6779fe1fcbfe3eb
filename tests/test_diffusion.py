"""Tests of hierprior.diffusion: schedules, preconditioning, DSM loss, priors, samplers."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from hierprior.diffusion import (
    EDMDenoiser,
    GaussianMixturePrior,
    GaussianPrior,
    VESchedule,
    VPSchedule,
    dsm_loss,
    load_prior,
    sample,
    save_prior,
)
from hierprior.diffusion.denoiser import Denoiser


def random_gaussian(dim: int, seed: int = 0, dtype=torch.float64) -> GaussianPrior:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=dtype)
    cov = a @ a.T / dim + 0.1 * torch.eye(dim, dtype=dtype)
    mean = torch.randn(dim, generator=g, dtype=dtype)
    return GaussianPrior(mean, cov)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", [VPSchedule(), VESchedule()])
def test_schedule_identities(schedule):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    if isinstance(schedule, VPSchedule):
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
        assert alpha[0] == 1 and sigma[0] == 0
    else:
        assert (alpha == 1).all()
    ratio = schedule.ratio(t[1:])
    assert (ratio.diff() > 0).all(), "s_t must increase with t"
    torch.testing.assert_close(schedule.t_from_ratio(ratio), t[1:], atol=1e-9, rtol=0)
    for spacing in ("uniform", "edm"):
        grid = schedule.timesteps(17, spacing=spacing)
        assert grid.shape == (18,) and grid[0] == 1 and grid[-1] == 0
        assert (grid.diff() < 0).all()


def test_schedule_errors():
    with pytest.raises(ValueError, match="steps"):
        VPSchedule().timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        VPSchedule().timesteps(8, spacing="cosine")
    from hierprior.diffusion import get_schedule

    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("subvp")


# ----------------------------------------------------------------------- preconditioning


class ZeroNet(nn.Module):
    def forward(self, x, c_noise):
        return torch.zeros_like(x)


def test_edm_preconditioning_with_zero_network_is_the_isotropic_gaussian_denoiser():
    # With F = 0, D = c_skip(s) x_t / alpha_t = E[x | x_t] for x ~ N(0, sigma_d^2 I): an identity
    # of the EDM preconditioning that holds for every schedule.
    sd = 0.7
    for schedule in (VPSchedule(), VESchedule()):
        edm = EDMDenoiser(ZeroNet(), (5,), schedule, sigma_data=sd).double()
        oracle = GaussianPrior(
            torch.zeros(5, dtype=torch.float64),
            sd**2 * torch.eye(5, dtype=torch.float64),
            schedule,
        )
        x = torch.randn(7, 5, dtype=torch.float64)
        t = torch.rand(7, dtype=torch.float64) * 0.98 + 0.01
        torch.testing.assert_close(edm(x, t), oracle(x, t))


def test_edm_denoiser_checks_shapes():
    edm = EDMDenoiser(ZeroNet(), (1, 8, 8))
    with pytest.raises(ValueError, match="x_t must have shape"):
        edm(torch.zeros(2, 1, 4, 4), 0.5)


def test_score_and_tweedie_identities():
    prior = random_gaussian(6)
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = prior.schedule.alpha_sigma(t)
    # the score of the Gaussian marginal N(alpha mu, alpha^2 Sigma + sigma^2 I)
    for i in range(4):
        cov_t = alpha[i] ** 2 * prior.cov + sigma[i] ** 2 * torch.eye(6, dtype=torch.float64)
        score = -torch.linalg.solve(cov_t, x[i] - alpha[i] * prior.mean)
        torch.testing.assert_close(prior.score(x[i : i + 1], t[i])[0], score)
    v = torch.randn(4, 6, dtype=torch.float64)
    exact = prior.tweedie_cov(x, t, v)
    generic = Denoiser.tweedie_cov(prior, x, t, v)  # by a VJP through the exact denoiser
    torch.testing.assert_close(exact, generic)
    mats = prior.posterior_cov(t, x)
    torch.testing.assert_close(torch.einsum("bij,bj->bi", mats, v), exact)


def test_gmm_denoiser_and_tweedie_cov_match_autograd_and_bayes():
    g = torch.Generator().manual_seed(3)
    k, d = 3, 4
    means = 2 * torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.mT / d + 0.2 * torch.eye(d, dtype=torch.float64)
    gmm = GaussianMixturePrior(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), means, covs)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    t = torch.full((5,), 0.4, dtype=torch.float64)
    v = torch.randn(5, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gmm.tweedie_cov(x, t, v), Denoiser.tweedie_cov(gmm, x, t, v))
    # Tweedie's formula: D = (x_t + sigma^2 * score) / alpha, score by autograd of log p_t.
    alpha, sigma = gmm.schedule.alpha_sigma(torch.tensor(0.4, dtype=torch.float64))
    marg = GaussianMixturePrior(
        gmm.weights, alpha * means, alpha**2 * covs + sigma**2 * torch.eye(d, dtype=torch.float64)
    )
    xr = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(marg.log_prob(xr).sum(), xr)
    torch.testing.assert_close(gmm(x, t), (x + sigma**2 * score) / alpha)


def test_covariance_validation():
    with pytest.raises(ValueError, match="not symmetric"):
        GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        GaussianPrior(torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixturePrior(
            torch.tensor([1.0, -1.0]), torch.zeros(2, 2), torch.eye(2).repeat(2, 1, 1)
        )


# ---------------------------------------------------------------------------------- loss


def test_dsm_loss_is_minimised_by_the_exact_denoiser():
    # At fixed t the weighted DSM loss of a denoiser D is E||D - x||^2 weighted; it is minimal for
    # D = E[x | x_t]. Compare the exact Gaussian denoiser with shifted and rescaled ones on the
    # same noise (common random numbers), and check the minimum value against its closed form
    # lambda(s) * tr(Cov[x | x_t]) / D.
    prior = random_gaussian(8, seed=1)
    x = prior.sample(20000, torch.Generator().manual_seed(0))
    t = torch.tensor(0.3, dtype=torch.float64)

    class Perturbed(Denoiser):
        def __init__(self, scale, shift):
            super().__init__()
            self.schedule, self.event_shape = prior.schedule, prior.event_shape
            self.scale, self.shift = scale, shift

        def forward(self, x_t, t):
            return self.scale * prior(x_t, t) + self.shift

    def loss(den):
        return float(
            dsm_loss(den, x, t=t, generator=torch.Generator().manual_seed(1), sigma_data=0.5)
        )

    best = loss(prior)
    for scale, shift in [(1.05, 0.0), (0.95, 0.0), (1.0, 0.05), (1.0, -0.05)]:
        assert loss(Perturbed(scale, shift)) > best
    alpha, sigma = prior.schedule.alpha_sigma(t)
    s = sigma / alpha
    weight = (s**2 + 0.25) / (s * 0.5) ** 2
    tr = torch.trace(prior.posterior_cov(t, x[:1])[0]) / 8
    # 20,000 samples: relative Monte-Carlo error of a mean of chi2-like terms ~ sqrt(2/20000)=1%
    assert best == pytest.approx(float(weight * tr), rel=0.05)


# ------------------------------------------------------------------------------ samplers

# Monte-Carlo tolerance: with n samples, each mean coordinate has standard error
# sqrt(Sigma_ii / n) and each covariance entry sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / n).
# We allow 5 standard errors (the maximum over 16 means / 136 entries stays below 5 SE with
# probability > 0.999) plus a discretisation allowance of 0.03 (mean) and 0.06 (covariance),
# measured errors at 256 steps being below these.
N_SAMPLES = 20000


@pytest.mark.parametrize("method", ["ddpm", "ddim", "heun"])
def test_samplers_reproduce_a_gaussian(method, report):
    prior = random_gaussian(16, seed=0)
    steps = 256 if method != "heun" else 64
    x = sample(
        prior, N_SAMPLES, method=method, steps=steps, generator=torch.Generator().manual_seed(2)
    )
    assert x.shape == (N_SAMPLES, 16)
    var = torch.diagonal(prior.cov)
    se_mean = torch.sqrt(var / N_SAMPLES)
    se_cov = torch.sqrt((var[:, None] * var[None] + prior.cov**2) / N_SAMPLES)
    err_mean = (x.mean(0) - prior.mean).abs()
    err_cov = (torch.cov(x.T) - prior.cov).abs()
    rel_frob = torch.linalg.norm(torch.cov(x.T) - prior.cov) / torch.linalg.norm(prior.cov)
    report(
        f"sampler {method:5s} ({steps} steps, n={N_SAMPLES}, 16-d Gaussian): "
        f"max|mean err| {err_mean.max():.4f} (5 SE {5 * se_mean.max():.4f}), "
        f"max|cov err| {err_cov.max():.4f} (5 SE {5 * se_cov.max():.4f}), "
        f"rel. Frobenius cov err {rel_frob:.4f}"
    )
    assert (err_mean <= 5 * se_mean + 0.03).all()
    assert (err_cov <= 5 * se_cov + 0.06).all()


def test_sampler_with_ve_schedule():
    prior = random_gaussian(4, seed=5)
    prior.schedule = VESchedule(sigma_min=1e-3, sigma_max=50.0)
    x = sample(prior, 8000, method="heun", steps=64, generator=torch.Generator().manual_seed(0))
    # 8,000 samples: 5 SE of the mean is below 0.1 for these variances (< 3)
    assert (x.mean(0) - prior.mean).abs().max() < 0.1
    assert (torch.cov(x.T) - prior.cov).abs().max() < 0.25


def test_gaussian_mixture_weights_are_reproduced(report):
    d = 2
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    covs = 0.3 * torch.eye(d, dtype=torch.float64).repeat(3, 1, 1)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    gmm = GaussianMixturePrior(weights, means, covs)
    n = 10000
    x = sample(gmm, n, method="ddpm", steps=256, generator=torch.Generator().manual_seed(0))
    labels = gmm.responsibilities(x).argmax(-1)
    share = torch.bincount(labels, minlength=3).double() / n
    report(
        f"GMM weights {weights.tolist()} -> sampled shares {[round(v, 4) for v in share.tolist()]}"
    )
    # binomial standard error sqrt(w(1-w)/n) <= 0.005; 5 SE + 0.01 discretisation allowance
    assert (share - weights).abs().max() < 0.035


def test_sampling_is_reproducible_and_validates():
    prior = random_gaussian(3)
    a = sample(prior, 10, steps=8, generator=torch.Generator().manual_seed(0))
    b = sample(prior, 10, steps=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(prior, 10, method="euler_maruyama")
    with pytest.raises(ValueError, match="steps"):
        sample(prior, 10, steps=0)
    with pytest.raises(ValueError, match="eta"):
        sample(prior, 10, method="heun", eta=0.5)


def test_gaussian_sample_and_fit():
    prior = random_gaussian(5, seed=2)
    x = prior.sample(50000, torch.Generator().manual_seed(0))
    fitted = prior.fit(x)
    # 50,000 samples: standard errors below 0.01 for these variances
    assert (fitted.mean - prior.mean).abs().max() < 0.04
    assert (fitted.cov - prior.cov).abs().max() < 0.08
    with pytest.raises(ValueError, match="NaN"):
        prior.fit(torch.full((4, 5), math.nan, dtype=torch.float64))


# --------------------------------------------------------------------------- checkpoints


def _assert_same_schedule(a, b):
    assert type(a) is type(b)
    assert a.config() == b.config()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_checkpoint_round_trips(tmp_path, dtype):
    prior = random_gaussian(4, dtype=dtype)
    prior.schedule = VESchedule(sigma_min=2e-3, sigma_max=40.0)
    meta = {"step": 7, "config": {"name": "toy", "lr": 1e-3}, "tags": ["a", "b"]}
    path = save_prior(prior, tmp_path / "gauss.ckpt", meta=meta)
    again = load_prior(path)
    assert type(again) is GaussianPrior
    # bit-identical tensors, dtype included
    assert again.mean.dtype == dtype and again.cov.dtype == dtype
    assert torch.equal(again.mean, prior.mean) and torch.equal(again.cov, prior.cov)
    assert again.event_shape == prior.event_shape == (4,)
    _assert_same_schedule(again.schedule, prior.schedule)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "hierprior-prior" and ckpt["kind"] == "gaussian"
    assert ckpt["meta"] == meta


def test_gmm_checkpoint_round_trips(tmp_path):
    g = torch.Generator().manual_seed(4)
    k, d = 3, 2
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    gmm = GaussianMixturePrior(
        torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
        torch.randn(k, d, generator=g, dtype=torch.float64),
        a @ a.mT / d + 0.1 * torch.eye(d, dtype=torch.float64),
        VPSchedule(beta_min=0.2, beta_max=15.0),
    )
    again = load_prior(save_prior(gmm, tmp_path / "gmm.ckpt", meta={"round": 3}))
    assert type(again) is GaussianMixturePrior
    for name in ("weights", "means", "covs"):
        assert torch.equal(getattr(again, name), getattr(gmm, name)), name
        assert getattr(again, name).dtype == torch.float64
    assert again.event_shape == gmm.event_shape == (d,)
    _assert_same_schedule(again.schedule, gmm.schedule)
    assert torch.load(tmp_path / "gmm.ckpt", weights_only=True)["meta"] == {"round": 3}


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    """Overwrites every floating tensor of the state dict (zero-initialised output layers,
    seeded Fourier frequencies) with random values, so that a round trip must carry each."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * 0.3)
    return module


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_edm_checkpoint_round_trips(tmp_path, kind):
    from hierprior.nn import MLP, UNet

    if kind == "mlp":
        backbone, shape = MLP(3, hidden=(16, 8), emb_dim=8, embedding="fourier"), (3,)
    else:
        backbone = UNet(
            1, image_size=8, channels=(8, 16), num_res_blocks=1, attention_resolutions=(4,)
        )
        shape = (1, 8, 8)
    schedule = VESchedule(sigma_min=5e-3, sigma_max=30.0)
    prior = _randomised(EDMDenoiser(backbone, shape, schedule, sigma_data=0.7), seed=1).eval()
    meta = {"step": 120, "config": {"model": kind}}
    again = load_prior(save_prior(prior, tmp_path / "edm.ckpt", meta=meta))
    assert type(again) is EDMDenoiser and type(again.backbone) is type(prior.backbone)
    assert again.backbone.config == prior.backbone.config
    assert again.event_shape == prior.event_shape == shape
    assert again.sigma_data == 0.7
    _assert_same_schedule(again.schedule, prior.schedule)
    assert not again.training
    ours, theirs = prior.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    assert torch.load(tmp_path / "edm.ckpt", weights_only=True)["meta"] == meta
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, *shape, generator=g)
    t = torch.linspace(0.05, 0.95, 5)
    with torch.no_grad():
        out = prior(x, t)
        assert out.abs().max() > 0  # the randomised output layer makes the network matter
        assert torch.equal(again(x, t), out)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prior(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a hierprior prior"):
        load_prior(tmp_path / "other.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable"):
        load_prior(tmp_path / "garbage.ckpt")


def _unreadable_files(tmp_path):
    """Junk bytes, random bytes, a truncated and an empty file, and torch files of non-dicts."""
    noise = torch.randint(
        0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    files = {"g": b"g" * 100, "random": noise.numpy().tobytes()}
    real = save_prior(random_gaussian(3), tmp_path / "real.ckpt").read_bytes()
    files["truncated"] = real[: len(real) // 2]
    files["empty"] = b""
    paths = []
    for name, data in files.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(data)
        paths.append(path)
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    paths += [tmp_path / "tensor.ckpt", tmp_path / "list.ckpt"]
    return paths


def test_unreadable_checkpoint_errors_are_one_line(tmp_path):
    # torch's own message runs over several paragraphs and advises weights_only=False; ours is
    # "<path> is not a ... checkpoint (<ExceptionType>: <first line, <= 120 chars>)".
    for path in _unreadable_files(tmp_path):
        with pytest.raises(ValueError, match="not a (loadable|valid) hierprior prior checkpoint"):
            load_prior(path)
        try:
            load_prior(path)
        except ValueError as err:
            message = str(err)
        assert "\n" not in message and "weights_only" not in message, message
        detail = r"\((\w+(: .{1,120})?|it holds a (Tensor|list), not a dict)\)"
        pattern = rf"{re.escape(str(path))} is not a (loadable|valid) hierprior prior checkpoint "
        assert re.fullmatch(pattern + detail, message), message
