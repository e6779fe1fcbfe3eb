"""The joint (source, lens) posterior method for lenses nobody has modelled.

- known source: the lens chains' posterior equals emcee's (10 lenses; means within 0.1
  posterior sd, sds within 10%);
- simulation-based calibration over 200 blind lenses whose sources are drawn from the prior
  in use (a Gaussian prior over a small source image, so that the source step is exact): ranks
  uniform per parameter, TARP on the lens parameters, residual chi2/nu;
- registration, options, every linear-lens source method, no coupling between observations,
  and the one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierprior.diffusion import GaussianPrior
from hierprior.evaluation.lens_parameters import lens_parameter_metrics
from hierprior.metrics import tarp
from hierprior.physics import GaussianNoise
from hierprior.physics.lensing import (
    SIE,
    BlindLensing,
    LensPrior,
    Shear,
    TruncatedNormal,
    Uniform,
)
from hierprior.posterior import (
    JOINT_SOURCES,
    POSTERIOR_METHODS,
    Joint,
    LensChains,
    PosteriorSamplingError,
    lens_posterior,
    lens_search,
    posterior_method,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D64 = torch.float64


def _lens_prior(shear: bool = True) -> LensPrior:
    parts = [
        SIE.prior(
            theta_E=Uniform(0.6, 1.0),
            e1=TruncatedNormal(0.0, 0.1, -0.25, 0.25),
            e2=TruncatedNormal(0.0, 0.1, -0.25, 0.25),
            center_x=Uniform(-0.1, 0.1),
            center_y=Uniform(-0.1, 0.1),
        )
    ]
    if shear:
        parts.append(
            Shear.prior(
                gamma1=TruncatedNormal(0.0, 0.03, -0.08, 0.08),
                gamma2=TruncatedNormal(0.0, 0.03, -0.08, 0.08),
            )
        )
    return LensPrior(parts)


def _gaussian_source_prior(n: int = 8, fov: float = 2.0, dtype=D64) -> GaussianPrior:
    """A smooth Gaussian random source over n x n pixels: a round blob plus correlated
    fluctuations (squared-exponential covariance, 0.4" correlation length)."""
    c = (torch.arange(n, dtype=D64) + 0.5) * fov / n - fov / 2
    X, Y = torch.meshgrid(c, c, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], -1)
    mean = torch.exp(-(X**2 + Y**2).flatten() / (2 * 0.35**2))
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    cov = 0.15**2 * torch.exp(-d2 / (2 * 0.4**2)) + 1e-4 * torch.eye(n * n, dtype=D64)
    return GaussianPrior(mean.to(dtype), cov.to(dtype))


def _blind_problem(n_obs: int, seed: int = 0, sigma: float = 0.05, shear: bool = False):
    prior = _lens_prior(shear)
    g = torch.Generator().manual_seed(seed)
    eta = prior.sample(n_obs, g)
    source_prior = _gaussian_source_prior()
    x = source_prior.sample(n_obs, g)
    blind = BlindLensing(prior, 16, 0.15, 8, 2.0, truth=eta, flat=True)
    y = blind.truth_forward()(x) + sigma * torch.randn(n_obs, 1, 16, 16, generator=g, dtype=D64)
    return source_prior, blind, GaussianNoise(sigma), y, x, eta


# ------------------------------------------------------------------------ options, errors


def test_registered_configurable_and_checked():
    assert POSTERIOR_METHODS["joint"] is Joint
    m = Joint(8, source={"method": "pigdm", "iterations": 3}, lens_steps=2)
    assert m.source["method"] == "pigdm" and m.source["steps"] == 8
    assert posterior_method(m.options()) == m
    assert set(JOINT_SOURCES) == {"mmps", "pigdm", "cla", "daps"}
    with pytest.raises(ValueError, match="linear-lens method"):
        Joint(4, source="dps")
    with pytest.raises(TypeError, match="does not take option"):
        Joint(4, source={"method": "mmps", "bogus": 1})
    with pytest.raises(ValueError, match="lens_steps must be an integer >= 0"):
        Joint(4, lens_steps=-1)
    source_prior, blind, noise, y, _, eta = _blind_problem(3)
    with pytest.raises(TypeError, match="needs a BlindLensing"):
        Joint(2).sample(source_prior, blind.truth_forward(), noise, y)
    bad = eta.clone()
    bad[1, 0] = 1.3  # outside Uniform(0.6, 1.0)
    with pytest.raises(ValueError, match="observation 1: theta_E = 1.3 is outside its prior"):
        Joint(2).sample_joint(source_prior, blind, noise, y, 2, eta_init=bad)


