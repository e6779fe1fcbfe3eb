"""Tests of hierprior.posterior: solvers, closed forms, diagnostics, method objects and their
options, conf/sampler/, validation, independence, the exact Gaussian sampler.

Accuracy against the exact posterior (W2 versus the sampler's discretisation floor), the
azula cross-check and the Gaussian-mixture SMC check are in test_posterior_accuracy.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hierprior.diffusion import GaussianMixturePrior, GaussianPrior
from hierprior.diffusion.denoiser import Denoiser
from hierprior.physics import DenseLinear, GaussianNoise, Mask, NonLinear
from hierprior.posterior import (
    CLA,
    DAPS,
    DPS,
    MMPS,
    POSTERIOR_METHODS,
    TDS,
    DenoiserMethod,
    ExactGaussian,
    Joint,
    MMPSDenoiser,
    Observation,
    PiGDM,
    PosteriorMethod,
    PosteriorSamplingError,
    conjugate_gradient,
    coverage_error,
    exact_gaussian_posterior,
    exact_gmm_posterior,
    expected_coverage,
    forward_matrix,
    gaussian_coverage,
    gaussian_fit,
    gaussian_w2,
    gmres,
    posterior_method,
    register_method,
    sample_posterior,
    solve,
)

F64 = torch.float64
METHODS = sorted(POSTERIOR_METHODS)
#: the methods for a known forward model (all but "joint", which needs a BlindLensing and has
#: its own tests in tests/test_joint.py)
KNOWN_FORWARD = [m for m in METHODS if m != "joint"]
#: the methods that sample a known forward model through a diffusion (all but "exact")
DIFFUSION_METHODS = [m for m in KNOWN_FORWARD if m != "exact"]
SAMPLER_CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"


# one thread (small ops are faster and less noisy on 2 cores), also for module fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_problem(n: int = 8, d: int = 8, m: int = 4, seed: int = 0):
    """Gaussian prior, per-observation dense A (N, M, D), per-observation noise levels."""
    g = gen(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    prior = GaussianPrior(torch.randn(d, generator=g, dtype=F64), a @ a.T / d + 0.1 * torch.eye(d))
    A = torch.randn(n, m, d, generator=g, dtype=F64) / math.sqrt(d)
    forward = DenseLinear(A)
    noise = GaussianNoise(0.1 + 0.2 * torch.rand(n, generator=g, dtype=F64))
    x = prior.sample(n, generator=g)
    y = forward(x) + noise.sample((n, m), generator=g, dtype=F64)
    return prior, forward, noise, y, x


# ----------------------------------------------------------------------------- solvers


def random_spd(batch, dim, g):
    b = torch.randn(*batch, dim, dim, generator=g, dtype=F64)
    return b @ b.mT + 0.5 * torch.eye(dim, dtype=F64)


def matvec(mats):
    return lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1)


def test_cg_exact_after_dim_iterations():
    g = gen(1)
    mats = random_spd((3, 2), 6, g)
    b = torch.randn(3, 2, 6, generator=g, dtype=F64)
    x, broken = conjugate_gradient(matvec(mats), b, iterations=6)
    exact = torch.linalg.solve(mats, b)
    # CG is exact after dim iterations in exact arithmetic; 1e-8 leaves room for round-off
    # on matrices with condition number ~1e2
    torch.testing.assert_close(x, exact, atol=1e-8, rtol=1e-8)
    assert not broken.any()
    # extra iterations after convergence must not blow up (rows freeze at rtol)
    x_more, _ = conjugate_gradient(matvec(mats), b, iterations=40)
    torch.testing.assert_close(x_more, exact, atol=1e-8, rtol=1e-8)


def test_gmres_nonsymmetric():
    g = gen(2)
    mats = torch.randn(4, 3, 5, 5, generator=g, dtype=F64) + 4 * torch.eye(5, dtype=F64)
    b = torch.randn(4, 3, 5, generator=g, dtype=F64)
    x = gmres(matvec(mats), b, iterations=5)
    # minimal residual over the full Krylov space = exact solve (round-off tolerance)
    torch.testing.assert_close(x, torch.linalg.solve(mats, b), atol=1e-8, rtol=1e-8)
    # fewer iterations: residual no larger than with one iteration less (monotone)
    res = [
        (b - matvec(mats)(gmres(matvec(mats), b, iterations=k))).norm(dim=-1) for k in (1, 2, 3)
    ]
    assert (res[1] <= res[0] + 1e-12).all() and (res[2] <= res[1] + 1e-12).all()


def test_cg_guard_falls_back_per_row():
    g = gen(3)
    mats = random_spd((2, 3), 4, g)
    mats[0, 1] = -mats[0, 1]  # negative definite: p^T A p < 0 on this row only
    b = torch.randn(2, 3, 4, generator=g, dtype=F64)
    _, broken = conjugate_gradient(matvec(mats), b, iterations=4)
    expected = torch.zeros(2, 3, dtype=torch.bool)
    expected[0, 1] = True
    assert torch.equal(broken, expected)
    x, fallback = solve(matvec(mats), b, "cg", iterations=4)
    assert torch.equal(fallback, expected)
    assert torch.isfinite(x).all()
    # the GMRES fallback is exact at k = dim (round-off tolerance), other rows untouched
    torch.testing.assert_close(x, torch.linalg.solve(mats, b), atol=1e-8, rtol=1e-8)


def test_solvers_keep_nan_rows_nan():
    g = gen(4)
    mats = random_spd((2, 2), 3, g)
    b = torch.randn(2, 2, 3, generator=g, dtype=F64)
    b[1, 0, 0] = float("nan")
    for solver in ("cg", "gmres"):
        x, _ = solve(matvec(mats), b, solver, iterations=3)
        assert torch.isnan(x[1, 0]).all()
        good = torch.ones(2, 2, dtype=torch.bool)
        good[1, 0] = False
        torch.testing.assert_close(x[good], torch.linalg.solve(mats, b)[good], atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="solver"):
        solve(matvec(mats), b, "lu")
    with pytest.raises(ValueError, match="iterations"):
        conjugate_gradient(matvec(mats), b, 0)


# ----------------------------------------------------------------------------- closed forms


def test_exact_gaussian_posterior_information_form():
    prior, forward, noise, y, _ = gaussian_problem(n=3)
    mean, cov = exact_gaussian_posterior(prior, forward, noise, y)
    A = forward.A
    var = noise.std(y) ** 2
    prec = torch.linalg.inv(prior.cov) + A.mT @ (A / var[..., None])
    cov_ref = torch.linalg.inv(prec)
    rhs = torch.linalg.solve(prior.cov, prior.mean) + (A.mT @ (y / var).unsqueeze(-1))[..., 0]
    mean_ref = (cov_ref @ rhs.unsqueeze(-1)).squeeze(-1)
    # two algebraically equal forms (Woodbury vs information) in float64
    torch.testing.assert_close(cov, cov_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(mean, mean_ref, atol=1e-10, rtol=1e-8)


def test_exact_posterior_materialises_any_linear_model():
    g = gen(5)
    prior, _, _, _, x = gaussian_problem(n=3)
    masks = (torch.rand(3, 8, generator=g) < 0.5).to(F64)
    mask = Mask(masks)
    torch.testing.assert_close(forward_matrix(mask), torch.diag_embed(masks))
    noise = GaussianNoise(0.2)
    y = mask(x)
    mean, cov = exact_gaussian_posterior(prior, mask, noise, y)
    mean2, cov2 = exact_gaussian_posterior(prior, DenseLinear(torch.diag_embed(masks)), noise, y)
    torch.testing.assert_close(mean, mean2)
    torch.testing.assert_close(cov, cov2)
    shared = DenseLinear(torch.randn(4, 8, generator=g, dtype=F64))
    assert forward_matrix(shared, 3).shape == (3, 4, 8)


def test_exact_posterior_errors():
    prior, forward, noise, y, _ = gaussian_problem(n=2)
    gmm = GaussianMixturePrior(torch.ones(1), prior.mean[None], prior.cov[None])
    with pytest.raises(TypeError, match="GaussianPrior"):
        exact_gaussian_posterior(gmm, forward, noise, y)
    nonlinear = NonLinear(torch.tanh, (8,), (8,))
    with pytest.raises(TypeError, match="linear"):
        exact_gaussian_posterior(prior, nonlinear, noise, y)
    with pytest.raises(ValueError, match="shape"):
        exact_gaussian_posterior(prior, forward, noise, y[:, :3])


def test_exact_gmm_posterior_against_importance_sampling():
    g = gen(6)
    d = 2
    prior = GaussianMixturePrior(
        torch.tensor([0.3, 0.7], dtype=F64),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=F64),
        torch.stack([torch.eye(d, dtype=F64) * 0.5, torch.tensor([[1.0, 0.3], [0.3, 0.4]])]),
    )
    forward = DenseLinear(torch.tensor([[[1.0, 0.5]], [[0.2, 1.0]]], dtype=F64))
    noise = GaussianNoise(torch.tensor([0.8, 0.5], dtype=F64))
    y = torch.tensor([[0.3], [0.9]], dtype=F64)
    w, means, covs = exact_gmm_posterior(prior, forward, noise, y)
    assert w.shape == (2, 2) and means.shape == (2, 2, d) and covs.shape == (2, 2, d, d)
    xs, labels = prior.sample(400_000, generator=g, return_labels=True)
    for i in range(2):
        lw = noise[i].log_prob(y[i : i + 1], forward[i](xs[None]))[0]
        wts = torch.softmax(lw, 0)
        ess = 1 / (wts**2).sum()
        post_mean = (wts[:, None] * xs).sum(0)
        post_w1 = (wts * (labels == 1)).sum()
        # importance sampling with ESS > 1e4: MC std of the mean < 0.02, of the weight < 0.01
        assert ess > 1e4
        torch.testing.assert_close((w[i, :, None] * means[i]).sum(0), post_mean, atol=0.05, rtol=0)
        assert abs(float(w[i, 1] - post_w1)) < 0.03
    # one component: the Gaussian closed form
    single = GaussianMixturePrior(torch.ones(1), prior.means[:1], prior.covs[:1])
    w1, m1, c1 = exact_gmm_posterior(single, forward, noise, y)
    mg, cg = exact_gaussian_posterior(
        GaussianPrior(prior.means[0], prior.covs[0]), forward, noise, y
    )
    torch.testing.assert_close(m1[:, 0], mg)
    torch.testing.assert_close(c1[:, 0], cg)
    assert torch.allclose(w1, torch.ones_like(w1))


# ----------------------------------------------------------------------------- diagnostics


def test_gaussian_w2_closed_forms():
    g = gen(7)
    c = random_spd((), 5, g)
    m = torch.randn(5, generator=g, dtype=F64)
    assert float(gaussian_w2(m, c, m, c)) < 1e-6  # sqrt of round-off ~1e-14
    # 1-D: W2^2 = (m1 - m2)^2 + (s1 - s2)^2
    w = gaussian_w2(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([0.0]), torch.eye(1))
    assert abs(float(w) - math.sqrt(1 + 1)) < 1e-12
    # commuting (diagonal) covariances: sum of the 1-D terms; batched leading dims
    s1, s2 = torch.rand(3, 4, generator=g, dtype=F64) + 0.1, torch.rand(3, 4, generator=g) + 0.1
    w = gaussian_w2(
        torch.zeros(3, 4), torch.diag_embed(s1**2), torch.ones(3, 4), torch.diag_embed(s2**2)
    )
    torch.testing.assert_close(w, (4 + ((s1 - s2.double()) ** 2).sum(-1)).sqrt())
    with pytest.raises(ValueError, match="share D"):
        gaussian_w2(m, c, m[:3], c)


def test_coverage_of_exact_samples_is_calibrated():
    g = gen(8)
    prior, forward, noise, _, _ = gaussian_problem(n=400, d=3, m=2, seed=8)
    x = prior.sample(400, generator=g)
    y = forward(x) + noise.sample((400, 2), generator=g, dtype=F64)
    mean, cov = exact_gaussian_posterior(prior, forward, noise, y)
    L = torch.linalg.cholesky(cov)
    samples = (
        mean[:, None] + (L[:, None] @ torch.randn(400, 200, 3, 1, generator=g, dtype=F64))[..., 0]
    )
    alpha, ecp = expected_coverage(samples, x, mean, cov)
    # f_i ~ U(0, 1): the max deviation of the empirical CDF of 400 values (Kolmogorov 99%:
    # 1.63 / sqrt(400) = 0.08) plus the 1/200 resolution of the ranks
    assert coverage_error(alpha, ecp) < 0.09
    alpha, ecp = gaussian_coverage(mean, cov, x)
    assert coverage_error(alpha, ecp) < 0.09
    # the fitted-Gaussian variant, and an overconfident posterior is detected
    alpha, ecp = expected_coverage(samples, x)
    assert coverage_error(alpha, ecp) < 0.1
    narrow = mean[:, None] + 0.3 * (samples - mean[:, None])
    assert coverage_error(*expected_coverage(narrow, x)) > 0.3
    assert coverage_error(*expected_coverage(narrow, x, mean, cov)) > 0.3
    m_fit, c_fit = gaussian_fit(samples)
    assert m_fit.shape == (400, 3) and c_fit.shape == (400, 3, 3)


# ----------------------------------------------------------------------------- validation


def test_validation_errors():
    prior, forward, noise, y, _ = gaussian_problem(n=4)

    def run(**kw):
        args = dict(
            prior=prior, forward=forward, noise=noise, y=y, method="mmps", steps=2, num_samples=2
        )
        args.update(kw)
        return sample_posterior(**args, generator=gen(0))

    with pytest.raises(ValueError, match=r"unknown posterior method 'nope'.*'mmps'"):
        run(method="nope")
    with pytest.raises(TypeError, match=r"does not take option\(s\) \['zeta'\].*iterations"):
        run(zeta=1.0)
    with pytest.raises(TypeError, match=r"'dps' does not take.*\['solver'\]"):
        run(method="dps", solver="cg")
    with pytest.raises(ValueError, match="steps"):
        run(steps=0)
    with pytest.raises(ValueError, match="num_samples"):
        run(num_samples=0)
    with pytest.raises(ValueError, match=r"y must have shape \(N, 4\)"):
        run(y=y[:, :3])
    with pytest.raises(ValueError, match="forward.num_obs"):
        run(y=y[:3])
    with pytest.raises(ValueError, match="noise.num_obs"):
        run(forward=DenseLinear(forward.A[0]), y=y[:3])
    with pytest.raises(ValueError, match="input_shape"):
        run(forward=DenseLinear(torch.randn(4, 4, 6, dtype=F64)))
    bad = y.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf in observations \[2\]"):
        run(y=bad)
    noisy = GaussianNoise(torch.full((4,), 0.1, dtype=F64))
    noisy.sigma[1] = float("nan")  # corrupted after construction
    with pytest.raises(ValueError, match=r"finite and > 0.*\[1\]"):
        run(noise=noisy)
    noisy.sigma[1] = 0.0
    with pytest.raises(ValueError, match=r"finite and > 0.*\[1\]"):
        run(noise=noisy)
    with pytest.raises(ValueError, match="solver"):
        run(solver="qr")
    with pytest.raises(ValueError, match="iterations"):
        run(iterations=0)
    with pytest.raises(ValueError, match="sampler"):
        run(sampler="euler")
    with pytest.raises(ValueError, match="eta"):
        run(eta=0.5)
    with pytest.raises(ValueError, match="x_init"):
        run(x_init=torch.zeros(4, 3, 8, dtype=F64))
    with pytest.raises(ValueError, match="multiple of particles"):
        run(method="tds", num_samples=6, particles=4)
    with pytest.raises(ValueError, match="zeta"):
        run(method="dps", zeta=-1.0)
    nonlinear = NonLinear(lambda x: x[:, :4] ** 2, (8,), (4,))
    with pytest.raises(ValueError, match="twist='pigdm' needs a linear"):
        run(method="tds", forward=nonlinear, noise=GaussianNoise(0.1), twist="pigdm")
    with pytest.raises(ValueError, match="likelihood_step='exact' needs a linear"):
        run(method="daps", forward=nonlinear, noise=GaussianNoise(0.1), likelihood_step="exact")
    with pytest.raises(TypeError, match="noise must be a hierprior NoiseModel"):
        run(noise=0.1)
    with pytest.raises(TypeError, match="Denoiser"):
        run(prior=torch.nn.Linear(8, 8))


# ----------------------------------------------------------------------------- method objects


def test_registry_and_exports():
    classes = {
        "mmps": MMPS,
        "dps": DPS,
        "cla": CLA,
        "pigdm": PiGDM,
        "daps": DAPS,
        "tds": TDS,
        "exact": ExactGaussian,
        "joint": Joint,
    }
    assert list(POSTERIOR_METHODS) == list(classes)  # registration order = documented order
    assert POSTERIOR_METHODS == classes
    for name, cls in classes.items():
        assert cls.name == name and issubclass(cls, PosteriorMethod)
        assert issubclass(cls, DenoiserMethod) == (name in ("mmps", "dps", "cla", "pigdm"))
        # common options first in every signature's tail, steps first
        assert cls.accepted_options()[0] == "steps"
        assert {"spacing", "batch_size"} <= set(cls.accepted_options())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [-1, "bogus"])
def test_every_option_is_checked_at_construction(method, bad):
    """Each constructor option, given a bad value, fails at construction naming the option."""
    cls = POSTERIOR_METHODS[method]
    for option in cls.accepted_options():
        with pytest.raises((ValueError, TypeError), match=rf"\b{option}\b"):
            cls(**{option: bad})


@pytest.mark.parametrize(
    "method, options, error, match",
    [
        ("mmps", {"eta": 0.5}, ValueError, r"eta is not an option of sampler 'ddpm'"),
        ("dps", {"sampler": "heun", "eta": 0.1}, ValueError, "eta"),
        ("cla", {"sampler": "ddim", "eta": 1.5}, ValueError, "eta"),
        ("pigdm", {"sampler": "euler"}, ValueError, r"sampler 'euler'.*'ddpm'"),
        ("mmps", {"solver": "qr"}, ValueError, "solver"),
        ("mmps", {"iterations": 0}, ValueError, "iterations"),
        ("mmps", {"iterations": None}, ValueError, "iterations"),  # mmps has no M-based default
        ("mmps", {"steps": 0}, ValueError, "steps"),
        ("mmps", {"steps": True}, ValueError, "steps"),
        ("mmps", {"steps": 2.0}, ValueError, "steps"),
        ("dps", {"zeta": float("nan")}, ValueError, "zeta"),
        ("dps", {"zeta": "1"}, TypeError, "zeta"),
        ("cla", {"spacing": "log"}, ValueError, "spacing"),
        ("cla", {"batch_size": 0}, ValueError, "batch_size"),
        ("pigdm", {"data_variance": 0.0}, ValueError, "data_variance"),
        ("daps", {"lr": 0.0}, ValueError, "lr"),
        ("daps", {"likelihood_step": "mcmc"}, ValueError, "likelihood_step"),
        ("daps", {"ode_steps": 0}, ValueError, "ode_steps"),
        ("daps", {"langevin_steps": 0}, ValueError, "langevin_steps"),
        ("tds", {"ess_threshold": 1.5}, ValueError, "ess_threshold"),
        ("tds", {"particles": 0}, ValueError, "particles"),
        ("tds", {"twist": "mmps"}, ValueError, "twist"),
        ("exact", {"steps": 0}, ValueError, "steps"),
    ],
)
def test_bad_option_values(method, options, error, match):
    with pytest.raises(error, match=match):
        posterior_method(method, **options)


def test_posterior_method_builds_and_names_problems():
    with pytest.raises(ValueError, match=r"unknown posterior method 'nope'; known methods: ") as e:
        posterior_method("nope")
    assert all(f"'{name}'" in str(e.value) for name in POSTERIOR_METHODS)
    with pytest.raises(ValueError, match="unknown posterior method"):
        posterior_method({"method": "nope"})
    # an unknown option: the method, the bad options and the accepted ones are named
    with pytest.raises(TypeError) as e:
        posterior_method("dps", solver="cg", zeta=2.0, kappa=1)
    accepted = sorted(DPS.accepted_options())
    assert str(e.value) == (
        f"method 'dps' does not take option(s) ['kappa', 'solver']; accepted options: {accepted}"
    )
    # by name, from a mapping (options override it), an instance as is
    m = posterior_method("mmps", steps=32, iterations=2)
    assert isinstance(m, MMPS) and (m.steps, m.iterations, m.solver) == (32, 2, "cg")
    spec = {"method": "tds", "steps": 8, "particles": 4}
    t = posterior_method(spec, particles=2)
    assert isinstance(t, TDS) and (t.steps, t.particles) == (8, 2)
    assert spec == {"method": "tds", "steps": 8, "particles": 4}  # not modified
    assert posterior_method(m) is m
    with pytest.raises(TypeError, match="instance and options"):
        posterior_method(m, steps=3)
    with pytest.raises(ValueError, match="'method' key"):
        posterior_method({"steps": 3})
    with pytest.raises(TypeError, match="method must be"):
        posterior_method(3)


@pytest.mark.parametrize("method", METHODS)
def test_options_are_plain_and_round_trip(method):
    cls = POSTERIOR_METHODS[method]
    default = cls()
    opts = default.options()
    assert list(opts) == ["method", *cls.accepted_options()]
    assert opts["method"] == method and opts["steps"] == (64 if method == "joint" else 256)
    assert json.loads(json.dumps(opts)) == opts  # JSON-able, plain values
    assert posterior_method(opts) == default and hash(posterior_method(opts)) == hash(default)
    changed = posterior_method(method, steps=7, batch_size=3)
    expected = {**opts, "steps": 7, "batch_size": 3}
    if method == "joint":  # the source method takes the joint method's steps
        expected["source"] = {**opts["source"], "steps": 7}
    assert changed != default and changed.options() == expected
    assert repr(changed).startswith(f"{cls.__name__}(steps=7, ")


def test_options_hold_checked_values():
    # an int where a float is expected is stored as float: equal configs, equal fingerprints
    assert DPS(zeta=2).options() == DPS(zeta=2.0).options()
    assert isinstance(DPS(zeta=2).options()["zeta"], float)


def test_sampler_configs_build_every_method():
    files = sorted(SAMPLER_CONF.glob("*.yaml"))
    assert {f.stem for f in files} == set(POSTERIOR_METHODS)
    for f in files:
        cfg = OmegaConf.to_container(OmegaConf.load(f))
        method = posterior_method(cfg)
        assert method.name == f.stem == cfg["method"]
        options = method.options()
        # every value as written; a null spacing is stored resolved (the sampler's own grid)
        written = {**cfg, "spacing": options["spacing"]} if "spacing" in cfg else cfg
        if f.stem == "joint":  # the source method's options are stored complete
            source = posterior_method({**cfg["source"], "steps": cfg["steps"]}).options()
            written = {**written, "source": {**source, "spacing": options["spacing"]}}
        assert {k: options[k] for k in cfg} == written, f.name
        assert cfg.get("spacing", None) is None and options["spacing"] == "edm", f.name
        if f.stem == "exact":
            assert cfg == {"method": "exact"}
        else:  # complete: every option overridable from the command line
            assert set(cfg) == set(options), f.name
        # one comment per option line
        lines = [x for x in f.read_text().splitlines() if re.match(r"^\w+:", x)]
        assert all("#" in x for x in lines if not x.startswith("method:")), f.name


def test_register_method_refuses_bad_classes():
    before = dict(POSTERIOR_METHODS)

    class Nameless(PosteriorMethod):
        pass

    class Variadic(PosteriorMethod):
        name = "variadic"

        def __init__(self, steps: int = 256, **options):
            super().__init__(steps, **options)

    class Clash(PosteriorMethod):
        name = "mmps"

    with pytest.raises(TypeError, match="name"):
        register_method(Nameless)
    with pytest.raises(TypeError, match=r"explicitly.*options"):
        register_method(Variadic)
    with pytest.raises(ValueError, match="'mmps' is already registered"):
        register_method(Clash)
    with pytest.raises(TypeError, match="PosteriorMethod subclass"):
        register_method(dict)
    assert POSTERIOR_METHODS == before


def test_defaults_resolved_from_the_forward_model():
    prior, forward, noise, y, _ = gaussian_problem(n=2)  # M = 4
    wide = DenseLinear(torch.randn(40, 8, dtype=F64))  # M = 40
    nonlinear = NonLinear(torch.tanh, (8,), (8,))
    assert CLA().resolve(forward)["iterations"] == 4
    assert CLA().resolve(wide)["iterations"] == 32
    assert CLA(iterations=7).resolve(wide)["iterations"] == 7
    assert CLA().options()["iterations"] is None  # the recorded options keep None
    assert PiGDM().resolve(wide)["iterations"] == 32
    assert DAPS().resolve(forward)["likelihood_step"] == "exact"
    assert DAPS().resolve(nonlinear)["likelihood_step"] == "langevin"
    assert TDS().resolve(forward, num_samples=6)["particles"] == 6
    assert TDS().resolve(forward)["twist"] == "pigdm"
    assert TDS().resolve(nonlinear)["twist"] == "dps"
    assert TDS(particles=3).resolve(forward, num_samples=6)["particles"] == 3
    with pytest.raises(ValueError, match="multiple of particles"):
        TDS(particles=4).resolve(forward, num_samples=6)


def test_check_needs_no_observations():
    prior, forward, _, _, _ = gaussian_problem(n=2)
    nonlinear = NonLinear(lambda x: x[:, :4] ** 2, (8,), (4,))
    gmm = GaussianMixturePrior(torch.ones(1, dtype=F64), prior.mean[None], prior.cov[None])
    for name in KNOWN_FORWARD:
        POSTERIOR_METHODS[name]().check(prior, forward)  # every method runs here
    with pytest.raises(TypeError, match="needs a BlindLensing"):
        POSTERIOR_METHODS["joint"]().check(prior, forward)
    with pytest.raises(ValueError, match="likelihood_step='exact' needs a linear"):
        DAPS(likelihood_step="exact").check(prior, nonlinear)
    DAPS().check(prior, nonlinear)  # the default resolves to Langevin
    with pytest.raises(ValueError, match="twist='pigdm' needs a linear"):
        TDS(twist="pigdm").check(prior, nonlinear)
    TDS().check(prior, nonlinear)
    with pytest.raises(ValueError, match="GaussianPrior.*GaussianMixturePrior"):
        ExactGaussian().check(gmm, forward)
    with pytest.raises(ValueError, match="linear forward model.*NonLinear"):
        ExactGaussian().check(prior, nonlinear)
    with pytest.raises(ValueError, match="input_shape"):
        MMPS().check(prior, DenseLinear(torch.randn(4, 6, dtype=F64)))
    with pytest.raises(TypeError, match="Denoiser"):
        MMPS().check(torch.nn.Linear(8, 8), forward)
    with pytest.raises(TypeError, match="ForwardModel"):
        TDS().check(prior, torch.tanh)


@pytest.mark.parametrize(
    "method, options",
    [("dps", {"zeta": 2.0, "sampler": "ddim", "eta": 0.3}), ("tds", {"particles": 2})],
)
def test_sample_posterior_is_the_method_sample(method, options):
    prior, forward, noise, y, _ = gaussian_problem(n=3)
    a, info_a = sample_posterior(
        prior, forward, noise, y, method, 5, 4, gen(7), return_info=True, **options
    )
    spec = posterior_method(method, steps=5, **options)
    b, info_b = spec.sample(prior, forward, noise, y, 4, gen(7), return_info=True)
    assert torch.equal(a, b)
    assert len(info_a["chunks"]) == len(info_b["chunks"]) == 1
    assert spec.sample(prior, forward, noise, y, generator=gen(7)).shape == (3, 1, 8)
    with pytest.raises(TypeError, match=r"accepted options: \[.*'return_info'.*'x_init'"):
        sample_posterior(prior, forward, noise, y, method, 5, 4, gen(7), xinit=None)


# ----------------------------------------------------------------------------- NaN reporting


class ScaledLinear:
    """y = p_i * (A x): a non-linear-model wrapper whose parameter can be NaN for one row."""

    def __init__(self, A):
        self.A = A

    def __call__(self, x, params):
        return params["p"][:, None] * (x @ self.A.T)


@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_nan_observation_is_reported(method):
    prior, _, _, _, x = gaussian_problem(n=4)
    A = torch.randn(4, 8, generator=gen(9), dtype=F64) / math.sqrt(8)
    p = torch.ones(4, dtype=F64)
    y = NonLinear(ScaledLinear(A), (8,), (4,), {"p": p})(x)
    p_bad = p.clone()
    p_bad[2] = float("nan")
    forward = NonLinear(ScaledLinear(A), (8,), (4,), {"p": p_bad})
    with pytest.raises(PosteriorSamplingError, match=r"observations \[2\]") as info:
        sample_posterior(prior, forward, GaussianNoise(0.1), y, method, 4, 4, gen(0))
    err = info.value
    assert err.bad.tolist() == [False, False, True, False]
    assert torch.isfinite(err.samples[~err.bad]).all()
    assert err.samples.shape == (4, 4, 8)


# ----------------------------------------------------------------------------- independence


def perturbed(forward, noise, y, seed=10):
    """The same problem with observations 1.. replaced by very different ones."""
    g = gen(seed)
    A = forward.A.clone()
    A[1:] = 3 * torch.randn(A[1:].shape, generator=g, dtype=F64)
    y2 = y.clone()
    y2[1:] = 10 * y[1:] + 5
    sigma = noise.sigma.clone()
    sigma[1:] = sigma[1:] * 0.2
    return DenseLinear(A), GaussianNoise(sigma), y2


@pytest.mark.parametrize("method", KNOWN_FORWARD)
def test_no_coupling_between_observations(method):
    """Observation 0's samples do not change when every other observation changes.

    Same generator seed, same batch size: the random stream is identical, so any coupling
    (batch norms, shared step sizes, shared resampling) would change observation 0.
    """
    prior, forward, noise, y, _ = gaussian_problem(n=8)
    opts = {"particles": 16} if method == "tds" else {}
    a = sample_posterior(prior, forward, noise, y, method, 8, 16, gen(1), **opts)
    f2, n2, y2 = perturbed(forward, noise, y)
    b = sample_posterior(prior, f2, n2, y2, method, 8, 16, gen(1), **opts)
    # identical computations on row 0 up to float64 round-off of batched kernels
    torch.testing.assert_close(a[0], b[0], atol=1e-9, rtol=1e-9)
    assert not torch.allclose(a[1:], b[1:])


@pytest.mark.parametrize("method", ["mmps", "dps", "cla", "pigdm"])
@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_alone_equals_in_batch_deterministic(method, sampler):
    """With the same initial noise and a deterministic sampler, obs i alone == inside a batch."""
    prior, forward, noise, y, _ = gaussian_problem(n=8)
    x_init = torch.randn(8, 6, 8, generator=gen(2), dtype=F64)
    batch = sample_posterior(
        prior, forward, noise, y, method, 6, 6, None, x_init=x_init, sampler=sampler
    )
    chunked = sample_posterior(
        prior, forward, noise, y, method, 6, 6, None, x_init=x_init, sampler=sampler, batch_size=3
    )
    torch.testing.assert_close(chunked, batch, atol=1e-10, rtol=1e-10)
    for i in (0, 5):
        alone = sample_posterior(
            prior,
            forward[i],
            noise[i],
            y[i : i + 1],
            method,
            6,
            6,
            None,
            x_init=x_init[i : i + 1],
            sampler=sampler,
        )
        # same arithmetic per row; 1e-10 covers round-off differences of batched BLAS
        torch.testing.assert_close(alone[0], batch[i], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", ["daps", "tds"])
def test_alone_and_in_batch_same_distribution(method):
    """Stochastic loop methods: observation 3 alone and in a batch of 8 agree in distribution."""
    prior, forward, noise, y, _ = gaussian_problem(n=8)
    s = 600
    opts = {"particles": 100} if method == "tds" else {}
    batch = sample_posterior(prior, forward, noise, y, method, 16, s, gen(3), **opts)[3]
    alone = sample_posterior(prior, forward[3], noise[3], y[3:4], method, 16, s, gen(4), **opts)[0]
    var = 0.5 * (batch.var(0) + alone.var(0))
    # difference of two means of s samples: std sqrt(2 var / s_eff); TDS samples are
    # correlated within a run (s_eff ~ s / 3 after resampling); 5 std
    s_eff = s / 3 if method == "tds" else s
    tol = 5 * (2 * var / s_eff).sqrt()
    assert ((batch.mean(0) - alone.mean(0)).abs() <= tol).all()


# ----------------------------------------------------------------------------- linearisation


@pytest.mark.parametrize("method", ["mmps", "dps", "cla", "pigdm"])
def test_nonlinear_path_matches_linear(method):
    """A NonLinear model that is secretly linear gives the linear model's samples (JVP/VJP)."""
    prior, forward, noise, y, _ = gaussian_problem(n=4)

    def fn(x, params):
        return (params["A"] @ x.unsqueeze(-1)).squeeze(-1)

    nonlinear = NonLinear(fn, (8,), (4,), {"A": forward.A})
    x_init = torch.randn(4, 5, 8, generator=gen(5), dtype=F64)
    kw = dict(x_init=x_init, sampler="ddim")
    a = sample_posterior(prior, forward, noise, y, method, 5, 5, None, **kw)
    b = sample_posterior(prior, nonlinear, noise, y, method, 5, 5, None, **kw)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)  # same maths, different AD paths


