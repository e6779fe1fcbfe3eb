"""PixelatedConvergence: the uniform-square closed form, the direct sum, the exact FFT path on
regular grids (Lensing's ray tracing), physics checks, batching, gradients, caching, errors, and
a comparison with lenstronomy's and caustics' pixelated convergences.

The oracle is an independent O(n^4) direct pixel sum written here in float64 numpy (four
corners per pixel), itself checked against quadrature of a single pixel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hierprior.physics import PixelatedConvergence as PhysicsExport
from hierprior.physics.lensing import (
    SIE,
    Lensing,
    MassSum,
    PixelatedConvergence,
    Shear,
)
from hierprior.physics.lensing import pixelated as pixelated_module

D64 = torch.float64


# ---------------------------------------------------------------------------- the oracle
def _G(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """G(u, v) = u atan(v/u) + v/2 log(u^2 + v^2), continuous (0 at u = 0, v = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(u == 0, 0.0, u * np.arctan(v / np.where(u == 0, 1.0, u)))
        b = np.where(v == 0, 0.0, 0.5 * v * np.log(u * u + v * v))
    return a + b


def _square(x, y, cx, cy, h):
    """Deflection of a uniform unit-convergence square of side h centred at (cx, cy)."""
    u2, u1 = x - cx + h / 2, x - cx - h / 2
    v2, v1 = y - cy + h / 2, y - cy - h / 2
    ax = _G(u2, v2) - _G(u1, v2) - _G(u2, v1) + _G(u1, v1)
    ay = _G(v2, u2) - _G(v1, u2) - _G(v2, u1) + _G(v1, u1)
    return ax / math.pi, ay / math.pi


def _reference(kappa, fov, x, y):
    """The direct pixel sum in float64: kappa (N, n, n) or (n, n), x, y (N, P) or (P,)."""
    kappa, x, y = (np.asarray(t, dtype=np.float64) for t in (kappa, x, y))
    n = kappa.shape[-1]
    h = fov / n
    c = (np.arange(n) + 0.5) * h - fov / 2
    shape = np.broadcast_shapes(x.shape, y.shape, kappa.shape[:-2] + (1,) * (x.ndim - 1))
    ax, ay = np.zeros(shape), np.zeros(shape)
    for i in range(n):
        for j in range(n):
            fx, fy = _square(x, y, c[j], c[i], h)
            k = kappa[..., i, j, None] if kappa.ndim == 3 else kappa[i, j]
            ax += k * fx
            ay += k * fy
    return ax, ay


def _kappa(n: int, N: int | None = 2, seed: int = 0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    shape = (n, n) if N is None else (N, n, n)
    return (torch.rand(shape, generator=g, dtype=D64) * 2 - 0.5).to(dtype)


def _no_direct(monkeypatch):
    """Make the direct sum fail, to prove a grid went through the FFT path."""

    def fail(*args, **kwargs):
        raise AssertionError("the direct sum was used")

    monkeypatch.setattr(PixelatedConvergence, "_direct", fail)


# ---------------------------------------------------------------------------- closed form
def test_square_closed_form_matches_quadrature():
    h, cx, cy = 0.3, 0.05, -0.02
    # (a) outside the square: 2-D Gauss-Legendre over 16 x 16 sub-squares of 8 x 8 nodes
    t, w = np.polynomial.legendre.leggauss(8)
    sub = 16
    edges = np.linspace(-h / 2, h / 2, sub + 1)
    nodes = ((edges[:-1, None] + edges[1:, None]) / 2 + (h / sub / 2) * t[None, :]).ravel()
    weights = np.tile(w * (h / sub / 2), sub)
    X, Y = cx + nodes[None, :], cy + nodes[:, None]
    W = weights[:, None] * weights[None, :]
    rng = np.random.default_rng(0)
    pts = [(0.6, 0.1), (-0.3, 0.4), (cx + h, cy), (cx, cy - h / 2 - 0.1), (2.0, -3.0)]
    pts += [
        tuple(p) for p in rng.uniform(-1, 1, (10, 2)) if max(abs(p[0] - cx), abs(p[1] - cy)) > h
    ]
    worst = 0.0
    for x, y in pts:
        dx, dy = x - X, y - Y
        r2 = dx**2 + dy**2
        qx, qy = (W * dx / r2).sum() / math.pi, (W * dy / r2).sum() / math.pi
        fx, fy = _square(np.float64(x), np.float64(y), cx, cy, h)
        worst = max(worst, abs(fx - qx), abs(fy - qy))
    assert worst < 1e-9, worst
    # (b) anywhere (inside, on edges and corners): the v integral is atan, the u integral by
    # adaptive quadrature split where the integrand jumps (u = 0)
    quad = pytest.importorskip("scipy.integrate").quad
    inside = [(cx, cy), (cx + 0.1, cy - 0.07), (cx + h / 2, cy), (cx + h / 2, cy + h / 2)]
    inside += [(cx - h / 2, cy + 0.03), (cx + 0.149, cy + 0.149), (cx + 0.2, cy - 0.01)]
    worst = 0.0
    for x, y in inside:
        u1, u2, v1, v2 = x - cx - h / 2, x - cx + h / 2, y - cy - h / 2, y - cy + h / 2

        def fx(u, v1=v1, v2=v2):
            return 0.0 if u == 0 else (math.atan(v2 / u) - math.atan(v1 / u)) / math.pi

        def fy(v, u1=u1, u2=u2):
            return 0.0 if v == 0 else (math.atan(u2 / v) - math.atan(u1 / v)) / math.pi

        qx = quad(fx, u1, u2, points=[0.0] if u1 < 0 < u2 else None, epsabs=1e-13)[0]
        qy = quad(fy, v1, v2, points=[0.0] if v1 < 0 < v2 else None, epsabs=1e-13)[0]
        ex, ey = _square(np.float64(x), np.float64(y), cx, cy, h)
        worst = max(worst, abs(ex - qx), abs(ey - qy))
        # the library's kernel is the same function
        m = PixelatedConvergence(torch.ones(1, 1, dtype=D64), h)
        ax, ay = m.deflection(torch.tensor(x - cx, dtype=D64), torch.tensor(y - cy, dtype=D64))
        assert abs(float(ax) - ex) < 1e-15 and abs(float(ay) - ey) < 1e-15
    assert worst < 1e-10, worst
    # at the centre by symmetry 0; finite at every corner
    ax, ay = _square(np.float64(cx), np.float64(cy), cx, cy, h)
    assert abs(ax) < 1e-16 and abs(ay) < 1e-16


# ---------------------------------------------------------------------------- exactness
def test_deflection_at_random_positions_inside_and_outside_equals_the_direct_sum():
    n, fov = 8, 1.6
    kappa = _kappa(n)
    mass = PixelatedConvergence(kappa, fov)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 300, generator=g, dtype=D64) * 4 - 2  # the grid spans [-0.8, 0.8]
    y = torch.rand(2, 300, generator=g, dtype=D64) * 4 - 2
    x[:, :5] = torch.tensor([0.0, 0.1, -0.8, 0.8, 0.3])  # corners, edges, a pixel centre
    y[:, :5] = torch.tensor([0.0, -0.2, 0.8, 0.2, 0.5])
    ax, ay = mass.deflection(x, y)
    rx, ry = _reference(kappa, fov, x, y)
    scale = np.abs(np.stack([rx, ry])).max()
    err = max(np.abs(ax.numpy() - rx).max(), np.abs(ay.numpy() - ry).max()) / scale
    assert err < 1e-12, err  # measured ~1e-15


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("image_size", [8, 11])  # even: on the kappa grid; odd: offset h/2
def test_lensing_grids_take_the_fft_path_and_equal_the_direct_sum(monkeypatch, k, image_size):
    n, fov = 8, 1.6
    h = fov / n
    kappa = _kappa(n)
    mass = PixelatedConvergence(kappa, fov)
    # the image covers 11 h > fov for image_size 11: rays outside the kappa grid too
    lens = Lensing(mass, image_size, h, source_size=8, source_fov=3.0, supersample=k)
    x, y = lens.image_grid(k)
    rx, ry = _reference(kappa, fov, x.reshape(1, -1), y.reshape(1, -1))
    _no_direct(monkeypatch)
    bx, by = lens.ray_trace()
    assert bx.shape == (2, image_size * k, image_size * k)
    ax, ay = (x - bx).reshape(2, -1).numpy(), (y - by).reshape(2, -1).numpy()
    scale = np.abs(np.stack([rx, ry])).max()
    err = max(np.abs(ax - rx).max(), np.abs(ay - ry).max()) / scale
    assert err < 1e-12, err  # measured ~1e-15


def test_grid_deflection_any_offset_rectangular_and_the_fallback(monkeypatch):
    n, fov = 6, 1.2
    h = fov / n
    kappa = _kappa(n, N=None, seed=5)
    mass = PixelatedConvergence(kappa, fov)
    cases = [
        (h / 2, 0.0371, 13, h / 3, -0.413, 9),  # k_x = 2, k_y = 3, arbitrary offsets
        (h, 5.0, 4, h, -5.2, 3),  # far outside the grid
        (h / 4, -0.01, 13, h, 0.3, 1),  # a single row
    ]
    for sx, x0, mx, sy, y0, my in cases:
        xs = x0 + sx * torch.arange(mx, dtype=D64)
        ys = y0 + sy * torch.arange(my, dtype=D64)
        with monkeypatch.context() as mp:
            _no_direct(mp)
            ax, ay = mass.grid_deflection(xs, ys)
        assert ax.shape == (my, mx)
        rx, ry = _reference(kappa, fov, xs[None, :].expand(my, mx), ys[:, None].expand(my, mx))
        scale = max(np.abs(rx).max(), np.abs(ry).max())
        assert max(np.abs(ax.numpy() - rx).max(), np.abs(ay.numpy() - ry).max()) < 1e-12 * scale
    # incommensurate (h / s = 2.5), irregular, or a few points of a huge k (h / s = 1e4,
    # whose 1e4 phase kernels would outgrow the direct sum): the direct sum
    monkeypatch.setattr(PixelatedConvergence, "_fft", None)
    for xs, ys in (
        (0.1 + (h / 2.5) * torch.arange(7, dtype=D64), h * torch.arange(5, dtype=D64) - 0.4),
        (torch.tensor([0.0, 0.1, 0.3], dtype=D64), torch.linspace(-0.7, 0.7, 5, dtype=D64)),
        (1e-4 * h * torch.arange(3, dtype=D64) + 0.05, h * torch.arange(5, dtype=D64) - 0.4),
    ):
        ax, ay = mass.grid_deflection(xs, ys)
        X, Y = xs[None, :].expand(5, -1), ys[:, None].expand(-1, len(xs))
        rx, ry = _reference(kappa, fov, X, Y)
        assert np.abs(ax.numpy() - rx).max() < 1e-13 and np.abs(ay.numpy() - ry).max() < 1e-13


def test_direct_sum_in_chunks(monkeypatch):
    kappa = _kappa(5, seed=2)
    mass = PixelatedConvergence(kappa, 1.0)
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(2, 3, 7, generator=g, dtype=D64),
        torch.randn(2, 3, 7, generator=g, dtype=D64),
    )
    ax, ay = mass.deflection(x, y)
    monkeypatch.setattr(pixelated_module, "_CHUNK_ELEMENTS", 50)  # one position per chunk
    cx, cy = mass.deflection(x, y)
    torch.testing.assert_close(cx, ax, rtol=0, atol=1e-15)
    torch.testing.assert_close(cy, ay, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------- physics
def test_single_pixel_is_a_point_mass_far_away_centred_on_the_pixel():
    n, fov = 24, 2.4
    h = fov / n
    kappa = torch.zeros(n, n, dtype=D64)
    i0, j0 = 5, 17
    kappa[i0, j0] = 2.0
    xc, yc = (j0 + 0.5) * h - fov / 2, (i0 + 0.5) * h - fov / 2
    mass = PixelatedConvergence(kappa, fov)
    r = 10 * h
    phi = torch.linspace(0, 2 * math.pi, 17, dtype=D64)[:-1] + 0.1
    for phis in (phi, torch.arange(8, dtype=D64) * math.pi / 4):  # generic; axes and diagonals
        x, y = xc + r * torch.cos(phis), yc + r * torch.sin(phis)
        ax, ay = mass.deflection(x, y)
        radial = ax * torch.cos(phis) + ay * torch.sin(phis)
        transverse = ay * torch.cos(phis) - ax * torch.sin(phis)
        expected = 2.0 * h**2 / (math.pi * r)
        assert ((radial - expected).abs() / expected).max() < 1e-4  # measured 1.5e-6
        assert (transverse.abs() / expected).max() < 1e-4  # 1.5e-6; a shift of h/2: 5e-2
    # on the pixel's axes and diagonals the direction is exact (no half-pixel shift)
    assert (transverse.abs() / expected).max() < 1e-12  # measured 2.4e-14
    # the same on the FFT path, on a grid through the pixel centre, supersampled by 2
    xs = xc + (h / 2) * torch.arange(-20, 21, dtype=D64)
    ax, ay = mass.grid_deflection(xs, torch.tensor([yc], dtype=D64))
    assert ax[0, 20].abs() < 1e-15 and ay.abs().max() < 1e-15  # antisymmetric about xc
    torch.testing.assert_close(ax[0, 20:], -ax[0, :21].flip(0), rtol=0, atol=1e-15)
    assert abs(float(ax[0, 40]) - expected) / expected < 1e-4


def test_pixelated_uniform_disk_matches_the_analytic_deflection_outside():
    n, fov, R = 64, 2.56, 0.8
    h = fov / n
    c = (torch.arange(n, dtype=D64) + 0.5) * h - fov / 2
    sub = (torch.arange(16, dtype=D64) + 0.5) / 16 * h - h / 2  # kappa = covered fraction
    fx = c[None, :, None, None] + sub[None, None, None, :]
    fy = c[:, None, None, None] + sub[None, None, :, None]
    kappa = ((fx**2 + fy**2) <= R * R).to(D64).mean((-1, -2))
    mass = PixelatedConvergence(kappa, fov)
    phi = torch.linspace(0, 2 * math.pi, 25, dtype=D64)[:-1] + 0.05
    for r in (1.1 * R, 1.5 * R, 2.5 * R):  # 2.5 R lies outside the kappa grid
        x, y = r * torch.cos(phi), r * torch.sin(phi)
        ax, ay = mass.deflection(x, y)
        expected = R**2 / r
        radial = ax * torch.cos(phi) + ay * torch.sin(phi)
        transverse = ay * torch.cos(phi) - ax * torch.sin(phi)
        assert (
            (radial - expected).abs() / expected
        ).max() < 1e-3  # 4.9e-4 at 1.1 R, 1.4e-5 at 2.5 R
        assert (transverse.abs() / expected).max() < 1e-3
    # inside a uniform disk alpha = r (on the FFT path at the pixel centres)
    ax, ay = mass.grid_deflection(c, c)
    inner = (c[None, :] ** 2 + c[:, None] ** 2) < (0.6 * R) ** 2
    assert (ax - c[None, :])[inner].abs().max() < 2e-4 * R  # measured 3.5e-5 R
    assert (ay - c[:, None])[inner].abs().max() < 2e-4 * R


def test_convergence_is_the_piecewise_constant_map():
    n, fov = 4, 2.0
    kappa = _kappa(n)
    mass = PixelatedConvergence(kappa, fov)
    c = (torch.arange(n, dtype=D64) + 0.5) * 0.5 - 1.0
    x, y = c[None, :].expand(n, n), c[:, None].expand(n, n)
    k = mass.convergence(x.expand(2, n, n) + 0.2, y.expand(2, n, n) - 0.24)
    torch.testing.assert_close(k, kappa, rtol=0, atol=0)
    out = mass.convergence(
        torch.tensor([[1.2, -1.01, 0.0]] * 2, dtype=D64), torch.zeros(2, 3, dtype=D64)
    )
    assert (out[:, :2] == 0).all() and (out[:, 2] == kappa[:, 2, 2]).all()
    shared = PixelatedConvergence(kappa[0], fov)
    assert (
        shared.convergence(torch.tensor(0.1, dtype=D64), torch.tensor(-0.6, dtype=D64)).item()
        == kappa[0, 0, 2].item()
    )


# ---------------------------------------------------------------------------- interface
def test_shared_per_observation_slicing_dtypes_and_sums():
    n, fov = 6, 1.2
    kappa = _kappa(n, N=3)
    mass = PixelatedConvergence(kappa, fov)
    assert mass.num_obs == 3 and len(mass) == 3 and not mass.elementwise
    assert PhysicsExport is PixelatedConvergence
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(3, 4, 5, generator=g, dtype=D64),
        torch.randn(3, 4, 5, generator=g, dtype=D64),
    )
    ax, ay = mass.deflection(x, y)
    assert ax.shape == (3, 4, 5)
    # shared == per-observation row by row, any coordinate shape
    for i in range(3):
        sx, sy = PixelatedConvergence(kappa[i], fov).deflection(x[i], y[i])
        torch.testing.assert_close(sx, ax[i], rtol=0, atol=1e-15)
        torch.testing.assert_close(sy, ay[i], rtol=0, atol=1e-15)
    shared = PixelatedConvergence(kappa[0], fov)
    assert shared.num_obs is None and shared[[0, 1]] is shared
    assert shared.deflection(x, y)[0].shape == (3, 4, 5)
    # slicing
    sub = mass[[2, 0]]
    assert sub.num_obs == 2
    torch.testing.assert_close(sub.deflection(x[[2, 0]], y[[2, 0]])[0], ax[[2, 0]])
    torch.testing.assert_close(mass[1].kappa, kappa[1:2])
    # float32 (kappa float64, coordinates float32) vs float64, both paths
    ax32, ay32 = mass.deflection(x.float(), y.float())
    assert ax32.dtype == torch.float32
    scale = torch.stack([ax, ay]).abs().max()
    assert max((ax32.double() - ax).abs().max(), (ay32.double() - ay).abs().max()) < 1e-6 * scale
    c = (torch.arange(2 * n, dtype=D64) + 0.5) * (fov / n / 2) - fov / 2 - 0.3
    gx, gy = mass.grid_deflection(c, c)
    gx32, gy32 = PixelatedConvergence(kappa.float(), fov).grid_deflection(c.float(), c.float())
    assert gx32.dtype == torch.float32
    assert max((gx32.double() - gx).abs().max(), (gy32.double() - gy).abs().max()) < 1e-6 * scale
    # sums with SIE + Shear: a MassSum, deflections add, slicing per observation
    sie = SIE(torch.tensor([1.0, 1.1, 0.9], dtype=D64), 0.1, -0.05, 0.02, 0.0)
    shear = Shear(torch.tensor([0.01, 0.0, -0.02], dtype=D64), 0.02)
    total = sie + shear + mass
    assert isinstance(total, MassSum) and len(total.components) == 3 and not total.elementwise
    tx, ty = total.deflection(x, y)
    ex = sie.deflection(x, y)[0] + shear.deflection(x, y)[0] + ax
    ey = sie.deflection(x, y)[1] + shear.deflection(x, y)[1] + ay
    torch.testing.assert_close(tx, ex, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ty, ey, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(total[[1]].deflection(x[1:2], y[1:2])[0], tx[1:2])
    torch.testing.assert_close(
        total.convergence(x, y), sie.convergence(x, y) + mass.convergence(x, y)
    )
    assert "kappa=(3, 6, 6)" in repr(mass)


def test_base_grid_deflection_is_the_full_grid_deflection():
    sie = SIE(torch.tensor([1.0, 1.2], dtype=D64), 0.1, -0.05, 0.02, 0.0) + Shear(0.01, 0.02)
    xs, ys = torch.linspace(-1, 1, 7, dtype=D64), torch.linspace(-0.5, 1.5, 5, dtype=D64)
    X, Y = xs[None, :].expand(2, 5, 7), ys[:, None].expand(2, 5, 7)
    for model in (sie, sie + PixelatedConvergence(_kappa(4), 1.0)):
        gx, gy = model.grid_deflection(xs, ys)
        ex, ey = model.deflection(X, Y)
        assert gx.shape == (2, 5, 7)
        torch.testing.assert_close(gx, ex, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(gy, ey, rtol=1e-13, atol=1e-13)
    shared = SIE(1.0, 0.1, 0.0)
    assert shared.grid_deflection(xs, ys)[0].shape == (5, 7)
    with pytest.raises(ValueError, match="shape \\(m,\\)"):
        shared.grid_deflection(X, ys)


def test_lensing_with_sie_shear_pixelated_equals_the_direct_sum_path():
    n, fov = 8, 2.4
    kappa = 0.3 * _kappa(n, N=2, seed=7)
    sie = SIE(torch.tensor([1.0, 0.9], dtype=D64), 0.1, -0.1, 0.05, 0.0)
    mass = sie + Shear(0.02, -0.01) + PixelatedConvergence(kappa, fov)
    lens = Lensing(mass, 12, 0.15, source_size=10, source_fov=2.0, supersample=2, psf=0.2)
    x, y = lens.image_grid(2)
    ex, ey = mass.ray_shoot(x.expand(2, 24, 24), y.expand(2, 24, 24))  # the direct sum
    bx, by = lens.ray_trace()
    torch.testing.assert_close(bx, ex, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(by, ey, rtol=1e-13, atol=1e-13)
    src = torch.rand(2, 1, 10, 10, dtype=D64, generator=torch.Generator().manual_seed(0))
    img = lens(src)
    lens._grid_cache.clear()
    slow = Lensing(mass, 12, 0.15, 10, 2.0, supersample=2, psf=0.2)
    slow.ray_trace = lambda dtype=D64, device=None: mass.ray_shoot(  # noqa: ARG005
        x.expand(2, 24, 24).to(dtype), y.expand(2, 24, 24).to(dtype)
    )
    torch.testing.assert_close(slow(src), img, rtol=1e-12, atol=1e-12)
    # per-observation slicing of the forward model
    torch.testing.assert_close(lens[[1]](src[[1]]), img[[1]])


def test_gradient_in_kappa_and_through_lensing():
    n, fov = 3, 0.9
    kappa = _kappa(n, N=2, seed=4).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, generator=g, dtype=D64), torch.randn(2, 5, generator=g, dtype=D64)
    xs = (torch.arange(7, dtype=D64) + 0.5) * (fov / n / 2) - 0.6

    def direct(k):
        return PixelatedConvergence(k, fov).deflection(x, y)

    def fft(k):
        return PixelatedConvergence(k, fov).grid_deflection(xs, xs)

    assert torch.autograd.gradcheck(direct, (kappa,))
    assert torch.autograd.gradcheck(fft, (kappa,))
    # the image is differentiable in kappa: autograd vs a central finite difference
    src = torch.rand(2, 1, 8, 8, dtype=D64, generator=g)

    def loss(k):
        mass = SIE(0.8, 0.05, 0.0) + PixelatedConvergence(k, fov)
        return Lensing(mass, 9, 0.15, 8, 2.0, supersample=2)(src).square().sum()

    value = loss(kappa)
    value.backward()
    eps = 1e-6
    step = torch.zeros_like(kappa)
    step[1, 2, 0] = eps
    fd = (loss(kappa.detach() + step) - loss(kappa.detach() - step)) / (2 * eps)
    assert abs(float(kappa.grad[1, 2, 0]) - float(fd)) < 1e-5 * abs(float(fd)) + 1e-8
    # a requires-grad kappa keeps the lens out of the grid cache
    lens = Lensing(PixelatedConvergence(kappa, fov), 9, 0.15, 8, 2.0)
    assert lens(src).requires_grad and lens(src).grad_fn is not None and not lens._grid_cache


def test_the_ray_cache_follows_kappa_changed_in_place():
    kappa = _kappa(8, N=2, seed=9)
    mass = PixelatedConvergence(kappa, 1.6)
    lens = Lensing(mass, 10, 0.2, 8, 2.5, supersample=2)
    src = torch.rand(2, 1, 8, 8, dtype=D64, generator=torch.Generator().manual_seed(1))
    before = lens(src)
    assert lens._grid_cache and len(mass._kernel_cache) == 1
    torch.testing.assert_close(lens(src), before, rtol=0, atol=0)  # cached
    with torch.no_grad():
        kappa.mul_(1.5).add_(0.2)  # the buffer is the user's tensor
    after = lens(src)
    fresh = Lensing(PixelatedConvergence(kappa.clone(), 1.6), 10, 0.2, 8, 2.5, supersample=2)
    torch.testing.assert_close(after, fresh(src), rtol=1e-13, atol=1e-13)
    assert (after - before).abs().max() > 1e-3
    assert len(mass._kernel_cache) == 1  # kernels depend on the geometry only


def test_bad_inputs_are_one_line_errors():
    cases = [
        (torch.zeros(3, 4), 1.0, "square"),
        (torch.zeros(2, 3, 4), 1.0, "square"),
        (torch.zeros(5), 1.0, "shape \\(n, n\\) or \\(N, n, n\\)"),
        (torch.zeros(1, 2, 3, 3), 1.0, "shape \\(n, n\\) or \\(N, n, n\\)"),
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), 1.0, "not finite"),
        (torch.tensor([[0.0, float("inf")], [0.0, 0.0]]), 1.0, "not finite"),
        (torch.zeros(2, 2), 0.0, "fov"),
        (torch.zeros(2, 2), -1.0, "fov"),
        (torch.zeros(2, 2), float("inf"), "fov"),
        (torch.zeros(0, 2, 2), 1.0, "at least one observation"),
    ]
    for kappa, fov, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            PixelatedConvergence(kappa, fov)
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError):
        PixelatedConvergence(1.0, 1.0)
    with pytest.raises(TypeError):
        PixelatedConvergence(torch.zeros(2, 2), "1")
    m = PixelatedConvergence(np.ones((2, 2)), 1.0)  # arrays become float64 tensors
    assert m.kappa.dtype == D64 and m.num_obs is None
    with pytest.raises(ValueError, match="N = 2"):
        PixelatedConvergence(torch.zeros(2, 3, 3), 1.0).deflection(
            torch.zeros(3, 4), torch.zeros(3, 4)
        )


