"""Tests of the multistep solvers (DPM-Solver++(2M)/(3M), UniPC-style) and the log-SNR grid.

Exactness and order use the analytic ``GaussianPrior``: every sampler here is then an affine
map of its initial noise (the stochastic ones: affine plus Gaussian noise), so running it on
x = 0 and on the basis vectors gives the map, and the law of its output for the true marginal
at t = 1 as input, N(b + M alpha_1 mu, M (alpha_1^2 Sigma + sigma_1^2 I) M^T), exactly, with
no Monte-Carlo error. The exact probability-flow ODE maps that marginal to the marginal at
t_min, and the final denoising step to N(mu, U diag(lam^2 / (lam + s_min^2)) U^T): W2 between
the two laws is the solver's error, and halving the step must divide it by 2^order.
"""

from __future__ import annotations

import math

import pytest
import torch

from hierprior.diffusion import GaussianPrior, VESchedule, sample
from hierprior.diffusion.sampling import (
    ETA_SAMPLERS,
    SAMPLERS,
    check_sampler,
    ddim_sampler,
    ddpm_sampler,
    default_spacing,
    initial_noise,
    nfe,
)
from hierprior.diffusion.solvers import check_order, multistep_sampler, step_weights
from hierprior.physics import DenseLinear, GaussianNoise
from hierprior.posterior import (
    exact_gaussian_posterior,
    gaussian_fit,
    gaussian_w2,
    posterior_method,
    sample_posterior,
)

F64 = torch.float64
NEW = ["dpm2m", "dpm3m", "unipc"]

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_gaussian(dim: int, seed: int = 0, floor: float = 0.05) -> GaussianPrior:
    g = gen(seed)
    b = torch.randn(dim, dim, generator=g, dtype=F64)
    cov = b @ b.T / dim + floor * torch.eye(dim, dtype=F64)
    return GaussianPrior(torch.randn(dim, generator=g, dtype=F64), cov)


def coef(schedule, t: float) -> tuple[float, float]:
    a, s = schedule.alpha_sigma(torch.tensor(t, dtype=F64))
    return float(a), float(s)


def ode_error(prior: GaussianPrior, method: str, steps: int, spacing: str) -> float:
    """Exact W2 between the sampler's output law and the exact flow's (true marginal input)."""
    d, sch = prior.dim, prior.schedule
    a1, s1 = coef(sch, 1.0)
    x = torch.cat([torch.zeros(1, d, dtype=F64), s1 * torch.eye(d, dtype=F64)])
    with torch.no_grad():
        out = SAMPLERS[method](prior, x, sch.timesteps(steps, spacing=spacing))
    b, m = out[0], (out[1:] - out[0]).T / s1  # out(x) = b + M x
    init_cov = a1**2 * prior.cov + s1**2 * torch.eye(d, dtype=F64)
    lam, u = torch.linalg.eigh(prior.cov)
    s_min = float(sch.ratio(torch.tensor(sch.t_min, dtype=F64)))
    target = (u * (lam**2 / (lam + s_min**2))) @ u.T
    return float(gaussian_w2(b + m @ (a1 * prior.mean), m @ init_cov @ m.T, prior.mean, target))


# ----------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def errors():
    """W2 errors of each ODE solver on each grid at 8..128 steps (a 6-d Gaussian prior)."""
    prior = random_gaussian(6)
    steps = [8, 16, 32, 64, 128]
    return {
        (m, sp): [ode_error(prior, m, n, sp) for n in steps]
        for m in ["ddim", "heun", *NEW]
        for sp in ["edm", "logsnr"]
    }


def ratios(errs: list[float]) -> list[float]:
    return [errs[i] / errs[i + 1] for i in range(len(errs) - 1)]


@pytest.mark.parametrize("spacing", ["edm", "logsnr"])
def test_ode_solvers_converge_to_the_exact_marginal(errors, spacing, report):
    for method in ["ddim", "heun", *NEW]:
        errs = errors[method, spacing]
        report(
            f"{method:5s} {spacing:6s} W2 at 8..128 steps: "
            + " ".join(f"{e:.1e}" for e in errs)
            + "; ratios "
            + " ".join(f"{r:.1f}" for r in ratios(errs))
        )
        assert all(a > b for a, b in zip(errs[1:], errs[2:])), (method, errs)  # decreasing
    # at 128 steps (128 evaluations) the higher-order solvers are orders of magnitude closer
    assert errors["ddim", spacing][-1] > 0.02
    assert errors["dpm2m", spacing][-1] < 5e-3
    assert errors["dpm3m", spacing][-1] < 2e-4
    assert errors["unipc", spacing][-1] < 5e-5


