"""The blind-lens EM experiments (ellipticals -> spirals with every lens unknown) through the
hydra root conf/em.yaml: each runs one round on the CPU, shrunk by overrides, with the joint
(source, lens) E-step, the lenses stored in the bank and the lens metrics in metrics.csv."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_galaxy_experiment import SHRINK  # tests/ is on sys.path

from hierprior.config import CONF_DIR
from hierprior.em.bank import SampleBank
from hierprior.em.cli import run_from_config

# the joint method's own steps shrunk too; no morphology classifier (its training is what
# test_galaxy_experiment covers); two samples per observation for the lens coverage
BLIND_SHRINK = [
    "sampler.lens_steps=1",
    "sampler.final_warmup=2",
    "sampler.final_steps=2",
    "em.estep.num_samples=2",
    "em.monitor.evaluators=[]",
]


def compose_em(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("em", overrides=overrides)


@pytest.mark.parametrize(
    "experiment", [pytest.param("blind_lens_tiny", marks=pytest.mark.slow), "blind_lens"]
)
def test_blind_lens_experiment_runs_one_shrunk_round(experiment, tmp_path):
    cfg = compose_em(
        [
            f"experiment={experiment}",
            f"run_dir={tmp_path / 'run'}",
            f"paths.priors={tmp_path / 'p'}",
        ]
        + SHRINK
        + BLIND_SHRINK
    )
    assert cfg.sampler.method == "joint" and cfg.sampler.source.method == "daps"
    result = run_from_config(cfg)
    assert len(result.metrics) == 2
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    keys = ["residual_chi2_nu_mean", "lens_theta_E_coverage68", "tarp_atc"]
    keys += [f"lens_{p}_median_abs_z" for p in ("theta_E", "e1", "e2", "center_x", "gamma2")]
    for key in keys:
        assert rows[1].get(key, "") != "", key
    assert 0.0 <= float(rows[1]["lens_theta_E_coverage68"]) <= 1.0
    r = cfg.data.resolution
    bank = SampleBank(tmp_path / "run" / "round_001" / "bank", 16, 2, (1, r, r))
    params = bank.load_params()
    assert params.shape == (16, 2, 7) and torch.isfinite(params).all()
