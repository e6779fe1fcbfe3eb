"""The latent mass-map EM experiments through the hydra root conf/em.yaml: each runs one
round on the CPU, shrunk by overrides, with the delta-kappa metrics in metrics.csv."""

from __future__ import annotations

import csv

import pytest
from hydra import compose, initialize_config_dir
from test_galaxy_experiment import SHRINK as GALAXY_SHRINK  # tests/ is on sys.path

from hierprior.config import CONF_DIR
from hierprior.em.cli import run_from_config

# the galaxy experiments' shrink, with 12 observations in batches of 6
SMALLER = {
    "population.num_obs": "12",
    "em.estep.batch_size": "6",
    "em.mstep.batch_size": "6",
    "em.monitor.num_prior_samples": "12",
}
SHRINK = [
    o if o.split("=")[0] not in SMALLER else f"{o.split('=')[0]}={SMALLER[o.split('=')[0]]}"
    for o in GALAXY_SHRINK
]
# the GPU-sized one shrunk further: its 64 x 64 delta kappa on a smaller image
GPU_SHRINK = ["population.image_size=32", "population.supersample=1", "sampler.iterations=1"]


@pytest.mark.parametrize("experiment", ["mass_map_tiny", "mass_map"])
def test_mass_map_experiment_runs_one_shrunk_round(experiment, tmp_path):
    extra = GPU_SHRINK if experiment == "mass_map" else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "em",
            overrides=[
                f"experiment={experiment}",
                f"run_dir={tmp_path / 'run'}",
                f"paths.priors={tmp_path / 'priors'}",
                *SHRINK,
                *extra,
            ],
        )
    result = run_from_config(cfg)
    assert len(result.metrics) == 2
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    for key in (
        "analytic_chi2_nu",
        "residual_chi2_nu",
        "truth_chi2",
        "kappa_corr",
        "power_log_ratio",
        "noise_prior",  # the fidelity report: structure, oracle, noise
        "peaks_per_map",
        "multipole_m3",
        "truths_peaks_per_map",
        "oracle_peaks_per_map",
        "fidelity",
        "fidelity_peaks_per_map",
    ):
        assert rows[1].get(key, "") != "", key
    assert float(rows[1]["analytic_chi2_nu"]) > 1.0
    for name in (
        "observations.png",
        "truth.png",
        "round_001/posterior_samples.png",
        "round_001/residuals_analytic.png",
        "round_001/residuals_posterior.png",
        "round_001/power_spectrum.png",
    ):
        assert (tmp_path / "run" / name).exists(), name
