"""The MNIST EM experiment through its hydra config: one short round, shrunk by overrides."""

from __future__ import annotations

import csv
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from hierprior.cli import CONF_DIR
from hierprior.em.cli import run_from_config


def compose_em(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_mnist_shift_tiny_runs_one_short_round(tmp_path):
    cfg = compose_em(
        [
            "experiment=mnist_shift_tiny",
            f"run_dir={tmp_path / 'run'}",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "train.steps=4",
            "train.warmup=1",
            "train.ckpt_every=0",
            "sample.n=4",
            "sample.steps=2",
            "population.num_obs=24",
            "em.rounds=1",
            "em.estep_batch_size=12",
            "sampler.steps=3",
            "em.mstep.steps=3",
            "em.mstep.checkpoint_every=2",
            "em.monitor.num_prior_samples=24",
            "em.monitor.steps=2",
            "em.monitor.num_refs=4",
            "em.monitor.re_tessellations=3",
            "em.monitor.permutations=5",
            "em.monitor.grid_size=4",
        ]
    )
    with open_dict(cfg):
        cfg.em.evaluators[0].epochs = 1  # the classifier is cached per test session
        cfg.em.evaluators[0].cache_dir = str(tmp_path / "cache")
    result = run_from_config(cfg)
    assert len(result.metrics) == 2 and result.stop_reason.startswith("reached")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1"]
    for key in (
        "share_56789",
        "truth_chi2",
        "drift_pvalue",
        "residual_chi2_nu",
        "posterior_mean_rmse",
        "convergence_log_pvalue",
    ):
        assert key in rows[1] and rows[1][key] != "", key
    for name in (
        "observations.png",
        "truth.png",
        "metrics.png",
        "table.md",
        "round_001/posterior_samples.png",
        "round_001/prior_samples.png",
        "initial_prior/prior.ckpt",
    ):
        assert (tmp_path / "run" / name).exists(), name
    # rerunning the same config continues (nothing left to do) and gives the same table
    again = run_from_config(cfg)
    assert json.dumps(again.metrics) == json.dumps(result.metrics)  # NaN-aware


def test_em_cli_refuses_a_train_prior_experiment(tmp_path):
    cfg = compose_em(["experiment=mnist04_prior_tiny", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="task 'em'"):
        run_from_config(cfg)


def test_unknown_sampler_option_fails_before_any_round(tmp_path):
    cfg = compose_em(
        [
            "experiment=mnist_shift_tiny",
            f"run_dir={tmp_path / 'run'}",
            "logger=none",
            "em.initial_prior=" + str(tmp_path / "missing.ckpt"),
        ]
    )
    with pytest.raises(FileNotFoundError, match="no prior checkpoint"):
        run_from_config(cfg)
