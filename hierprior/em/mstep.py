r"""M-step: refit the prior on the E-step's posterior samples.

- :class:`GaussianMStep` (for a :class:`~hierprior.diffusion.GaussianPrior`): the maximum
  likelihood Gaussian of all samples (``GaussianPrior.fit``), which with exact posterior samples
  is the Monte-Carlo estimate of the closed-form Gaussian EM update :math:`\mu' = \bar m`,
  :math:`\Sigma' = \overline{C + (m - \mu')(m - \mu')^\top}`.
- :class:`NetworkMStep` (for a neural :class:`~hierprior.diffusion.EDMDenoiser`):
  ``Trainer.fit`` of a :class:`~hierprior.training.PriorModule` by denoising score matching on
  the samples, warm started from the previous round's raw weights and EMA, with a fresh
  optimiser, for a fixed number of steps. Lightning's ``last.ckpt`` (in ``<workdir>/checkpoints``)
  lets a killed M-step resume; a checkpoint that cannot be read (torn by a kill outside the
  atomic write, or foreign) is quarantined and the M-step restarts from the round's initial
  weights. Any other error propagates. The loss of every optimiser step goes to
  ``<workdir>/loss.csv`` (``step,split,loss``) and ``<workdir>/loss.png`` (rewritten at every
  checkpoint and at the end; a resumed M-step keeps the rows of its checkpoint).

Randomness: the training noise and times come from the module's generator seeded with
(run seed, round, "mstep", "noise"), the batch order from (run seed, round, "mstep",
"shuffle"); the global RNG is neither read nor reseeded.

Several devices (``trainer.devices = k``, one process per device, see
:mod:`hierprior.em.estep`): Lightning's DDP, with the data split across ranks by the batch
stream itself (:class:`~hierprior.training.datamodule.BatchStream` with ``rank``/``world_size``):
optimiser step j uses global batch j of ``k * batch_size`` samples of the same shuffled
stream, rank r taking its r-th slice of ``batch_size``. ``batch_size`` is per device, so the
effective batch is ``k * batch_size`` (keep ``lr`` or scale it yourself). Every rank draws the
same training noise stream (so a resumed M-step, which restores rank 0's generator state on
every rank, continues exactly). Rank 0 writes the checkpoints and ``loss.csv``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from hierprior.checks import check_choice, check_float, check_int, check_positive
from hierprior.diffusion import EDMDenoiser, GaussianPrior
from hierprior.em.bank import rank_and_world
from hierprior.em.estep import check_devices, check_trainer, rank_zero_first
from hierprior.io import device_of
from hierprior.precision import lightning_precision, precision_scope
from hierprior.runs import stop_point
from hierprior.seeds import derive_seed
from hierprior.training.module import TIME_DISTRIBUTIONS, TRAINER_VOCABULARY, check_betas

__all__ = ["GaussianMStep", "NetworkMStep", "default_mstep"]

log = logging.getLogger(__name__)

#: Lightning Trainer arguments an M-step takes
TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "precision")


class GaussianMStep:
    """M-step of a Gaussian prior: the maximum-likelihood Gaussian of the samples.

    Arguments:
        min_eigenvalue: floor of the fitted covariance's eigenvalues (keeps it SPD).
    """

    def __init__(self, min_eigenvalue: float = 1e-6):
        self.min_eigenvalue = check_float(min_eigenvalue, "mstep min_eigenvalue")

    def options(self) -> dict:
        return {"kind": "gaussian", "min_eigenvalue": self.min_eigenvalue}

    def check(self, prior) -> None:
        if not isinstance(prior, GaussianPrior):
            raise TypeError(f"GaussianMStep fits a GaussianPrior, got {type(prior).__name__}")

    def __call__(
        self, prior, samples: Tensor, workdir: Path, *, seed: int, round_index: int, state=None
    ) -> tuple[GaussianPrior, None]:
        """The new prior fitted to samples (N, S, D); no training state."""
        flat = samples.reshape(-1, *samples.shape[2:]).to(prior.mean)
        return prior.fit(flat, min_eigenvalue=self.min_eigenvalue), None


class NetworkMStep:
    """M-step of a neural prior: denoising score-matching fine-tuning with Lightning.

    Arguments:
        steps: optimiser steps per round.
        batch_size: samples per optimiser step.
        lr, weight_decay, betas, warmup_steps: AdamW settings and linear warm-up (fresh every
            round); the names of the round-0 prior's ``train`` section (one vocabulary).
        ema_decay: decay of the EMA of the weights (warm started from the previous prior).
        gradient_clip_val: gradient-norm clipping.
        checkpoint_every: optimiser steps between resumable ``last.ckpt`` checkpoints.
        time_distribution: training times, ``"lognormal"`` (EDM) or ``"uniform"``.
        augment: ``None`` or ``"dihedral"`` (random rotations by quarter turns and flips of
            the bank's images; see :class:`~hierprior.training.PriorModule`).
        trainer: Lightning Trainer arguments (``accelerator``, ``devices``, ``strategy``,
            ``num_nodes``, ``precision``: Lightning's, e.g. ``"bf16-mixed"`` on a GPU, or
            ``"tf32"``; TF32 is on only for ``"tf32"``, see :mod:`hierprior.precision`).
        progress: show Lightning's progress bar (``hierprior-em`` sets it from the ``progress``
            key).
        support: None (every bank sample is trained on), or (lo, hi): samples with a value
            outside [lo, hi] are left out of the round's training and their number is logged
            (DiEM's manifold experiment keeps only posterior samples inside (-3, 3)^5, Rozet et
            al. 2024; a sampler's rare far outliers otherwise become training data).
    """

    def __init__(
        self,
        steps: int = 500,
        batch_size: int = 64,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.99,
        gradient_clip_val: float = 1.0,
        checkpoint_every: int = 100,
        time_distribution: str = "lognormal",
        trainer: Mapping | None = None,
        progress: bool = False,
        augment: str | None = None,
        support: Sequence[float] | None = None,
    ):
        self.steps = check_int(steps, "mstep steps", 1)
        self.batch_size = check_int(batch_size, "mstep batch_size", 1)
        self.lr = check_positive(lr, "mstep lr")
        self.weight_decay = check_float(weight_decay, "mstep weight_decay")
        self.warmup_steps = check_int(warmup_steps, "mstep warmup_steps", 0)
        self.ema_decay = check_float(
            ema_decay, "mstep ema_decay", 0.0, maximum=1.0, strict_maximum=True
        )
        self.gradient_clip_val = check_float(gradient_clip_val, "mstep gradient_clip_val")
        self.checkpoint_every = check_int(checkpoint_every, "mstep checkpoint_every", 1)
        self.time_distribution = check_choice(
            time_distribution, "mstep time_distribution", TIME_DISTRIBUTIONS
        )
        try:
            self.betas = check_betas(betas)
        except ValueError as err:
            raise ValueError(f"mstep {err}") from None
        from hierprior.training.module import AUGMENTATIONS

        self.augment = (
            None if augment is None else check_choice(augment, "mstep augment", AUGMENTATIONS[1:])
        )
        self.trainer = check_trainer(trainer, TRAINER_KEYS, "M-step")
        check_devices(self.trainer, "M-step")
        #: Lightning's precision, or "tf32" (Lightning's 32-true with TF32 on CUDA); any other
        #: precision trains with TF32 off (hierprior.precision)
        self.precision = str(self.trainer.get("precision", "32-true"))
        self.progress = bool(progress)
        self.support = None
        if support is not None:
            lo, hi = (check_float(v, "mstep support", None) for v in support)
            if not hi > lo:
                raise ValueError(f"mstep support must be (lo, hi) with lo < hi, got {support}")
            self.support = (lo, hi)

    def options(self) -> dict:
        # what changes the trained prior (not the checkpoint interval)
        keys = ("steps", "batch_size", *(k for k in TRAINER_VOCABULARY if k != "checkpoint_every"))
        out = {
            "kind": "network",
            **{k: getattr(self, k) for k in keys},
            "precision": self.precision,
            **({"augment": self.augment} if self.augment else {}),  # absent: older runs valid
        }
        if self.support is not None:  # absent by default: older run directories stay valid
            out["support"] = list(self.support)
        return out

    def check(self, prior) -> None:
        if not isinstance(prior, EDMDenoiser):
            raise TypeError(f"NetworkMStep trains an EDMDenoiser, got {type(prior).__name__}")

    def seeds(self, seed: int, round_index: int) -> dict[str, int]:
        """The seeds of the round's training noise and batch order."""
        return {
            "noise": derive_seed(seed, round_index, "mstep", "noise") % 2**63,
            "shuffle": derive_seed(seed, round_index, "mstep", "shuffle") % 2**31,
        }

    def __call__(
        self,
        prior: EDMDenoiser,
        samples: Tensor,
        workdir: str | os.PathLike,
        *,
        seed: int,
        round_index: int,
        state: dict | None = None,
    ) -> tuple[EDMDenoiser, dict]:
        """Fine-tunes the prior on samples (N, S, *event_shape) in ``workdir``.

        ``state`` is the previous round's training state (``{"raw": state_dict}``, the raw,
        non-EMA weights), None in round 1 (the raw weights start from the prior's).

        Returns the new prior (the EMA denoiser) and the training state to carry forward.
        """
        from hierprior.training import PriorModule, TensorDataModule
        from hierprior.training.callbacks import LossCurve, quiet_lightning

        quiet_lightning()
        workdir = Path(workdir)
        raw = copy.deepcopy(prior).train()
        if state is not None:
            raw.load_state_dict(state["raw"])
        seeds = self.seeds(seed, round_index)
        module = PriorModule(
            raw,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
            warmup_steps=self.warmup_steps,
            ema_decay=self.ema_decay,
            time_distribution=self.time_distribution,
            ema_state_dict=prior.state_dict(),
            seed=seeds["noise"],
            augment=self.augment,
        )
        flat = samples.reshape(-1, *samples.shape[2:]).float()
        if self.support is not None:
            lo, hi = self.support
            keep = ((flat >= lo) & (flat <= hi)).flatten(1).all(1)
            if not keep.any():
                raise ValueError(
                    f"M-step round {round_index}: no bank sample lies inside the support "
                    f"[{lo}, {hi}]"
                )
            log.info(
                "M-step round %d: %d of %d bank samples outside the support [%g, %g] left out",
                round_index, int((~keep).sum()), len(flat), lo, hi,
            )  # fmt: skip
            flat = flat[keep]
        data = TensorDataModule(flat, batch_size=self.batch_size, seed=seeds["shuffle"])
        ckpt_dir = workdir / "checkpoints"
        checkpoint = pl.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=self.checkpoint_every,
            enable_version_counter=False,
        )
        distributed = {}
        if rank_and_world()[1] > 1:  # the batch stream gives each rank its own slice
            distributed["use_distributed_sampler"] = False
        runner = pl.Trainer(
            max_steps=self.steps,
            default_root_dir=workdir,
            logger=False,
            # the loss of every step into workdir/loss.csv (state saved in last.ckpt)
            callbacks=[
                checkpoint,
                LossCurve(workdir, 1, self.checkpoint_every),
                StopPoint("mstep", round_index),
            ],
            gradient_clip_val=self.gradient_clip_val,
            enable_progress_bar=self.progress,
            enable_model_summary=False,
            **distributed,
            **{**self.trainer, "precision": lightning_precision(self.precision)},
        )
        last = ckpt_dir / "last.ckpt"
        # rank 0 quarantines an unreadable checkpoint before the other ranks look
        rank_zero_first(lambda: last.exists() and _readable_checkpoint(last))
        resume = str(last) if last.exists() else None
        with precision_scope(self.precision, device_of(prior)):  # TF32 only for "tf32"
            runner.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
        raw_out = {k: v.detach().cpu() for k, v in module.denoiser.state_dict().items()}
        return module.sampling_prior(), {"raw": raw_out}


class StopPoint(pl.Callback):
    """Passes :func:`hierprior.runs.stop_point` (``phase``, round) after every optimiser step."""

    def __init__(self, phase: str, round_index: int):
        self.phase, self.round_index = phase, int(round_index)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop_point(self.phase, self.round_index)


def _readable_checkpoint(path: Path) -> bool:
    """Whether a Lightning checkpoint loads; an unreadable one is moved aside (quarantined)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
            raise ValueError("not a Lightning checkpoint")
        return True
    except Exception as err:  # unpickling errors come in many types
        target = path.with_suffix(".ckpt.quarantined")
        os.replace(path, target)
        log.warning(
            "M-step checkpoint %s unreadable (%s); moved to %s, restarting the M-step",
            path,
            str(err).splitlines()[0][:120],
            target,
        )
        return False


def default_mstep(prior) -> GaussianMStep | NetworkMStep:
    """The M-step that fits this kind of prior, with default options."""
    return GaussianMStep() if isinstance(prior, GaussianPrior) else NetworkMStep()
