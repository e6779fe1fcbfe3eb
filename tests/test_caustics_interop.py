"""Tests of hierprior.interop.caustics: a caustics simulator as a hierprior forward model.

The simulator: caustics 1.7.1 ``LensSource`` with an SIE (``angle_system="e1_e2"``) plus
external shear lens in one ``SinglePlane`` (static redshifts) and a dynamic ``Pixelated``
source, in float64. Sections: the mapping of caustics' parameters to lenstronomy's; the adapter
reproduces the simulator (every parameter layout, subsets, shared models, device/dtype moves);
its linearisation (finite differences, dot-product test, forward-mode against double-VJP); the
posterior samplers and one EM round on it; refused input.
"""

from __future__ import annotations

import sys

import pytest
import torch

caustics = pytest.importorskip("caustics")

from hierprior.diffusion import GaussianPrior  # noqa: E402
from hierprior.em import EStep, GaussianMStep, Monitor, Population, StopRule, run_em  # noqa: E402
from hierprior.interop import CausticsForwardModel, caustics_forward_model  # noqa: E402
from hierprior.physics import GaussianNoise, NonLinear  # noqa: E402
from hierprior.posterior import sample_posterior  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
CPU = torch.device("cpu")
S_SRC, N_PIX, N_OBS = 8, 12, 4
KEYS = ("sie.Rein", "sie.e1", "sie.e2", "shear.gamma_1", "shear.gamma_2")


def build_simulator(dynamic_center: bool = False, static_lens: bool = False, psf=None):
    """SIE + shear + pixelated source (8x8 over 1.6"), image 12x12 at 0.25"/pixel, float64."""
    cosmo = caustics.FlatLambdaCDM(name="cosmo")
    center = {} if dynamic_center else {"x0": 0.0, "y0": 0.0}
    lens_values = {"Rein": 1.0, "e1": 0.1, "e2": -0.05} if static_lens else {}
    shear_values = {"gamma_1": 0.02, "gamma_2": 0.01} if static_lens else {}
    sie = caustics.SIE(cosmology=cosmo, name="sie", angle_system="e1_e2", **center, **lens_values)
    if static_lens:  # caustics' e1/e2 parameters stay dynamic even when given a value
        sie.e1.to_static()
        sie.e2.to_static()
    shear = caustics.ExternalShear(cosmology=cosmo, name="shear", x0=0.0, y0=0.0, **shear_values)
    lens = caustics.SinglePlane(
        cosmology=cosmo, lenses=[sie, shear], name="lens", z_l=0.5, z_s=1.0
    )
    source = caustics.Pixelated(
        name="src", x0=0.0, y0=0.0, pixelscale=1.6 / S_SRC, shape=(S_SRC, S_SRC)
    )
    extra = {} if psf is None else {"psf": psf}
    sim = caustics.LensSource(
        lens=lens, source=source, pixelscale=3.0 / N_PIX, pixels_x=N_PIX, **extra
    )
    # both device and dtype: caskade's .to(dtype=...) alone fails on the e1/e2 pointers
    return sim.to(device=CPU, dtype=F64), source


def lens_params(n: int = N_OBS, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sie.Rein": 0.9 + 0.2 * torch.rand(n, generator=g, dtype=F64),
        "sie.e1": 0.1 * torch.randn(n, generator=g, dtype=F64),
        "sie.e2": 0.1 * torch.randn(n, generator=g, dtype=F64),
        "shear.gamma_1": 0.02 * torch.randn(n, generator=g, dtype=F64),
        "shear.gamma_2": 0.02 * torch.randn(n, generator=g, dtype=F64),
    }


