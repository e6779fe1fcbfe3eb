r"""The EM loop: four swappable pieces, a run directory that is the whole state of the run.

Monte-Carlo EM on the marginal likelihood :math:`p(\{y_i\} \mid \theta)`, round k = 0, 1, ...::

    prior_k = prior_0 (given)                  if k = 0
            = mstep(prior_{k-1}, bank_{k-1})    otherwise                       (mstep.py)
    bank_k  = estep(prior_k, population)        x_i^(s) ~ p_{prior_k}(x | y_i)  (estep.py)
    metrics = monitor(prior_k, bank_k, ...)     PQMass, TARP, residuals, grids  (monitor.py)
            + stop.test(bank_k, bank_{k-1}, prior_k samples)   fixed-point test (stop.py)
    stop when stop.decide(metrics) fires, returning prior_k, or after ``rounds`` rounds.

Run directory (rerunning the same call continues it; a different configuration is refused)::

    em_state.json      the configuration that identifies the run (pieces' options, seed,
                       fingerprints of population and initial prior), wandb run id
    population.pt      y, truth, fingerprint
    metrics.csv, table.md, metrics.png, calibration.png, observations.png, truth.png
    round_kkk/         mstep/ (Lightning checkpoints, loss.csv and loss.png: the loss of
                       every M-step step, k >= 1), train_state.pt, prior.ckpt (the M-step's
                       commit marker), bank/shard_*.pt (E-step), tarp_bank/, prior_samples.pt,
                       tarp.json, *.png, timing.json (wall times of the M-step, E-step and
                       monitor, in s, of the process that finished each), metrics.json (the
                       round's commit marker, written last)

Several devices (``trainer.devices = k`` in the E- and M-step; ``hierprior-em`` starts the k
processes, or ``torchrun --nproc-per-node=k``): every rank runs this loop. The E-step deals its
batches out over the ranks, the M-step trains with DDP; rank 0 alone writes ``em_state.json``,
``population.pt``, ``prior.ckpt``, ``train_state.pt``, the metrics, figures and wandb logs, and
runs the monitor, while the other ranks wait at a barrier and then read what rank 0 wrote (the
M-step's prior, the round's metrics for the stop rule). The ranks meet after opening the run
directory, after each M-step's checkpoint, after each E-step and at the end of every round.

Randomness: every stream derives from (run seed, round, purpose[, observation]) through
:func:`hierprior.seeds.derive_seed`; the global RNG is never used, so any round is
reproducible and a resumed round equals an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hierprior.checks import check_int
from hierprior.diffusion import EDMDenoiser, GaussianPrior, load_prior, save_prior
from hierprior.diffusion.checkpoint import prior_to_dict
from hierprior.em.bank import SampleBank, rank_and_world
from hierprior.em.estep import (
    EStep,
    barrier,
    check_launched,
    init_distributed,
    rank_zero_first,
)
from hierprior.em.monitor import Monitor, fidelity_columns
from hierprior.em.mstep import GaussianMStep, NetworkMStep, default_mstep
from hierprior.em.population import Population, tensor_fingerprint
from hierprior.em.report import Report, metrics_table
from hierprior.em.stop import StopRule, long_lag_round
from hierprior.io import atomic_save, atomic_write_text, device_of
from hierprior.runs import stop_point
from hierprior.training.callbacks import quiet_lightning

__all__ = ["EMResult", "run_em", "build_pieces"]

log = logging.getLogger(__name__)


@dataclass
class EMResult:
    """Outcome of :func:`run_em`.

    Attributes:
        priors: the prior of every round run, prior_0 (the initial one) first.
        metrics: one dict per round (round 0 first) of the logged metrics.
        run_dir: the run directory.
        stop_round: the round at which the stop rule fired (its prior is the last of
            ``priors``), or None when the run ended at the maximum number of rounds.
        stop_reason: why the loop ended.
        banks: the folders of the sample banks, one per round.
    """

    priors: list
    metrics: list[dict]
    run_dir: Path
    stop_round: int | None = None
    stop_reason: str = ""
    banks: list[Path] = field(default_factory=list)

    @property
    def prior(self):
        """The prior the run returns: the certified one when the rule fired, else the last."""
        return self.priors[-1]

    def table(self, columns: Sequence[str] | None = None) -> str:
        """The per-round metrics as a markdown table."""
        return metrics_table(self.metrics, columns)


# ------------------------------------------------------------------------- configuration


def build_pieces(
    prior,
    estep: EStep | Mapping | None = None,
    mstep: GaussianMStep | NetworkMStep | Mapping | None = None,
    monitor: Monitor | Mapping | None = None,
    stop: StopRule | Mapping | None = None,
) -> tuple[EStep, GaussianMStep | NetworkMStep, Monitor, StopRule]:
    """The four pieces from objects, keyword mappings or None (defaults); all validated."""
    if not isinstance(estep, EStep):
        estep = EStep(**dict(estep or {}))
    if mstep is None:
        mstep = default_mstep(prior)
    elif isinstance(mstep, Mapping):
        kind = GaussianMStep if isinstance(prior, GaussianPrior) else NetworkMStep
        mstep = kind(**dict(mstep))
    if not isinstance(monitor, Monitor):
        monitor = Monitor(**dict(monitor or {}))
    if not isinstance(stop, StopRule):
        stop = StopRule(**dict(stop or {}))
    return estep, mstep, monitor, stop


def _prior_fingerprint(prior) -> str:
    d = prior_to_dict(prior)
    tensors = [d[key] for key in ("mean", "cov", "weights", "means", "covs") if key in d]
    tensors += [v for _, v in sorted(d.get("state_dict", {}).items())]
    return tensor_fingerprint(*tensors)


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} (run directory) vs {b!r} (this call)")
    return out


def _open_run_dir(run_dir: Path, identity: dict, probe: bool = True) -> dict:
    """The run directory's state; refuses a directory made with another configuration."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if probe:
            probe_file = run_dir / ".write_probe"
            probe_file.write_text("ok")
            probe_file.unlink()
    except OSError as err:
        raise PermissionError(f"the run directory {run_dir} is not writable: {err}") from err
    path = run_dir / "em_state.json"
    if not path.exists():
        return {"config": identity}
    state = json.loads(path.read_text())
    diff = _config_diff(state["config"], identity)
    if diff:
        raise ValueError(
            f"the run directory {run_dir} holds a run made with a different configuration; "
            "use another run_dir. Differences:\n  " + "\n  ".join(diff)
        )
    return state