# ---------------------------------------------------------------------------- other codes
def test_comparison_with_lenstronomy_and_caustics():
    """lenstronomy and caustics treat pixels as point masses and return the deflection at the
    pixel centres; caustics 1.7.1 in addition evaluates it half a pixel off (+h/2 in x and y)."""
    n, fov = 32, 3.2
    h = fov / n
    c = (torch.arange(n, dtype=D64) + 0.5) * h - fov / 2
    X, Y = c[None, :].expand(n, n), c[:, None].expand(n, n)
    kappa = torch.exp(-((X - 0.2) ** 2 + (Y + 0.1) ** 2) / (2 * 0.3**2))
    mass = PixelatedConvergence(kappa, fov)
    ax, ay = mass.grid_deflection(c, c)
    scale = float(torch.hypot(ax, ay).max())

    def point_masses(x, y):  # the point-mass pixel sum, no self term
        dx = x.reshape(-1, 1) - X.reshape(1, -1)
        dy = y.reshape(-1, 1) - Y.reshape(1, -1)
        r2 = dx**2 + dy**2
        w = torch.where(r2 > 1e-20, h * h / (math.pi * r2.clamp_min(1e-20)), 0.0)
        return (w * dx) @ kappa.reshape(-1), (w * dy) @ kappa.reshape(-1)

    def diff(a, b, inner=slice(None)):
        return (
            max(
                float((a[0] - b[0])[inner, inner].abs().max()),
                float((a[1] - b[1])[inner, inner].abs().max()),
            )
            / scale
        )

    convergence_integrals = pytest.importorskip("lenstronomy.LensModel.convergence_integrals")
    fx, fy = convergence_integrals.deflection_from_kappa_grid(kappa.numpy(), h)
    lt = (torch.from_numpy(fx), torch.from_numpy(fy))
    pm = tuple(t.reshape(n, n) for t in point_masses(X, Y))
    assert diff(lt, pm) < 1e-12  # lenstronomy = the point-mass sum at the pixel centres
    assert 1e-4 < diff(lt, (ax, ay)) < 1e-3  # point mass vs square pixels: measured 5.4e-4

    caustics = pytest.importorskip("caustics")
    cosmology = caustics.FlatLambdaCDM(name="cosmo")
    lens = caustics.PixelatedConvergence(
        pixelscale=h, cosmology=cosmology, z_l=0.5, z_s=1.0, convergence_map=kappa, shape=(n, n)
    )
    with torch.no_grad():
        ca = lens.reduced_deflection_angle(X.clone(), Y.clone())
    inner = slice(3, n - 3)  # caustics interpolates its map: stay off the border
    assert diff(ca, (ax, ay), inner) > 0.15  # measured 0.18 of the maximum deflection
    shifted = mass.deflection(X + h / 2, Y + h / 2)
    assert diff(ca, shifted, inner) < 1e-2  # measured 6.1e-3 (point mass vs square)
    pm_shifted = tuple(t.reshape(n, n) for t in point_masses(X + h / 2, Y + h / 2))
    assert diff(ca, pm_shifted, inner) < 1e-5  # measured 6.5e-7: the half-pixel shift


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu():
    kappa = _kappa(16, N=3, seed=11)
    lens = Lensing(SIE(1.0, 0.1, 0.0) + PixelatedConvergence(kappa, 2.4), 24, 0.1, 16, 3.0, 2)
    src = torch.rand(3, 1, 16, 16, dtype=D64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 50, dtype=D64)
    expected, deflection = lens(src), lens.mass.deflection(x, x.flip(-1))
    lens.to("cuda")  # buffers, kappa included, move; the kernels are rebuilt on the device
    for dtype, tol in ((D64, 1e-12), (torch.float32, 1e-5)):
        got = lens(src.to("cuda", dtype))
        assert got.device.type == "cuda" and got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol)
    got = lens.mass.deflection(x.cuda(), x.flip(-1).cuda())
    for g, w in zip(got, deflection):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)
