"""hierprior-lens (hierprior.lensfit): the joint likelihood with general Gaussian noise and lens
light, the residual statistics, and the command end to end on a bundled lens (shrunk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hierprior.physics import CorrelatedNoise, GaussianNoise
from hierprior.physics.lensing import (
    SIE,
    BlindLensing,
    BlindLensingWithLight,
    LensLight,
    LensLightPrior,
    LensPrior,
    Normal,
    Sersic,
    Shear,
    Uniform,
)
from hierprior.posterior.joint import LensLikelihood, lens_posterior

N_PIX, PIX = 24, 0.1


def _mass() -> LensPrior:
    return LensPrior(
        [
            SIE.prior(
                theta_E=Uniform(0.6, 1.0),
                e1=Uniform(-0.2, 0.2),
                e2=Uniform(-0.2, 0.2),
                center_x=Normal(0.0, 0.05),
                center_y=Normal(0.0, 0.05),
            ),
            Shear.prior(gamma1=Uniform(-0.05, 0.05), gamma2=Uniform(-0.05, 0.05)),
        ]
    )


LIGHT_PRIOR = {
    "R_sersic": Uniform(0.2, 1.5),
    "n_sersic": Uniform(1.0, 5.0),
    "e1": Uniform(-0.3, 0.3),
    "e2": Uniform(-0.3, 0.3),
    "center_x": Normal(0.0, 0.05),
    "center_y": Normal(0.0, 0.05),
}


def _forward(light: bool = True):
    common = (N_PIX, PIX, 16, 1.6, 1, 0.15)
    if not light:
        return BlindLensing(_mass(), *common)
    lens_light = LensLight(Sersic(), N_PIX, PIX, 1, 0.15)
    return BlindLensingWithLight(_mass(), lens_light, LIGHT_PRIOR, *common)


def _spot(n: int = 16) -> torch.Tensor:
    c = torch.arange(n, dtype=torch.float32) - n / 2 + 0.5
    r2 = c[None] ** 2 + c[:, None] ** 2
    return torch.exp(-r2 / 8.0)[None]


TRUTH = [0.8, 0.05, -0.03, 0.01, -0.02, 0.02, -0.01, 0.7, 2.5, 0.1, 0.05, 0.012, -0.011]


def test_diagonal_likelihood_and_gram_are_the_per_pixel_formulas():
    """The diagonal path is the per-pixel sum and J^T diag(1/(var + w)) J (as before)."""
    f = _forward(light=False)
    g = torch.Generator().manual_seed(0)
    eta = f.prior.sample(3, g, torch.float32).reshape(1, 3, -1)
    x = torch.rand(1, 3, 1, 16, 16, generator=g)
    y = torch.randn(1, 1, N_PIX, N_PIX, generator=g)
    sigma = 0.1 + torch.rand(1, 1, N_PIX, N_PIX, generator=g)
    lik = LensLikelihood(f, GaussianNoise(sigma), y)
    w = torch.tensor([[0.0, 0.1, 0.5]])
    r = (y.unsqueeze(1) - f.image(eta, x)).double()
    var = (sigma**2).unsqueeze(1).double() + w.double()[..., None, None, None]
    expected = -0.5 * (r * r / var).flatten(2).sum(-1)
    assert torch.equal(lik(eta, x, w), expected)
    jac = torch.randn(1, 3, 4, N_PIX * N_PIX, dtype=torch.float64, generator=g)
    prec = 1.0 / var.flatten(2)
    assert torch.equal(lik.gram(jac, w), torch.einsum("nsim,nsm,nsjm->nsij", jac, prec, jac))


def test_correlated_noise_with_a_flat_spectrum_is_the_diagonal_likelihood():
    """Σ = σ² I as a CorrelatedNoise (the whitened path) gives the diagonal path's values, the
    widening (1 + w/σ²) σ² = σ² + w included; with lens light too."""
    f = _forward()
    g = torch.Generator().manual_seed(1)
    eta = f.prior.sample(2, g, torch.float32).reshape(1, 2, -1)
    x = torch.rand(1, 2, 1, 16, 16, generator=g)
    y = torch.randn(1, 1, N_PIX, N_PIX, generator=g)
    sigma = 0.3
    white = LensLikelihood(f, GaussianNoise(sigma), y)
    corr = LensLikelihood(f, CorrelatedNoise(torch.full((N_PIX, N_PIX), sigma**2)), y)
    assert not corr.diagonal and white.diagonal
    w = torch.tensor([[0.0, 0.2]])
    torch.testing.assert_close(corr(eta, x, w), white(eta, x, w), rtol=1e-5, atol=1e-3)
    jac = torch.randn(1, 2, 3, N_PIX * N_PIX, dtype=torch.float64, generator=g)
    torch.testing.assert_close(corr.gram(jac, w), white.gram(jac, w), rtol=1e-6, atol=1e-6)


def test_light_image_is_the_weighted_least_squares_light():
    f = _forward()
    eta = torch.tensor(TRUTH)[None, None]
    target = torch.randn(1, 1, 1, N_PIX, N_PIX, generator=torch.Generator().manual_seed(2))
    noise = GaussianNoise(0.2)
    amp = f.light.solve_amplitudes(eta[..., 7:], target, noise)
    torch.testing.assert_close(f.light_image(eta, target, noise), f.light(eta[..., 7:], amp))
    assert f.names[7:] == tuple(f"light_{n}" for n in Sersic.parameter_names)
    assert f.at(eta[:, 0]).input_shape == (1, 16, 16)


def test_lens_posterior_with_light_and_correlated_noise_finds_the_lens():
    """Known source, simulated SIE + shear + Sérsic light and correlated noise: the lens
    chains (mass and light) cover the truth."""
    f = _forward()
    truth = torch.tensor(TRUTH)[None]
    src = _spot()[None]
    g = torch.Generator().manual_seed(3)
    acf = torch.zeros(N_PIX, N_PIX, dtype=torch.float64)
    acf[0, 0], acf[0, 1], acf[0, -1], acf[1, 0], acf[-1, 0] = 1.0, 0.25, 0.25, 0.2, 0.2
    spectrum = torch.fft.fft2(acf).real * 0.02**2
    noise = CorrelatedNoise(spectrum)
    clean = f.image(truth[:, None], src[:, None])[:, 0]
    light = f.light(truth[..., 7:], torch.tensor([[2.0]]))
    y = (clean + light + noise.sample((1, 1, N_PIX, N_PIX), generator=g)).float()
    samples = lens_posterior(
        f, noise, y, src, num_chains=2, num_samples=150, warmup=150, generator=g
    )
    mean, sd = samples[0].mean(0), samples[0].std(0)
    z = ((mean - truth[0]) / sd).abs()
    assert z[0] < 4 and z[7] < 4, (mean, sd)  # theta_E, the light's R_sersic
    assert sd[0] < 0.02


def test_light_prior_and_grid_errors_are_one_line():
    with pytest.raises(ValueError, match="missing: \\['center_y'\\]"):
        missing = {k: v for k, v in LIGHT_PRIOR.items() if k != "center_y"}
        LensLightPrior(_mass(), Sersic.parameter_names, missing)
    with pytest.raises(ValueError, match="unknown: \\['bogus'\\]"):
        LensLightPrior(_mass(), Sersic.parameter_names, {**LIGHT_PRIOR, "bogus": 1.0})
    with pytest.raises(ValueError, match="e1 must lie in"):
        LensLightPrior(_mass(), Sersic.parameter_names, {**LIGHT_PRIOR, "e1": Uniform(-1, 0.5)})
    with pytest.raises(ValueError, match="grid"):
        BlindLensingWithLight(
            _mass(), LensLight(Sersic(), 20, PIX), LIGHT_PRIOR, N_PIX, PIX, 16, 1.6
        )


def test_statistics_table_and_annuli():
    from hierprior.lensfit.report import criteria
    from hierprior.lensfit.statistics import annuli, lens_table

    n = 400
    cols = {
        "theta_E": np.full(n, 1.5),
        "e1": np.full(n, 0.2),
        "e2": np.zeros(n),
        "gamma1": np.zeros(n),
        "gamma2": np.full(n, 0.05),
        "center_x": np.zeros(n),
        "center_y": np.zeros(n),
    }
    t = lens_table(cols)
    assert t["q"]["median"] == pytest.approx(0.8 / 1.2)
    assert t["phi"]["median"] == pytest.approx(0.0) and t["PA_sky"]["median"] == 90.0
    assert t["gamma"]["median"] == pytest.approx(0.05)
    assert t["phi_gamma"]["median"] == pytest.approx(45.0)
    radius = np.linspace(0, 1, 1000)
    rows = annuli(np.ones(1000), radius, radius > 0.35)
    assert [r["r_in"] for r in rows] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert all(r["mean"] == 1.0 for r in rows)
    stats = {
        "chi2_nu_correlated": 1.0,
        "annuli_correlated": [{"mean": 0.1}, {"mean": -0.35}],
        "ks_arcs_vs_sky": {"p": 0.5},
    }
    c = criteria(t, stats, 1.52)
    assert c["theta_E_within_3pct"]["pass"] and c["chi2_nu_in_0.9_1.15"]["pass"]
    assert not c["annuli_within_0.3"]["pass"] and c["annuli_within_0.3"]["value"] == -0.35


# ----------------------------------------------------------------------------- the command


def _lens(tmp_path: Path, *args: str, timeout: float = 600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    root = Path(__file__).resolve().parents[1]
    env.update(
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        HIERPRIOR_ROOT=str(tmp_path / "root"),
        PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]),
    )
    return subprocess.run(
        [sys.executable, "-c", "from hierprior.cli import lens; lens()", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SHRUNK = [
    "train.steps=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.checkpoint_every=0",
    "train.num_threads=1",
    "data.n=64",
    "sample.n=4",
    "sample.steps=2",
    "sampler.steps=3",
    "sampler.final_warmup=3",
    "sampler.final_steps=3",
    "lens.size=41",
    "lens.psf_size=7",
    "lens.num_samples=2",
    "lens.chains=1",
    "lens.lens_samples=5",
    "lens.lens_warmup=4",
]


def test_command_end_to_end_on_a_bundled_lens_with_light(tmp_path):
    result = _lens(tmp_path, "experiment=slacs_j1430_tiny", *SHRUNK)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "root" / "runs" / "lens" / "slacs_j1430_tiny"
    for name in ("figure.png", "corner.png", "table.md", "table.json", "statistics.json"):
        assert (out / name).stat().st_size > 0, name
    table = json.loads((out / "table.json").read_text())
    assert set(table["table"]) >= {"theta_E", "q", "PA_sky", "gamma", "center_x", "center_y"}
    assert table["published_b_SIE"] == 1.52
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["nu"] == 41 * 41 - 13 - 1
    assert set(stats["criteria"]) == {
        "theta_E_within_3pct",
        "theta_E_interval_le_3pct",
        "chi2_nu_in_0.9_1.15",
        "annuli_within_0.3",
        "ks_p_ge_0.01",
    }
    with np.load(out / "samples.npz") as s:
        assert s["sources"].shape == (2, 32, 32)
        assert s["lens_samples"].shape == (2 * 1 * 5, 13)
        assert s["light"].shape == (2, 41, 41) and np.abs(s["light"]).max() > 0
        assert list(s["names"][:2]) == ["theta_E", "e1"]
    assert (out / "source_prior" / "DONE").exists()  # trained once, cached, linked


@pytest.mark.parametrize(
    "override, needle",
    [
        ("lens.name=slacs0000", "lens.name"),
        ("lens.psf_size=8", "lens.psf_size must be odd"),
        ("lens.size=40", "lens.size must be odd"),
        ("lens.noise=slic", "lens.noise"),
        ("lens.mask=[[0.0,0.0]]", "lens.mask[0]"),
        ("+lens.init.bogus=1.0", "lens.init: unknown lens parameter 'bogus'"),
        ("+lens.init.theta_E=5.0", "outside its prior"),
        ("~lens.light.prior.n_sersic", "missing: ['n_sersic']"),
        ("lens.num_samples=0", "lens.num_samples"),
        ("lens.light.prior.R_sersic.low=-1.0", "R_sersic must be > 0"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_training(tmp_path, override, needle):
    """Each bad value: a one-line ConfigError naming it, before any prior is trained."""
    from hydra import compose, initialize_config_dir

    from hierprior.config import CONF_DIR, ConfigError
    from hierprior.lensfit.cli import run_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "lens",
            overrides=["experiment=slacs_j1430_tiny", f"paths.root={tmp_path}", override],
        )
    with pytest.raises(ConfigError) as err:
        run_from_config(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "runs").exists()  # nothing trained, no run directory


def test_bad_input_is_one_line_on_stderr(tmp_path):
    result = _lens(tmp_path, "experiment=slacs_j2303_tiny", "lens.psf_size=8")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hierprior-lens: lens.psf_size must be odd"), last
    assert not (tmp_path / "root" / "runs" / "priors").exists()  # nothing trained