# ------------------------------------------------------------------------- round steps


def _timing(rdir: Path, key: str, start: float) -> float:
    """Records a step's wall time (s, since ``start``) in ``rdir/timing.json``."""
    seconds = round(time.perf_counter() - start, 3)
    path = rdir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    timing[key] = seconds
    atomic_write_text(path, json.dumps(timing, indent=1))
    return seconds


def _mstep(mstep, previous, samples: Tensor, rdir: Path, *, seed: int, k: int, device):
    """prior_k = M-step(prior_{k-1}, bank_{k-1}); reloaded from rdir once it is done.

    Distributed: every rank trains (DDP), rank 0 writes the prior, and after a barrier every
    rank loads it."""
    done, state_file = rdir / "prior.ckpt", rdir / "train_state.pt"
    rank, world = rank_and_world()
    todo = not done.exists()
    barrier()  # every rank has looked before rank 0 may write it
    if todo:
        start = time.perf_counter()
        state = _load(rdir.parent / f"round_{k - 1:03d}" / "train_state.pt")
        new, state = mstep(
            previous, samples.to(device), rdir / "mstep", seed=seed, round_index=k, state=state
        )
        if rank == 0:
            if state is not None:
                atomic_save(state, state_file)
            save_prior(new, done, meta={"round": k})  # the M-step's commit marker
            log.info("M-step round %d done in %.1f s", k, _timing(rdir, "mstep_s", start))
        barrier()  # prior.ckpt is written
    return load_prior(done, map_location=device)


def _reference(monitor: Monitor, population: Population, oracle, run_dir: Path, seed: int):
    """The truths' and the oracle's measurements (:meth:`Monitor.reference`), once per run."""
    path = run_dir / "reference.json"
    if path.exists():
        return json.loads(path.read_text())
    if population.truth is None:
        return {}
    if oracle is not None:
        oracle = oracle.to(population.truth.device)
    with torch.no_grad():
        row = monitor.reference(population, oracle, seed=seed)
    atomic_write_text(path, json.dumps(row, indent=1))
    return row


def _earlier_bank(stop: StopRule, banks: list[Path], k: int, population, num_samples: int):
    """The bank of round k // 2 for the stop rule's long-lag tests, or None."""
    j = long_lag_round(k) if stop.long_lag else None
    if j is None:
        return None
    return SampleBank(banks[j], len(population), num_samples, population.signal_shape).load()


