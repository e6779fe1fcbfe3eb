"""The galaxy EM experiments (ellipticals -> spirals on lensed observations) through the hydra
root conf/em.yaml: each runs one round on the CPU, shrunk by overrides, with the spiral share
(the morphology classifier, one epoch, cached in the test's folder) in metrics.csv."""

from __future__ import annotations

import csv

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

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
    "train.warmup_steps=1",
    "train.checkpoint_every=0",
    "train.sample_every=0",
    "sample.n=4",
    "sample.steps=2",
    "population.num_obs=16",
    "sampler.steps=3",
    "em.rounds=1",
    "em.estep.num_samples=1",
    "em.estep.batch_size=8",
    "em.mstep.steps=2",
    "em.mstep.batch_size=8",
    "em.mstep.warmup_steps=1",
    "em.mstep.checkpoint_every=1",
    "em.monitor.num_prior_samples=16",
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
    "em.stop.permutations=24",
]


def compose_em(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("em", overrides=overrides)


@pytest.mark.parametrize("experiment", ["galaxy_shift_tiny", "galaxy_shift"])
def test_galaxy_experiment_runs_one_shrunk_round(experiment, tmp_path):
    cfg = compose_em(
        [
            f"experiment={experiment}",
            f"run_dir={tmp_path / 'run'}",
            f"paths.priors={tmp_path / 'p'}",
        ]
        + SHRINK
    )
    with open_dict(cfg):
        (share,) = [e for e in cfg.em.monitor.evaluators if e._target_.endswith("SpiralShare")]
        share.epochs = 1
        share.cache_dir = str(tmp_path / "cache")
    result = run_from_config(cfg)
    assert len(result.metrics) == 2
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    keys = ["share_spiral", "truth_chi2", "residual_chi2_nu", "posterior_mean_rmse"]
    keys += ["noise_prior", "noise_posterior", "noise_truths"]  # every image experiment's
    if experiment == "galaxy_shift_tiny":  # the structure yardstick and its oracle
        keys += ["arm_strength", "truths_arm_strength", "oracle_arm_strength", "fidelity"]
        keys += ["fidelity_arm_strength", "fidelity_share_spiral"]
    for key in keys:
        assert rows[1].get(key, "") != "", key
    assert 0.0 <= float(rows[1]["share_spiral"]) <= 1.0
    for name in ("observations.png", "truth.png", "round_001/posterior_samples.png"):
        assert (tmp_path / "run" / name).exists(), name
