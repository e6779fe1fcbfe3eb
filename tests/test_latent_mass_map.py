"""LatentMassMap (lensed images as a function of delta kappa) and the mass-map population."""

from __future__ import annotations

import pytest
import torch

from hierprior.metrics import residual_chi2
from hierprior.physics import GaussianNoise
from hierprior.physics.lensing import SIE, Lensing, PixelatedConvergence, Shear
from hierprior.physics.lensing.latent import LatentMassMap
from hierprior.populations import PerturbedLenses, simulate_mass_map_population

D64 = torch.float64


def _model(n_obs=3, dtype=D64, scale=0.05, k=1, psf=0.1):
    g = torch.Generator().manual_seed(0)
    macro = SIE(1.0 + 0.2 * torch.rand(n_obs, generator=g, dtype=D64), 0.1, -0.05) + Shear(
        0.02, 0.01
    )
    source = torch.rand(n_obs, 1, 16, 16, generator=g, dtype=D64).to(dtype)
    return LatentMassMap(macro, source, 12, 2.4, 24, 0.1, 2.0, k, psf, scale), macro, source


@pytest.mark.parametrize("k", [1, 2])
def test_equals_lensing_through_the_full_mass_model(k):
    fm, macro, source = _model(k=k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 1, 12, 12, generator=g, dtype=D64)
    y = fm(x)
    assert y.shape == (3, 2, 1, 24, 24)
    for s in range(2):
        mass = macro + PixelatedConvergence(0.05 * x[:, s, 0], 2.4)
        ref = Lensing(mass, 24, 0.1, 16, 2.0, k, 0.1)(source)
        torch.testing.assert_close(y[:, s], ref, rtol=1e-10, atol=1e-12)
    # delta kappa = 0 is the macro model alone
    torch.testing.assert_close(
        fm(torch.zeros(3, 1, 12, 12, dtype=D64)), Lensing(macro, 24, 0.1, 16, 2.0, k, 0.1)(source)
    )


def test_jvp_vjp_and_finite_differences():
    fm, _, _ = _model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 12, 12, generator=g, dtype=D64)
    v = torch.randn(3, 1, 12, 12, generator=g, dtype=D64)
    u = torch.randn(3, 1, 24, 24, generator=g, dtype=D64)
    y, jv = fm.jvp(x, v)
    y2, jtu = fm.vjp(x, u)
    torch.testing.assert_close(y, y2)
    assert abs(float((jv * u).sum() - (v * jtu).sum())) < 1e-9 * float((jv * u).abs().sum())
    eps = 1e-6
    fd = (fm(x + eps * v) - fm(x - eps * v)) / (2 * eps)
    assert float((fd - jv).abs().max()) < 1e-5 * float(jv.abs().max())


def test_slicing_and_errors():
    fm, _, _ = _model()
    x = torch.randn(3, 1, 12, 12, dtype=D64)
    torch.testing.assert_close(fm[[0, 2]](x[[0, 2]]), fm(x)[[0, 2]])
    macro = SIE(1.0, 0.0, 0.0)
    src = torch.rand(1, 16, 16, dtype=D64)
    with pytest.raises(ValueError, match="kappa_fov"):
        LatentMassMap(macro, src, 12, 0.0, 24, 0.1, 2.0)
    with pytest.raises(ValueError, match="kappa_size"):
        LatentMassMap(macro, src, 0, 2.4, 24, 0.1, 2.0)
    with pytest.raises(ValueError, match="source is not finite"):
        LatentMassMap(macro, src * float("nan"), 12, 2.4, 24, 0.1, 2.0)
    with pytest.raises(ValueError, match="event shape"):
        fm(torch.zeros(3, 1, 10, 10, dtype=D64))
    with pytest.raises(ValueError, match="kappa is not finite"):
        fm(torch.full((3, 1, 12, 12), float("nan"), dtype=D64))


def test_population_truth_explains_the_data():
    sigma = 0.01
    lenses = PerturbedLenses(multipole_amplitude=0.015, subhalo_mass=(3e-3, 3e-2))
    kw = dict(noise=GaussianNoise(sigma), lenses=lenses, kappa_size=24, kappa_fov=3.84)
    pop = simulate_mass_map_population(24, seed=3, **kw)
    again = simulate_mass_map_population(24, seed=3, **kw)
    assert torch.equal(pop.y, again.y) and torch.equal(pop.truth, again.truth)
    assert pop.y.shape == (24, 1, 48, 48) and pop.truth.shape == (24, 1, 24, 24)
    with torch.no_grad():
        chi_true = residual_chi2(pop.y, pop.forward(pop.truth), sigma, 1)
        chi_zero = residual_chi2(pop.y, pop.forward(torch.zeros_like(pop.truth)), sigma, 1)
    # the pixelated true delta kappa explains the data to near the noise; delta kappa = 0 not
    assert float(chi_true.mean()) < 1.1
    assert float(chi_zero.mean()) > float(chi_true.mean()) + 0.3
