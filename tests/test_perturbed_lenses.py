"""The perturbed-lens truth generator and the Gaussian-random-field data set."""

from __future__ import annotations

import math

import pytest
import torch

from hierprior.data import make_gaussian_random_fields
from hierprior.physics.lensing import Lensing
from hierprior.populations.perturbed_lenses import PerturbedLenses


def test_draws_are_deterministic_and_follow_the_table():
    gen = PerturbedLenses(num_subhalos=4.0, max_subhalos=10, subhalo_mass=(1e-3, 1e-2))
    a = gen(400, torch.Generator().manual_seed(3))
    b = gen(400, torch.Generator().manual_seed(3))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    count = a["num_subhalos"]
    assert abs(float(count.mean()) - 4.0) < 0.3  # Poisson(4), hardly capped at 10
    present = a["sub_mass"] > 0
    assert torch.equal(present.sum(1).double(), count)
    m = a["sub_mass"][present]
    assert float(m.min()) >= 1e-3 and float(m.max()) <= 1e-2
    # a power law with slope -1.9 puts more than half of the subhalos in the lowest third (log)
    assert float((m < 1e-3 * 10 ** (1 / 3)).double().mean()) > 0.5
    # absent subhalos have zero mass, so zero convergence and deflection
    assert float(a["sub_sigma0"][~present].abs().max()) == 0.0
    # subhalos favour the Einstein ring
    r = torch.hypot(a["sub_x"] - a["center_x"][:, None], a["sub_y"] - a["center_y"][:, None])
    rel = (r / a["theta_E"][:, None])[present]
    assert abs(float(rel.median()) - 1.0) < 0.05
    # the pseudo-Jaffe mass equals the drawn mass: 2 pi sigma0 Ra Rs
    mass = 2 * math.pi * a["sub_sigma0"] * a["sub_Ra"] * a["sub_Rs"]
    torch.testing.assert_close(mass, a["sub_mass"])


def test_mass_models_and_lensing():
    d = PerturbedLenses()(5, torch.Generator().manual_seed(0))
    mass, macro, pert = d.mass(), d.macro(), d.perturbation()
    assert mass.num_obs == macro.num_obs == pert.num_obs == 5
    lens = Lensing(mass, image_size=16, pixel_scale=0.2, source_size=16, source_fov=2.0)
    x, y = lens.image_grid()
    x, y = x.expand(5, 16, 16), y.expand(5, 16, 16)
    ax, ay = mass.deflection(x, y)
    mx, my = macro.deflection(x, y)
    px, py = pert.deflection(x, y)
    torch.testing.assert_close(ax, mx + px)
    torch.testing.assert_close(ay, my + py)
    # the perturbation is small next to the macro model but not negligible
    rel = float(torch.hypot(px, py).mean() / torch.hypot(mx, my).mean())
    assert 1e-3 < rel < 0.2


def test_generator_errors():
    with pytest.raises(ValueError, match="theta_E"):
        PerturbedLenses(theta_E=(-1.0, 1.0))
    with pytest.raises(ValueError, match="axis_ratio"):
        PerturbedLenses(axis_ratio=(0.5, 1.5))
    with pytest.raises(ValueError, match="max_subhalos"):
        PerturbedLenses(max_subhalos=-1)


def test_gaussian_random_fields():
    a = make_gaussian_random_fields(64, 16, amplitude=0.05, scale=2.0, seed=1)
    b = make_gaussian_random_fields(64, 16, amplitude=0.05, scale=2.0, seed=1)
    assert a.shape == (64, 1, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert abs(float(a.std()) - 0.05) < 1e-4

    # smoothing correlates neighbours; white fields do not
    def corr(f):
        return float((f[..., 1:] * f[..., :-1]).mean() / f.pow(2).mean())

    assert corr(a) > 0.8
    assert abs(corr(make_gaussian_random_fields(64, 16, 0.05, 0.0, seed=1))) < 0.05
    with pytest.raises(ValueError, match="amplitude"):
        make_gaussian_random_fields(4, 8, amplitude=-1.0)