def test_orders_of_convergence(errors):
    # first order: DDIM halves its error when the steps double
    for spacing in ["edm", "logsnr"]:
        assert all(1.8 < r < 2.2 for r in ratios(errors["ddim", spacing])[2:])
        # second order: 2M divides it by ~4 once the steps are fine enough
        assert all(3.5 < r < 5.0 for r in ratios(errors["dpm2m", spacing])[2:])
    # third order: 3M by ~8 on the EDM grid (8.5 measured at 64 -> 128)
    assert 6.5 < ratios(errors["dpm3m", "edm"])[-1] < 11.0
    # on the uniform log-SNR grid the leading h^3 term of 3M integrates to ~0 for this smooth
    # integrand (measured ratios ~18): at least third order
    assert all(r > 8.0 for r in ratios(errors["dpm3m", "logsnr"])[1:])
    # the corrector adds one order: ~16 on the EDM grid
    assert ratios(errors["unipc", "edm"])[-1] > 12.0
    for spacing in ["edm", "logsnr"]:
        for e_pc, e_3m in zip(errors["unipc", spacing][2:], errors["dpm3m", spacing][2:]):
            assert e_pc < e_3m


def test_order_one_is_ddim_and_ddpm():
    """The exponential integrator of order 1 is DDIM (eta 0) and DDPM (eta 1), noise included."""
    prior = random_gaussian(5, seed=1)
    ts = prior.schedule.timesteps(12, spacing="logsnr")
    x = initial_noise(prior, 64, generator=gen(0), dtype=F64)
    with torch.no_grad():
        ode = multistep_sampler(prior, x, ts, order=1)
        torch.testing.assert_close(ode, ddim_sampler(prior, x, ts), rtol=1e-10, atol=1e-10)
        sde = multistep_sampler(prior, x, ts, gen(3), order=1, eta=1.0)
        ref = ddpm_sampler(prior, x, ts, gen(3))
    torch.testing.assert_close(sde, ref, rtol=1e-9, atol=1e-9)


def test_step_weights_integrate_polynomials_exactly():
    """sum_j w_j P(tau_j) = rho int_0^h e^{-rho (h - tau)} P(tau) dtau for P of degree < m."""
    taus, h = [0.0, -0.3, -0.7], 0.45
    for rho in (1.0, 1.5, 2.0):
        w = step_weights(taus, h, rho)
        for k in range(3):
            grid = torch.linspace(0, h, 20001, dtype=F64)
            f = rho * torch.exp(-rho * (h - grid)) * grid**k
            exact = float(torch.trapezoid(f, grid))
            assert sum(wj * tj**k for wj, tj in zip(w, taus)) == pytest.approx(exact, rel=1e-7)
    # tiny steps use the series (no cancellation)
    w = step_weights([0.0, -1e-3], 1e-4)
    assert sum(w) == pytest.approx(-math.expm1(-1e-4), rel=1e-12)


@pytest.mark.parametrize("method", NEW)
def test_stochastic_variants_reproduce_a_gaussian(method, report):
    """eta = 1 (SDE-DPM-Solver++) samples the prior: mean and covariance within 5 SE + 0.03."""
    prior = random_gaussian(4, seed=2, floor=0.1)
    n = 20000
    x = sample(prior, n, method, 48, gen(4), spacing="logsnr", eta=1.0)
    var = torch.diagonal(prior.cov)
    se_mean = torch.sqrt(var / n)
    se_cov = torch.sqrt((var[:, None] * var[None] + prior.cov**2) / n)
    err_mean = (x.mean(0) - prior.mean).abs()
    err_cov = (torch.cov(x.T) - prior.cov).abs()
    w2 = float(gaussian_w2(*gaussian_fit(x), prior.mean, prior.cov))
    report(f"{method} eta=1, 48 steps logsnr, n={n}: W2 to the prior {w2:.3f}")
    assert (err_mean <= 5 * se_mean + 0.03).all()
    assert (err_cov <= 5 * se_cov + 0.03).all()


