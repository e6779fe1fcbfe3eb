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

from hierprior.config import ConfigError
from hierprior.diffusion.denoiser import EDMDenoiser
from hierprior.diffusion.sampling import SAMPLERS
from hierprior.diffusion.schedule import Schedule
from hierprior.training.callbacks import LossCurve, PriorCheckpoint, SampleGrid
from hierprior.training.datamodule import TensorDataModule, load_training_tensors
from hierprior.training.module import PriorModule

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


def _int(cfg, key: str, minimum: int, section: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{section}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def check_train_config(cfg: DictConfig) -> None:
    """Raises a ConfigError (a ValueError) naming the key when train/sample values are invalid.

    Runs before any data is loaded, so a typo fails in a second, not after an hour.
    """
    for section in ("train", "sample", "data", "prior", "schedule", "trainer"):
        if cfg.get(section) is None:
            raise ConfigError(f"the config has no `{section}` section")
    train, smp = cfg.train, cfg.sample
    _int(train, "steps", 1, "train")
    _int(train, "batch_size", 1, "train")
    _int(train, "warmup", 0, "train")
    _int(train, "sample_every", 0, "train")
    _int(train, "ckpt_every", 0, "train")
    _int(train, "loss_every", 1, "train")
    if train.get("num_threads") is not None:
        _int(train, "num_threads", 1, "train")
    if not float(train.lr) > 0:
        raise ConfigError(f"train.lr must be > 0, got {train.lr}")
    if not 0.0 <= float(train.ema_decay) < 1.0:
        raise ConfigError(f"train.ema_decay must lie in [0, 1), got {train.ema_decay}")
    if train.time_distribution not in ("lognormal", "uniform"):
        raise ConfigError(
            f"train.time_distribution must be 'lognormal' or 'uniform', got "
            f"{train.time_distribution!r}"
        )
    if smp.method not in SAMPLERS:
        raise ConfigError(
            f"unknown sampler sample.method={smp.method!r}; expected one of {sorted(SAMPLERS)}"
        )
    _int(smp, "steps", 1, "sample")
    _int(smp, "n", 1, "sample")


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
        warmup_steps=int(train.warmup),
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
        PriorCheckpoint(run_dir, int(train.ckpt_every), meta={"config": plain_config(cfg)}),
        # periodic checkpoints/last.ckpt for resuming (the final one comes from PriorCheckpoint)
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            save_top_k=0,
            save_last=True,
            every_n_train_steps=int(train.ckpt_every),
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
    """
    from hydra.utils import instantiate

    node = cfg.trainer
    if node is None or "_target_" not in node:
        raise ValueError("the trainer config needs a `_target_` (pytorch_lightning.Trainer)")
    kwargs = {"callbacks": callbacks or [], "logger": loggers if loggers else False}
    if run_dir is not None:
        kwargs["default_root_dir"] = str(run_dir)
    kwargs.update(overrides)
    return instantiate(node, _convert_="all", **kwargs)
