r"""Data for prior training: a LightningDataModule over tensors, and the tensors of a config.

:class:`TensorDataModule` serves any tensor dataset :math:`\{x_i\}_{i=1}^N` (images with shape
(N, C, H, W), vectors with shape (N, D), posterior samples of an EM round, ...) in shuffled
mini-batches. By default (``infinite=True``, for training by optimiser steps) the batches form one
endless stream: batch :math:`k` is slice :math:`k \bmod E` of the permutation
:math:`\pi_{\lfloor k / E \rfloor}` of the data, where :math:`E = \lfloor N / B \rfloor` batches
make a pass and :math:`\pi_e` is drawn by a generator seeded with ``(seed, e)``. The stream is
a pure function of the batch counter, so a run resumed at optimiser step :math:`k` sees exactly
the batches an uninterrupted run would; the global RNG is never touched.

:func:`load_training_tensors` builds the training (and optional validation) tensors from a
``data`` config: a hydra ``_target_`` (``hierprior.data.load_mnist``,
``hierprior.data.make_galaxies``, :func:`toy_mixture`, ...) whose result is a tensor, or a tuple
whose first element is the tensor (labels and parameters are dropped). A ``val_fraction`` of the
data, chosen by a seeded permutation, is held out for validation.

References:
    Falcon et al. (2019), PyTorch Lightning, https://github.com/Lightning-AI/pytorch-lightning.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from hierprior.checks import check_int, check_tensor

__all__ = [
    "BatchStream",
    "TensorDataModule",
    "load_training_tensors",
    "split_tensors",
    "toy_mixture",
]


class BatchStream(Sampler[list[int]]):
    """An endless stream of index batches, a pure function of (seed, batch counter).

    Batch k holds indices ``perm_e[j B : (j + 1) B]`` with ``e, j = divmod(k, E)``, where
    E = max(1, N // B) batches make one pass over the N samples (a remainder of fewer than B
    samples is left out of that pass) and ``perm_e`` is a permutation drawn by a generator
    seeded with ``seed`` and e. Iteration starts at batch ``start``.

    Split across W processes (DDP, ``world_size = W``): global batch k is
    ``perm_e[j W B : (j + 1) W B]`` with E = max(1, N // (W B)), and rank r yields its r-th
    slice of B indices; the effective batch is W B. With W = 1 this is the stream above.

    Arguments:
        n: number of samples N.
        batch_size: samples per batch (per rank) B (at most N // W are used when N < W B).
        seed: seed of the permutations.
        start: index of the first batch produced by ``iter``.
        rank, world_size: this process's rank and the number of processes W.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.n = check_int(n, "n", 1)
        self.world_size = check_int(world_size, "world_size", 1)
        self.rank = check_int(rank, "rank", 0)
        if self.rank >= self.world_size or self.n < self.world_size:
            raise ValueError(
                f"rank {rank} of {world_size} processes needs rank < world_size <= n = {n}"
            )
        self.batch_size = min(check_int(batch_size, "batch_size", 1), self.n // self.world_size)
        self.seed = check_int(seed, "seed", 0)
        self.start = check_int(start, "start", 0)
        self.batches_per_pass = max(1, self.n // (self.batch_size * self.world_size))

    def permutation(self, epoch: int) -> Tensor:
        """The permutation of pass ``epoch``, with shape (N,)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        for k in itertools.count(self.start):
            e, j = divmod(k, self.batches_per_pass)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            first = (j * self.world_size + self.rank) * self.batch_size
            yield perm[first : first + self.batch_size].tolist()


class TensorDataModule(pl.LightningDataModule):
    """Shuffled mini-batches of a tensor, for training by optimiser steps (or by epochs).

    Arguments:
        train: training data with shape (N, *event_shape).
        val: optional validation data with shape (M, *event_shape).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: seed of the shuffling.
        infinite: serve the training batches as one endless :class:`BatchStream` (train with
            the Trainer's ``max_steps``); resuming from a checkpoint at step k continues the
            stream at batch k (times ``accumulate_grad_batches``). With ``False``, a usual
            epoch-based loader (a seeded shuffle per epoch, the last incomplete batch dropped
            when N is larger than one batch).

    Batches are tensors with shape (batch_size, *event_shape). With ``infinite=True`` under
    DDP (the attached trainer's ``world_size`` > 1) each rank serves its slice of the stream
    (:class:`BatchStream` with ``rank``/``world_size``; batch_size is per device, the
    effective batch ``world_size * batch_size``); the Trainer must then be built with
    ``use_distributed_sampler=False``. The epoch-based loader (``infinite=False``) is left to
    Lightning's distributed sampler.

    Example:
        >>> dm = TensorDataModule(torch.randn(1000, 2), batch_size=128, seed=0)
        >>> next(iter(dm.train_dataloader())).shape
        torch.Size([128, 2])
    """

    def __init__(
        self,
        train: Tensor,
        val: Tensor | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        infinite: bool = True,
    ):
        super().__init__()
        check_tensor(train, "train", floating=True)
        if train.ndim < 2 or train.shape[0] < 1:
            raise ValueError(
                f"train must have shape (N, *event_shape) with N >= 1, got {train.shape}"
            )
        if val is not None:
            if not isinstance(val, Tensor):
                raise TypeError(f"val must be a tensor or None, got {type(val).__name__}")
            if val.shape[1:] != train.shape[1:] or val.shape[0] < 1:
                raise ValueError(
                    f"val must have shape (M, {', '.join(map(str, train.shape[1:]))}), "
                    f"got {tuple(val.shape)}"
                )
        self.train_data = train
        self.val_data = val
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.num_workers = check_int(num_workers, "num_workers", 0)
        self.seed = check_int(seed, "seed", 0)
        self.infinite = bool(infinite)
        self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.train_data.shape[1:])

    def _batches_done(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.global_step) * int(trainer.accumulate_grad_batches)

    def _loader(self, data: Tensor, shuffle: bool) -> DataLoader:
        common = {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": _stack,
        }
        # every loader has an explicit generator: one without draws its base seed (for worker
        # seeds) from the global RNG, which this module never touches
        fixed = torch.Generator().manual_seed(self.seed)
        if shuffle and self.infinite:
            trainer = getattr(self, "trainer", None)
            rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
            stream = BatchStream(
                len(data), self.batch_size, self.seed, self._batches_done(), rank, world
            )
            # the sampler yields whole index batches, gathered by one indexing operation
            common.pop("collate_fn")
            return DataLoader(
                _Gather(data), sampler=stream, batch_size=None, generator=fixed, **common
            )
        return DataLoader(
            TensorDataset(data),
            batch_size=min(self.batch_size, len(data)),
            shuffle=shuffle,
            drop_last=shuffle and len(data) > self.batch_size,
            generator=self._generator if shuffle else fixed,
            **common,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            return []
        return self._loader(self.val_data, shuffle=False)

    def state_dict(self) -> dict:
        # the epoch-based shuffling generator resumes where it was (Lightning checkpoints)
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "generator" in state_dict:
            self._generator.set_state(state_dict["generator"].cpu())


class _Gather(torch.utils.data.Dataset):
    """A dataset whose items are index batches: ``dataset[[i, j, ...]]`` is data[[i, j, ...]]."""

    def __init__(self, data: Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: list[int]) -> Tensor:
        return self.data[index]


def _stack(items: list) -> Tensor:
    """Collates TensorDataset items [(x,), (x,), ...] into one tensor with shape (B, *)."""
    return torch.stack([item[0] for item in items])


def split_tensors(
    data: Tensor, val_fraction: float = 0.0, seed: int = 0
) -> tuple[Tensor, Tensor | None]:
    """Splits data with shape (N, *) into (train, val) by a seeded permutation.

    ``val_fraction`` in [0, 1); 0 gives (data, None). At least one sample stays in each part.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n_val = int(round(float(val_fraction) * len(data)))
    if n_val == 0:
        return data, None
    if n_val >= len(data):
        raise ValueError(f"val_fraction {val_fraction} leaves no training data of {len(data)}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data[perm[n_val:]].contiguous(), data[perm[:n_val]].contiguous()


def toy_mixture(
    n: int = 4096,
    features: int = 2,
    modes: int = 4,
    radius: float = 1.0,
    std: float = 0.1,
    seed: int = 0,
) -> Tensor:
    r"""Vectors from a Gaussian mixture with modes on a circle in the first two coordinates.

    Mode k has mean :math:`r (\cos 2\pi k / K, \sin 2\pi k / K, 0, \dots, 0)` and covariance
    :math:`\text{std}^2 I`; the modes have equal weights. Returns float32 with shape
    (n, features). A toy dataset for vector (MLP) priors.
    """
    check_int(n, "n", 1)
    check_int(features, "features", 2)
    check_int(modes, "modes", 1)
    if std <= 0 or radius < 0:
        raise ValueError(f"need std > 0 and radius >= 0, got std={std}, radius={radius}")
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(modes, (n,), generator=g)
    angle = 2 * torch.pi * k.double() / modes
    x = std * torch.randn(n, features, generator=g, dtype=torch.float64)
    x[:, 0] += radius * torch.cos(angle)
    x[:, 1] += radius * torch.sin(angle)
    return x.float()


def load_training_tensors(data_cfg: Mapping, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """(train, val) tensors from a data config: ``_target_`` + its kwargs + ``val_fraction``.

    The target's result must be a floating tensor with shape (N, *event_shape), or a tuple
    whose first element is one. Keys starting with ``_`` other than ``_target_`` and the key
    ``val_fraction`` are not passed to the target.
    """
    from hydra.utils import get_object
    from omegaconf import DictConfig, OmegaConf

    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    if not isinstance(data_cfg, Mapping) or "_target_" not in data_cfg:
        raise ValueError("the data config needs a `_target_` (e.g. hierprior.data.load_mnist)")
    kwargs = {k: v for k, v in data_cfg.items() if k != "val_fraction" and not k.startswith("_")}
    target = get_object(data_cfg["_target_"])
    # called directly (not through hydra's instantiate) so that the loader's own errors
    # (e.g. FileNotFoundError for a data root without the dataset) reach the caller unwrapped
    out = target(**kwargs)
    data = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(data, Tensor) or not data.is_floating_point() or data.ndim < 2:
        raise TypeError(
            f"the data target {data_cfg['_target_']} must return a floating tensor with shape "
            f"(N, *event_shape) (or a tuple starting with one), got {type(data).__name__}"
        )
    return split_tensors(data.float(), data_cfg.get("val_fraction", 0.0) or 0.0, seed)