def test_solvers_on_a_ve_schedule():
    prior = random_gaussian(3, seed=3, floor=0.2)
    prior.schedule = VESchedule(sigma_min=1e-3, sigma_max=50.0)
    x = sample(prior, 8000, "dpm3m", 24, gen(0), spacing="logsnr")
    assert (x.mean(0) - prior.mean).abs().max() < 0.1
    assert (torch.cov(x.T) - prior.cov).abs().max() < 0.2


# ----------------------------------------------------------------------------- the grid


def test_logsnr_grid():
    prior = random_gaussian(2)
    sch = prior.schedule
    ts = sch.timesteps(10, spacing="logsnr")
    assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert (ts[1:] < ts[:-1]).all()
    log_s = torch.log(sch.ratio(ts[:-1]))
    steps = log_s[1:] - log_s[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(9), rtol=1e-6, atol=1e-8)
    assert float(ts[-2]) == pytest.approx(sch.t_min, rel=1e-6)
    assert sch.timesteps(1, spacing="logsnr").tolist() == [1.0, 0.0]


def default_grid_error(prior: GaussianPrior, method: str, steps: int) -> float:
    """ode_error of ``sample(prior, n, method, steps)`` with no spacing given (the sampler's
    own grid): the deterministic samplers are affine in x_init, so the map is read off exactly."""
    d, sch = prior.dim, prior.schedule
    a1, s1 = coef(sch, 1.0)
    x = torch.cat([torch.zeros(1, d, dtype=F64), s1 * torch.eye(d, dtype=F64)])
    out = sample(prior, d + 1, method, steps, x_init=x)
    b, m = out[0], (out[1:] - out[0]).T / s1
    init_cov = a1**2 * prior.cov + s1**2 * torch.eye(d, dtype=F64)
    lam, u = torch.linalg.eigh(prior.cov)
    s_min = float(sch.ratio(torch.tensor(sch.t_min, dtype=F64)))
    target = (u * (lam**2 / (lam + s_min**2))) @ u.T
    return float(gaussian_w2(b + m @ (a1 * prior.mean), m @ init_cov @ m.T, prior.mean, target))


def test_each_sampler_defaults_to_the_grid_it_is_accurate_on(report):
    """With no spacing, unipc and dpm3m at 16 evaluations beat DDIM at 64 (their log-SNR
    grid; on EDM's they did not: W2 0.18 and 0.15 vs 0.10 for this prior)."""
    assert [default_spacing(m) for m in ("ddpm", "ddim", "heun", *NEW, None)] == [
        "edm",
        "edm",
        "edm",
        "logsnr",
        "logsnr",
        "logsnr",
        "edm",
    ]
    prior = random_gaussian(6)
    ddim64 = default_grid_error(prior, "ddim", 64)
    assert ddim64 == pytest.approx(ode_error(prior, "ddim", 64, "edm"), rel=1e-9)
    for method in ("unipc", "dpm3m"):
        w2 = default_grid_error(prior, method, 16)
        report(f"sample({method}, 16) on its own grid: W2 {w2:.4f}; ddim 64: {ddim64:.4f}")
        assert w2 == pytest.approx(ode_error(prior, method, 16, "logsnr"), rel=1e-9)
        assert w2 < 0.5 * ddim64
    # the posterior methods resolve and record the sampler's grid; an explicit one is kept
    assert posterior_method("mmps", sampler="unipc").spacing == "logsnr"
    assert posterior_method("mmps", sampler="ddpm").spacing == "edm"
    assert posterior_method("dps", sampler="dpm2m", spacing="edm").spacing == "edm"
    assert posterior_method("daps").spacing == posterior_method("tds").spacing == "edm"
    m = posterior_method("pigdm", sampler="unipc")
    assert m.options()["spacing"] == "logsnr" and posterior_method(m.options()) == m


