r"""E-step: posterior samples of every observation under the current prior, with Lightning.

For each observation i, draw :math:`x_i^{(1..S)} \sim p_\theta(x \mid y_i)` with a posterior
method of :mod:`hierprior.posterior` (``mmps``, ``dps``, ..., or ``exact`` for a Gaussian prior
with a linear-Gaussian likelihood). The observations are split into fixed batches of
consecutive indices; ``Trainer.predict`` runs the batches that the
:class:`~hierprior.em.bank.SampleBank` does not hold yet, and :class:`BankWriter` stores each
batch as one atomic shard, so a killed E-step resumes at the first missing batch. Each batch
draws from its own generator, seeded from (run seed, round, "estep", first observation of the
batch): a resumed round equals an uninterrupted one.

Several devices (``trainer.devices = k``): one process per device, all running the same EM
(``hierprior-em`` starts them, or ``torchrun --nproc-per-node=k``; see :func:`init_distributed`).
The batches still to do are dealt out round robin, rank r taking batches r, r + k, ...; each
rank runs them with a one-device Trainer on its own device (an E-step has no gradients to
synchronise) and writes their shards, named by observation indices, never by rank; then all
ranks meet (a barrier) before the completeness check. Since every batch draws from the
generator of its first observation, a k-device bank equals the one-device bank shard for shard.

Devices and precision: each batch of the population is moved to the device Lightning runs
the prior on, and its samples are written to the bank on the CPU (``SampleBank.load(device)``
puts them where the caller asks). ``precision`` (:mod:`hierprior.precision`) is ``"32-true"``
(the default: everything in plain fp32, TF32 off on CUDA), ``"tf32"`` (fp32 with TF32 matmuls
and convolutions on CUDA, the posterior solves included) or ``"bf16-mixed"`` (the prior's
network under ``torch.autocast(bfloat16)`` on CUDA: :class:`NetworkAutocast` wraps only the
network call, whose output is cast back to fp32, so the posterior method's arithmetic, the
forward model and the CG/GMRES solves stay in plain fp32/fp64, TF32 off). On the CPU every
precision runs in plain fp32, unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader

from hierprior.checks import check_int
from hierprior.diffusion.denoiser import Denoiser
from hierprior.em.bank import SampleBank, rank_and_world
from hierprior.em.population import Population
from hierprior.posterior import PosteriorMethod, posterior_method
from hierprior.precision import PRECISIONS, check_precision, precision_scope
from hierprior.runs import stop_point
from hierprior.seeds import derive_seed

__all__ = [
    "EStep",
    "BankWriter",
    "PosteriorSamplingModule",
    "NetworkAutocast",
    "PRECISIONS",
    "check_precision",
    "inference_prior",
    "precision_scope",
    "estep_batches",
    "barrier",
    "check_devices",
    "init_distributed",
    "num_devices",
    "rank_and_world",
    "rank_zero_first",
]

log = logging.getLogger(__name__)

#: Lightning Trainer arguments an E-step takes (Lightning's own precision stays fp32: the
#: solves need it; the E-step's ``precision`` autocasts the network only)
TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes")


class NetworkAutocast(Denoiser):
    """A prior whose network runs under ``torch.autocast``; its output is cast back.

    Only the call of the wrapped denoiser is autocast (its network forward and, through the
    recorded graph, the VJPs of MMPS); everything around it (sampler updates, forward model,
    CG/GMRES) sees fp32 tensors. Autocast is active only for inputs on ``device_types``
    (CUDA by default), so on the CPU the wrapper is the identity.

    Arguments:
        prior: the denoiser to wrap (its ``schedule`` and ``event_shape`` are shared).
        dtype: the autocast dtype (bfloat16).
        device_types: the device types on which autocast is enabled.
    """

    def __init__(
        self,
        prior: Denoiser,
        dtype: torch.dtype = torch.bfloat16,
        device_types: tuple[str, ...] = ("cuda",),
    ):
        super().__init__()
        self.inner = prior
        self.schedule = prior.schedule
        self.event_shape = tuple(prior.event_shape)
        self.dtype = dtype
        self.device_types = tuple(device_types)

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        kind = x_t.device.type
        if kind not in self.device_types:
            return self.inner(x_t, t)
        with torch.autocast(device_type=kind, dtype=self.dtype):
            out = self.inner(x_t, t)
        return out.to(x_t.dtype)


def inference_prior(prior, precision: str):
    """The prior to sample with at this precision: wrapped in :class:`NetworkAutocast` for
    ``bf16-mixed`` when it is a network (analytic priors, e.g. Gaussian, are returned as is)."""
    analytic = type(prior).tweedie_cov is not Denoiser.tweedie_cov
    if precision != "bf16-mixed" or analytic or not isinstance(prior, Denoiser):
        return prior
    return NetworkAutocast(prior)


def check_trainer(trainer: Mapping | None, allowed: tuple[str, ...], owner: str) -> dict:
    """The Lightning Trainer arguments of an EM piece, refusing keys it does not take."""
    trainer = dict(trainer or {})
    unknown = sorted(set(trainer) - set(allowed))
    if unknown:
        raise ValueError(f"{owner} trainer option(s) {unknown} not accepted; allowed: {allowed}")
    return trainer


#: strategies of a multi-device run: one process per device, gradients synchronised by DDP
DDP_STRATEGIES = ("auto", "ddp")
#: how long a rank waits at a barrier (rank 0 may train the round-0 prior meanwhile)
BARRIER_TIMEOUT = timedelta(hours=48)


def _is_gpu(trainer: Mapping) -> bool:
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "auto":
        return torch.cuda.is_available()
    return accelerator in ("gpu", "cuda")


def num_devices(trainer: Mapping | None) -> int:
    """The number of processes a trainer config asks for: ``devices`` (a count, a list of
    device ids, or ``-1``/``"auto"``: every GPU, one CPU) times ``num_nodes``."""
    trainer = dict(trainer or {})
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif devices in ("auto", -1):
        count = torch.cuda.device_count() if _is_gpu(trainer) else 1
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        count = devices
    else:
        raise ValueError(
            f"trainer devices must be a count >= 1, a list or 'auto', got {devices!r}"
        )
    return max(1, count) * int(trainer.get("num_nodes", 1) or 1)


def check_devices(trainer: Mapping | None, owner: str) -> int:
    """The number of devices of a trainer config; a one-line ValueError when several devices
    are asked for with a strategy other than DDP (``auto`` or ``ddp``)."""
    count = num_devices(trainer)
    strategy = (trainer or {}).get("strategy", "auto")
    if count > 1 and str(strategy) not in DDP_STRATEGIES:
        raise ValueError(
            f"{owner} trainer devices={count} needs strategy ddp (one process per device), "
            f"got strategy={strategy!r}"
        )
    return count


def check_launched(trainer: Mapping | None, owner: str) -> None:
    """A one-line RuntimeError when the trainer asks for k > 1 devices but this process is not
    one of k processes (torch.distributed set up by ``hierprior-em`` or ``torchrun``)."""
    count = check_devices(trainer, owner)
    _, world = rank_and_world()
    if world != max(count, 1) and (count > 1 or world > 1):
        raise RuntimeError(
            f"{owner} trainer devices={count} but this process is one of {world}: multi-device "
            "EM runs one process per device; launch it with hierprior-em (which starts them) "
            f"or torchrun --nproc-per-node={count}"
        )


def init_distributed(trainer: Mapping | None = None) -> tuple[int, int]:
    """Sets up torch.distributed once, from the launcher's environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``: ``torchrun`` or
    ``hierprior-em``'s own launcher); gloo on the CPU, NCCL on GPUs (each rank on GPU
    ``LOCAL_RANK``). A no-op without ``WORLD_SIZE > 1`` or when already set up.

    Returns (rank, world size).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return rank_and_world()
    gpu = _is_gpu(dict(trainer or {}))
    if gpu:
        torch.cuda.set_device(local_device_index(trainer))
    dist.init_process_group("nccl" if gpu else "gloo", timeout=BARRIER_TIMEOUT)
    return rank_and_world()


