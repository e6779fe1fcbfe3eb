"""Training of diffusion priors with Lightning: module with EMA, data, callbacks, builders."""

from hierprior.io import save_sample_grid
from hierprior.training.build import (
    build_callbacks,
    build_datamodule,
    build_denoiser,
    build_loggers,
    build_module,
    build_schedule,
    build_trainer,
    check_train_config,
    plain_config,
)
from hierprior.training.callbacks import LossCurve, PriorCheckpoint, SampleGrid, plot_loss_curve
from hierprior.training.datamodule import (
    BatchStream,
    TensorDataModule,
    load_training_tensors,
    split_tensors,
    toy_mixture,
)
from hierprior.training.module import PriorModule, ema_decay_at, update_ema
from hierprior.training.train import TrainOutputs, fit_prior, write_config

__all__ = [
    "BatchStream",
    "LossCurve",
    "PriorCheckpoint",
    "PriorModule",
    "SampleGrid",
    "TensorDataModule",
    "TrainOutputs",
    "build_callbacks",
    "build_datamodule",
    "build_denoiser",
    "build_loggers",
    "build_module",
    "build_schedule",
    "build_trainer",
    "check_train_config",
    "ema_decay_at",
    "fit_prior",
    "load_training_tensors",
    "plot_loss_curve",
    "plain_config",
    "save_sample_grid",
    "split_tensors",
    "toy_mixture",
    "update_ema",
    "write_config",
]
