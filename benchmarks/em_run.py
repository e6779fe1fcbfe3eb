"""A shrunk EM run through ``hierprior-em``'s config (2 rounds), timed, as a markdown section.

On CUDA it runs ``experiment=mnist_shift`` (the ~9M U-Net at 32x32, ``trainer=gpu``: M-step
in bf16-mixed, E-step and monitor in ``precision: bf16-mixed``) shrunk to minutes; with
``--dry-run`` it runs ``experiment=mnist_shift_tiny`` on the CPU shrunk to seconds. It prints
(and with ``--out`` writes) the wall time, the device of the returned prior and the per-round
metrics. Used by ``benchmarks/gpu_check.sh``.

    python benchmarks/em_run.py --out em.md [--workdir DIR] [--dry-run] [--override KEY=VALUE]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

#: shared by both modes: no logger, bundled data, short samplers and PQMass settings
COMMON = [
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.source=bundled",
    "train.warmup_steps=1",
    "train.checkpoint_every=0",
    "sample.n=4",
    "sample.steps=2",
    "em.rounds=2",
    "em.mstep.warmup_steps=1",
    "em.monitor.num_refs=8",
    "em.monitor.re_tessellations=5",
    "em.monitor.permutations=20",
    "em.monitor.grid_size=16",
    "em.stop.min_rounds=3",  # the run goes to its 2 rounds
    "em.stop.num_refs=8",
    "em.stop.re_tessellations=5",
    "em.stop.level=0.2",
    "em.stop.permutations=25",  # 5 tests at level 0.2 (with the long-lag tests)
]

#: CUDA: the real network and batch sizes, few steps
GPU = [
    "experiment=mnist_shift",
    "train.steps=100",
    "population.num_obs=512",
    "sampler.steps=32",
    "em.estep.batch_size=256",
    "em.estep.num_samples=2",
    "em.mstep.steps=100",
    "em.mstep.checkpoint_every=50",
    "em.monitor.num_prior_samples=512",
    "em.monitor.steps=16",
    "em.monitor.tarp_observations=64",
    "em.monitor.tarp_samples=2",
]

#: CPU dry run: the tiny experiment, seconds
DRY = [
    "experiment=mnist_shift_tiny",
    "train.steps=4",
    "population.num_obs=24",
    "sampler.steps=3",
    "em.estep.batch_size=12",
    "em.mstep.steps=3",
    "em.mstep.checkpoint_every=2",
    "em.monitor.num_prior_samples=24",
    "em.monitor.steps=2",
    "em.monitor.num_refs=4",
    "em.monitor.re_tessellations=3",
    "em.monitor.permutations=5",
    "em.monitor.tarp_observations=8",
    "em.monitor.tarp_samples=4",
    "em.monitor.grid_size=4",
    "em.stop.num_refs=4",
    "em.stop.re_tessellations=3",
]

COLUMNS = (
    "round",
    "residual_chi2_nu",
    "posterior_mean_rmse",
    "share_56789",
    "truth_chi2",
    "tarp_atc",
    "mira_z",
    "stop_pvalue",
)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="mnist_shift_tiny on the CPU")
    parser.add_argument("--workdir", default=None, help="run and prior folders (default: tmp)")
    parser.add_argument("--override", action="append", default=[], help="more KEY=VALUE")
    parser.add_argument("--out", default=None, help="also write the section to this file")
    args = parser.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from hierprior.config import CONF_DIR
    from hierprior.em.cli import run_from_config

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --dry-run for the CPU mode)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="em_run_"))
    overrides = [
        *COMMON,
        *(DRY if args.dry_run else GPU),
        *args.override,
        f"run_dir={work / 'run'}",
        f"paths.priors={work / 'priors'}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("em", overrides=overrides)
    with open_dict(cfg):
        for share in cfg.em.monitor.evaluators:  # DigitShare: a one-epoch classifier
            share.epochs = 1
            share.cache_dir = str(work / "cache")
    start = time.perf_counter()
    result = run_from_config(cfg)
    seconds = time.perf_counter() - start
    device = next(result.prior.parameters()).device
    lines = [
        f"experiment: {cfg.name}, trainer: {cfg.trainer.accelerator} ({cfg.trainer.precision}), "
        f"E-step precision: {cfg.em.estep.precision}, monitor precision: "
        f"{cfg.em.monitor.precision}, N={cfg.population.num_obs}, "
        f"rounds: {len(result.metrics) - 1}, wall time (round-0 prior training included): "
        f"{seconds:.1f} s, returned prior on: {device}",
        "",
        f"overrides: `{' '.join(o for o in overrides if not o.startswith(('run_dir', 'paths')))}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for row in result.metrics:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in COLUMNS) + " |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out:
        Path(args.out).write_text(section)
    return section


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