@pytest.mark.parametrize("seed", [84, 0])
def test_sample_posterior_unipc_16_reaches_ddim_64_with_no_other_argument(seed, report):
    """sample_posterior(..., sampler="unipc", steps=16) (MMPS, its default 4 CG iterations =
    the rank) against sampler="ddim", steps=64, on the design problem: W2 0.025-0.038 vs
    0.080-0.088 measured (with the EDM grid unipc gave 0.13-0.14)."""
    prior, forward, noise, y = design_problem(seed)
    mean, cov = exact_gaussian_posterior(prior, forward, noise, y)

    def w2(sampler: str, steps: int) -> float:
        xs = sample_posterior(
            prior,
            forward,
            noise,
            y,
            steps=steps,
            num_samples=20000,
            generator=gen(seed + 1000),
            sampler=sampler,
        )
        return float(gaussian_w2(*gaussian_fit(xs), mean, cov).mean())

    unipc, ddim = w2("unipc", 16), w2("ddim", 64)
    report(f"design problem seed {seed}: unipc 16 W2 {unipc:.3f}, ddim 64 W2 {ddim:.3f}")
    assert unipc < ddim


# ----------------------------------------------------------------------------- selection


def test_names_and_reproducibility():
    prior = random_gaussian(3, seed=4)
    for method in NEW:
        assert method in SAMPLERS and method in ETA_SAMPLERS and nfe(method, 16) == 16
        for spacing in ["edm", "uniform", "logsnr"]:
            a = sample(prior, 50, method, 8, gen(0), spacing=spacing)
            b = sample(prior, 50, method, 8, gen(0), spacing=spacing)
            assert a.shape == (50, 3) and torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # stochastic: the same generator seed gives the same samples, another seed others
        a = sample(prior, 50, method, 8, gen(0), eta=0.5)
        torch.testing.assert_close(
            a, sample(prior, 50, method, 8, gen(0), eta=0.5), rtol=0, atol=0
        )
        assert not torch.equal(a, sample(prior, 50, method, 8, gen(1), eta=0.5))
        # the ODE solvers use no randomness after the initial noise
        x0 = initial_noise(prior, 50, gen(9), dtype=F64)
        a = sample(prior, 50, method, 8, gen(1), x_init=x0)
        torch.testing.assert_close(a, sample(prior, 50, method, 8, gen(2), x_init=x0))
        # batches give the same samples as one call (deterministic given the initial noise)
        torch.testing.assert_close(a, sample(prior, 50, method, 8, x_init=x0, batch_size=16))
    assert nfe("heun", 16) == 31 and nfe("ddim", 16) == 16


@pytest.fixture(scope="module")
def linear_problem():
    g = gen(7)
    prior = random_gaussian(6, seed=7, floor=0.1)
    forward = DenseLinear(torch.randn(3, 3, 6, generator=g, dtype=F64) / math.sqrt(6))
    noise = GaussianNoise(0.1)
    y = forward(prior.sample(3, generator=g)) + noise.sample((3, 3), generator=g, dtype=F64)
    return prior, forward, noise, y


@pytest.mark.parametrize("method", ["mmps", "dps", "cla", "pigdm"])
@pytest.mark.parametrize("sampler", NEW)
def test_every_wrapper_runs_on_the_solvers(linear_problem, method, sampler):
    prior, forward, noise, y = linear_problem
    opts = dict(sampler=sampler, spacing="logsnr", eta=0.0)
    a = sample_posterior(prior, forward, noise, y, method, 6, 5, gen(0), **opts)
    b = sample_posterior(prior, forward, noise, y, method, 6, 5, gen(0), **opts)
    assert a.shape == (3, 5, 6) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    spec = posterior_method(method, steps=6, **opts)
    assert spec.options()["sampler"] == sampler and posterior_method(spec.options()) == spec
    if sampler == "dpm2m":  # SDE-DPM-Solver++(2M) through the wrappers
        c = sample_posterior(
            prior, forward, noise, y, method, 6, 5, gen(0), sampler=sampler, eta=1.0
        )
        assert torch.isfinite(c).all() and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", NEW)
def test_mmps_on_a_solver_is_the_solver_on_the_exact_posterior(linear_problem, sampler):
    """MMPS with k = M is the exact posterior denoiser: same samples from the same noise."""
    prior, forward, noise, y = linear_problem
    x0 = initial_noise(prior, 3 * 40, gen(1), dtype=F64).reshape(3, 40, 6)
    xs = sample_posterior(
        prior,
        forward,
        noise,
        y,
        "mmps",
        10,
        40,
        sampler=sampler,
        spacing="logsnr",
        iterations=3,
        x_init=x0,
    )
    mean, cov = exact_gaussian_posterior(prior, forward, noise, y)
    for i in range(3):
        post = GaussianPrior(mean[i], cov[i])
        ref = sample(post, 40, sampler, 10, spacing="logsnr", x_init=x0[i])
        torch.testing.assert_close(xs[i], ref, rtol=1e-7, atol=1e-7)


