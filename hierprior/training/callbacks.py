r"""Training callbacks that write a prior's artefacts into its run directory.

- :class:`LossCurve`: the training loss averaged over windows of ``every_n_steps`` optimiser
  steps, :math:`\bar L_k = \frac1W \sum_{j \in \text{window } k} L_j`, and the validation loss,
  written to ``loss.csv`` (columns ``step,split,loss``) and plotted to ``loss.png``.
- :class:`SampleGrid`: a grid of samples of the EMA prior (a fixed generator, so grids at
  different steps start from the same noise) written to ``samples.png``, and a copy per step
  under ``samples/``. Images are mapped from the data ``value_range`` to [0, 1]; vector data
  are drawn as a scatter plot of their first two coordinates over the training data.
- :class:`PriorCheckpoint`: ``prior.ckpt`` (the EMA denoiser, via
  :func:`~hierprior.diffusion.save_prior`, with the step and the run config in its meta) every
  ``every_n_steps`` and at the end of training, and Lightning's ``checkpoints/last.ckpt`` at the
  end of training (periodic ones come from a ``ModelCheckpoint``), from which a rerun resumes.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``),
so an interrupted run never leaves a torn artefact.

References:
    Karras et al. (2022), EDM, arXiv 2206.00364 (the Heun sampler used for the grids).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from hierprior.checks import check_int
from hierprior.diffusion.checkpoint import save_prior
from hierprior.diffusion.sampling import check_sampler, sample
from hierprior.io import atomic_write_bytes, figure_bytes, save_sample_grid

__all__ = [
    "LossCurve",
    "PriorCheckpoint",
    "SampleGrid",
    "plot_loss_curve",
    "progress_enabled",
    "quiet_lightning",
]

#: Lightning's INFO lines that are noise in a run's log: its advertising tips (always) and the
#: accelerator lines (after their first occurrence in the process)
_ADVERTS = ("\N{ELECTRIC LIGHT BULB} Tip:", "Tip: For seamless")
_ONCE = ("GPU available:", "TPU available:", "HPU available:")


class _LightningNoise(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(a in msg for a in _ADVERTS):
            return False
        if msg.startswith(_ONCE):
            if msg in self.seen:
                return False
            self.seen.add(msg)
        return True


_NOISE = _LightningNoise()


def quiet_lightning() -> None:
    """Silences Lightning's advertising tips (litlogger, litmodels) and repeats of its
    "GPU available / TPU available" lines (one Trainer per EM step would print them every
    round). Idempotent; affects this process's ``pytorch_lightning`` loggers only."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _NOISE not in logger.filters:
            logger.addFilter(_NOISE)


