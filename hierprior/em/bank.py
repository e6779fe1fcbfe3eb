"""The sample bank: posterior samples of one EM round, stored as atomic shard files.

A bank lives in a folder (``round_k/bank/``). Each shard file holds the samples of a set of
observations::

    shard_<first index>_<count>_<digest>.pt = {"format": "hierprior-bank-shard", "version": 1,
        "indices": LongTensor (n,), "samples": Tensor (n, S, *event_shape)
        [, "params": Tensor (n, S, d)]}

A joint (source, lens) E-step also stores each sample's lens parameters beside it
(``params``; :meth:`SampleBank.load_params`).

Shards are named by the observations they hold (never by a process rank), so a bank filled by
k processes equals the one filled by one, shard for shard. Each is written to a temporary file
named after the writing rank (``.shard_<...>.pt.rank<r>.<random>.tmp``) and renamed into
place, so a shard either exists whole or not at all; several processes (DDP ranks) can fill
one bank. Opening a bank scans its shards: a shard that fails to load or to validate is moved
to ``quarantine/`` and its observations count as not done, so they are recomputed and never
used for training. :meth:`SampleBank.refresh` deletes the temporary files left by a killed
writer: in a distributed run only this rank's own and stale ones (older than
:data:`STALE_TMP_S`), never another rank's write in progress.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from hierprior.io import atomic_save

__all__ = ["SampleBank", "rank_and_world"]

log = logging.getLogger(__name__)

SHARD_FORMAT = "hierprior-bank-shard"
#: age (s) after which another rank's temporary shard file counts as left by a killed writer
STALE_TMP_S = 3600.0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed's default group; (0, 1) when
    it is not initialised (a single-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SampleBank:
    """Posterior samples x_i^(1..S) of N observations, with an index of the completed ones.

    Arguments:
        path: the bank's folder (created if needed).
        num_obs: number of observations N.
        num_samples: samples per observation S.
        event_shape: shape of one sample.
    """

    def __init__(
        self, path: str | os.PathLike, num_obs: int, num_samples: int, event_shape: tuple[int, ...]
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.num_obs = int(num_obs)
        self.num_samples = int(num_samples)
        self.event_shape = tuple(int(n) for n in event_shape)
        self._done = torch.zeros(self.num_obs, dtype=torch.bool)
        self._shards: dict[Path, Tensor] = {}
        self.refresh()

    # ------------------------------------------------------------------------ index

    def _validate(self, shard: dict) -> Tensor:
        if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
            raise ValueError("not a bank shard")
        idx, samples = shard["indices"], shard["samples"]
        if idx.ndim != 1 or idx.dtype != torch.long or len(idx) == 0:
            raise ValueError("bad indices")
        if idx.min() < 0 or idx.max() >= self.num_obs:
            raise ValueError("indices out of range")
        expected = (len(idx), self.num_samples, *self.event_shape)
        if tuple(samples.shape) != expected:
            raise ValueError(f"samples have shape {tuple(samples.shape)}, expected {expected}")
        if not torch.isfinite(samples).all():
            raise ValueError("samples hold NaN/Inf")
        params = shard.get("params")
        if params is not None:
            if params.dim() != 3 or tuple(params.shape[:2]) != expected[:2]:
                raise ValueError(
                    f"params have shape {tuple(params.shape)}, expected {expected[:2]} + (d,)"
                )
            if not torch.isfinite(params).all():
                raise ValueError("params hold NaN/Inf")
        return idx

    def _quarantine(self, file: Path, reason: str) -> None:
        qdir = self.path / "quarantine"
        qdir.mkdir(exist_ok=True)
        target = qdir / file.name
        try:
            os.replace(file, target)
        except FileNotFoundError:  # another rank quarantined it first
            return
        log.warning("bank shard %s failed to load (%s); moved to %s", file.name, reason, target)

    def refresh(self) -> None:
        """Rescans the shard files (e.g. after other processes wrote some).

        Temporary files of torn writes are deleted: all of them in a single-process run; in a
        distributed one, this rank's and those older than :data:`STALE_TMP_S` only.
        """
        self._done.zero_()
        self._shards.clear()
        rank, world = rank_and_world()
        now = time.time()
        for tmp in self.path.glob(".shard_*.tmp"):
            try:
                if world > 1 and f".rank{rank}." not in tmp.name:
                    if now - tmp.stat().st_mtime < STALE_TMP_S:
                        continue  # another rank's write in progress
                tmp.unlink(missing_ok=True)  # torn writes of a killed process
            except FileNotFoundError:
                continue
        for file in sorted(self.path.glob("shard_*.pt")):
            try:
                shard = torch.load(file, map_location="cpu", weights_only=True)
                idx = self._validate(shard)
            except FileNotFoundError:  # quarantined by another rank meanwhile
                continue
            except Exception as err:  # any unreadable or inconsistent shard is quarantined
                self._quarantine(file, str(err)[:200])
                continue
            self._shards[file] = idx
            self._done[idx] = True

    @property
    def done(self) -> Tensor:
        """Boolean mask of the observations whose samples are stored, with shape (N,)."""
        return self._done.clone()

    def missing(self) -> Tensor:
        """Indices of the observations still to sample, with shape (K,)."""
        return (~self._done).nonzero().flatten()

    def is_complete(self) -> bool:
        return bool(self._done.all())

    # ------------------------------------------------------------------------ I/O

    def write(self, indices: Tensor, samples: Tensor, params: Tensor | None = None) -> Path:
        """Stores the samples (n, S, *event_shape) of observations ``indices`` (n,) atomically
        (and their lens parameters (n, S, d), when given)."""
        indices = torch.as_tensor(indices, dtype=torch.long).detach().cpu().flatten()
        samples = samples.detach().cpu()
        shard = {"format": SHARD_FORMAT, "version": 1, "indices": indices, "samples": samples}
        if params is not None:
            shard["params"] = params.detach().cpu()
        self._validate(shard)
        digest = hashlib.sha1(indices.numpy().tobytes()).hexdigest()[:8]
        name = f"shard_{int(indices[0]):07d}_{len(indices):05d}_{digest}.pt"
        path = atomic_save(shard, self.path / name, tmp_tag=f"rank{rank_and_world()[0]}.")
        self._shards[path] = indices
        self._done[indices] = True
        return path

    def load(self, device: torch.device | str | None = None) -> Tensor:
        """All samples in observation order, with shape (N, S, *event_shape).

        Arguments:
            device: where the returned tensor lives (default: the CPU). Shards are always
                read on the CPU; the assembled tensor is allocated on ``device`` (e.g. the
                population's device, ``population.y.device``).

        Raises a RuntimeError naming the missing observations if the bank is incomplete.
        """
        if not self.is_complete():
            missing = self.missing().tolist()
            raise RuntimeError(
                f"the sample bank at {self.path} is incomplete: {len(missing)} observation(s) "
                f"missing, e.g. {missing[:10]}"
            )
        out = None
        for file in sorted(self._shards):
            shard = torch.load(file, map_location="cpu", weights_only=True)
            if out is None:
                out = torch.empty(
                    (self.num_obs, *shard["samples"].shape[1:]),
                    dtype=shard["samples"].dtype,
                    device=device,
                )
            index = shard["indices"].to(out.device)
            out[index] = shard["samples"].to(out.device)
        return out

    def load_params(self, device: torch.device | str | None = None) -> Tensor | None:
        """The lens parameters stored beside the samples, (N, S, d) in observation order, or
        None when the bank holds none (a RuntimeError when it is incomplete or only some
        shards hold them)."""
        if not self.is_complete():
            raise RuntimeError(f"the sample bank at {self.path} is incomplete")
        out, missing = None, []
        for file in sorted(self._shards):
            shard = torch.load(file, map_location="cpu", weights_only=True)
            params = shard.get("params")
            if params is None:
                missing.append(file.name)
                continue
            if out is None:
                out = torch.empty((self.num_obs, *params.shape[1:]), dtype=params.dtype)
            out[shard["indices"]] = params
        if out is None:
            return None
        if missing:
            raise RuntimeError(f"bank shards without lens parameters: {missing[:5]}")
        return out.to(device) if device is not None else out

    def __repr__(self) -> str:
        return (
            f"SampleBank({self.path}, done {int(self._done.sum())}/{self.num_obs}, "
            f"S={self.num_samples}, event_shape={self.event_shape})"
        )
