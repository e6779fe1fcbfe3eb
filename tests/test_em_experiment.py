"""The MNIST EM experiment through its hydra root conf/em.yaml: one short round, shrunk by
overrides, and the checks that stop a bad run before any training."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from hierprior.config import CONF_DIR, ConfigError
from hierprior.em.cli import run_from_config
from hierprior.em.stop import LONG_TESTS, STOP_STATISTIC, STOP_TESTS

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:no MNIST under root"),
]

# the tiny experiment shrunk to seconds: 24 observations, a 4-step round-0 prior, 3-step
# samplers and M-step, small PQMass/TARP settings
SHORT = [
    "experiment=mnist_shift_tiny",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.source=bundled",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.checkpoint_every=0",
    "sample.n=4",
    "sample.steps=2",
    "population.num_obs=24",
    "sampler.steps=3",
    "em.rounds=1",
    "em.estep.batch_size=12",
    "em.mstep.steps=3",
    "em.mstep.warmup_steps=1",
    "em.mstep.checkpoint_every=2",
    "em.monitor.num_prior_samples=24",
    "em.monitor.steps=2",
    "em.monitor.num_refs=4",
    "em.monitor.re_tessellations=3",
    "em.monitor.permutations=5",
    "em.monitor.tarp_observations=8",
    "em.monitor.tarp_samples=4",
    "em.monitor.grid_size=4",
    # the stop rule may fire at round 1 of so short a run; min_rounds=2 keeps the run to its
    # maximum of rounds, so the stop reason is known
    "em.stop.min_rounds=2",
    "em.stop.num_refs=4",
    "em.stop.re_tessellations=3",
    # a level of its own (conf's is being tuned) and enough permutations to reach it
    "em.stop.level=0.2",
    f"em.stop.permutations={math.ceil((len(STOP_TESTS) + len(LONG_TESTS)) / 0.2)}",
]


def compose_em(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("em", overrides=overrides)


def short_config(tmp_path, *extra):
    cfg = compose_em(
        [*SHORT, f"run_dir={tmp_path / 'run'}", f"paths.priors={tmp_path / 'priors'}", *extra]
    )
    with open_dict(cfg):
        (share,) = cfg.em.monitor.evaluators  # DigitShare of digits 5-9
        share.epochs = 1  # a one-epoch classifier, cached in the test's folder
        share.cache_dir = str(tmp_path / "cache")
    return cfg


def test_mnist_shift_tiny_runs_one_short_round(tmp_path):
    cfg = short_config(tmp_path)
    result = run_from_config(cfg)
    assert len(result.metrics) == 2 and result.stop_reason.startswith("reached"), (
        result.stop_reason
    )
    run = tmp_path / "run"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1"]
    measured = (
        "share_56789",
        "truth_chi2",
        "drift_pvalue",
        "residual_chi2_nu",
        "posterior_mean_rmse",
        "tarp_atc",
        "mira_z",
    )
    for key in measured:
        assert key in rows[1] and rows[1][key] != "", key
    # the stop rule's fixed-point tests and decision p-value, from round 1 on
    stop_columns = [f"{test}_pvalue" for test in STOP_TESTS] + [STOP_STATISTIC]
    assert any(c.startswith("fixedpoint") for c in stop_columns)
    for key in stop_columns:
        assert key in rows[1] and rows[1][key] != "", key
        assert 0.0 < float(rows[1][key]) <= 1.0, (key, rows[1][key])
        assert rows[0].get(key, "") == "", key  # round 0 has no earlier bank
    for name in (
        "observations.png",
        "truth.png",
        "metrics.png",
        "calibration.png",
        "table.md",
        "round_001/posterior_samples.png",
        "round_001/prior_samples.png",
        "initial_prior/prior.ckpt",
    ):
        assert (run / name).exists(), name
    # rerunning the same config continues (nothing left to do) and gives the same table
    again = run_from_config(short_config(tmp_path))
    assert json.dumps(again.metrics) == json.dumps(result.metrics)  # NaN-aware
    assert again.table() == result.table()
    assert again.stop_reason == result.stop_reason


def test_mnist_shift_tiny_with_learned_noise(tmp_path):
    """population/noise=learned_correlated (a LearnedNoise: SLIC's likelihood through the noise
    score): refused with the default mmps E-step in one line before any training; with
    sampler=dps, two short rounds run end to end and the residuals are measured."""
    learned = ["population/noise=learned_correlated"]
    with pytest.raises(ConfigError, match="^sampler: mmps assumes Gaussian noise") as err:
        run_from_config(short_config(tmp_path, *learned))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "priors").exists() and not (tmp_path / "run").exists()
    cfg = short_config(tmp_path, *learned, "sampler=dps", "sampler.steps=3", "sampler.zeta=20")
    result = run_from_config(cfg)
    assert [row["round"] for row in result.metrics] == [0, 1]
    assert type(result.prior).__name__ == "EDMDenoiser"
    for row in result.metrics:
        assert math.isfinite(row["residual_chi2_nu"]) and math.isfinite(row["tarp_atc"])


def test_em_refuses_a_train_prior_experiment(tmp_path):
    cfg = compose_em(["experiment=mnist04_prior_tiny", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="no population"):
        run_from_config(cfg)
    assert not (tmp_path / "initial_prior").exists()


def test_missing_initial_prior_fails_before_any_round(tmp_path):
    cfg = short_config(tmp_path, f"em.initial_prior={tmp_path / 'missing.ckpt'}")
    with pytest.raises(FileNotFoundError, match="no prior checkpoint"):
        run_from_config(cfg)
    assert not (tmp_path / "run").exists()


def test_junk_initial_prior_fails_before_any_round(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(bytes(range(256)) * 8)
    cfg = short_config(tmp_path, f"em.initial_prior={junk}")
    with pytest.raises(ConfigError, match="not a loadable hierprior prior checkpoint") as err:
        run_from_config(cfg)
    assert str(err.value).startswith("em.initial_prior: ") and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "initial_prior").exists()
    assert not (tmp_path / "run" / "round_000").exists()


def test_unknown_sampler_option_fails_before_any_training(tmp_path):
    cfg = short_config(tmp_path, "+sampler.bogus=1")
    with pytest.raises(ConfigError, match=r"^sampler: .*bogus"):
        run_from_config(cfg)
    assert not (tmp_path / "run" / "initial_prior").exists()  # no round-0 prior was trained
    assert not (tmp_path / "run" / "round_000").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("sampler.iterations=0", "sampler"),
        ("em.estep.num_samples=0", "em.estep"),
        ("em.mstep.steps=0", "em.mstep"),
        ("em.monitor.permutations=-1", "em.monitor"),
        ("em.stop.level=2", "em.stop"),
        ("em.rounds=-1", "em.rounds"),
        ("population.num_obs=0", "population"),
    ],
)
def test_bad_values_fail_before_any_training(override, key, tmp_path):
    cfg = short_config(tmp_path, override)
    with pytest.raises(ConfigError, match=f"^{key}") as err:
        run_from_config(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "initial_prior").exists()  # no round-0 prior was trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without CUDA")
def test_gpu_trainer_without_cuda_fails_before_any_training(tmp_path):
    cfg = compose_em(["trainer=gpu", f"run_dir={tmp_path / 'run'}", "logger=none"])
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run_from_config(cfg)
    assert not (tmp_path / "run").exists()