def test_daps_langevin_runs_on_nonlinear():
    prior, forward, noise, y, _ = gaussian_problem(n=2)
    nonlinear = NonLinear(lambda x: torch.tanh(x[:, :4]), (8,), (4,))
    out = sample_posterior(prior, nonlinear, noise, y.tanh(), "daps", 4, 3, gen(0))
    assert out.shape == (2, 3, 8) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- CG guard


class RotatingDenoiser(Denoiser):
    """A 'learned' denoiser with a non-symmetric Jacobian whose symmetric part is indefinite."""

    def __init__(self, prior: GaussianPrior):
        super().__init__()
        self.prior = prior
        self.schedule = prior.schedule
        self.event_shape = prior.event_shape
        d = prior.dim
        skew = torch.randn(d, d, generator=gen(11), dtype=F64)
        self.register_buffer("R", 3.0 * (skew - skew.T) - 0.5 * torch.eye(d, dtype=F64))

    def forward(self, x_t, t):
        alpha, _ = self.alpha_sigma(t, x_t)
        return self.prior(x_t, t) + (x_t / alpha) @ self.R.T


def test_mmps_cg_guard_with_nonsymmetric_jacobian():
    prior, forward, noise, y, _ = gaussian_problem(n=4)
    net = RotatingDenoiser(prior)
    observation = Observation(forward, noise, y)
    den = MMPSDenoiser(net, observation, num_samples=8, solver="cg", iterations=4)
    x = torch.randn(32, 8, generator=gen(6), dtype=F64)
    out = den(x, torch.tensor(0.9, dtype=F64))
    assert torch.isfinite(out).all()
    assert den.fallbacks > 0, "the indefinite Jacobian should trigger the GMRES fallback"
    samples = sample_posterior(net, forward, noise, y, "mmps", 8, 8, gen(0))
    assert torch.isfinite(samples).all()


