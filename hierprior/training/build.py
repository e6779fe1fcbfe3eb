r"""Builders: a denoiser, data, a LightningModule, callbacks, loggers and a Trainer from a config.

The config is the composed hydra tree of ``conf/train_prior.yaml`` (see docs/api.md): groups
``data`` (a ``_target_`` returning the training tensor), ``prior`` (``backbone`` with a
``_target_``, and ``sigma_data``), ``schedule`` (a ``_target_``), ``trainer`` (a
``pytorch_lightning.Trainer`` ``_target_``) and ``logger`` (a mapping of name to logger
``_target_``), and the top-level ``seed``, ``run_dir``, ``train`` and ``sample`` sections.

The denoiser is :math:`D = c_{skip} x + c_{out} F(c_{in} x, c_{noise})`
(:class:`~hierprior.diffusion.EDMDenoiser`) around the backbone :math:`F` and the schedule.

References:
    Karras et al. (2022), EDM, arXiv 2206.00364.
    Yadan (2019), Hydra, https://github.com/facebookresearch/hydra.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from hierprior.checks import check_choice, check_float, check_int, check_positive
from hierprior.config import ConfigError, check_renamed
from hierprior.diffusion.denoiser import EDMDenoiser
from hierprior.diffusion.sampling import SAMPLERS
from hierprior.diffusion.schedule import Schedule
from hierprior.precision import lightning_precision
from hierprior.training.callbacks import LossCurve, PriorCheckpoint, SampleGrid
from hierprior.training.datamodule import TensorDataModule, load_training_tensors
from hierprior.training.module import TIME_DISTRIBUTIONS, PriorModule, check_betas

__all__ = [
    "build_callbacks",
    "build_datamodule",
    "build_denoiser",
    "build_loggers",
    "build_module",
    "build_schedule",
    "build_trainer",
    "check_train_config",
    "plain_config",
]

log = logging.getLogger(__name__)


def plain_config(cfg: DictConfig | Mapping) -> dict:
    """The config resolved into plain Python containers (for checkpoints and config.yaml)."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def _instantiate(node, what: str):
    from hydra.utils import instantiate

    if node is None or "_target_" not in node:
        raise ValueError(f"the {what} config needs a `_target_`, got {node!r}")
    try:
        return instantiate(node, _convert_="all")
    except Exception as err:  # hydra wraps the real cause in InstantiationException
        raise ValueError(f"could not build the {what} from the config: {err}") from err


def check_train_config(cfg: DictConfig) -> None:
    """Raises a ConfigError (a ValueError) naming the key when train/sample values are invalid.

    Runs before any data is loaded, so a typo fails in a second, not after an hour. A key of
    the ``train`` section under its old name (:data:`hierprior.config.RENAMED_KEYS`, e.g.
    ``train.warmup``, now ``train.warmup_steps`` as in the M-step) is refused, never ignored.
    """
    for section in ("train", "sample", "data", "prior", "schedule", "trainer"):
        if cfg.get(section) is None:
            raise ConfigError(f"the config has no `{section}` section")
    check_renamed(cfg)
    train, smp = cfg.train, cfg.sample
    try:
        for key, minimum in (
            ("steps", 1),
            ("batch_size", 1),
            ("warmup_steps", 0),
            ("sample_every", 0),
            ("checkpoint_every", 0),
            ("loss_every", 1),
        ):
            check_int(train.get(key), f"train.{key}", minimum)
        if train.get("num_threads") is not None:
            check_int(train.num_threads, "train.num_threads")
        check_positive(train.get("lr"), "train.lr")
        check_float(train.get("weight_decay", 0.0), "train.weight_decay")
        check_float(train.get("gradient_clip_val"), "train.gradient_clip_val")
        check_float(
            train.get("ema_decay"), "train.ema_decay", 0.0, maximum=1.0, strict_maximum=True
        )
        check_betas(list(train.get("betas", (0.9, 0.999))))
        check_choice(train.get("time_distribution"), "train.time_distribution", TIME_DISTRIBUTIONS)
        check_choice(smp.get("method"), "sampler sample.method", sorted(SAMPLERS))
        check_int(smp.get("steps"), "sample.steps")
        check_int(smp.get("n"), "sample.n")
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def build_schedule(cfg: DictConfig) -> Schedule:
    """The noise schedule of ``cfg.schedule`` (a ``_target_``, e.g. VPSchedule)."""
    schedule = _instantiate(cfg.schedule, "schedule")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule target must build a Schedule, got {type(schedule).__name__}")
    return schedule


