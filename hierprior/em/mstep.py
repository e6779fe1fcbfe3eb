r"""M-step: refit the prior on the E-step's posterior samples.

- Gaussian prior: the maximum-likelihood Gaussian of all samples (``GaussianPrior.fit``), which
  with exact posterior samples is the Monte-Carlo estimate of the closed-form Gaussian EM update
  :math:`\mu' = \bar m`, :math:`\Sigma' = \overline{C + (m - \mu')(m - \mu')^\top}`.
- Neural prior (:class:`~hierprior.diffusion.EDMDenoiser`): ``Trainer.fit`` of a
  :class:`~hierprior.training.PriorModule` by denoising score matching on the samples, warm
  started from the previous round's raw weights and EMA, with a fresh optimiser, for a fixed
  number of steps. Lightning's ``last.ckpt`` (in ``<workdir>/checkpoints``) lets a killed M-step
  resume; a checkpoint that fails to load is quarantined and the M-step restarts from the round's
  initial weights.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
from torch import Tensor

from hierprior.diffusion import EDMDenoiser, GaussianPrior
from hierprior.diffusion.analytic import GaussianMixturePrior

__all__ = ["run_mstep", "MSTEP_DEFAULTS"]

log = logging.getLogger(__name__)

MSTEP_DEFAULTS = {
    "steps": 500,
    "batch_size": 64,
    "lr": 2e-4,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "ema_decay": 0.99,
    "gradient_clip_val": 1.0,
    "checkpoint_every": 100,
    "min_eigenvalue": 1e-6,
    "time_distribution": "lognormal",
    "precision": "32-true",  # Lightning precision of the M-step, e.g. bf16-mixed on a GPU
}


def run_mstep(
    prior,
    samples: Tensor,
    workdir: str | os.PathLike,
    *,
    options: dict | None = None,
    seed: int = 0,
    raw_state: dict | None = None,
    trainer: dict | None = None,
    progress: bool = False,
) -> tuple[object, dict | None]:
    """Fits a new prior to samples (with shape (N, S, *event_shape)).

    Returns the new prior (EMA weights for a neural prior) and, for a neural prior, the raw
    training weights to warm start the next round (``{"raw": state_dict}``).
    """
    opts = {**MSTEP_DEFAULTS, **(options or {})}
    unknown = set(opts) - set(MSTEP_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown M-step option(s) {sorted(unknown)}; accepted: {sorted(MSTEP_DEFAULTS)}"
        )
    flat = samples.reshape(-1, *samples.shape[2:])
    if isinstance(prior, GaussianPrior):
        return prior.fit(flat.to(prior.mean.dtype), min_eigenvalue=opts["min_eigenvalue"]), None
    if isinstance(prior, GaussianMixturePrior):
        raise NotImplementedError("EM over a GaussianMixturePrior is not supported")
    if not isinstance(prior, EDMDenoiser):
        raise TypeError(f"cannot run an M-step for a prior of type {type(prior).__name__}")

    from hierprior.training import PriorModule, TensorDataModule

    workdir = Path(workdir)
    raw = copy.deepcopy(prior).train()
    if raw_state is not None:
        raw.load_state_dict(raw_state)
    module = PriorModule(
        raw,
        lr=opts["lr"],
        weight_decay=opts["weight_decay"],
        warmup_steps=opts["warmup_steps"],
        ema_decay=opts["ema_decay"],
        time_distribution=opts["time_distribution"],
        ema_state_dict=prior.state_dict(),
    )
    data = TensorDataModule(flat.float(), batch_size=opts["batch_size"], seed=seed % (2**31))
    ckpt_dir = workdir / "checkpoints"
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=opts["checkpoint_every"],
    )
    runner = pl.Trainer(
        max_steps=opts["steps"],
        default_root_dir=workdir,
        logger=False,
        callbacks=[checkpoint],
        gradient_clip_val=opts["gradient_clip_val"],
        precision=opts["precision"],
        enable_progress_bar=progress,
        enable_model_summary=False,
        **(trainer or {}),
    )
    last = ckpt_dir / "last.ckpt"
    pl.seed_everything(seed % (2**32), workers=True, verbose=False)
    if last.exists():
        try:
            runner.fit(module, datamodule=data, ckpt_path=str(last))
        except Exception as err:  # a torn or foreign checkpoint: start the M-step afresh
            log.warning(
                "M-step checkpoint %s failed to load (%s); restarting the M-step", last, err
            )
            os.replace(last, last.with_suffix(".ckpt.quarantined"))
            return run_mstep(
                prior,
                samples,
                workdir,
                options=options,
                seed=seed,
                raw_state=raw_state,
                trainer=trainer,
                progress=progress,
            )
    else:
        runner.fit(module, datamodule=data)
    new_prior = module.sampling_prior()
    raw_out = {k: v.detach().cpu() for k, v in module.denoiser.state_dict().items()}
    return new_prior, {"raw": raw_out}