def direct(sim, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The simulator called row by row: x (N, S, s, s) -> (N, S, H, W)."""
    return torch.stack(
        [
            torch.stack([sim([params[k][i] for k in KEYS] + [xs]) for xs in x[i]])
            for i in range(x.shape[0])
        ]
    )


@pytest.fixture(scope="module")
def setup():
    sim, source = build_simulator()
    return sim, source, lens_params()


# ============================================================== caustics' parameters


def test_caustics_sie_shear_is_lenstronomy_sie_shear():
    """SIE(e1_e2: Rein, e1, e2, x0, y0) + ExternalShear(gamma_1, gamma_2, x0 = y0 = 0) is
    lenstronomy's SIE(theta_E, e1, e2, center_x, center_y) + SHEAR(gamma1, gamma2): measured
    max relative deflection difference 5e-10 in float64 (lenstronomy's SIE is an NIE with a
    1e-10 core)."""
    lenstronomy = pytest.importorskip("lenstronomy.LensModel.lens_model")
    sim, _ = build_simulator(dynamic_center=True)
    lens = sim.lens
    model = lenstronomy.LensModel(["SIE", "SHEAR"])
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        th, e1, e2, cx, cy, g1, g2 = (
            (torch.rand(7, generator=g, dtype=F64) - 0.5)
            * torch.tensor([1.0, 0.6, 0.6, 0.6, 0.6, 0.2, 0.2], dtype=F64)
        ).tolist()
        th += 1.0
        kwargs = [
            {"theta_E": th, "e1": e1, "e2": e2, "center_x": cx, "center_y": cy},
            {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0},
        ]
        x, y = (torch.rand(2, 100, generator=g, dtype=F64) - 0.5) * 6
        ax, ay = model.alpha(x.numpy(), y.numpy(), kwargs)
        p = [torch.tensor(v, dtype=F64) for v in (cx, cy, th, e1, e2, g1, g2)]
        cax, cay = lens.reduced_deflection_angle(x, y, p)
        scale = max(abs(ax).max(), abs(ay).max())
        assert (cax - torch.from_numpy(ax)).abs().max() / scale < 1e-8
        assert (cay - torch.from_numpy(ay)).abs().max() / scale < 1e-8


# ============================================================== reproduces the simulator


def test_adapter_reproduces_the_simulator(setup):
    sim, source, params = setup
    model = caustics_forward_model(sim, params, S_SRC, N_PIX)
    assert isinstance(model, NonLinear) and isinstance(model, CausticsForwardModel)
    assert model.num_obs == N_OBS and model.param_keys == KEYS
    assert model.input_shape == (1, S_SRC, S_SRC) and model.output_shape == (1, N_PIX, N_PIX)
    x = torch.rand(N_OBS, 3, 1, S_SRC, S_SRC, generator=torch.Generator().manual_seed(1)).double()
    want = direct(sim, params, x[:, :, 0])
    y = model(x)
    assert y.shape == (N_OBS, 3, 1, N_PIX, N_PIX)
    torch.testing.assert_close(y[:, :, 0], want, rtol=0, atol=1e-13)
    torch.testing.assert_close(model(x[:, 0]), y[:, 0], rtol=0, atol=0)  # (N, *event) input
    # the other layouts of the same parameters, bare names, explicit image_param
    flat = torch.stack([params[k] for k in KEYS], 1)
    as_list = [params[k] for k in KEYS]
    bare = {k.split(".")[1]: v for k, v in params.items()}
    for other in (
        caustics_forward_model(sim, flat, S_SRC, N_PIX),
        caustics_forward_model(sim, as_list, (S_SRC, S_SRC), (N_PIX, N_PIX)),
        caustics_forward_model(sim, bare, S_SRC, N_PIX, image_param=source),
        caustics_forward_model(sim, params, S_SRC, N_PIX, image_param=source.image),
    ):
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    # subsets, and a flat input shape
    sub = model[[2, 0]]
    assert isinstance(sub, CausticsForwardModel) and sub.num_obs == 2
    torch.testing.assert_close(sub(x[[2, 0]]), y[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(model[1](x[1:2]), y[1:2], rtol=0, atol=0)
    flat_model = caustics_forward_model(sim, params, S_SRC, N_PIX, input_shape=(S_SRC**2,))
    torch.testing.assert_close(flat_model(x.flatten(2)), y, rtol=0, atol=0)
    assert model.named_params.keys() == set(KEYS)


def test_shared_model_and_dtype_moves():
    sim, _ = build_simulator(static_lens=True)
    model = caustics_forward_model(sim, None, S_SRC, N_PIX)
    assert model.shared
    x = torch.rand(5, 2, 1, S_SRC, S_SRC, dtype=F64)
    y = model(x)
    assert y.shape == (5, 2, 1, N_PIX, N_PIX) and y.dtype == F64
    torch.testing.assert_close(y[3, 1, 0], sim([x[3, 1, 0]]), rtol=0, atol=1e-13)
    model.float()  # moves the simulator too
    assert sim._grid[0].dtype == torch.float32
    y32 = model(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y, rtol=0, atol=1e-5)
    model.double()
    assert sim._grid[0].dtype == F64


# ============================================================== linearisation


@pytest.mark.parametrize("mode", ["forward_ad", "double_vjp", "linear"])
def test_jvp_vjp_finite_differences_and_dot_product(setup, mode):
    sim, _, params = setup
    options = {
        "forward_ad": {"forward_ad": True},
        "double_vjp": {"forward_ad": False},
        "linear": {"linear": True},
    }[mode]
    model = caustics_forward_model(sim, params, S_SRC, N_PIX, **options)
    assert model.linear == (mode == "linear")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(N_OBS, 2, 1, S_SRC, S_SRC, generator=g, dtype=F64)
    v = torch.randn(x.shape, generator=g, dtype=F64)
    u = torch.randn(N_OBS, 2, 1, N_PIX, N_PIX, generator=g, dtype=F64)
    y, jv = model.jvp(x, v)
    y2, jtu = model.vjp(x, u)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    eps = 1e-4
    fd = (model(x + eps * v) - model(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(jv, fd, rtol=0, atol=1e-9)
    # <J v, u> = <v, J^T u>, per observation and sample
    lhs = (jv * u).flatten(2).sum(-1)
    rhs = (v * jtu).flatten(2).sum(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # the simulator is linear in the source: J v = A v
    torch.testing.assert_close(jv, model(v), rtol=0, atol=1e-12)


# ============================================================== posterior and EM


def gaussian_problem(seed: int = 0):
    """A smooth Gaussian prior over flat 8x8 sources, N_OBS lensed noisy observations."""
    sim, _ = build_simulator()
    params = lens_params(seed=seed)
    d = S_SRC * S_SRC
    rows, cols = torch.arange(d) // S_SRC, torch.arange(d) % S_SRC
    dist = (rows[:, None] - rows[None]).abs() + (cols[:, None] - cols[None]).abs()
    cov = torch.exp(-dist.to(F64) / 2) + 1e-3 * torch.eye(d, dtype=F64)
    prior = GaussianPrior(torch.zeros(d, dtype=F64), cov)
    model = caustics_forward_model(sim, params, S_SRC, N_PIX, input_shape=(d,))
    g = torch.Generator().manual_seed(seed)
    truth = prior.sample(N_OBS, g)
    noise = GaussianNoise(0.05)
    y = model(truth) + 0.05 * torch.randn(N_OBS, 1, N_PIX, N_PIX, generator=g, dtype=F64)
    return prior, model, noise, y, truth


def test_sample_posterior_on_the_adapter():
    prior, model, noise, y, truth = gaussian_problem()

    def draw(method: str, forward, **options):
        g = torch.Generator().manual_seed(7)
        return sample_posterior(
            prior, forward, noise, y, method, num_samples=3, generator=g, **options
        )

    xs = draw("mmps", model, steps=8)
    assert xs.shape == (N_OBS, 3, S_SRC * S_SRC) and torch.isfinite(xs).all()
    torch.testing.assert_close(draw("mmps", model, steps=8), xs, rtol=0, atol=0)  # seeded
    assert torch.isfinite(draw("dps", model, steps=8)).all()
    # declared linear: the exact Gaussian posterior (dense matrix from forward calls)
    exact = draw(
        "exact",
        caustics_forward_model(
            model.simulator, model.named_params, S_SRC, N_PIX, input_shape=(S_SRC**2,), linear=True
        ),
    )
    assert exact.shape == xs.shape and torch.isfinite(exact).all()
    # the data constrain the source: posterior mean closer to the truth than the prior mean
    assert ((exact.mean(1) - truth) ** 2).mean() < 0.5 * (truth**2).mean()


def test_one_em_round_on_the_adapter(tmp_path):
    prior, model, noise, y, truth = gaussian_problem(seed=1)
    population = Population(y=y, forward=model, noise=noise, truth=truth)
    d = S_SRC * S_SRC
    start = GaussianPrior(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    result = run_em(
        start,
        population,
        estep=EStep({"method": "mmps", "steps": 4}, num_samples=2, batch_size=N_OBS),
        mstep=GaussianMStep(),
        monitor=Monitor(
            num_prior_samples=16,
            steps=4,
            num_refs=4,
            re_tessellations=2,
            permutations=0,
            tarp_observations=0,
        ),
        stop=StopRule(
            min_rounds=100,
            level=0.05,
            permutations=59,
            re_tessellations=1,
            num_refs=10,
            long_lag=False,
        ),
        rounds=1,
        run_dir=tmp_path / "run",
        seed=0,
        logger=None,
    )
    assert len(result.priors) == 2
    fitted = result.priors[1]
    assert torch.isfinite(fitted.mean).all() and torch.isfinite(fitted.cov).all()
    assert (tmp_path / "run" / "round_001").exists()


# ============================================================== refused input


def test_refused_input(setup, monkeypatch):
    sim, source, params = setup
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['shear.gamma_2'\]"):
        caustics_forward_model(sim, {k: params[k] for k in KEYS[:-1]}, S_SRC, N_PIX)
    with pytest.raises(ValueError, match="unknown parameter 'Rein2'"):
        caustics_forward_model(sim, {**params, "Rein2": params["sie.Rein"]}, S_SRC, N_PIX)
    with pytest.raises(ValueError, match="4 columns.*take 5"):
        caustics_forward_model(sim, torch.zeros(N_OBS, 4, dtype=F64), S_SRC, N_PIX)
    with pytest.raises(ValueError, match="disagree on the number of observations"):
        caustics_forward_model(sim, {**params, "sie.e1": params["sie.e1"][:2]}, S_SRC, N_PIX)
    with pytest.raises(ValueError, match="params is None"):
        caustics_forward_model(sim, None, S_SRC, N_PIX)
    with pytest.raises(ValueError, match="cannot tell the source image"):
        caustics_forward_model(sim, params, 9, N_PIX)
    with pytest.raises(ValueError, match="not an image of size"):
        caustics_forward_model(sim, params, S_SRC, 10)
    with pytest.raises(ValueError, match="input_shape"):
        caustics_forward_model(sim, params, S_SRC, N_PIX, input_shape=(63,))
    monkeypatch.setitem(sys.modules, "caustics", None)
    with pytest.raises(ImportError, match="pip install caustics"):
        caustics_forward_model(sim, params, S_SRC, N_PIX)