def test_return_info_and_reproducible():
    prior, forward, noise, y, _ = gaussian_problem(n=2)
    a, info = sample_posterior(prior, forward, noise, y, "tds", 4, 8, gen(0), return_info=True)
    b = sample_posterior(prior, forward, noise, y, "tds", 4, 8, gen(0))
    assert torch.equal(a, b)
    assert info["chunks"][0]["ess"].shape == (2, 1)
    state = torch.random.get_rng_state()
    sample_posterior(prior, forward, noise, y, "dps", 4, 8, gen(0))
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG was used"


def test_dps_zero_guidance_is_the_prior_sampler():
    from hierprior.diffusion import sample

    prior, forward, noise, y, _ = gaussian_problem(n=2)
    x_init = torch.randn(2, 5, 8, generator=gen(12), dtype=F64)
    kw = dict(zeta=0.0, x_init=x_init, sampler="ddim")
    a = sample_posterior(prior, forward, noise, y, "dps", 8, 5, None, **kw)
    b = sample(prior, 10, "ddim", 8, x_init=x_init.reshape(10, 8)).reshape(2, 5, 8)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)  # identical arithmetic


# ----------------------------------------------------------------------------- exact sampler


def test_exact_method_is_mean_plus_cholesky_times_z():
    prior, forward, noise, y, _ = gaussian_problem(n=5)
    xs = sample_posterior(prior, forward, noise, y, "exact", 256, 7, gen(13))
    mean, cov = exact_gaussian_posterior(prior, forward, noise, y)
    z = torch.randn((5, 7, 8), generator=gen(13), dtype=F64)  # one draw, (N, S, D)
    ref = mean[:, None] + (torch.linalg.cholesky(cov)[:, None] @ z[..., None])[..., 0]
    torch.testing.assert_close(xs, ref, atol=1e-12, rtol=1e-12)  # same arithmetic
    # steps and spacing are ignored; chunks see the same z rows
    for opts in ({"steps": 1, "spacing": "uniform"}, {"batch_size": 2}):
        again = sample_posterior(prior, forward, noise, y, "exact", num_samples=7,
                                 generator=gen(13), **opts)  # fmt: skip
        torch.testing.assert_close(again, xs, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="x_init"):
        sample_posterior(prior, forward, noise, y, "exact", 4, 7, gen(0), x_init=xs)
    # a float32 prior gets float32 samples
    p32 = GaussianPrior(prior.mean.float(), prior.cov.float())
    assert sample_posterior(p32, forward, noise, y, "exact", 4, 2, gen(0)).dtype == torch.float32


