r"""Shared helpers: atomic file writes, image grids with one scaling rule, device lookup,
progress bars.

Every file hierprior writes goes through :func:`atomic_write_bytes` (or its wrappers
:func:`atomic_write_text` and :func:`atomic_save`): the data go to a temporary file in the
target's folder, are flushed and fsync'ed, then ``os.replace`` moves them into place, so a
killed process leaves either the old file or the new one, never a torn one.

Image grids (:func:`save_sample_grid`) map the data range ``value_range = (a, b)`` linearly to
black..white, :math:`u = \mathrm{clip}((x - a) / (b - a), 0, 1)`, for every grid in the
project (training samples, EM observations, posterior and prior samples), so grids of one run
compare pixel for pixel. Vectors are drawn as a scatter plot of their first two coordinates.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "device_dtype",
    "device_of",
    "figure_bytes",
    "is_image_shape",
    "progress_bar",
    "save_sample_grid",
]


def atomic_write_bytes(path: str | os.PathLike, data: bytes, tmp_tag: str = "") -> Path:
    """Writes bytes to path via a temporary file in the same folder and ``os.replace``.

    The temporary file is ``.<name>.<tmp_tag>*.tmp`` (a tag such as ``rank1.`` lets a process
    tell its own leftovers from others').
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tmp_tag}", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes text (UTF-8) atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj, path: str | os.PathLike, tmp_tag: str = "") -> Path:
    """``torch.save`` of obj, written atomically (never a torn file); see atomic_write_bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue(), tmp_tag)


def device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first floating parameter or buffer.

    A module without floating tensors (e.g. a closed-form prior built on integers) is on the
    CPU with torch's default dtype.
    """
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def device_of(module: nn.Module) -> torch.device:
    """Device of a module's first floating parameter or buffer (CPU if it has none)."""
    return device_dtype(module)[0]


def progress_bar(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    """The iterable, wrapped in a transient tqdm bar named ``desc`` when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def is_image_shape(event_shape: Sequence[int]) -> bool:
    """Whether samples with this shape are images (C, H, W) with 1 or 3 channels."""
    return len(event_shape) == 3 and event_shape[0] in (1, 3)


def figure_bytes(draw: Callable, figsize: tuple[float, float], dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib figure drawn by ``draw(fig)`` (no pyplot state, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
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
        path: the PNG file (written atomically).
        value_range: the (a, b) that maps to black and white (images only).
        reference: optional data with shape (M, D) drawn under vector samples.
        nrow: images per row of the grid (default about sqrt(N)).
    """
    samples = samples.detach().float().cpu()
    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        from PIL import Image
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

        return atomic_write_bytes(path, figure_bytes(draw, (5, 5)))
    raise ValueError(
        "samples must be images with shape (N, 1 or 3, H, W) or vectors with shape (N, D >= 2), "
        f"got {tuple(samples.shape)}"
    )
