"""Priors on lens parameters, the declarative lens population and the blind forward model.

Densities against quadrature and scipy, transforms' log-Jacobians against autograd, the
galaxy_shift lenses bit for bit against RandomLens's former arithmetic, and the one-line errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hierprior.physics import GaussianNoise
from hierprior.physics.lensing import (
    SIE,
    AxisRatioAngle,
    BlindLensing,
    Fixed,
    Lensing,
    LensPrior,
    LogNormal,
    MagnitudeAngle,
    Normal,
    Shear,
    TruncatedNormal,
    Uniform,
    ellipticity,
)
from hierprior.populations import RandomLens, simulate_population

pytestmark = pytest.mark.usefixtures("one_thread")

D64 = torch.float64
SCALARS = [
    Uniform(0.5, 2.0),
    Normal(0.1, 0.3),
    LogNormal(0.0, 0.4),
    TruncatedNormal(0.0, 0.2, -0.3, 0.5),
    TruncatedNormal(1.0, 0.5, low=0.2),
]


@pytest.mark.parametrize("prior", SCALARS, ids=repr)
def test_scalar_priors_density_draws_and_transform(prior):
    scipy_stats = pytest.importorskip("scipy.stats")
    lo, hi = prior.box()[0]
    a, b = max(lo, -6.0), min(hi, 12.0)
    v = torch.linspace(a, b, 200_001, dtype=D64)[1:-1]
    density = prior.log_prob(v[:, None]).exp()
    assert abs(float(torch.trapezoid(density, v)) - 1) < 2e-4
    # draws by the inverse CDF: a KS test against the density's own CDF
    u = torch.rand(4000, 1, dtype=D64, generator=torch.Generator().manual_seed(0))
    draws = prior.from_uniform(u)[:, 0]
    cdf = torch.cumulative_trapezoid(density, v)
    cdf = torch.cat([cdf.new_zeros(1), cdf])

    def F(t):
        import numpy as np

        return np.interp(t, v.numpy(), cdf.numpy())

    assert scipy_stats.kstest(draws.numpy(), F).pvalue > 0.01
    # the unconstrained map: round trip and log|dv/dz| = autograd's derivative
    z = prior.to_unconstrained(draws[:50, None])
    back, logdet = prior.from_unconstrained(z)
    torch.testing.assert_close(back[:, 0], draws[:50], rtol=1e-10, atol=1e-12)
    zz = z.clone().requires_grad_(True)
    (dv,) = torch.autograd.grad(prior.from_unconstrained(zz)[0].sum(), zz)
    torch.testing.assert_close(logdet, dv[:, 0].abs().log(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "prior", [AxisRatioAngle((0.5, 1.0)), MagnitudeAngle((0.0, 0.1))], ids=repr
)
def test_pair_priors_density_and_disc_map(prior):
    r = prior.radii()[1]
    # polar quadrature (the density has a 1/r singularity at the origin)
    rad = torch.linspace(0, r, 2001, dtype=D64)[1:-1]
    om = torch.linspace(0, 2 * math.pi, 721, dtype=D64)
    R, W = torch.meshgrid(rad, om, indexing="ij")
    density = prior.log_prob(torch.stack((R * torch.cos(W), R * torch.sin(W)), -1)).exp()
    mass = torch.trapezoid(torch.trapezoid(density * R, om, dim=-1), rad)
    assert abs(float(mass) - 1) < 2e-3  # the trapezoid misses the edge bin (~1e-3)
    z = torch.randn(40, 2, dtype=D64, generator=torch.Generator().manual_seed(1))
    v, logdet = prior.from_unconstrained(z)
    torch.testing.assert_close(prior.to_unconstrained(v), z, rtol=1e-9, atol=1e-9)
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda t: prior.from_unconstrained(t)[0], zi)
            for zi in z
        ]
    )
    torch.testing.assert_close(logdet, torch.linalg.det(jac).abs().log(), rtol=1e-9, atol=1e-9)
    assert (torch.hypot(v[:, 0], v[:, 1]) < r).all()


def _old_random_lens(n, gen, theta_E, axis_ratio, center, shear, psf):
    """RandomLens's draw before the lens population was declarative (the reference)."""
    u = torch.rand((n, 8), generator=gen, dtype=D64)

    def uniform(col, bounds):
        return bounds[0] + (bounds[1] - bounds[0]) * u[:, col]

    e1, e2 = ellipticity(uniform(1, axis_ratio), math.pi * u[:, 2])
    g1, g2 = ellipticity(torch.zeros(n, dtype=D64), math.pi * u[:, 6])
    g = uniform(5, shear)
    params = [uniform(0, theta_E), e1, e2, uniform(3, center), uniform(4, center), g * g1, g * g2]
    return torch.stack([p.float() for p in params], -1), uniform(7, psf)


