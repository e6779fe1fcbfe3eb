"""Mass models with parameters at call time (ParametricMass) and the ray cache that cannot go
stale: against lenstronomy 1.14.2, the fixed-lens models, autograd and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierprior.physics.lensing import (
    SIE,
    SIS,
    Component,
    Lensing,
    ParametricMass,
    PixelatedConvergence,
    PointMass,
    Shear,
)
from hierprior.physics.lensing.substructure import Multipole, PseudoJaffe

pytestmark = pytest.mark.usefixtures("one_thread")

D64 = torch.float64


def _params(n: int, s: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if s is None else (n, s)
    lo = torch.tensor([0.6, -0.3, -0.3, -0.2, -0.2, -0.08, -0.08], dtype=D64)
    hi = torch.tensor([1.6, 0.3, 0.3, 0.2, 0.2, 0.08, 0.08], dtype=D64)
    return lo + (hi - lo) * torch.rand(*lead, 7, generator=g, dtype=D64)


def test_names_follow_lenstronomy_and_duplicates_get_labels():
    fam = ParametricMass(SIE, Shear)
    assert fam.names == ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2")
    assert fam.dim == 7 and fam.index("gamma2") == 6
    two = ParametricMass(SIE, SIS, SIS)
    assert two.names[:2] == ("sie.theta_E", "e1") and "sis_2.theta_E" in two.names
    assert "sis.center_x" in two.names
    with pytest.raises(ValueError, match="unknown lens parameter 'thetaE'"):
        fam.index("thetaE")
    with pytest.raises(TypeError, match="no pure deflection_at"):
        ParametricMass(PixelatedConvergence)
    with pytest.raises(ValueError, match="missing"):
        ParametricMass(Multipole)
    with pytest.raises(ValueError, match="integer >= 2"):
        ParametricMass(Component(Multipole, m=1))


def test_sie_shear_at_a_parameter_tensor_vs_lenstronomy():
    lm = pytest.importorskip("lenstronomy.LensModel.lens_model")
    sie_shear = lm.LensModel(["SIE", "SHEAR"])
    epl_shear = lm.LensModel(["EPL", "SHEAR"])
    fam = ParametricMass(SIE, Shear)
    eta = _params(3, 2)  # (N, S, d): two lenses per observation
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 2, 50, generator=g, dtype=D64) * 4 - 2
    y = torch.rand(3, 2, 50, generator=g, dtype=D64) * 4 - 2
    ax, ay = fam.deflection(eta, x, y)
    bx, by = fam.ray_shoot(eta, x, y)
    kappa = fam.convergence(eta, x, y)
    assert ax.shape == (3, 2, 50) and kappa.shape == (3, 2, 50)
    for i in range(3):
        for s in range(2):
            kw = dict(zip(fam.names, eta[i, s].tolist()))
            kwargs = [
                {k: kw[k] for k in ("theta_E", "e1", "e2", "center_x", "center_y")},
                {"gamma1": kw["gamma1"], "gamma2": kw["gamma2"]},
            ]
            xi, yi = x[i, s].numpy(), y[i, s].numpy()
            lax, lay = sie_shear.alpha(xi, yi, kwargs)
            scale = np.hypot(lax, lay).max()
            assert np.abs(ax[i, s].numpy() - lax).max() < 1e-8 * scale
            assert np.abs(ay[i, s].numpy() - lay).max() < 1e-8 * scale
            lbx, lby = sie_shear.ray_shooting(xi, yi, kwargs)
            assert np.abs(bx[i, s].numpy() - lbx).max() < 1e-8 * scale
            assert np.abs(by[i, s].numpy() - lby).max() < 1e-8 * scale
            kwargs[0]["gamma"] = 2.0
            lk = epl_shear.kappa(xi, yi, kwargs)
            np.testing.assert_allclose(kappa[i, s].numpy(), lk, rtol=1e-12)


def test_fixed_models_are_the_family_at_their_parameters():
    fam = ParametricMass(SIE, Shear)
    eta = _params(4)
    mass = fam.fixed(eta)
    torch.testing.assert_close(fam.parameters_of(mass), eta, rtol=0, atol=0)
    x = torch.rand(4, 30, dtype=D64) * 3 - 1.5
    y = torch.rand(4, 30, dtype=D64) * 3 - 1.5
    for a, b in zip(mass.deflection(x, y), fam.deflection(eta, x, y)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one shared lens from (d,) and lenses of (N, S, d), flattened to N·S
    shared = fam.fixed(eta[0])
    assert shared.num_obs is None
    for a, b in zip(shared.deflection(x[0], y[0]), fam.deflection(eta[0], x[0], y[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fam.fixed(_params(2, 3)).num_obs == 6
    # components with options, and profiles other than SIE + shear
    other = ParametricMass(SIS, PointMass, Component(Multipole, m=4), PseudoJaffe)
    p = torch.tensor(
        [1.0, 0.1, -0.1, 0.2, 0.3, 0.0, 0.01, 0.3, 0.1, 0.0, 0.05, 0.001, 0.5, -0.4, 0.2],
        dtype=D64,
    )
    assert other.dim == len(p)
    fixed = other.fixed(p)
    for a, b in zip(fixed.deflection(x[0], y[0]), other.deflection(p, x[0], y[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(
        fixed.convergence(x[0], y[0]), other.convergence(p, x[0], y[0]), rtol=0, atol=0
    )


def test_grid_deflection_and_gradients_flow_to_the_parameters():
    fam = ParametricMass(SIE, Shear)
    eta = _params(2, 3, seed=2)
    xs = torch.linspace(-1.5, 1.5, 9, dtype=D64)
    gx, gy = fam.grid_deflection(eta, xs, xs)
    assert gx.shape == (2, 3, 9, 9)
    X = xs[None, :].expand(9, 9).expand(2, 3, 9, 9)
    Y = xs[:, None].expand(9, 9).expand(2, 3, 9, 9)
    fx, fy = fam.deflection(eta, X, Y)
    torch.testing.assert_close(gx, fx, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gy, fy, rtol=1e-14, atol=1e-14)
    x = torch.rand(2, 3, 7, dtype=D64) * 2 - 1 + 0.05

    def f(p):
        ax, ay = fam.deflection(p, x, x.flip(-1))
        return ax + 2 * ay

    assert torch.autograd.gradcheck(f, (eta.clone().requires_grad_(True),))


def test_physical_range_lines_name_the_rows():
    fam = ParametricMass(SIE, Shear)
    eta = _params(3)
    assert fam.outside_physical_range(eta) == []
    eta[1, 0] = -0.1
    eta[2, 1:3] = torch.tensor([0.8, 0.7], dtype=D64)
    lines = fam.outside_physical_range(eta)
    assert lines == [
        "row 1: theta_E = -0.1 must be > 0",
        "row 2: |(e1, e2)| = 1.063 must be < 1",
    ]
    with pytest.raises(ValueError, match="shape \\(\\*lead, d\\) with d = 7"):
        fam.deflection(eta[:, :5], torch.zeros(3, 2), torch.zeros(3, 2))


# ------------------------------------------------------------- the ray cache cannot go stale


def _lens_and_source():
    mass = SIE(1.0, 0.1, -0.05, 0.02, 0.0) + Shear(0.01, 0.02)
    lens = Lensing(mass, 16, 0.12, 12, 1.8, supersample=2, psf=0.15)
    src = torch.rand(1, 12, 12, dtype=D64, generator=torch.Generator().manual_seed(0))
    return mass, lens, src


def _fresh(mass):
    return Lensing(mass, 16, 0.12, 12, 1.8, supersample=2, psf=0.15)


def test_reassigned_parameter_retraces_the_rays():
    mass, lens, src = _lens_and_source()
    before = lens(src)
    assert lens._grid_cache  # traced once and cached
    sie = mass.components[0]
    sie.theta_E = torch.tensor(0.5, dtype=D64)  # reassign the buffer (old code: stale rays)
    after = lens(src)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _fresh(mass)(src), rtol=0, atol=0)
    mass.components[1].gamma1 = torch.tensor(-0.04, dtype=D64)
    torch.testing.assert_close(lens(src), _fresh(mass)(src), rtol=0, atol=0)


def test_in_place_change_and_swapped_mass_retrace_and_equal_values_reuse():
    mass, lens, src = _lens_and_source()
    lens(src)
    cached = lens._grid_cache[(D64, torch.device("cpu"))][1]
    with torch.no_grad():
        mass.components[0].e1.add_(0.1)
    torch.testing.assert_close(lens(src), _fresh(mass)(src), rtol=0, atol=0)
    assert lens._grid_cache[(D64, torch.device("cpu"))][1] is not cached
    lens.mass = SIE(0.9, 0.0, 0.1) + Shear(0.0, 0.0)
    torch.testing.assert_close(lens(src), _fresh(lens.mass)(src), rtol=0, atol=0)
    # the same values in new tensors reuse the rays (no retrace)
    grid = lens._grid_cache[(D64, torch.device("cpu"))][1]
    lens.mass.components[0].theta_E = torch.tensor(0.9, dtype=D64)
    lens(src)
    assert lens._grid_cache[(D64, torch.device("cpu"))][1] is grid
