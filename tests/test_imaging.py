"""hierprior.data.imaging: FITS ingestion, cut-outs, PSF preparation, masks, the bundled lenses.

Every bad input of the issue has its one-line error: a missing file, a PSF of even size or
zero sum (or not centred), shapes that disagree, NaN in unmasked pixels, a noise value <= 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits

from hierprior.data import (
    SLACS_LENSES,
    ImagingData,
    load_imaging,
    load_slacs,
    prepare_psf,
    slacs_info,
)


def _psf(size: int = 7, sigma: float = 1.2) -> np.ndarray:
    r = np.arange(size) - size // 2
    return np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(21, 25))
    noise = np.full((21, 25), 0.5)
    noise[0, 0] = 1e8  # the sentinel
    paths = {}
    for name, a in (("image", image), ("noise", noise), ("psf", 3.0 * _psf())):
        paths[name] = tmp_path / f"{name}.fits"
        fits.PrimaryHDU(a).writeto(paths[name])
    return paths, image, noise


def test_load_from_fits_reads_checks_and_masks(files):
    paths, image, noise = files
    data = load_imaging(paths["image"], paths["noise"], paths["psf"], 0.05)
    assert isinstance(data, ImagingData) and data.shape == (21, 25)
    assert data.image.dtype == torch.float64 and data.psf.shape == (7, 7)
    assert torch.isclose(data.psf.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert not data.observed[0, 0] and int(data.observed.sum()) == 21 * 25 - 1
    assert data.image[0, 0] == 0 and data.noise_map[0, 0] == 0.5  # finite placeholders
    np.testing.assert_allclose(data.image[1:, 1:].numpy(), image[1:, 1:])
    # the grid is centred and follows Lensing's convention (x along columns, y along rows)
    x, y = data.grid()
    assert x[0, 1] > x[0, 0] and y[1, 0] > y[0, 0]
    assert torch.isclose(x[0, 0], torch.tensor(-25 * 0.05 / 2 + 0.025, dtype=torch.float64))


def test_cutout_crop_and_masks(files):
    paths, image, noise = files
    data = load_imaging(
        paths["image"], paths["noise"], paths["psf"], 0.05, center=(10, 12), size=9, psf_size=5
    )
    assert data.shape == (9, 9) and data.origin == (6, 8) and data.psf.shape == (5, 5)
    np.testing.assert_allclose(data.image.numpy(), image[6:15, 8:17])
    assert torch.isclose(data.psf.sum(), torch.tensor(1.0, dtype=torch.float64))
    x, y = data.grid()
    assert x[4, 4] == 0 and y[4, 4] == 0  # an odd cut-out is centred on its centre pixel
    # a given mask (True = ignore), a NaN masked on request
    mask = np.zeros((21, 25), dtype=bool)
    mask[5, 5] = True
    bad = image.copy()
    bad[7, 7] = np.nan
    data = load_imaging(bad, noise, _psf(), 0.05, mask=mask, mask_nan=True)
    assert not data.observed[5, 5] and not data.observed[7, 7] and data.observed[6, 6]
    assert torch.isfinite(data.image).all() and torch.isfinite(data.noise_map).all()
    # a NaN outside the cut-out does not matter
    load_imaging(bad, noise, _psf(), 0.05, center=(15, 15), size=5)
    sub = data.cutout((10, 10), 5).with_mask(np.eye(5))
    assert int(sub.observed.sum()) == 20


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"psf": _psf(6)}, ValueError, "odd sizes"),
        ({"psf": _psf() - _psf().mean()}, ValueError, "sums to"),
        ({"psf": np.roll(_psf(), 1, axis=0)}, ValueError, "not centred"),
        ({"noise_map": np.full((20, 25), 0.5)}, ValueError, "different shapes"),
        ({"mask": np.zeros((21, 24))}, ValueError, "different shapes"),
        ({"image": "nan"}, ValueError, "NaN or infinite values in unmasked pixels"),
        ({"noise_map": "zero"}, ValueError, "values <= 0 in unmasked pixels"),
        ({"image": "missing.fits"}, FileNotFoundError, "image file not found"),
        ({"psf_size": 4}, ValueError, "psf_size must be odd"),
        ({"pixel_scale": 0.0}, ValueError, "pixel_scale"),
        ({"size": 30}, ValueError, "leaves the 21 x 25 image"),
    ],
)
def test_bad_inputs_fail_in_one_line(tmp_path, change, error, match):
    rng = np.random.default_rng(1)
    kwargs = {
        "image": rng.normal(size=(21, 25)),
        "noise_map": np.full((21, 25), 0.5),
        "psf": _psf(),
        "pixel_scale": 0.05,
    }
    for key, value in change.items():
        if isinstance(value, str) and value in ("nan", "zero"):
            value, kwargs[key] = kwargs[key].copy(), None
            value[3, 4] = np.nan if change[key] == "nan" else 0.0
        elif isinstance(value, str):
            value = tmp_path / value
        kwargs[key] = value
    with pytest.raises(error, match=match) as info:
        load_imaging(**kwargs)
    assert "\n" not in str(info.value)


def test_prepare_psf_crops_around_the_centre():
    psf = _psf(9, 2.0)
    out = prepare_psf(psf, 5)
    np.testing.assert_allclose(out, psf[2:7, 2:7] / psf[2:7, 2:7].sum())


@pytest.mark.parametrize("name", SLACS_LENSES)
def test_bundled_lenses_load_offline(name):
    data = load_slacs(name)
    assert data.shape == (121, 121) and data.pixel_scale == 0.05
    assert data.psf.shape == (61, 61) and bool(data.observed.all())
    assert torch.isclose(data.psf.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert data.origin == (80, 80) and data.meta["short"] == name.replace("slacs", "J")
    info = slacs_info(name)
    assert info["cutout"]["size"] == 121 and "sha256" in info
    sky = data.sky
    assert sky is not None and sky.image.shape[1:] == (24, 24) and len(sky) >= 40
    assert 10 <= int(sky.held_out.sum()) < len(sky) // 2
    r = sky.residuals()
    assert r.shape[0] == int((~sky.held_out).sum())
    assert abs(float(r.mean())) < 1e-12  # each plane fit leaves a zero-mean residual
    # the blank-sky scatter is below the noise map's blank-sky level (the map overstates it)
    assert 0.5 < float(r.std()) / sky.noise_level() < 0.9
    # the lens sits at the centre: the lens light (J1430) or the ring (J2303) around it
    small = load_slacs(name, size=61, psf_size=31)
    assert small.shape == (61, 61) and small.psf.shape == (31, 31)
    assert small.origin == (110, 110)


def test_bundled_lens_errors():
    with pytest.raises(ValueError, match="unknown bundled lens"):
        load_slacs("slacs0000+0000")
    with pytest.raises(ValueError, match="size must be odd"):
        load_slacs(SLACS_LENSES[0], size=60)


def test_noise_from_the_blank_sky():
    from hierprior.data import correlated_noise_from_sky, sky_noise_realisations, sky_noise_unit

    data = load_slacs("slacs2303+1422", size=41)
    sky = data.sky
    u = sky.relative_residuals(held_out=False)
    assert u.shape == sky.residuals(held_out=False).shape
    noise = correlated_noise_from_sky(data)
    assert noise.obs_shape == (1, 41, 41) and noise.num_obs is None
    # the blank sky's level: the model's marginal sd there is the sky scatter, below the map's
    level = sky.noise_level()
    sd = noise.std(torch.zeros(1, 1, 41, 41, dtype=torch.float64))[0, 0]
    np.testing.assert_allclose(sd * level / data.noise_map, float(u.std()), rtol=0.02)
    assert float(u.std()) < 0.8 * level
    # held-out sky, whitened with the same autocovariance on its own grid, is ~N(0, 1)
    from hierprior.physics import CorrelatedNoise

    held = sky.residuals(held_out=True)
    w = sky.noise_map[sky.held_out] / level
    model = CorrelatedNoise.from_patches(u, (24, 24), max_lag=2, scale=w, obs_shape=(24, 24))
    z = model.whiten(held)
    assert abs(float(z.std()) - 1) < 0.05
    assert abs(float((z[..., 1:] * z[..., :-1]).mean() / z.var())) < 0.05  # decorrelated
    raw = held / w
    assert float((raw[..., 1:] * raw[..., :-1]).mean() / raw.var()) > 0.15  # it was correlated
    # masks are marginalised
    masked = data.with_mask(np.pad(np.ones((3, 3)), 19))
    assert int((~correlated_noise_from_sky(masked).observed).sum()) == 9
    # SLIC training data: unit variance crops of the fitting sky
    x = sky_noise_realisations("slacs2303+1422", n=500, resolution=16, seed=1)
    assert x.shape == (500, 1, 16, 16) and x.dtype == torch.float32
    assert abs(float(x.std()) - 1) < 0.1
    assert torch.equal(x, sky_noise_realisations("slacs2303+1422", n=500, resolution=16, seed=1))
    assert 0.005 < sky_noise_unit("slacs2303+1422") < 0.008
    with pytest.raises(ValueError, match="at most the patch side"):
        sky_noise_realisations("slacs2303+1422", n=2, resolution=32)


@pytest.mark.slow
def test_slic_on_the_bundled_sky_trains_and_scores(tmp_path):
    """hierprior-train-prior experiment=slic_slacs, shrunk: the data target, the config and a
    LearnedNoise around the trained model (plumbing; the quality is measured in
    experiments/slacs/README.md)."""
    from hydra import compose, initialize_config_dir

    from hierprior.config import CONF_DIR
    from hierprior.data import sky_noise_unit
    from hierprior.diffusion.checkpoint import load_prior
    from hierprior.physics import LearnedNoise
    from hierprior.training import fit_prior

    overrides = [
        "experiment=slic_slacs",
        "data.name=slacs2303+1422",
        "data.n=512",
        f"run_dir={tmp_path}",
        "train.steps=20",
        "train.warmup_steps=5",
        "train.checkpoint_every=10",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train_prior", overrides=overrides)
    out = fit_prior(cfg)
    denoiser = load_prior(out.prior)
    unit = sky_noise_unit("slacs2303+1422")
    noise = LearnedNoise(denoiser, unit, smoothing=0.3)
    held = load_slacs("slacs2303+1422").sky.residuals(held_out=True)[:2, :16, :16]
    score = noise.score(held.unsqueeze(1).float())
    assert score.shape == (2, 1, 16, 16) and torch.isfinite(score).all()
    draw = noise.sample((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    assert draw.shape == (2, 1, 16, 16) and torch.isfinite(draw).all()
