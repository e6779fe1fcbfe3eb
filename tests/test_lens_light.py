"""The lens galaxy's light (hierprior.physics.lensing.light) against lenstronomy 1.14.2.

Surface brightness of ``SERSIC_ELLIPSE`` and ``MULTI_GAUSSIAN_ELLIPSE`` to 1e-12 relative
(float64); images with supersampling and an asymmetric PSF kernel equal lenstronomy's
``ImageModel`` (lens light only, ``supersampling_convolution=False``) divided by the pixel area
to 1e-10 of the peak; weighted least-squares amplitudes equal the dense solve; gradients flow
to the non-linear parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hierprior.physics import CorrelatedNoise, GaussianNoise, spectrum_from_autocovariance
from hierprior.physics.lensing import (
    Lensing,
    LensLight,
    LightSum,
    MultiGaussian,
    Sersic,
    gaussian_psf,
)

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.Data.imaging_data import ImageData  # noqa: E402
from lenstronomy.Data.psf import PSF  # noqa: E402
from lenstronomy.ImSim.image_model import ImageModel  # noqa: E402
from lenstronomy.LightModel.light_model import LightModel  # noqa: E402

SERSIC = [
    {
        "R_sersic": 0.9,
        "n_sersic": 4.0,
        "e1": 0.12,
        "e2": -0.05,
        "center_x": 0.03,
        "center_y": -0.02,
    },
    {"R_sersic": 0.3, "n_sersic": 0.8, "e1": -0.3, "e2": 0.25, "center_x": -0.2, "center_y": 0.1},
    {"R_sersic": 2.5, "n_sersic": 7.5, "e1": 0.0, "e2": 0.4, "center_x": 0.0, "center_y": 0.0},
]


def as_params(kwargs: dict, names) -> torch.Tensor:
    return torch.tensor([kwargs[n] for n in names], dtype=torch.float64)


@pytest.mark.parametrize("kw", SERSIC)
def test_sersic_surface_brightness_equals_lenstronomy(kw):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-3, 3, (2, 500))
    x[0], y[0] = kw["center_x"], kw["center_y"]  # the centre (the floor of R)
    ref = LightModel(["SERSIC_ELLIPSE"]).surface_brightness(x, y, [{**kw, "amp": 2.5}])
    got = Sersic().surface_brightness(
        as_params(kw, Sersic.parameter_names),
        torch.tensor([2.5], dtype=torch.float64),
        torch.from_numpy(x),
        torch.from_numpy(y),
    )
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=0)


def test_multi_gaussian_equals_lenstronomy():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-2, 2, (2, 400))
    sigmas, amps = [0.05, 0.2, 0.7, 2.0], [3.0, 1.5, -0.2, 0.8]
    kw = {"e1": 0.2, "e2": -0.1, "center_x": 0.1, "center_y": 0.05}
    ref = LightModel(["MULTI_GAUSSIAN_ELLIPSE"]).surface_brightness(
        x, y, [{**kw, "amp": amps, "sigma": sigmas}]
    )
    mge = MultiGaussian(sigmas)
    got = mge.surface_brightness(
        as_params(kw, mge.parameter_names),
        torch.tensor(amps, dtype=torch.float64),
        torch.from_numpy(x),
        torch.from_numpy(y),
    )
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-14)
    assert mge.num_amplitudes == 4


@pytest.mark.parametrize("supersample", [1, 3])
def test_image_equals_lenstronomy_image_model(supersample):
    n, p = 24, 0.07
    rng = np.random.default_rng(2)
    kernel = rng.uniform(0.1, 1.0, (5, 5)) * gaussian_psf(0.15, p, 5).numpy()
    kernel[2, 2] = kernel.max() * 1.5
    kernel /= kernel.sum()
    data = ImageData(
        image_data=np.zeros((n, n)),
        ra_at_xy_0=-(n - 1) / 2 * p,
        dec_at_xy_0=-(n - 1) / 2 * p,
        transform_pix2angle=np.eye(2) * p,
    )
    profiles = ["SERSIC_ELLIPSE", "SERSIC_ELLIPSE"]
    model = ImageModel(
        data,
        PSF(psf_type="PIXEL", kernel_point_source=kernel),
        lens_light_model_class=LightModel(profiles),
        kwargs_numerics={"supersampling_factor": supersample, "supersampling_convolution": False},
    )
    kwargs = [{**SERSIC[0], "amp": 3.0}, {**SERSIC[1], "amp": 7.0}]
    ref = model.image(kwargs_lens_light=kwargs, source_add=False) / p**2
    light = LensLight(Sersic() + Sersic(), n, p, supersample, torch.from_numpy(kernel))
    params = torch.cat([as_params(k, Sersic.parameter_names) for k in kwargs])
    got = light(params[None], torch.tensor([[3.0, 7.0]], dtype=torch.float64))
    assert got.shape == (1, 1, n, n)
    np.testing.assert_allclose(got[0, 0].numpy(), ref, rtol=0, atol=1e-10 * abs(ref).max())
    # the grid is Lensing's
    lens = Lensing(None, n, p, 8, 1.0, supersample)
    for a, b in zip(light.image_grid(), lens.image_grid(supersample)):
        torch.testing.assert_close(a, b)


def test_light_sum_names_shapes_and_per_observation_psf():
    s = LightSum(Sersic(), MultiGaussian([0.1, 0.3]))
    assert s.parameter_names[:2] == ("R_sersic_0", "n_sersic_0") and s.num_amplitudes == 3
    assert s.parameter_names[-1] == "center_y_1" and s.num_parameters == 10
    psf = gaussian_psf(torch.tensor([0.1, 0.2]), 0.05, 7)
    light = LensLight(s, 16, 0.05, 2, psf)
    assert light.num_obs == 2
    g = torch.Generator().manual_seed(0)
    params = torch.tensor(
        [[0.5, 2.0, 0.1, 0.0, 0.0, 0.0, 0.1, 0.1, 0.0, 0.0]], dtype=torch.float64
    ).expand(2, 3, 10)
    amps = torch.rand(2, 3, 3, generator=g, dtype=torch.float64)
    out = light(params, amps)
    assert out.shape == (2, 3, 1, 16, 16)
    # observation 1 has the wider PSF: a lower peak
    assert out[1, 0].max() < out[0, 0].max()
    parts = s.split(params)
    assert parts[0].shape == (2, 3, 6) and parts[1].shape == (2, 3, 4)
    with pytest.raises(ValueError, match="takes params"):
        light(params[..., :9], amps)
    with pytest.raises(ValueError, match="amplitudes must have shape"):
        light(params, amps[..., :2])


@pytest.mark.parametrize("noise_kind", ["white", "correlated"])
def test_solved_amplitudes_are_the_weighted_least_squares(noise_kind):
    n, p = 12, 0.1
    g = torch.Generator().manual_seed(3)
    light = LensLight(Sersic() + MultiGaussian([0.15, 0.4]), n, p, 2, 0.2)
    params = torch.tensor(
        [
            [0.6, 3.0, 0.1, -0.1, 0.05, 0.0, 0.2, 0.1, 0.0, 0.0],
            [0.4, 1.5, 0.0, 0.2, -0.1, 0.1, 0.0, 0.0, 0.1, 0.0],
        ],
        dtype=torch.float64,
    )
    truth = torch.tensor([[2.0, 1.0, 0.5], [1.0, 3.0, -0.4]], dtype=torch.float64)
    clean = light(params, truth)
    if noise_kind == "white":
        noise = GaussianNoise(
            0.05 + 0.1 * torch.rand(2, 1, n, n, generator=g, dtype=torch.float64)
        )
    else:
        acf = torch.tensor(
            [[0.0, 0.15, 0.0], [0.25, 1.0, 0.25], [0.0, 0.15, 0.0]], dtype=torch.float64
        )
        noise = CorrelatedNoise(0.01 * spectrum_from_autocovariance(acf, (n, n)))
    np.testing.assert_allclose(light.solve_amplitudes(params, clean, noise), truth, rtol=1e-8)
    y = clean + noise.sample((2, 1, n, n), generator=g, dtype=torch.float64)
    a = light.solve_amplitudes(params, y, noise)
    # the dense weighted least squares
    b = light.basis(params).reshape(2, 3, -1)
    for i in range(2):
        if noise_kind == "white":
            w = torch.diag(noise.sigma[i].flatten() ** -2)
        else:
            eye = torch.eye(n * n, dtype=torch.float64).reshape(-1, 1, n, n)
            w = noise.inv_cov_action(eye).reshape(n * n, n * n)
        ref = torch.linalg.solve(b[i] @ w @ b[i].T, b[i] @ w @ y[i].flatten())
        torch.testing.assert_close(a[i], ref, rtol=1e-9, atol=1e-12)
    # S samples of the other components: params (N, S, d), target (N, S, 1, n, n)
    a2 = light.solve_amplitudes(
        params[:, None].expand(2, 4, 10), y[:, None].expand(2, 4, 1, n, n), noise
    )
    torch.testing.assert_close(a2, a[:, None].expand(2, 4, 3))
    mean, cov = light.amplitude_posterior(params, y, noise)
    torch.testing.assert_close(mean, a)
    assert cov.shape == (2, 3, 3) and bool((torch.linalg.eigvalsh(cov) > 0).all())
    draws = light.sample_amplitudes(
        params[:, None].expand(2, 400, 10),
        y[:, None].expand(2, 400, 1, n, n),
        noise,
        torch.Generator().manual_seed(4),
    ).transpose(0, 1)
    assert ((draws.mean(0) - mean).abs() < 4 * cov.diagonal(dim1=-2, dim2=-1).sqrt() / 20).all()


def test_gradients_flow_to_the_non_linear_parameters():
    light = LensLight(Sersic(), 8, 0.1, 2, 0.25)
    noise = GaussianNoise(0.1)
    params = torch.tensor([[0.5, 2.5, 0.1, 0.05, 0.02, -0.03]], dtype=torch.float64)
    y = light(params, torch.tensor([[1.0]], dtype=torch.float64))
    start = (params + 0.03).requires_grad_(True)

    def loglik(eta):
        a = light.solve_amplitudes(eta, y, noise)
        return noise.log_prob(y, light(eta, a))

    assert torch.autograd.gradcheck(loglik, (start,), eps=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(loglik(start).sum(), start)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_light_needs_a_gaussian_noise_model():
    light = LensLight(Sersic(), 8, 0.1)

    class NotGaussian:
        gaussian = False

    with pytest.raises(TypeError, match="Gaussian noise model"):
        light.solve_amplitudes(
            torch.ones(1, 6, dtype=torch.float64), torch.zeros(1, 1, 8, 8), NotGaussian()
        )
    with pytest.raises(ValueError, match="sigmas"):
        MultiGaussian([0.1, -1.0])


def test_end_to_end_lensed_source_plus_light_plus_correlated_noise():
    """y = Lensing(SIE + shear) source + LensLight + correlated noise: the light amplitudes are
    recovered within their posterior sd and chi^2 under the noise model is ~ the pixel count."""
    from hierprior.physics.lensing import SIE, Shear

    n, p = 41, 0.05
    g = torch.Generator().manual_seed(7)
    psf = gaussian_psf(0.1, p, 9)
    lensing = Lensing(SIE(0.7, 0.1, -0.05) + Shear(0.02, 0.01), n, p, 32, 1.2, 2, psf)
    sx, sy = lensing.source_grid()
    source = torch.exp(-((sx - 0.05) ** 2 + sy**2) / (2 * 0.08**2))[None, None]
    light = LensLight(Sersic() + Sersic(), n, p, 2, psf)
    eta = torch.tensor(
        [[0.8, 4.0, 0.1, 0.0, 0.0, 0.0, 0.15, 1.0, 0.05, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    amps = torch.tensor([[0.3, 2.0]], dtype=torch.float64)
    acf = torch.tensor(
        [[0.01, 0.07, 0.01], [0.25, 1.0, 0.25], [0.01, 0.07, 0.01]], dtype=torch.float64
    )
    noise = CorrelatedNoise(0.02**2 * spectrum_from_autocovariance(acf, (n, n)))
    clean = lensing(source) + light(eta, amps)
    y = clean + noise.sample((1, 1, n, n), generator=g, dtype=torch.float64)
    target = y - lensing(source)
    mean, cov = light.amplitude_posterior(eta, target, noise)
    z = (mean - amps) / cov.diagonal(dim1=-2, dim2=-1).sqrt()
    assert (z.abs() < 4).all()
    r = y - lensing(source) - light(eta, mean)
    chi2 = float((noise.whiten(r) ** 2).sum())
    dof = n * n - 2
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof)