def test_galaxy_shift_population_draws_the_same_lenses_bit_for_bit():
    cfg = OmegaConf.load("conf/population/galaxy_shift.yaml").forward
    gen = instantiate(cfg)
    new = gen(300, (1, 32, 32), torch.Generator().manual_seed(11))
    old, _ = _old_random_lens(
        300,
        torch.Generator().manual_seed(11),
        cfg.theta_E,
        cfg.axis_ratio,
        cfg.center,
        cfg.shear,
        (0.1, 0.1),
    )
    params = new.mass.components[0], new.mass.components[1]
    got = torch.stack(
        [getattr(params[0], n) for n in SIE.parameter_names]
        + [getattr(params[1], n) for n in Shear.parameter_names],
        -1,
    )
    assert got.dtype == torch.float32
    assert torch.equal(got, old)
    # a per-observation PSF draws from the last column, as before
    per_obs = RandomLens(psf_fwhm=(0.08, 0.12))(20, (1, 16, 16), torch.Generator().manual_seed(2))
    _, fwhm = _old_random_lens(
        20,
        torch.Generator().manual_seed(2),
        (0.9, 1.3),
        (0.6, 1.0),
        (-0.15, 0.15),
        (0.0, 0.05),
        (0.08, 0.12),
    )
    from hierprior.physics.lensing import gaussian_psf

    torch.testing.assert_close(per_obs.blur.psf, gaussian_psf(fwhm, 0.08), rtol=0, atol=0)


BLIND_YAML = """
_target_: hierprior.physics.lensing.LensPrior
components:
  - _target_: hierprior.physics.lensing.SIE.prior
    theta_E: {_target_: hierprior.physics.lensing.Uniform, low: 0.8, high: 1.4}
    e1: {_target_: hierprior.physics.lensing.TruncatedNormal, loc: 0, scale: 0.15,
         low: -0.4, high: 0.4}
    e2: {_target_: hierprior.physics.lensing.TruncatedNormal, loc: 0, scale: 0.15,
         low: -0.4, high: 0.4}
    center_x: {_target_: hierprior.physics.lensing.Normal, loc: 0, scale: 0.1}
    center_y: {_target_: hierprior.physics.lensing.Normal, loc: 0, scale: 0.1}
  - _target_: hierprior.physics.lensing.Shear.prior
    gamma1: {_target_: hierprior.physics.lensing.Uniform, low: -0.05, high: 0.05}
    gamma2: 0.0
"""


def _blind_prior() -> LensPrior:
    return instantiate(OmegaConf.create(BLIND_YAML))


def test_a_lens_population_from_a_config_and_its_density():
    prior = _blind_prior()
    assert prior.names == ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2")
    assert prior.free == prior.names[:-1] and prior.zdim == 6 and prior.columns == 7
    eta = prior.sample(500, torch.Generator().manual_seed(0))
    assert eta.shape == (500, 7) and (eta[:, 6] == 0).all() and prior.inside(eta).all()
    # log p = sum of the marginals; p in z = p(eta) |d eta / dz|
    lp = prior.log_prob(eta)
    manual = (
        Uniform(0.8, 1.4).log_prob(eta[:, :1])
        + TruncatedNormal(0, 0.15, -0.4, 0.4).log_prob(eta[:, 1:2])
        + TruncatedNormal(0, 0.15, -0.4, 0.4).log_prob(eta[:, 2:3])
        + Normal(0, 0.1).log_prob(eta[:, 3:4])
        + Normal(0, 0.1).log_prob(eta[:, 4:5])
        + Uniform(-0.05, 0.05).log_prob(eta[:, 5:6])
    )
    torch.testing.assert_close(lp, manual)
    z = prior.to_unconstrained(eta)
    back, lpz = prior.log_prob_unconstrained(z)
    torch.testing.assert_close(back, eta, rtol=1e-9, atol=1e-12)
    _, logdet = prior.from_unconstrained(z)
    torch.testing.assert_close(lpz, lp + logdet)