def _load(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def _estep(estep: EStep, prior, population: Population, rdir: Path, *, seed: int, k: int):
    bank = rank_zero_first(
        SampleBank, rdir / "bank", len(population), estep.num_samples, population.signal_shape
    )
    if bank.is_complete():
        return bank
    start = time.perf_counter()
    estep(prior, population, bank, seed=seed, round_index=k)  # every rank; ends at a barrier
    if rank_and_world()[0] == 0:
        _timing(rdir, "estep_s", start)
    return bank


class _NoReport:
    """The report of ranks other than 0: they write and log nothing."""

    def start(self) -> None: ...

    def round(self, *args, **kwargs) -> None: ...

    def replay(self, *args, **kwargs) -> None: ...

    def finish(self) -> None: ...


# ------------------------------------------------------------------------------ the loop


def run_em(
    prior,
    population: Population,
    *,
    estep: EStep | Mapping | None = None,
    mstep: GaussianMStep | NetworkMStep | Mapping | None = None,
    monitor: Monitor | Mapping | None = None,
    stop: StopRule | Mapping | None = None,
    run_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    rounds: int = 10,
    logger: str | None = "csv",
    logger_options: dict | None = None,
    config: dict | None = None,
    generator: torch.Generator | None = None,
    sampler: Mapping | str | None = None,
    num_samples: int | None = None,
    estep_batch_size: int | None = None,
    evaluators: Sequence[Callable[[Tensor], dict]] | None = None,
    oracle=None,
) -> EMResult:
    """Learns a prior from a population of corrupted observations by Monte-Carlo EM.

    Arguments:
        prior: the initial prior, a :class:`~hierprior.diffusion.GaussianPrior` or a neural
            :class:`~hierprior.diffusion.EDMDenoiser`.
        population: the observations (:class:`~hierprior.em.Population`).
        estep: the :class:`~hierprior.em.EStep` (or its keyword arguments).
        mstep: :class:`~hierprior.em.GaussianMStep` / :class:`~hierprior.em.NetworkMStep` (or
            keyword arguments of the one that fits the prior); default by the prior's type.
        monitor: the :class:`~hierprior.em.Monitor` (or its keyword arguments).
        stop: the :class:`~hierprior.em.StopRule` (or its keyword arguments).
        run_dir: the run directory (default: a new temporary folder).
        seed: the run seed (default: ``generator.initial_seed()`` if given, else 0).
        rounds: the maximum number of rounds after round 0 (a rerun with more continues).
        logger: ``"wandb"`` (offline by default, in the run directory), ``"csv"`` or None;
            metrics.csv, table.md and the figures are always written.
        logger_options: wandb options (``project``, ``entity``, ``name``, ``group``,
            ``job_type``, ``tags``, ``mode``, ``config``: the config the wandb run stores,
            default the run's identity); see :class:`~hierprior.em.report.Report`.
        config: extra configuration that identifies the run (e.g. the population's config);
            a run directory made with a different one is refused.
        generator: only its ``initial_seed()`` is used, as the run seed.
        sampler, num_samples, estep_batch_size: a convenience that builds the E-step
            (``EStep(sampler, num_samples, batch_size)``) when ``estep`` is not given.
        evaluators: a convenience that adds evaluators to the monitor.
        oracle: the same network trained with the same budget directly on the truths (the
            upper bound of what EM can reach), or None. With it and truths, every round reports
            the oracle's distance to the truths and the round's ``fidelity`` columns (see
            :mod:`hierprior.em.monitor`); it is measured once, into ``reference.json``.

    Returns:
        :class:`EMResult`; ``result.prior`` is the prior the run returns.

    Raises (before any round): TypeError / ValueError for a bad prior, population or piece
    option, a prior/forward-model shape mismatch, a run directory made with another
    configuration; PermissionError for a run directory that cannot be written.
    """
    if not isinstance(population, Population):
        raise TypeError(f"population must be a hierprior.em.Population, got {type(population)}")
    if not isinstance(prior, (GaussianPrior, EDMDenoiser)):
        raise TypeError(f"run_em needs a GaussianPrior or an EDMDenoiser, got {type(prior)}")
    check_int(rounds, "rounds", 0)
    shortcut = {"sampler": sampler, "num_samples": num_samples, "batch_size": estep_batch_size}
    shortcut = {k: v for k, v in shortcut.items() if v is not None}
    if shortcut:
        if estep is not None:
            raise ValueError(f"give the E-step either as estep or as {sorted(shortcut)}")
        estep = shortcut
    if evaluators:  # added to a copy: the caller's Monitor is left as it was
        if not isinstance(monitor, Monitor):
            monitor = Monitor(**dict(monitor or {}))
        monitor = monitor.with_evaluators(evaluators)
    estep, mstep, monitor, stop = build_pieces(prior, estep, mstep, monitor, stop)
    init_distributed(estep.trainer)
    check_launched(estep.trainer, "E-step")
    if hasattr(mstep, "trainer"):
        check_launched(mstep.trainer, "M-step")
    rank, world = rank_and_world()
    quiet_lightning()
    estep.check(prior, population)
    mstep.check(prior)
    if seed is None:
        seed = generator.initial_seed() if generator is not None else 0
    seed = int(seed)

    if run_dir is None and world > 1:
        raise ValueError("a multi-device EM run needs a run_dir shared by its processes")
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="em_"))
    identity = json.loads(
        json.dumps(
            {
                "estep": estep.options(),
                "mstep": mstep.options(),
                "monitor": monitor.options(),
                "stop": stop.options(),
                "seed": seed,
                "extra": config or {},
                "population": population.fingerprint(),
                "initial_prior": _prior_fingerprint(prior),
                "prior_type": type(prior).__name__,
                **({} if oracle is None else {"oracle": _prior_fingerprint(oracle)}),
            },
            default=str,
        )
    )
    if rank == 0:
        state = _open_run_dir(run_dir, identity)
        if not (run_dir / "population.pt").exists():
            population.save(run_dir / "population.pt")
        report = Report(run_dir, logger, logger_options, state, identity)
        report.start()
        atomic_write_text(run_dir / "em_state.json", json.dumps(state, indent=1))
    else:
        report = _NoReport()
    barrier()  # the run directory is open (a refused one stops rank 0 and so the launch)
    if rank != 0:
        _open_run_dir(run_dir, identity, probe=False)

    device = device_of(prior)
    reference = _reference(monitor, population, oracle, run_dir, seed) if rank == 0 else {}
    priors, metrics, banks = [prior], [], []
    stop_round, reason = None, f"reached the maximum of {rounds} round(s)"
    previous = None  # the bank of the previous round, (N, S, *event)
    try:
        for k in range(rounds + 1):
            rdir = run_dir / f"round_{k:03d}"
            if k == 0:
                if rank == 0 and not (rdir / "prior.ckpt").exists():
                    save_prior(prior, rdir / "prior.ckpt", meta={"round": 0})
            else:
                priors.append(
                    _mstep(mstep, priors[-1], previous, rdir, seed=seed, k=k, device=device)
                )
            bank = _estep(estep, priors[-1], population, rdir, seed=seed, k=k)
            banks.append(bank.path)
            samples = bank.load()
            done = rdir / "metrics.json"
            completed = done.exists()  # the same on every rank (rank 0 writes it, then a barrier)
            if completed or rank != 0:
                barrier()  # other ranks: rank 0 has measured the round (nothing when completed)
                metrics.append(json.loads(done.read_text()))
                if completed:
                    report.replay(metrics[-1])  # a resumed offline wandb run logs it again
            else:
                start = time.perf_counter()
                stop_point("monitor", k)
                row, images = {"round": k}, {}
                if k == 0:
                    images.update(monitor.population_grids(population, run_dir))
                before = run_dir / f"round_{k - 1:03d}" / "prior_samples.pt"
                with estep.on_this_rank():  # the monitor's own E-step (TARP) on rank 0 alone
                    measured, grids, prior_x = monitor(
                        k,
                        priors[-1],
                        population,
                        samples,
                        estep,
                        rdir,
                        seed=seed,
                        previous_prior_samples=_load(before) if k > 0 else None,
                    )
                row.update(measured)
                row.update(reference)
                row.update(
                    fidelity_columns(row, metrics[0] if k > 0 else row, monitor.fidelity_metrics)
                )
                images.update(grids)
                if previous is not None:
                    earlier = _earlier_bank(stop, banks, k, population, estep.num_samples)
                    row.update(
                        stop.test(
                            samples, previous, prior_x, seed=seed, round_index=k,
                            earlier_bank=earlier,
                        )
                    )  # fmt: skip
                atomic_save(prior_x, rdir / "prior_samples.pt")
                _timing(rdir, "monitor_s", start)
                atomic_write_text(done, json.dumps(row, indent=1))  # commits the round
                metrics.append(row)
                report.round(metrics, images)
                log.info("EM round %d: %s", k, row)
                if world > 1:
                    barrier()  # the round is committed: the other ranks read its metrics
            previous = samples
            fired = stop.decide(metrics)
            if fired:
                stop_round, reason = k, fired
                break
    finally:
        report.finish()
    return EMResult(priors, metrics, run_dir, stop_round, reason, banks)