def local_device_index(trainer: Mapping | None) -> int:
    """This rank's GPU: ``devices[LOCAL_RANK]`` for a list of device ids, else LOCAL_RANK."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    devices = (trainer or {}).get("devices")
    if isinstance(devices, (list, tuple)):
        return int(devices[local])
    return local


def barrier() -> None:
    """All ranks meet here (nothing in a single-process run)."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def rank_zero_first(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0, a barrier, then on the other ranks (e.g. a rescan
    that may quarantine files), and a barrier again (so that every rank has seen the same
    files before any rank writes); returns this rank's result."""
    rank, world = rank_and_world()
    out = fn(*args, **kwargs) if rank == 0 else None
    if world > 1:
        barrier()
        if rank != 0:
            out = fn(*args, **kwargs)
        barrier()
    return out


def one_device_trainer(trainer: Mapping) -> dict:
    """Trainer arguments of one process's own device in a distributed run: GPU
    :func:`local_device_index` or one CPU, strategy auto."""
    out = {k: v for k, v in trainer.items() if k not in ("devices", "strategy", "num_nodes")}
    out["devices"] = [local_device_index(trainer)] if _is_gpu(trainer) else 1
    return out


def estep_batches(num_obs: int, batch_size: int) -> list[Tensor]:
    """The fixed partition of observations 0..N-1 into batches of consecutive indices."""
    return list(torch.arange(num_obs).split(batch_size))


