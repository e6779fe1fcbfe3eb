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
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from hierprior.diffusion.checkpoint import save_prior
from hierprior.diffusion.sampling import SAMPLERS, sample

__all__ = [
    "LossCurve",
    "PriorCheckpoint",
    "SampleGrid",
    "atomic_write_bytes",
    "plot_loss_curve",
    "save_sample_grid",
]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes bytes to path via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _figure_bytes(draw: Callable, figsize: tuple[float, float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def save_sample_grid(
    samples: Tensor,
    path: str | os.PathLike,
    value_range: Sequence[float] = (-1.0, 1.0),
    reference: Tensor | None = None,
    nrow: int | None = None,
) -> Path:
    """Saves samples as a PNG: a grid of images, or a scatter plot for vectors.

    Arguments:
        samples: images with shape (N, C, H, W) (C in {1, 3}), or vectors with shape (N, D),
            D >= 2 (the first two coordinates are drawn).
        path: the PNG file.
        value_range: the (a, b) that maps to black and white (images only).
        reference: optional data with shape (M, D) drawn under vector samples.
        nrow: images per row of the grid (default about sqrt(N)).
    """
    samples = samples.detach().float().cpu()
    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        from torchvision.utils import make_grid

        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must satisfy a < b, got {value_range}")
        images = ((samples - lo) / (hi - lo)).clamp(0.0, 1.0)
        nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
        grid = make_grid(images, nrow=nrow, padding=1, pad_value=1.0)
        grid = grid[: samples.shape[1]]  # make_grid repeats one channel to three
        scale = max(1, math.ceil(512 / grid.shape[-1]))  # at least 512 px wide, pixel-exact
        grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        from PIL import Image

        array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        buf = io.BytesIO()
        image.save(buf, format="png")
        return atomic_write_bytes(path, buf.getvalue())
    if samples.ndim == 2 and samples.shape[1] >= 2:

        def draw(fig):
            ax = fig.add_subplot()
            if reference is not None:
                ref = reference.detach().float().cpu().reshape(len(reference), -1)
                ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", label="data")
            ax.scatter(samples[:, 0], samples[:, 1], s=4, c="C0", label="samples")
            ax.set_xlabel("x[0]")
            ax.set_ylabel("x[1]")
            ax.set_aspect("equal", adjustable="datalim")
            ax.legend(loc="upper right")

        return atomic_write_bytes(path, _figure_bytes(draw, (5, 5)))
    raise ValueError(
        "samples must be images with shape (N, 1 or 3, H, W) or vectors with shape (N, D >= 2), "
        f"got {tuple(samples.shape)}"
    )


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

    return atomic_write_bytes(path, _figure_bytes(draw, (6, 4)))


def _check_every(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: only at the end), got {value!r}")
    return value


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
        self.every_n_steps = max(1, _check_every("every_n_steps", every_n_steps))
        self.write_every_n_steps = _check_every("write_every_n_steps", write_every_n_steps)
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
            if step != self._last_step:
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
        if method not in SAMPLERS:
            raise ValueError(f"unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"sample steps must be an integer >= 1, got {steps!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of samples must be an integer >= 1, got {n!r}")
        self.run_dir = Path(run_dir)
        self.every_n_steps = _check_every("every_n_steps", every_n_steps)
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
        self.every_n_steps = _check_every("every_n_steps", every_n_steps)
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
