"""The lens mass models and the Lensing forward model: maths, conventions, linearity, errors.

Agreement with lenstronomy and caustics is in tests/test_lensing_references.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from hierprior.diffusion import GaussianPrior
from hierprior.physics import Compose, DenseLinear, GaussianNoise, Reshape
from hierprior.physics.lensing import (
    SIE,
    SIS,
    Lensing,
    MassSum,
    PointMass,
    Shear,
    ellipticity,
    gaussian_psf,
)
from hierprior.posterior import sample_posterior

D64 = torch.float64


def _lens(n: int = 4, seed: int = 0, dtype=D64):
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=D64)).to(dtype)

    return SIE(u(0.8, 1.2), u(-0.3, 0.3), u(-0.3, 0.3), u(-0.1, 0.1), u(-0.1, 0.1)) + Shear(
        u(-0.05, 0.05), u(-0.05, 0.05)
    )


def _points(n: int, m: int = 200, seed: int = 1, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, m, generator=g, dtype=D64) * 4 - 2
    y = torch.rand(n, m, generator=g, dtype=D64) * 4 - 2
    return x.to(dtype), y.to(dtype)


# ---------------------------------------------------------------------------- mass models
def test_round_sie_is_the_sis_and_shear_formula():
    x, y = _points(1, 100)
    x, y = x[0], y[0]
    for a, b in zip(
        SIE(1.1, 0.0, 0.0, 0.05, -0.02).deflection(x, y), SIS(1.1, 0.05, -0.02).deflection(x, y)
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ax, ay = SIE(1.1, 1e-5, 0.0).deflection(x, y)  # series branch near q = 1
    bx, by = SIS(1.1).deflection(x, y)
    assert (ax - bx).abs().max() < 1e-4 and (ay - by).abs().max() < 1e-4
    gx, gy = Shear(0.03, -0.02).deflection(x, y)
    torch.testing.assert_close(gx, 0.03 * x - 0.02 * y)
    torch.testing.assert_close(gy, -0.02 * x - 0.03 * y)
    px, py = PointMass(0.7).deflection(x, y)
    torch.testing.assert_close(px, 0.49 * x / (x**2 + y**2))


@pytest.mark.parametrize("model", ["sie", "sis"])
def test_convergence_is_half_the_divergence_of_the_deflection(model):
    """kappa = (d alpha_x / dx + d alpha_y / dy) / 2, the lens equation's Poisson equation."""
    x, y = _points(3, 300)
    x.requires_grad_(True)
    y.requires_grad_(True)
    mass = (
        _lens(3).components[0] if model == "sie" else SIS(torch.tensor([0.9, 1.0, 1.3], dtype=D64))
    )
    ax, ay = mass.deflection(x, y)
    dxx = torch.autograd.grad(ax.sum(), x, retain_graph=True)[0]
    dyy = torch.autograd.grad(ay.sum(), y)[0]
    kappa = mass.convergence(x, y).detach()
    assert ((0.5 * (dxx + dyy) - kappa) / kappa).abs().max() < 1e-10


def test_sie_einstein_radius_encloses_mean_convergence_one():
    """The mean convergence inside the (elliptical) critical curve of an SIE is 1; for the
    circle of radius theta_E the enclosed mean is 1 only for q = 1 -- use the SIS check and
    the flux of kappa through ellipses with axes theta_E / sqrt(q), theta_E sqrt(q)."""
    q, phi = 0.6, 0.4
    e1, e2 = ellipticity(q, phi)
    mass = SIE(1.2, e1, e2)
    # mean kappa in the ellipse sqrt(q x'^2 + y'^2 / q) < theta_E is 1 (kappa ~ 1 / (2 r_ell))
    n = 1200
    t = (torch.arange(n, dtype=D64) + 0.5) / n
    r = 1.2 * torch.sqrt(t)  # equal-area radii in the ellipse's scaled coordinates
    ang = 2 * math.pi * ((torch.arange(n, dtype=D64) * 0.618034) % 1)
    xr, yr = r * torch.cos(ang) / math.sqrt(q), r * torch.sin(ang) * math.sqrt(q)
    x = math.cos(phi) * xr - math.sin(phi) * yr
    y = math.sin(phi) * xr + math.cos(phi) * yr
    assert abs(mass.convergence(x, y).mean().item() - 1.0) < 0.02