def build_denoiser(cfg: DictConfig, event_shape: Sequence[int]) -> EDMDenoiser:
    """The EDM denoiser of ``cfg.prior`` and ``cfg.schedule`` for samples of ``event_shape``.

    Raises a ValueError when the backbone is built for another event shape than the data's.
    """
    prior = cfg.prior
    backbone = _instantiate(prior.get("backbone"), "prior backbone")
    event_shape = tuple(int(n) for n in event_shape)
    shape = getattr(backbone, "event_shape", None)
    if shape is not None and tuple(shape) != event_shape:
        raise ValueError(
            f"the prior backbone expects samples with shape {tuple(shape)} but the data have "
            f"shape {event_shape}; match prior.backbone (image_size/in_channels/features) to "
            "the data config"
        )
    return EDMDenoiser(backbone, event_shape, build_schedule(cfg), float(prior.sigma_data))


def build_datamodule(cfg: DictConfig) -> TensorDataModule:
    """Loads the data of ``cfg.data`` and wraps it with the batch settings of ``cfg.train``."""
    train, val = load_training_tensors(cfg.data, seed=int(cfg.seed))
    return TensorDataModule(
        train,
        val,
        batch_size=int(cfg.train.batch_size),
        num_workers=int(cfg.train.get("num_workers", 0)),
        seed=int(cfg.seed),
    )


def build_module(cfg: DictConfig, denoiser: EDMDenoiser, ema_state_dict=None) -> PriorModule:
    """The :class:`PriorModule` with the optimiser and EMA settings of ``cfg.train``."""
    train = cfg.train
    return PriorModule(
        denoiser,
        lr=float(train.lr),
        weight_decay=float(train.get("weight_decay", 0.0)),
        warmup_steps=int(train.warmup_steps),
        ema_decay=float(train.ema_decay),
        time_distribution=str(train.time_distribution),
        ema_state_dict=ema_state_dict,
        betas=tuple(train.get("betas", (0.9, 0.999))),
        seed=int(cfg.seed),
        augment=train.get("augment"),
    )


def build_callbacks(cfg: DictConfig, run_dir: str | os.PathLike) -> list[pl.Callback]:
    """Loss curve, sample grid, prior checkpoint and Lightning's periodic ``last.ckpt``."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    run_dir = Path(run_dir)
    train, smp = cfg.train, cfg.sample
    value_range = cfg.data.get("value_range", (-1.0, 1.0))
    callbacks: list[pl.Callback] = [
        LossCurve(run_dir, int(train.loss_every), int(train.sample_every)),
        SampleGrid(
            run_dir,
            int(train.sample_every),
            n=int(smp.n),
            method=str(smp.method),
            steps=int(smp.steps),
            seed=int(smp.get("seed", 0)),
            value_range=tuple(value_range),
        ),
        PriorCheckpoint(run_dir, int(train.checkpoint_every), meta={"config": plain_config(cfg)}),
        # periodic checkpoints/last.ckpt for resuming (the final one comes from PriorCheckpoint)
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            save_top_k=0,
            save_last=True,
            every_n_train_steps=int(train.checkpoint_every),
            every_n_epochs=0,
            enable_version_counter=False,
        ),
    ]
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    """The Lightning loggers of ``cfg.logger`` (a mapping name -> ``_target_``; may be empty)."""
    node = cfg.get("logger")
    if node is None:
        return []
    loggers = []
    for name, spec in node.items():
        if spec is None:
            continue
        loggers.append(_instantiate(spec, f"logger {name!r}"))
    return loggers


def build_trainer(
    cfg: DictConfig,
    callbacks: list[pl.Callback] | None = None,
    loggers: list | None = None,
    run_dir: str | os.PathLike | None = None,
    **overrides,
) -> pl.Trainer:
    """The ``pytorch_lightning.Trainer`` of ``cfg.trainer`` with the given callbacks/loggers.

    ``overrides`` are further Trainer arguments that take precedence over the config.
    ``trainer.precision: tf32`` is Lightning's ``32-true``, with TF32 turned on by
    :func:`hierprior.precision.precision_scope` around ``fit`` (:func:`fit_prior`).
    """
    from hydra.utils import instantiate

    node = cfg.trainer
    if node is None or "_target_" not in node:
        raise ValueError("the trainer config needs a `_target_` (pytorch_lightning.Trainer)")
    kwargs = {"callbacks": callbacks or [], "logger": loggers if loggers else False}
    kwargs["precision"] = lightning_precision(node.get("precision", "32-true"))
    if run_dir is not None:
        kwargs["default_root_dir"] = str(run_dir)
    kwargs.update(overrides)
    return instantiate(node, _convert_="all", **kwargs)