def test_non_finite_lens_parameters_are_one_line_naming_the_observation(monkeypatch):
    source_prior, blind, noise, y, _, _ = _blind_problem(3)
    eta = LensChains.eta

    def broken(self):
        out = eta(self).clone()
        out[2, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(LensChains, "eta", broken)
    with pytest.raises(PosteriorSamplingError, match=r"observations \[2\] went non-finite"):
        Joint(3, lens_steps=1, final_warmup=1, final_steps=1).sample(
            source_prior, blind, noise, y, 2, torch.Generator().manual_seed(0)
        )


@pytest.mark.parametrize("source", JOINT_SOURCES)
def test_every_source_method_gives_joint_samples(source):
    source_prior, blind, noise, y, _, eta = _blind_problem(3, shear=True)
    m = Joint(6, source=source, lens_steps=2, final_warmup=30, final_steps=20)
    x, info = m.sample(
        source_prior, blind, noise, y, 2, torch.Generator().manual_seed(0), return_info=True
    )
    assert x.shape == (3, 2, 64) and info["params"].shape == (3, 2, 7)
    assert blind.prior.inside(info["params"]).all()
    assert info["acceptance"].shape == (3, 2) and float(info["acceptance"].mean()) > 0.2


def test_observations_do_not_couple():
    source_prior, blind, noise, y, _, _ = _blind_problem(3)
    m = Joint(6, lens_steps=2, final_warmup=5, final_steps=5)
    x1, e1 = m.sample_joint(source_prior, blind, noise, y, 2, torch.Generator().manual_seed(4))
    y2 = y.clone()
    y2[1] = y2[1] + 0.3  # another observation 1
    x2, e2 = m.sample_joint(source_prior, blind, noise, y2, 2, torch.Generator().manual_seed(4))
    assert torch.equal(x1[[0, 2]], x2[[0, 2]]) and torch.equal(e1[[0, 2]], e2[[0, 2]])
    assert not torch.equal(e1[1], e2[1])


# ------------------------------------------------------------------------ known source


def _known_source_problem():
    prior = _lens_prior(shear=True)
    g = torch.Generator().manual_seed(0)
    n, fov, ns = 10, 2.0, 16
    eta = prior.sample(n, g)
    c = (torch.arange(ns, dtype=D64) + 0.5) * fov / ns - fov / 2
    X, Y = torch.meshgrid(c, c, indexing="xy")
    sources = []
    for _ in range(n):
        x0, y0 = ((torch.rand(2, generator=g, dtype=D64) - 0.5) * 0.4).tolist()
        blob = torch.exp(-((X - x0) ** 2 + (Y - y0) ** 2) / (2 * 0.2**2))
        knot = 0.5 * torch.exp(-((X + 0.3) ** 2 + (Y - 0.2) ** 2) / (2 * 0.1**2))
        sources.append((blob + knot)[None])
    source = torch.stack(sources)
    sigma = 0.05
    blind = BlindLensing(prior, 20, 0.12, ns, fov, truth=eta)
    y = blind.truth_forward()(source) + sigma * torch.randn(n, 1, 20, 20, generator=g, dtype=D64)
    return blind, GaussianNoise(sigma), y, source, eta


def _emcee_reference(blind, y, source, eta, i: int, steps: int) -> np.ndarray:
    """emcee (DE + snooker moves, 32 walkers started at the truth) on p(eta | x, y_i)."""
    emcee = pytest.importorskip("emcee")
    prior, sigma, n = blind.prior, 0.05, source.shape[-1]

    def log_post(p: np.ndarray) -> np.ndarray:
        p = torch.as_tensor(p, dtype=D64)
        out = prior.log_prob(p)
        ok = torch.isfinite(out)
        if ok.any():
            q = p[ok][None]
            img = blind.image(q, source[i : i + 1].expand(1, q.shape[1], 1, n, n))
            out[ok] = out[ok] - 0.5 * ((y[i] - img[0]) ** 2).flatten(1).sum(1) / sigma**2
        return out.numpy()

    walkers = 32
    start = eta[i].numpy() + 1e-4 * np.random.default_rng(i).standard_normal((walkers, 7))
    moves = [(emcee.moves.DEMove(), 0.8), (emcee.moves.DESnookerMove(), 0.2)]
    sampler = emcee.EnsembleSampler(walkers, 7, log_post, vectorize=True, moves=moves)
    sampler.random_state = np.random.RandomState(i).get_state()
    sampler.run_mcmc(start, steps, progress=False)
    return sampler.get_chain(discard=steps // 4, flat=True)


@pytest.mark.parametrize(
    "lenses, steps",
    [
        ((0, 1, 2), 3000),  # the reduced size (default suite)
        pytest.param(tuple(range(10)), 10000, marks=pytest.mark.slow),
    ],
    ids=["3_lenses", "10_lenses"],
)
def test_known_source_lens_posterior_matches_emcee(lenses, steps):
    """The lens chains at a known source (annealed, pruned warm-up; 8 chains x 2000 samples)
    against emcee: means within 0.1 posterior sd, sds within 10%."""
    blind, noise, y, source, eta = _known_source_problem()
    ours = lens_posterior(
        blind,
        noise,
        y,
        source,
        num_chains=8,
        num_samples=2000,
        warmup=300,
        generator=torch.Generator().manual_seed(1),
    )
    for i in lenses:
        ref = _emcee_reference(blind, y, source, eta, i, steps)
        m_ref, s_ref = ref.mean(0), ref.std(0)
        m, s = ours[i].mean(0).numpy(), ours[i].std(0).numpy()
        assert (np.abs(m - m_ref) / s_ref).max() < 0.1, (i, (m - m_ref) / s_ref)
        assert (np.abs(s / s_ref - 1)).max() < 0.1, (i, s / s_ref)


# ------------------------------------------------------------------------ calibration


@pytest.mark.parametrize(
    "settings",
    [
        # the reduced size (default suite): 10 samples, 24 steps, 24 CG iterations
        {"s": 10, "steps": 24, "iterations": 24, "lens_steps": 6, "warmup": 30, "final": 60},
        pytest.param(
            {"s": 15, "steps": 32, "iterations": 32, "lens_steps": 8, "warmup": 50, "final": 100},
            marks=pytest.mark.slow,
        ),
    ],
    ids=["reduced", "full"],
)
def test_simulation_based_calibration_over_200_blind_lenses(settings):
    """200 lenses (SIE, 5 parameters), sources drawn from the Gaussian prior in use (MMPS with
    the prior's closed-form covariance), S joint samples each: the ranks of every true lens
    parameter are uniform (KS p >= 0.01), TARP's ATC on the lens parameters within ±0.05
    (10 references per lens), residual chi2/nu in [0.9, 1.1]."""
    n_obs, s = 200, settings["s"]
    source_prior, blind, noise, y, _, eta = _blind_problem(n_obs, seed=0)
    m = Joint(
        settings["steps"],
        source={"method": "mmps", "iterations": settings["iterations"]},
        lens_steps=settings["lens_steps"],
        final_warmup=settings["warmup"],
        final_steps=settings["final"],
        precondition_every=4,
    )
    x, params = m.sample_joint(source_prior, blind, noise, y, s, torch.Generator().manual_seed(1))
    names = blind.names
    metrics = lens_parameter_metrics(params, eta, names, torch.Generator().manual_seed(0))
    for name in names:
        assert metrics[f"lens_{name}_rank_ks_pvalue"] >= 0.01, (name, metrics)
    r = tarp(
        params.float(),
        eta.float(),
        num_refs=10,
        generator=torch.Generator().manual_seed(0),
        bootstrap=0,
    )
    assert abs(float(r.atc)) <= 0.05, float(r.atc)
    residual = (y.unsqueeze(1) - blind.image(params, x)) / 0.05
    chi2 = float(residual.pow(2).mean())
    assert 0.9 <= chi2 <= 1.1, chi2


# ------------------------------------------------------------------------ lens search, gating


def test_lens_search_starts_the_chains_near_the_true_lenses():
    """The back-projection search needs no source: on 20 blind lenses its estimates are much
    closer to the truths than prior draws, inside the prior; ``Joint(init="search")`` starts
    there, and ``lens_below`` below every diffusion time is no lens step at all."""
    source_prior, blind, noise, y, _, eta = _blind_problem(20, seed=3, sigma=0.02)
    g = torch.Generator().manual_seed(0)
    est = lens_search(blind, noise, y, draws=64, steps=30, generator=g)
    assert est.shape == eta.shape and blind.prior.inside(est).all()
    drawn = blind.prior.sample(20, torch.Generator().manual_seed(1)).to(eta)
    err, err0 = (est - eta).abs().mean(0), (drawn - eta).abs().mean(0)
    assert (err < 0.5 * err0).all(), (err, err0)
    with pytest.raises(ValueError, match="unknown init 'bogus'"):
        Joint(4, init="bogus")
    kw = dict(final_warmup=2, final_steps=2, init="search", search_draws=16, search_steps=2)
    a = Joint(6, lens_steps=2, lens_below=1e-9, **kw)
    b = Joint(6, lens_steps=0, **kw)
    three = blind[torch.arange(3)]
    xa, ea = a.sample_joint(source_prior, three, noise, y[:3], 2, torch.Generator().manual_seed(5))
    xb, eb = b.sample_joint(source_prior, three, noise, y[:3], 2, torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb) and torch.equal(ea, eb)