def test_batched_parameters_and_shapes():
    mass = _lens(4)
    assert mass.num_obs == 4 and isinstance(mass, MassSum)
    x, y = _points(4, 30)
    ax, ay = mass.deflection(x.reshape(4, 5, 6), y.reshape(4, 5, 6))
    assert ax.shape == (4, 5, 6)
    # row i equals the model of observation i alone
    for i in range(4):
        bx, by = mass[i].deflection(x[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(bx[0], ax[i].flatten())
    sub = mass[[3, 1]]
    assert sub.num_obs == 2
    torch.testing.assert_close(
        sub.convergence(x[[3, 1]], y[[3, 1]]), mass.convergence(x, y)[[3, 1]]
    )
    shared = SIE(1.0, 0.1, 0.0) + Shear(0.01, 0.0)
    assert shared.num_obs is None and shared[0] is shared
    assert shared.deflection(torch.zeros(2, 3, 4), torch.ones(2, 3, 4))[0].shape == (2, 3, 4)


def test_float32_matches_float64_and_python_floats_keep_float64():
    x, y = _points(4, 100)
    a64 = _lens(4).deflection(x, y)[0]
    a32 = _lens(4, dtype=torch.float32).deflection(x.float(), y.float())[0]
    assert a32.dtype == torch.float32
    assert (a32.double() - a64).abs().max() < 1e-5
    mass = SIE(1.0, 0.1, 0.05) + Shear(0.01, 0.02)
    assert mass.deflection(x, y)[0].dtype == D64


def test_lens_parameters_are_differentiable():
    theta = torch.tensor([1.0, 1.2], dtype=D64, requires_grad=True)
    mass = SIE(theta, torch.tensor([0.1, 0.0], dtype=D64), torch.zeros(2, dtype=D64))
    x, y = _points(2, 20)
    mass.deflection(x, y)[0].sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()


def test_mass_model_errors():
    with pytest.raises(ValueError, match="theta_E must be > 0"):
        SIE(0.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="theta_E must be > 0"):
        SIS(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="not finite"):
        SIE(1.0, float("nan"), 0.0)
    with pytest.raises(ValueError, match="not finite"):
        Shear(torch.tensor([0.1, float("inf")]), 0.0)
    with pytest.raises(ValueError, match=r"\|e\|"):
        SIE(1.0, 0.8, 0.8)
    with pytest.raises(ValueError, match="disagree on the number of observations"):
        SIE(torch.ones(3), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="disagree on the number of observations"):
        SIE(torch.ones(3), 0.0, 0.0) + Shear(torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="coordinates must have shape"):
        _lens(4).deflection(torch.zeros(3, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        SIS(1.0).deflection(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="shape \\(N,\\)"):
        SIS(torch.ones(2, 2))


# ---------------------------------------------------------------------------- Lensing
class _FullGridOnly(SIS):
    """An SIS that, like a user's non-elementwise component, needs x and y of one shape."""

    elementwise = False

    def _deflection(self, x, y):
        assert x.shape == y.shape
        return super()._deflection(x, y)


@pytest.mark.parametrize(
    "mass",
    [
        _lens(3),
        _lens(3) + SIS(0.3, 0.4, -0.2) + PointMass(0.2, -0.5, 0.3),
        SIE(1.0, 0.1, -0.2, 0.05, 0.0) + Shear(0.02, -0.01),  # shared (float) parameters
        Shear(torch.tensor([0.02, 0.0]), torch.tensor([0.0, 0.03])),
        _lens(2) + _FullGridOnly(torch.tensor([0.3, 0.2])),  # falls back to full grids
        SIE(torch.tensor([1.0, 1.1]), torch.tensor([0.0, 0.1]), torch.tensor([0.0, 0.0])),  # round
    ],
)
@pytest.mark.parametrize("k", [1, 2])
def test_ray_trace_on_the_separable_grid_equals_ray_shoot(mass, k):
    lens = Lensing(
        mass, image_size=9, pixel_scale=0.2, source_size=8, source_fov=2.0, supersample=k
    )
    x, y = lens.image_grid(k)
    if mass.num_obs is not None:
        x, y = x.expand(mass.num_obs, *x.shape), y.expand(mass.num_obs, *y.shape)
    bx, by = lens.ray_trace()
    ex, ey = mass.ray_shoot(x, y)
    assert bx.shape == ex.shape and by.shape == ey.shape
    torch.testing.assert_close(bx, ex, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(by, ey, rtol=1e-13, atol=1e-13)


def test_image_grid_conventions():
    lens = Lensing(None, 4, 0.5, 8, 2.0)
    x, y = lens.image_grid()
    assert x.shape == (4, 4)
    torch.testing.assert_close(x[0], torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=D64))
    torch.testing.assert_close(x[:, 0], torch.full((4,), -0.75, dtype=D64))  # x along columns
    torch.testing.assert_close(y[:, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=D64))
    xs, _ = lens.image_grid(supersample=2)
    torch.testing.assert_close(xs[0, :2], torch.tensor([-0.875, -0.625], dtype=D64))


def test_unlensed_same_grid_is_the_identity_and_orientation():
    """No lens, no PSF, source grid = image grid: the image is the source, pixel for pixel
    (a point at +x, +y lands at a larger column, a larger row)."""
    lens = Lensing(None, 16, 0.1, 16, 1.6)
    s = torch.randn(3, 1, 16, 16, dtype=D64)
    torch.testing.assert_close(lens(s), s)
    lens2 = Lensing(None, 16, 0.1, 16, 1.6, supersample=1)
    src = torch.zeros(1, 1, 16, 16, dtype=D64)
    src[0, 0, 12, 3] = 1.0  # row 12 (y > 0), column 3 (x < 0)
    img = lens2(src)[0, 0]
    assert tuple((img == img.max()).nonzero()[0].tolist()) == (12, 3)


def test_uniform_source_is_one_where_rays_land_inside_the_field():
    """A uniform source is mapped to 1 where the rays land inside the source field."""
    lens = Lensing(SIS(0.5), 32, 0.1, 16, 2.0, supersample=1)
    img = lens(torch.ones(1, 1, 16, 16, dtype=D64))[0, 0]
    bx, by = lens.ray_trace()
    inside = (bx.abs() < 1.0 - 0.0625) & (by.abs() < 1.0 - 0.0625)
    torch.testing.assert_close(img[inside], torch.ones_like(img[inside]))
    # zero-valued pixels continue the source beyond its field: zero half a pixel outside it
    assert (img[(bx.abs() > 1.0 + 0.0625) | (by.abs() > 1.0 + 0.0625)] == 0).all()


@pytest.mark.parametrize("per_obs", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_adjoint_dot_product(per_obs, k):
    mass = _lens(3) if per_obs else SIE(1.0, 0.15, -0.1, 0.05, 0.0) + Shear(0.02, 0.01)
    psf = torch.tensor([0.1, 0.15, 0.2], dtype=D64) if per_obs else 0.12
    lens = Lensing(mass, 20, 0.12, 12, 1.8, supersample=k, psf=psf)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 2, 1, 12, 12, generator=g, dtype=D64)
    u = torch.randn(3, 2, 1, 20, 20, generator=g, dtype=D64)
    lhs, rhs = (lens(x) * u).sum(), (x * lens.adjoint(u)).sum()
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)
    # vjp of the forward map equals the explicit adjoint
    _, pull = torch.func.vjp(lens, x)
    torch.testing.assert_close(pull(u)[0], lens.adjoint(u))


def test_dense_matrix_and_exact_gaussian_posterior():
    """Lensing equals its dense matrix, and the exact Gaussian posterior method runs on it
    (through a Reshape from a vector prior) and matches the closed-form posterior mean."""
    lens = Lensing(_lens(2), 10, 0.2, 6, 1.6, supersample=2, psf=0.25)
    eye = torch.eye(36, dtype=D64).reshape(36, 1, 1, 6, 6).expand(36, 2, 1, 6, 6)
    cols = lens(eye.transpose(0, 1).contiguous().reshape(2, 36, 1, 6, 6))  # (2, 36, 1, 10, 10)
    A = cols.reshape(2, 36, 100).transpose(1, 2)  # (2, 100, 36)
    dense = DenseLinear(A, (1, 6, 6))
    x = torch.randn(2, 1, 6, 6, dtype=D64)
    torch.testing.assert_close(dense(x), lens(x).reshape(2, 100))
    mean, cov = torch.zeros(36, dtype=D64), torch.eye(36, dtype=D64) * 0.5
    prior = GaussianPrior(mean, cov)
    forward = Compose(Reshape((36,), (1, 6, 6)), lens)
    noise = GaussianNoise(0.1)
    y = forward(torch.randn(2, 36, dtype=D64) * 0.7) + 0.1 * torch.randn(2, 1, 10, 10, dtype=D64)
    samples = sample_posterior(
        prior,
        forward,
        noise,
        y,
        method="exact",
        num_samples=4000,
        generator=torch.Generator().manual_seed(0),
    )
    for i in range(2):
        a = A[i]
        post_cov = torch.linalg.inv(a.T @ a / 0.01 + torch.eye(36, dtype=D64) / 0.5)
        post_mean = post_cov @ (a.T @ y[i].flatten() / 0.01)
        err = (samples[i].mean(0) - post_mean).abs().max()
        assert err < 5 * post_cov.diagonal().sqrt().max() / math.sqrt(4000) + 1e-6


def test_slicing_and_sample_axis():
    lens = Lensing(_lens(4), 12, 0.15, 8, 1.6, supersample=2, psf=torch.full((4,), 0.2))
    x = torch.randn(4, 3, 1, 8, 8, dtype=D64)
    y = lens(x)
    assert y.shape == (4, 3, 1, 12, 12)
    torch.testing.assert_close(lens[[2, 0]](x[[2, 0]]), y[[2, 0]])
    torch.testing.assert_close(lens[1](x[1:2, 0]), y[1:2, 0])
    shared = Lensing(SIS(1.0), 12, 0.15, 8, 1.6)
    assert shared.num_obs is None and shared(torch.randn(2, 5, 1, 8, 8)).shape == (2, 5, 1, 12, 12)


def test_float32_float64_and_cache_follows_the_lens():
    mass = _lens(2)
    lens = Lensing(mass, 16, 0.12, 12, 1.8, supersample=2, psf=0.12)
    x = torch.rand(2, 1, 12, 12, dtype=D64)
    y64 = lens(x)
    y32 = lens(x.float())
    assert y32.dtype == torch.float32 and (y32.double() - y64).abs().max() < 1e-5
    with torch.no_grad():
        mass.components[1].gamma1.add_(0.05)  # in-place change: the cached rays are retraced
    fresh = Lensing(mass, 16, 0.12, 12, 1.8, supersample=2, psf=0.12)
    torch.testing.assert_close(lens(x), fresh(x))


def test_image_is_differentiable_in_the_lens():
    theta = torch.tensor([1.0, 1.1], dtype=D64, requires_grad=True)
    lens = Lensing(SIE(theta, 0.1, 0.0), 12, 0.15, 10, 1.6, psf=0.2)
    x = torch.rand(2, 1, 10, 10, dtype=D64)

    def f(t):
        return Lensing(SIE(t, 0.1, 0.0), 12, 0.15, 10, 1.6, psf=0.2)(x).square().sum()

    f(theta).backward()
    h = 1e-6
    fd = (
        f(theta.detach() + torch.tensor([h, 0.0], dtype=D64))
        - f(theta.detach() - torch.tensor([h, 0.0], dtype=D64))
    ) / (2 * h)
    assert abs(theta.grad[0] - fd) < 1e-4 * abs(fd) + 1e-8
    assert lens(x).requires_grad


def test_gaussian_psf_kernel():
    k = gaussian_psf(0.2, 0.05)
    assert k.shape[0] % 2 == 1 and abs(k.sum().item() - 1) < 1e-12
    r = torch.arange(k.shape[0], dtype=D64) - k.shape[0] // 2
    sigma = math.sqrt((k.sum(0) * r**2).sum().item())
    assert abs(sigma * 0.05 * 2 * math.sqrt(2 * math.log(2)) - 0.2) < 0.005
    assert gaussian_psf(torch.tensor([0.1, 0.3]), 0.05).shape[0] == 2


def test_lensing_errors_are_one_line_and_early():
    mass = _lens(3)
    lens = Lensing(mass, 12, 0.15, 8, 1.6)
    with pytest.raises(ValueError, match=r"the source has shape .*\(source_size = 8\)"):
        lens(torch.zeros(3, 1, 10, 10))
    with pytest.raises(ValueError, match="supersample must be an integer >= 1"):
        Lensing(mass, 12, 0.15, 8, 1.6, supersample=0)
    with pytest.raises(ValueError, match="odd sizes"):
        Lensing(mass, 12, 0.15, 8, 1.6, psf=torch.full((4, 4), 1 / 16))
    with pytest.raises(ValueError, match="normalised to unit sum"):
        Lensing(mass, 12, 0.15, 8, 1.6, psf=torch.full((5, 5), 0.1))
    with pytest.raises(ValueError, match="mass model has 3 observations but the PSF has 2"):
        Lensing(mass, 12, 0.15, 8, 1.6, psf=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="pixel_scale must be a finite number > 0"):
        Lensing(mass, 12, float("nan"), 8, 1.6)
    with pytest.raises(ValueError, match="fwhm must be positive"):
        Lensing(mass, 12, 0.15, 8, 1.6, psf=-0.1)
    with pytest.raises(TypeError, match="MassModel"):
        Lensing("SIE", 12, 0.15, 8, 1.6)
    for err in (ValueError,):
        with pytest.raises(err) as info:
            SIE(torch.tensor([1.0, float("nan")]), 0.0, 0.0)
        assert "\n" not in str(info.value)
