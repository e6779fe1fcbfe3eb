"""Subhalo (pseudo-Jaffe) and multipole mass components against lenstronomy 1.14.2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hierprior.physics.lensing import SIE, Lensing, Shear
from hierprior.physics.lensing.substructure import Multipole, PseudoJaffe, pseudo_jaffe_from_mass

D64 = torch.float64


def _points(seed=0, n=400):
    g = np.random.default_rng(seed)
    x, y = g.uniform(-2, 2, n), g.uniform(-2, 2, n)
    keep = np.hypot(x - 0.3, y + 0.2) > 0.05  # away from the profiles' centres
    return x[keep], y[keep]


def test_pseudo_jaffe_matches_lenstronomy():
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel

    x, y = _points()
    kw = dict(sigma0=0.8, Ra=0.05, Rs=0.6, center_x=0.3, center_y=-0.2)
    ref = LensModel(["PJAFFE"])
    ax, ay = ref.alpha(x, y, [kw])
    kappa = ref.kappa(x, y, [kw])
    ours = PseudoJaffe(**kw)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    bx, by = ours.deflection(tx, ty)
    scale = np.abs(np.concatenate([ax, ay])).max()
    assert np.abs(bx.numpy() - ax).max() < 1e-10 * scale
    assert np.abs(by.numpy() - ay).max() < 1e-10 * scale
    k = ours.convergence(tx, ty).numpy()
    # lenstronomy's kappa is half the trace of its analytic Hessian
    assert np.abs(k - kappa).max() < 1e-8 * np.abs(kappa).max()
    # swapped radii are sorted, as lenstronomy does
    sx, _ = PseudoJaffe(0.8, 0.6, 0.05, 0.3, -0.2).deflection(tx, ty)
    torch.testing.assert_close(sx, bx)


@pytest.mark.parametrize("m", [3, 4])
def test_multipole_matches_lenstronomy(m):
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel

    x, y = _points(1)
    kw = dict(m=m, a_m=0.02, phi_m=0.4, center_x=0.3, center_y=-0.2)
    ref = LensModel(["MULTIPOLE"])
    ax, ay = ref.alpha(x, y, [kw])
    kappa = ref.kappa(x, y, [kw])
    ours = Multipole(**kw)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    bx, by = ours.deflection(tx, ty)
    scale = np.abs(np.concatenate([ax, ay])).max()
    assert np.abs(bx.numpy() - ax).max() < 1e-10 * scale
    assert np.abs(by.numpy() - ay).max() < 1e-10 * scale
    k = ours.convergence(tx, ty).numpy()
    assert np.abs(k - kappa).max() < 1e-8 * np.abs(kappa).max()


@pytest.mark.parametrize(
    "model",
    [PseudoJaffe(0.5, 0.02, 0.4, 0.1, 0.05), Multipole(4, 0.03, 0.3, 0.1, 0.05)],
)
def test_convergence_is_half_the_divergence(model):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, generator=g, dtype=D64) * 3 - 1.5
    y = torch.rand(300, generator=g, dtype=D64) * 3 - 1.5
    keep = torch.hypot(x - 0.1, y - 0.05) > 0.1
    x, y, h = x[keep], y[keep], 1e-5
    div = (model.deflection(x + h, y)[0] - model.deflection(x - h, y)[0]) / (2 * h) + (
        model.deflection(x, y + h)[1] - model.deflection(x, y - h)[1]
    ) / (2 * h)
    torch.testing.assert_close(model.convergence(x, y), 0.5 * div, rtol=1e-6, atol=1e-7)


def test_total_mass_and_batching():
    Rs, Ra = 0.5, 0.01
    sigma0 = pseudo_jaffe_from_mass(0.02, Rs, Ra)
    pj = PseudoJaffe(sigma0, Ra, Rs)
    # far away the deflection is that of a point of the total mass: M / (pi r)
    r = torch.tensor([400.0], dtype=D64)
    ax, _ = pj.deflection(r, torch.zeros_like(r))
    assert abs(float(ax) - 0.02 / (math.pi * 400.0)) < 1e-3 * 0.02 / (math.pi * 400.0)
    # per-observation parameters, slicing, sums, ray tracing through Lensing
    n = 3
    sub = PseudoJaffe(torch.full((n,), 0.3), 0.02, 0.3, torch.tensor([0.0, 0.5, -0.5]), 0.8)
    mp = Multipole(4, torch.tensor([0.01, 0.0, -0.02]), torch.zeros(n))
    mass = SIE(torch.ones(n), 0.1, 0.0) + Shear(0.01, 0.0) + sub + mp
    assert mass.num_obs == n and mass.elementwise
    assert mp[1:].m == 4 and mp[1:].num_obs == 2
    lens = Lensing(mass, image_size=8, pixel_scale=0.3, source_size=8, source_fov=2.0)
    bx, by = lens.ray_trace()
    x, y = lens.image_grid()
    ex, ey = mass.ray_shoot(x.expand(n, 8, 8), y.expand(n, 8, 8))
    torch.testing.assert_close(bx, ex, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by, ey, rtol=1e-12, atol=1e-12)
    xs = torch.zeros(2, 4, dtype=D64)
    s2 = mass[[0, 2]]
    torch.testing.assert_close(
        s2.deflection(xs, xs)[0],
        mass.deflection(torch.zeros(n, 4, dtype=D64), torch.zeros(n, 4, dtype=D64))[0][[0, 2]],
    )


def test_errors():
    with pytest.raises(ValueError, match="Ra != Rs"):
        PseudoJaffe(0.1, 0.3, 0.3)
    with pytest.raises(ValueError, match="Ra must be > 0"):
        PseudoJaffe(0.1, -0.1, 0.3)
    with pytest.raises(ValueError, match="integer >= 2"):
        Multipole(1, 0.01, 0.0)
    with pytest.raises(ValueError, match="not finite"):
        Multipole(3, float("nan"), 0.0)