# ----------------------------------------------------------------------------- errors


def test_bad_input_fails_early_in_one_line(linear_problem):
    prior, forward, noise, y = linear_problem
    cases = [
        (dict(method="dpm4m"), "unknown sampler 'dpm4m'"),
        (dict(method="dpm2m", steps=0), "steps must be an integer >= 1"),
        (dict(method="dpm2m", steps=2), r"'dpm2m': order 2 needs steps >= 3"),
        (dict(method="dpm3m", steps=3), r"'dpm3m': order 3 needs steps >= 4"),
        (dict(method="unipc", steps=3), r"'unipc': order 3 needs steps >= 4"),
        (dict(method="dpm2m", eta=1.5), "eta must be a number in"),
        (dict(method="heun", eta=0.5), "eta is not an option of sampler 'heun'"),
        (dict(method="dpm3m", spacing="log"), "unknown time spacing 'log'"),
    ]
    for kw, match in cases:
        args = {"method": "ddim", "steps": 8, **kw}
        with pytest.raises(ValueError, match=match) as err:
            sample(prior, 4, **args)
        assert "\n" not in str(err.value)
    for kw, match in cases[:-1]:  # the posterior methods refuse the same at construction
        opts = {"sampler": kw.get("method", "ddim"), "steps": kw.get("steps", 8)}
        if "eta" in kw:
            opts["eta"] = kw["eta"]
            match = "eta"
        with pytest.raises(ValueError, match=match) as err:
            posterior_method("mmps", **opts)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown time spacing 'log'"):
        posterior_method("dps", sampler="dpm3m", spacing="log")
    with pytest.raises(ValueError, match="needs steps >= 4"):  # before any sampling
        sample_posterior(prior, forward, noise, y, "pigdm", 3, 2, sampler="unipc")
    with pytest.raises(ValueError, match="order must be an integer in"):
        check_order(0)
    with pytest.raises(ValueError, match="order 4 needs steps >= 5"):
        multistep_sampler(
            prior, torch.zeros(2, 6, dtype=F64), prior.schedule.timesteps(4), order=4
        )
    check_sampler("unipc", 4)  # the smallest supported count


# ----------------------------------------------------------------------------- acceptance


def design_problem(seed: int):
    """DESIGN.md §4: 8-d Gaussian prior, dense 4x8 A, sigma_y 0.1 (experiments/samplers)."""
    g = gen(seed)
    b = torch.randn(8, 8, generator=g, dtype=F64)
    prior = GaussianPrior(torch.randn(8, generator=g, dtype=F64), b @ b.T / 8 + 0.1 * torch.eye(8))
    forward = DenseLinear(torch.randn(1, 4, 8, generator=g, dtype=F64) / math.sqrt(8))
    noise = GaussianNoise(0.1)
    y = forward(prior.sample(1, generator=g)) + noise.sample((1, 4), generator=g, dtype=F64)
    return prior, forward, noise, y


@pytest.mark.parametrize("seed", [84, 0, 1])
def test_mmps_reaches_w2_0061_with_16_evaluations(seed, report):
    """The issue's target: W2 <= 0.061 at <= 16 network evaluations per sample (MMPS, k=4).

    Measured over seeds 0-9 and 84 (experiments/samplers/nfe.md): unipc 0.014-0.036, ddim at
    16 evaluations 0.22-0.32; the Monte-Carlo floor of 20,000 exact samples is 0.01-0.03.
    """
    prior, forward, noise, y = design_problem(seed)
    mean, cov = exact_gaussian_posterior(prior, forward, noise, y)
    xs = sample_posterior(
        prior,
        forward,
        noise,
        y,
        "mmps",
        16,
        20000,
        gen(seed + 1000),
        iterations=4,
        sampler="unipc",
        spacing="logsnr",
    )
    w2 = float(gaussian_w2(*gaussian_fit(xs), mean, cov).mean())
    report(f"design problem seed {seed}: MMPS k=4 + unipc, 16 evaluations, logsnr: W2 {w2:.3f}")
    assert nfe("unipc", 16) == 16
    assert w2 <= 0.061