def test_one_line_errors():
    with pytest.raises(ValueError, match=r"unknown lens parameter\(s\) \['thetaE'\] for SIE"):
        SIE.prior(thetaE=Uniform(0.5, 1.5), e1=0.0, e2=0.0)
    with pytest.raises(ValueError, match="theta_E has support \\(-inf, inf\\) but theta_E must"):
        SIE.prior(theta_E=Normal(1.0, 0.3), e1=0.0, e2=0.0)
    with pytest.raises(ValueError, match=r"reaches \|\(e1, e2\)\| = 1.13"):
        SIE.prior(theta_E=1.0, e1=Uniform(-0.8, 0.8), e2=Uniform(-0.8, 0.8))
    with pytest.raises(ValueError, match="e1 has two priors"):
        SIE.prior(theta_E=1.0, e1=0.0, ellipticity=AxisRatioAngle())
    with pytest.raises(ValueError, match="needs a prior for theta_E"):
        SIE.prior(e1=0.0, e2=0.0)
    with pytest.raises(ValueError, match="either a lens population"):
        RandomLens(theta_E=(1.0, 1.2), lens=_blind_prior())
    prior = _blind_prior()
    eta = prior.sample(4, torch.Generator().manual_seed(1))
    eta[2, 0] = 1.5
    with pytest.raises(ValueError, match="observation 2: theta_E = 1.5 is outside its prior"):
        prior.check(eta)
    eta = prior.sample(3, torch.Generator().manual_seed(1))
    eta[1, 6] = 0.01  # a fixed parameter moved
    with pytest.raises(ValueError, match="observation 1: gamma2 = 0.01 is outside"):
        BlindLensing(prior, 8, 0.2, 6, 1.6, truth=eta)


def test_blind_lensing_images_slices_and_refusals():
    prior = _blind_prior()
    eta = prior.sample(3, torch.Generator().manual_seed(4))
    blind = BlindLensing(prior, 12, 0.15, 10, 1.8, supersample=2, psf=0.2, truth=eta)
    assert blind.num_obs == 3 and blind.blind
    src = torch.rand(3, 2, 1, 10, 10, dtype=D64, generator=torch.Generator().manual_seed(0))
    truth_lens = blind.truth_forward()
    ref = Lensing(prior.family.fixed(eta), 12, 0.15, 10, 1.8, supersample=2, psf=0.2)
    torch.testing.assert_close(truth_lens(src), ref(src), rtol=0, atol=0)
    # one lens per (observation, sample): image() equals at() over N·S observations
    etas = torch.stack([eta, prior.sample(3, torch.Generator().manual_seed(5))], 1)  # (3, 2, 7)
    img = blind.image(etas, src)
    flat = blind.at(etas)(src.reshape(6, 1, 1, 10, 10)).reshape(3, 2, 1, 12, 12)
    torch.testing.assert_close(img, flat, rtol=1e-12, atol=1e-12)
    # differentiable in the lens parameters: autograd vs a central difference
    p = etas.clone().requires_grad_(True)
    w = torch.randn(3, 2, 1, 12, 12, dtype=D64, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((blind.image(p, src) * w).sum(), p)
    h = 1e-6
    for j in (0, 1, 3, 5):
        step = torch.zeros_like(etas)
        step[1, 0, j] = h
        fd = ((blind.image(etas + step, src) - blind.image(etas - step, src)) * w).sum() / (2 * h)
        assert abs(float(grad[1, 0, j] - fd)) < 1e-5 * max(1.0, abs(float(fd)))
    sub = blind[[2, 0]]
    torch.testing.assert_close(sub.truth, eta[[2, 0]])
    with pytest.raises(ValueError, match="lens of each observation is unknown"):
        blind(src)
    bad = etas.clone()
    bad[2, 1, 0] = -0.2
    with pytest.raises(ValueError, match="observation 2, sample 1: theta_E = -0.2 must be > 0"):
        blind.at(bad)


def test_blind_population_hides_the_lens_and_simulates_the_same_images():
    from hierprior.populations import GaussianSignals

    truth = GaussianSignals(torch.zeros(64, dtype=D64) + 0.5, dtype="float64")
    noise = GaussianNoise(0.01)
    kw = {"image_size": 10, "pixel_scale": 0.2, "source_fov": 1.6, "lens": _blind_prior()}
    known = simulate_population(truth, RandomLens(**kw), noise, num_obs=6, seed=3)
    blind = simulate_population(truth, RandomLens(**kw, blind=True), noise, num_obs=6, seed=3)
    assert isinstance(blind.forward, BlindLensing)
    torch.testing.assert_close(blind.y, known.y, rtol=0, atol=0)
    fam = blind.forward.family
    torch.testing.assert_close(
        fam.parameters_of(known.forward.models[1].mass), blind.forward.truth
    )
    from hierprior.diffusion import GaussianPrior
    from hierprior.posterior import MMPS

    with pytest.raises(ValueError, match="mmps needs a known forward model"):
        MMPS(4).sample(
            GaussianPrior(torch.zeros(64, dtype=D64), torch.eye(64, dtype=D64)),
            blind.forward,
            blind.noise,
            blind.y,
        )
    assert Fixed(0.0).zdim == 0