class PosteriorSamplingModule(pl.LightningModule):
    """Wraps a prior and a posterior method for ``Trainer.predict`` over observation batches.

    Arguments:
        prior: the current prior (a Denoiser).
        population: the observations.
        method: the posterior method (:class:`~hierprior.posterior.PosteriorMethod`).
        num_samples: posterior samples per observation S.
        seed: the run seed; round_index: the EM round (both enter each batch's seed).
    """

    def __init__(
        self,
        prior,
        population: Population,
        method: PosteriorMethod,
        num_samples: int,
        seed: int,
        round_index: int,
        purpose: str = "estep",
        precision: str = "32-true",
    ):
        super().__init__()
        self.precision = check_precision(precision, "E-step")
        self.prior = inference_prior(prior, self.precision)
        self.population = population
        self.method = method
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.round_index = int(round_index)
        self.purpose = purpose

    def predict_step(self, batch: Tensor, batch_idx: int = 0) -> dict:
        indices = batch.flatten().cpu()
        sub = self.population[indices].to(self.device)
        generator = torch.Generator(self.device)
        generator.manual_seed(
            derive_seed(self.seed, self.round_index, self.purpose, int(indices[0]))
        )
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            precision_scope(self.precision, self.device),
        ):
            if getattr(self.method, "joint", False):  # (source, lens parameters): both kept
                samples, params = self.method.sample_joint(
                    self.prior, sub.forward, sub.noise, sub.y, self.num_samples, generator
                )
                return {"indices": indices, "samples": samples.detach(), "params": params}
            samples = self.method.sample(
                self.prior, sub.forward, sub.noise, sub.y, self.num_samples, generator
            )
        return {"indices": indices, "samples": samples.detach()}


class BankWriter(BasePredictionWriter):
    """Writes each predicted batch into the sample bank as one atomic shard.

    After each shard it passes :func:`hierprior.runs.stop_point` (phase = the E-step's
    ``purpose``, ``"estep"`` or ``"tarp"``, of round ``round_index``).
    """

    def __init__(self, bank: SampleBank, round_index: int = 0, purpose: str = "estep"):
        super().__init__(write_interval="batch")
        self.bank = bank
        self.round_index, self.purpose = int(round_index), str(purpose)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        self.bank.write(prediction["indices"], prediction["samples"], prediction.get("params"))
        stop_point(self.purpose, self.round_index)