def progress_enabled(value=None) -> bool:
    """Whether to show progress bars: ``True``/``False`` as given; ``None`` or ``"auto"``: on in
    an interactive terminal (stderr is a TTY) unless ``$CI`` is set, off in batch logs.

    Raises a ValueError for anything else (e.g. ``progress=maybe``).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            return False
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    raise ValueError(f"progress must be true, false or auto (null), got {value!r}")


def plot_loss_curve(rows: Sequence[tuple[int, str, float]], path: str | os.PathLike) -> Path:
    """Plots (step, split, loss) rows, one line per split on a log scale, to a PNG."""

    def draw(fig):
        ax = fig.add_subplot()
        for split in sorted({r[1] for r in rows}):
            pts = [(s, v) for s, sp, v in rows if sp == split and math.isfinite(v)]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, "-" if split == "train" else "o-", label=split, ms=3)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("denoising score-matching loss")
        if any(v > 0 for _, _, v in rows):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()

    return atomic_write_bytes(path, figure_bytes(draw, (6, 4)))


class LossCurve(pl.Callback):
    """Records the training and validation loss and writes ``loss.csv`` and ``loss.png``.

    Arguments:
        run_dir: folder of the run.
        every_n_steps: optimiser steps per averaging window of the training loss (>= 1).
        write_every_n_steps: rewrite the files every this many steps (0: only at the end).
    """

    def __init__(
        self, run_dir: str | os.PathLike, every_n_steps: int = 10, write_every_n_steps: int = 0
    ):
        self.run_dir = Path(run_dir)
        self.every_n_steps = max(1, check_int(every_n_steps, "every_n_steps", 0))
        self.write_every_n_steps = check_int(write_every_n_steps, "write_every_n_steps", 0)
        self.rows: list[tuple[int, str, float]] = []
        self._sum: Tensor | None = None
        self._count = 0
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach().float()
        self._sum = loss if self._sum is None else self._sum + loss
        self._count += 1
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0:
            self._flush(step)
        if self.write_every_n_steps and step % self.write_every_n_steps == 0:
            if step != self._last_step and trainer.is_global_zero:  # one writer under DDP
                self.write()
        self._last_step = step

    def _flush(self, step: int) -> None:
        if self._count:
            self.rows.append((int(step), "train", float(self._sum) / self._count))
        self._sum, self._count = None, 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.rows.append((int(trainer.global_step), "val", float(value)))

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer.global_step)
        if trainer.is_global_zero:
            self.write()

    def write(self) -> None:
        """Writes loss.csv and loss.png (rows sorted by step)."""
        rows = sorted(self.rows, key=lambda r: (r[0], r[1]))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["step", "split", "loss"])
        writer.writerows([(s, sp, f"{v:.6g}") for s, sp, v in rows])
        atomic_write_bytes(self.run_dir / "loss.csv", buf.getvalue().encode())
        plot_loss_curve(rows, self.run_dir / "loss.png")

    def state_dict(self) -> dict:
        return {"rows": [list(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = [(int(s), str(sp), float(v)) for s, sp, v in state_dict.get("rows", [])]


class SampleGrid(pl.Callback):
    """Writes ``samples.png`` (EMA prior samples) every ``every_n_steps`` and at the end.

    Arguments:
        run_dir: folder of the run; per-step grids go to ``run_dir/samples/``.
        every_n_steps: steps between grids (0: only at the end of training).
        n: number of samples.
        method: sampler name (``"heun"``, ``"ddim"``, ``"ddpm"``).
        steps: sampler steps.
        seed: seed of the fixed generator (the same noise at every grid).
        value_range: data range mapped to black/white for images.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        every_n_steps: int = 0,
        n: int = 64,
        method: str = "heun",
        steps: int = 32,
        seed: int = 0,
        value_range: Sequence[float] = (-1.0, 1.0),
    ):
        check_sampler(method, steps)
        check_int(n, "the number of samples n")
        self.run_dir = Path(run_dir)
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", 0)
        self.n, self.method, self.steps, self.seed = n, method, steps, int(seed)
        self.value_range = tuple(float(v) for v in value_range)
        self._last_step = -1

    @torch.no_grad()
    def draw(self, pl_module) -> Tensor:
        """Samples of the module's EMA prior, with shape (n, *event_shape)."""
        prior = pl_module.sampling_prior()
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        return sample(prior, self.n, method=self.method, steps=self.steps, generator=generator)

    def write(self, trainer, pl_module) -> None:
        step = trainer.global_step
        samples = self.draw(pl_module)
        reference = None
        datamodule = getattr(trainer, "datamodule", None)
        if samples.ndim == 2 and getattr(datamodule, "train_data", None) is not None:
            reference = datamodule.train_data[:2000]
        path = save_sample_grid(samples, self.run_dir / "samples.png", self.value_range, reference)
        target = self.run_dir / "samples" / f"step_{step:07d}.png"
        atomic_write_bytes(target, path.read_bytes())
        self._last_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            if trainer.is_global_zero:
                self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.global_step != self._last_step:
            self.write(trainer, pl_module)


class PriorCheckpoint(pl.Callback):
    """Writes ``prior.ckpt`` (EMA prior) periodically and at the end, and the last Lightning
    checkpoint ``checkpoints/last.ckpt`` at the end of training.

    Arguments:
        run_dir: folder of the run.
        every_n_steps: steps between prior checkpoints (0: only at the end).
        meta: extra meta data stored in the prior checkpoint (e.g. the run config as a plain
            dict); ``step`` and ``ema_updates`` are added.
        filename: name of the prior checkpoint.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        every_n_steps: int = 0,
        meta: dict | None = None,
        filename: str = "prior.ckpt",
    ):
        self.run_dir = Path(run_dir)
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", 0)
        self.meta = dict(meta or {})
        self.filename = filename
        self._last_step = -1

    @property
    def path(self) -> Path:
        return self.run_dir / self.filename

    def save(self, trainer, pl_module) -> Path:
        """Saves the EMA prior now; returns the path."""
        meta = dict(self.meta)
        meta.update(step=int(trainer.global_step), ema_updates=int(pl_module.ema_updates))
        self._last_step = trainer.global_step
        return save_prior(pl_module.sampling_prior(), self.path, meta=meta)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            if trainer.is_global_zero:
                self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.global_step != self._last_step:
            self.save(trainer, pl_module)
        trainer.save_checkpoint(self.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
