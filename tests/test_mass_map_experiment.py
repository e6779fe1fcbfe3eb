"""The latent mass-map EM experiments through the hydra root conf/em.yaml: each runs one
round on the CPU, shrunk by overrides, with the delta-kappa metrics in metrics.csv."""

from __future__ import annotations

import csv

import pytest
from hydra import compose, initialize_config_dir

from hierprior.config import CONF_DIR
from hierprior.em.cli import run_from_config

SHRINK = [
    "logger=none",
    "trainer=default",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.n=64",
    "prior.backbone.channels=[8,8]",
    "prior.backbone.num_res_blocks=1",
    "prior.backbone.attention_resolutions=[]",
    "train.steps=3",
    "train.batch_size=16",
    "train.warmup=1",
    "train.ckpt_every=0",
    "train.sample_every=0",
    "sample.n=4",
    "sample.steps=2",
    "population.num_obs=12",
    "sampler.steps=3",
    "em.rounds=1",
    "em.estep.num_samples=1",
    "em.estep.batch_size=6",
    "em.mstep.steps=2",
    "em.mstep.batch_size=6",
    "em.mstep.warmup_steps=1",
    "em.mstep.checkpoint_every=1",
    "em.monitor.num_prior_samples=12",
    "em.monitor.steps=2",
    "em.monitor.num_refs=4",
    "em.monitor.re_tessellations=3",
    "em.monitor.permutations=5",
    "em.monitor.tarp_observations=4",
    "em.monitor.tarp_samples=2",
    "em.monitor.grid_size=4",
    "em.stop.min_rounds=2",
    "em.stop.num_refs=4",
    "em.stop.re_tessellations=3",
    "em.stop.level=0.2",
    "em.stop.permutations=15",
]
# the GPU-sized one shrunk further: its 64 x 64 delta kappa on a smaller image
GPU_SHRINK = ["population.image_size=32", "population.supersample=1", "sampler.iterations=1"]


@pytest.mark.parametrize("experiment", ["mass_map_tiny", "mass_map"])
def test_mass_map_experiment_runs_one_shrunk_round(experiment, tmp_path):
    extra = GPU_SHRINK if experiment == "mass_map" else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "em",
            overrides=[f"experiment={experiment}", f"run_dir={tmp_path / 'run'}", *SHRINK, *extra],
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