class EStep:
    """The E-step: S posterior samples of every observation, stored in a sample bank.

    Arguments:
        sampler: the posterior method: a :class:`~hierprior.posterior.PosteriorMethod`, a
            mapping ``{"method": name, "steps": ..., **options}`` (as in ``conf/sampler/``), or
            a method name. Its options are checked here.
        num_samples: posterior samples per observation and round, S >= 1.
        batch_size: observations per E-step batch (one bank shard each).
        trainer: Lightning Trainer arguments (``accelerator``, ``devices``, ``strategy``,
            ``num_nodes``).
        progress: show Lightning's progress bar.
        precision: ``"32-true"`` (default), ``"tf32"`` or ``"bf16-mixed"`` (the network under
            bf16 autocast, TF32 elsewhere; CUDA only, a no-op on the CPU; see the module
            docstring).
    """

    def __init__(
        self,
        sampler: PosteriorMethod | Mapping | str = "mmps",
        num_samples: int = 2,
        batch_size: int = 64,
        trainer: Mapping | None = None,
        progress: bool = False,
        precision: str = "32-true",
    ):
        self.method = posterior_method(sampler)
        self.num_samples = check_int(num_samples, "estep num_samples")
        self.batch_size = check_int(batch_size, "estep batch_size")
        self.trainer = check_trainer(trainer, TRAINER_KEYS, "E-step")
        check_devices(self.trainer, "E-step")
        self.progress = bool(progress)
        self.precision = check_precision(precision, "E-step")
        self.local = False  # True: this rank alone (the monitor's E-step on rank 0)

    @contextlib.contextmanager
    def on_this_rank(self) -> Iterator[None]:
        """Inside, the E-step runs every batch in this process alone, on its own device (in
        a distributed run, the monitor's E-step on rank 0 while the others wait)."""
        saved, self.local = self.local, True
        try:
            yield
        finally:
            self.local = saved

    def options(self) -> dict:
        """What identifies this E-step in a run directory (JSON-able), its precision
        included."""
        return {
            "sampler": self.method.options(),
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "precision": self.precision,
        }

    def check(self, prior, population: Population) -> None:
        """Raises a ValueError (TypeError) when the method cannot run on this prior and
        population (a shape mismatch, a non-linear forward model where it needs a linear one,
        a noise model it cannot use: :meth:`check_noise`)."""
        population.check_prior(prior)
        self.method.check(prior, population.forward)
        self.check_noise(population)

    def check_noise(self, population: Population) -> None:
        """Raises a one-line TypeError / ValueError when the posterior method cannot use the
        population's noise model (e.g. MMPS with a non-Gaussian
        :class:`~hierprior.physics.LearnedNoise`); needs no prior, so it runs first."""
        opts = self.method.resolve(population.forward, self.num_samples)
        self.method.check_noise(population.noise, opts)

    def __call__(
        self,
        prior,
        population: Population,
        bank: SampleBank,
        *,
        seed: int,
        round_index: int,
        purpose: str = "estep",
    ) -> SampleBank:
        """Fills the bank with posterior samples of every observation it does not hold yet.

        In a distributed run every rank calls it; rank r runs batches r, r + k, ... of those
        still to do, and the ranks meet before the completeness check.
        """
        rank, world = (0, 1) if self.local else rank_and_world()
        trainer = dict(self.trainer)
        if world > 1 or self.local and rank_and_world()[1] > 1:
            trainer = one_device_trainer(trainer)
        if world > 1:
            rank_zero_first(bank.refresh)  # rank 0 quarantines bad shards before the others
        else:
            bank.refresh()
        todo = [
            b for b in estep_batches(len(population), self.batch_size) if not bank.done[b].all()
        ]
        if not todo:
            return bank
        log.info(
            "E-step round %d: %d batch(es) of up to %d observations%s",
            round_index,
            len(todo),
            self.batch_size,
            f", rank {rank} of {world} runs {len(todo[rank::world])}" if world > 1 else "",
        )
        todo = todo[rank::world]
        module = PosteriorSamplingModule(
            prior,
            population,
            self.method,
            bank.num_samples,
            seed,
            round_index,
            purpose,
            precision=self.precision,
        )
        runner = pl.Trainer(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=self.progress,
            enable_model_summary=False,
            callbacks=[BankWriter(bank, round_index, purpose)],
            inference_mode=False,
            **trainer,
        )
        # an explicit generator: a DataLoader without one draws its base seed from the global RNG
        loader_seed = derive_seed(seed, round_index, purpose, "loader")
        loader = DataLoader(
            todo,
            batch_size=None,
            shuffle=False,
            generator=torch.Generator().manual_seed(loader_seed),
        )
        start = time.perf_counter()
        if todo:
            runner.predict(module, dataloaders=loader, return_predictions=False)
        if world > 1:
            barrier()  # every rank's shards are written
        log.info(
            "E-step round %d (%s) done in %.1f s",
            round_index,
            purpose,
            time.perf_counter() - start,
        )
        bank.refresh()
        if not bank.is_complete():
            missing = bank.missing().tolist()
            raise RuntimeError(
                f"E-step round {round_index} left observations without samples: {missing[:10]}"
            )
        return bank
