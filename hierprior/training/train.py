r"""Train a diffusion prior from a config: the function behind ``hierprior-train-prior``.

:func:`fit_prior` composes the builders of :mod:`hierprior.training.build`: it checks the
config, writes the resolved config to ``<run_dir>/config.yaml``, loads the data, builds the
EDM denoiser :math:`D_\theta` and the :class:`~hierprior.training.PriorModule`, and fits it by
denoising score matching for ``train.steps`` optimiser steps. The run directory is the whole
state: when ``<run_dir>/checkpoints/last.ckpt`` exists, training resumes from it (model, EMA,
optimiser, learning-rate schedule, data order, training noise generator, loss history).
One process at a time holds the run directory (``<run_dir>/.lock``,
:func:`hierprior.runs.hold_run_dir`); SIGUSR1 or SIGUSR2 ends training after the current
optimiser step with ``checkpoints/last.ckpt`` written, and exits with status 75
(:func:`hierprior.runs.stop_on_signal`), so a requeued job resumes there.

Outputs in ``run_dir``: ``prior.ckpt`` (EMA prior, :func:`~hierprior.diffusion.load_prior`),
``config.yaml``, ``loss.csv``, ``loss.png``, ``samples.png`` (+ ``samples/step_*.png``) and
``checkpoints/last.ckpt``.

References:
    Karras et al. (2022), EDM, arXiv 2206.00364.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from omegaconf import DictConfig

from hierprior.io import atomic_write_text
from hierprior.precision import precision_scope
from hierprior.runs import hold_run_dir, safe_points, stop_callback, stop_on_signal
from hierprior.training.build import (
    build_callbacks,
    build_datamodule,
    build_denoiser,
    build_loggers,
    build_module,
    build_trainer,
    check_train_config,
    plain_config,
)
from hierprior.training.callbacks import progress_enabled, quiet_lightning

__all__ = ["TrainOutputs", "fit_prior", "write_config"]

log = logging.getLogger(__name__)


@dataclass
class TrainOutputs:
    """Paths written by :func:`fit_prior`, and the final optimiser step."""

    run_dir: Path
    prior: Path
    config: Path
    loss_csv: Path
    loss_png: Path
    samples: Path
    last_ckpt: Path
    step: int


def write_config(cfg: DictConfig, path: str | Path) -> Path:
    """Writes the resolved config as plain YAML (atomically)."""
    text = yaml.safe_dump(plain_config(cfg), sort_keys=False, default_flow_style=None)
    return atomic_write_text(path, text)


def fit_prior(cfg: DictConfig) -> TrainOutputs:
    """Trains (or resumes training of) a prior as configured; returns the output paths.

    Raises a ValueError for an invalid config before loading any data, and whatever the data
    loader raises for a missing dataset (FileNotFoundError) before building the model.
    """
    if not cfg.get("run_dir"):
        raise ValueError("the config needs a run_dir")
    check_train_config(cfg)
    run_dir = Path(str(cfg.run_dir))
    # one live process per run directory; SIGUSR1/SIGUSR2 stop it after an optimiser step
    with stop_on_signal(f"training in {run_dir}"), hold_run_dir(run_dir):
        config_path = write_config(cfg, run_dir / "config.yaml")
        threads = cfg.train.get("num_threads")
        previous_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(int(threads))
        try:
            return _fit(cfg, run_dir, config_path)
        finally:
            torch.set_num_threads(previous_threads)


def _loggers(cfg: DictConfig, run_dir: Path) -> list:
    """``cfg.logger``'s loggers; a wandb one gets the full resolved config, ``job_type``
    ``prior`` and the run directory's name as ``group`` (unless the config sets them), and a
    run id kept in ``<run_dir>/wandb_id`` with ``resume="allow"``, so that a resumed training
    logs into the same wandb run."""
    import uuid

    from pytorch_lightning.loggers import WandbLogger

    loggers = build_loggers(cfg)
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is None:
            init = logger._wandb_init
            id_file = run_dir / "wandb_id"
            if not init.get("id"):
                if not id_file.exists():
                    atomic_write_text(id_file, uuid.uuid4().hex[:8])
                init["id"] = id_file.read_text().strip()
                init["resume"] = "allow"
            init["group"] = init.get("group") or run_dir.name
            init["job_type"] = init.get("job_type") or "prior"
            init["tags"] = list(init.get("tags") or []) or None
            init["config"] = plain_config(cfg)
    return loggers


def _fit(cfg: DictConfig, run_dir: Path, config_path: Path) -> TrainOutputs:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    denoiser = build_denoiser(cfg, datamodule.event_shape)
    module = build_module(cfg, denoiser)
    quiet_lightning()
    trainer = build_trainer(
        cfg,
        [*build_callbacks(cfg, run_dir), stop_callback()],
        _loggers(cfg, run_dir),
        run_dir,
        # without validation data, skip the validation loop altogether
        **({"limit_val_batches": 0} if datamodule.val_data is None else {}),
        # `progress` (null: on in a terminal, off in batch logs and CI) and the trainer's own
        enable_progress_bar=bool(cfg.trainer.get("enable_progress_bar", True))
        and progress_enabled(cfg.get("progress")),
    )

    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if last.is_file() else None
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    log.info(
        "training %s (%.2fM parameters) on %d samples with shape %s for %d steps in %s",
        type(denoiser.backbone).__name__,
        sum(p.numel() for p in denoiser.parameters()) / 1e6,
        len(datamodule.train_data),
        datamodule.event_shape,
        int(cfg.train.steps),
        run_dir,
    )
    with warnings.catch_warnings():
        # the EMA copy is in eval mode on purpose (it is only sampled from)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        # a deprecation inside Lightning's own pytree helper, not actionable here
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        precision = cfg.trainer.get("precision", "32-true")  # TF32 only for "tf32"
        # a stop signal ends fit after a step, with last.ckpt written
        with safe_points(), precision_scope(precision, trainer.strategy.root_device):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return TrainOutputs(
        run_dir=run_dir,
        prior=run_dir / "prior.ckpt",
        config=config_path,
        loss_csv=run_dir / "loss.csv",
        loss_png=run_dir / "loss.png",
        samples=run_dir / "samples.png",
        last_ckpt=last,
        step=int(trainer.global_step),
    )