def test_exact_method_samples_the_posterior():
    prior, forward, noise, y, _ = gaussian_problem(n=3)
    xs = sample_posterior(prior, forward, noise, y, "exact", num_samples=20_000, generator=gen(14))
    mean, cov = exact_gaussian_posterior(prior, forward, noise, y)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    # Monte-Carlo error of a mean of 20,000 exact samples: sd / 141; 5 std
    assert ((xs.mean(1) - mean).abs() <= 5 * sd / math.sqrt(20_000)).all()
    # W2 of the Gaussian fit: only the fit's sampling error, ~sqrt(D(D+1)/4S) sd ~ 0.02 sd
    assert float(gaussian_w2(*gaussian_fit(xs), mean, cov).max()) < 0.05


def test_exact_method_reports_nan_observations():
    prior, forward, noise, y, _ = gaussian_problem(n=4)
    bad = DenseLinear(forward.A.clone())
    bad.A[2, 0, 0] = float("nan")  # corrupted after construction
    with pytest.raises(PosteriorSamplingError, match=r"exact: .*observations \[2\]") as info:
        sample_posterior(prior, bad, noise, y, "exact", 4, 3, gen(0))
    assert info.value.bad.tolist() == [False, False, True, False]
    assert torch.isfinite(info.value.samples[~info.value.bad]).all()
    # the closed form itself: NaN moments for that observation only, the others unchanged
    mean, cov = exact_gaussian_posterior(prior, bad, noise, y)
    ref_mean, ref_cov = exact_gaussian_posterior(prior, forward, noise, y)
    assert torch.isnan(mean[2]).all() and torch.isnan(cov[2]).all()
    keep = [0, 1, 3]
    torch.testing.assert_close(mean[keep], ref_mean[keep])
    torch.testing.assert_close(cov[keep], ref_cov[keep])
