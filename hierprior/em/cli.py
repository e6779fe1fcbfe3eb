"""``hierprior-em``: the EM loop from the composed ``conf/em.yaml`` config.

:func:`run_from_config` checks every value first (``em``, the four pieces, the sampler, the
population and the data path), in seconds and before any training; then it takes the run
directory (``<run_dir>/.lock``: a second live job on it is refused in one line naming the
holder) and obtains the round-0 prior: ``em.initial_prior``, else the run's own, else the one
in the shared cache ``${paths.priors}/<key>/`` (:func:`initial_prior_key`: a hash of the
resolved config that determines it), trained there once under a lock that concurrent jobs
wait on, and linked as ``<run_dir>/initial_prior``; with ``paths.priors: null`` it is trained
into ``<run_dir>/initial_prior``. Then it runs :func:`~hierprior.em.run_em` in ``run_dir``.
SIGUSR1/SIGUSR2 stop the run with its directory consistent (:mod:`hierprior.runs`);
rerunning the same command continues the run.

Several devices: ``hierprior-em trainer.devices=k trainer.strategy=ddp`` (``trainer=gpu`` on
GPUs, ``trainer.accelerator=cpu`` on CPUs: gloo) runs one process per device. This process is
rank 0; it starts ranks 1..k-1 itself (:func:`launch_ranks`: the same hydra job, rerun in
single-run mode with its overrides, ``run_dir`` and ``hydra.run.dir=<run_dir>/.rank<r>``, where
their log goes) with the environment ``torchrun`` would set, and ends them when it ends; under
``torchrun --nproc-per-node=k`` (``WORLD_SIZE`` set) it starts nothing. Rank 0 holds the run
directory's lock and trains the round-0 prior on one device (its cache key is that of the
one-device config) while the others wait; then every rank runs :func:`~hierprior.em.run_em`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from hierprior.config import ConfigError, check_em_section, first_line, instantiate_checked

__all__ = [
    "PRIOR_KEY_IGNORED",
    "wandb_identity",
    "check_em_section",
    "check_devices_section",
    "check_sampler_section",
    "launch_ranks",
    "initial_prior_key",
    "run_from_config",
]

log = logging.getLogger(__name__)


def check_sampler_section(cfg) -> None:
    """Raises a ConfigError naming ``sampler`` for a bad option of the E-step's method.

    The E-step builds the same method from ``em.estep.sampler`` (``${sampler}``); checked here
    first, a bad ``sampler.iterations`` or an unknown ``+sampler.bogus`` is reported under the
    key the user typed rather than under ``em.estep``.
    """
    from omegaconf import OmegaConf

    from hierprior.posterior import posterior_method

    node = cfg.get("sampler")
    if node is None:
        raise ConfigError("the config has no `sampler` section (choose one with sampler=<name>)")
    try:
        posterior_method(OmegaConf.to_container(node, resolve=True))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"sampler: {first_line(err)}") from err


#: keys of the ``train`` and ``trainer`` sections that do not change the trained prior (left out
#: of its cache key): threads, workers, logging, checkpoint and sample-grid intervals, and the
#: strategy (the round-0 prior is trained on one device)
PRIOR_KEY_IGNORED = {
    "train": ("num_workers", "num_threads", "loss_every", "sample_every", "checkpoint_every"),
    "trainer": (
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "log_every_n_steps",
        "default_root_dir",
        "strategy",
    ),
}


def initial_prior_key(cfg) -> tuple[str, dict]:
    """The round-0 prior's cache key: (16 hex digits, the resolved config they hash).

    What determines the trained prior: the resolved ``data``, ``prior``, ``schedule``,
    ``train`` and ``trainer`` sections and ``seed``, without :data:`PRIOR_KEY_IGNORED`.
    """
    import hashlib
    import json

    from omegaconf import OmegaConf

    key: dict = {"seed": cfg.get("seed")}
    for section in ("data", "prior", "schedule", "train", "trainer"):
        node = cfg.get(section)
        value = OmegaConf.to_container(node, resolve=True) if node is not None else None
        if isinstance(value, dict):
            for name in PRIOR_KEY_IGNORED.get(section, ()):
                value.pop(name, None)
        key[section] = value
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], key


def _load_or_quarantine(prior_dir: Path):
    """The finished prior in prior_dir, or None after moving an unloadable entry aside (e.g.
    one written by an older version of the code) so that it is trained again."""
    import time

    from hierprior.diffusion import load_prior

    try:
        return load_prior(prior_dir / "prior.ckpt")
    except (ValueError, FileNotFoundError) as err:
        target = prior_dir.with_name(f"{prior_dir.name}.quarantined-{time.time_ns()}")
        log.warning("cached prior %s unreadable (%s): moved to %s", prior_dir, err, target)
        try:
            os.replace(prior_dir, target)
        except FileNotFoundError:  # another job moved it already
            pass
        return None


def _train_prior(cfg, prior_dir: Path, name: str, run_dir: Path) -> None:
    """Trains (or resumes) the round-0 prior in prior_dir and marks it DONE.

    Its wandb run (``logger=wandb``) is in the EM run's group, with ``job_type: prior`` and the
    name ``<EM run's name>/prior``, in ``<prior_dir>/wandb``.
    """
    from omegaconf import OmegaConf, open_dict

    from hierprior.io import atomic_write_text
    from hierprior.training import fit_prior

    ident = wandb_identity(cfg, run_dir)
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(sub):  # the logger's folder and name follow run_dir and name
        sub.run_dir = str(prior_dir)
        sub.name = name
        sub.pop("hydra", None)
        if (sub.get("logger") or {}).get("wandb") is not None:
            sub.logger.wandb.name = f"{ident['name']}/prior"
            sub.logger.wandb.group = ident["group"]
            sub.logger.wandb.job_type = "prior"
            sub.logger.wandb.tags = ident["tags"]
    sub = OmegaConf.create(OmegaConf.to_container(sub, resolve=True))
    out = fit_prior(sub)
    atomic_write_text(prior_dir / "DONE", str(out.prior))


def _link(run_dir: Path, prior_dir: Path, name: str = "initial_prior") -> None:
    """``<run_dir>/<name>``: a relative symlink to the cached prior (or a text file
    ``<name>.path`` with its path where symlinks are not possible)."""
    from hierprior.io import atomic_write_text

    link = run_dir / name
    target = os.path.relpath(prior_dir.resolve(), run_dir.resolve())
    if link.is_symlink() and os.readlink(link) == target:
        return
    try:
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        atomic_write_text(run_dir / f"{name}.path", f"{prior_dir.resolve()}\n")


def _initial_prior(cfg, run_dir: Path):
    """The round-0 prior: ``em.initial_prior``; the run's own (a rerun); the shared cache
    ``${paths.priors}/<key>/`` (trained there once, under a lock other jobs wait on); or,
    with ``paths.priors: null``, trained into ``<run_dir>/initial_prior``."""
    from hierprior.diffusion import load_prior

    if cfg.em.initial_prior:
        try:
            return load_prior(cfg.em.initial_prior)
        except ValueError as err:
            raise ConfigError(f"em.initial_prior: {err}") from err
    # the run's copy of round 0 serves a rerun whose cache entry is gone
    copy = run_dir / "round_000" / "prior.ckpt"
    return trained_prior(cfg, run_dir, "initial_prior", "round-0 prior", fallback=copy)


def trained_prior(cfg, run_dir: Path, name: str, what: str, fallback: Path | None = None):
    """The prior the ``data``/``prior``/``schedule``/``train`` sections of cfg train: the
    run's own ``<run_dir>/<name>`` (a rerun), else ``fallback`` when it exists, else the
    shared cache ``${paths.priors}/<key>/`` (trained there once, linked as
    ``<run_dir>/<name>``), or, with ``paths.priors: null``, trained into ``<run_dir>/<name>``.
    ``what`` names it in the log."""
    from hierprior.diffusion import load_prior

    own = run_dir / name
    if (own / "DONE").exists():  # trained in (or linked from) this run directory
        return load_prior(own / "prior.ckpt")
    if fallback is not None and fallback.exists():
        return load_prior(fallback)
    cache = (cfg.get("paths") or {}).get("priors")
    if not cache:  # no shared cache: train inside the run directory
        if own.is_symlink():
            own.unlink()
        _train_prior(cfg, own, f"{cfg.name}_{name}", run_dir)
        return load_prior(own / "prior.ckpt")
    digest, key = initial_prior_key(cfg)
    return _cached_prior(cfg, Path(str(cache)) / digest, key, name, run_dir, what)


def _cached_prior(cfg, prior_dir: Path, key: dict, name: str, run_dir: Path, what: str):
    """The prior trained once by ``cfg`` into the cache entry ``prior_dir`` (under a lock other
    jobs wait on; resumed when a job stopped), linked as ``<run_dir>/<name>``."""
    from hierprior.io import atomic_write_text
    from hierprior.runs import hold_run_dir

    for _ in range(2):  # a second pass after quarantining an unreadable entry
        if not (prior_dir / "DONE").exists():
            with hold_run_dir(prior_dir, wait=True, what=f"the {what}"):
                if not (prior_dir / "DONE").exists():  # not trained by a job we waited for
                    atomic_write_text(prior_dir / "key.json", json.dumps(key, indent=1))
                    log.info("training the %s %s into %s", what, prior_dir.name, prior_dir)
                    _train_prior(cfg, prior_dir, f"{name}_{prior_dir.name}", run_dir)
        prior = _load_or_quarantine(prior_dir)
        if prior is not None:
            _link(run_dir, prior_dir, name)
            return prior
    raise RuntimeError(f"the {what} in {prior_dir} could not be trained and loaded")


def oracle_config(cfg, truths_path: Path):
    """The round-0 prior's training config with the population's truths as its data."""
    from omegaconf import OmegaConf, open_dict

    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(sub):
        value_range = sub.data.get("value_range", [-1.0, 1.0])
        sub.data = {
            "_target_": "hierprior.em.oracle.load_truths",
            "path": str(truths_path),
            "value_range": list(value_range),
        }
    return sub


def _oracle(cfg, run_dir: Path, population):
    """The oracle: the round-0 prior's network and training budget (``train``), trained
    directly on the population's truths; cached like the round-0 prior under
    ``${paths.priors}/oracle-<key>`` (key: the round-0 prior's config and the truths)."""
    import hashlib

    from hierprior.em.oracle import save_truths
    from hierprior.em.population import tensor_fingerprint

    _, key = initial_prior_key(cfg)
    key = {**key, "data": {"truths": tensor_fingerprint(population.truth)}}
    text = json.dumps(key, sort_keys=True, default=str)
    digest = "oracle-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    cache = (cfg.get("paths") or {}).get("priors")
    prior_dir = Path(str(cache)) / digest if cache else run_dir / "oracle_prior"
    truths = prior_dir / "truths.pt"
    if not truths.exists():
        save_truths(population.truth, truths)
    return _cached_prior(
        oracle_config(cfg, truths), prior_dir, key, "oracle_prior", run_dir, "oracle prior"
    )


def wandb_identity(cfg, run_dir: Path) -> dict:
    """The wandb ``group``, ``name`` and ``tags`` of an EM run (and of its round-0 prior).

    ``group``: the run directory's name, or for a job of a multirun (``-m``) the sweep's name
    (the folder above ``multirun/``); ``name``: the group, or ``<group>:<job folder>`` for a
    multirun job; ``tags``: the experiment, the sampler, the M-step kind and the population.
    ``logger.wandb.group`` / ``name`` / ``tags`` given in the config take precedence.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    run_dir = Path(str(run_dir))
    group, name, choices = run_dir.name, run_dir.name, {}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        choices = dict(hc.runtime.choices or {})
        if hc.mode == RunMode.MULTIRUN:
            sweep = Path(str(hc.sweep.dir))
            group = sweep.parent.name if sweep.name == "multirun" else sweep.name
            name = f"{group}:{run_dir.name}"
    sampler = (cfg.get("sampler") or {}).get("method")
    tags = [
        choices.get("experiment") or cfg.get("name"),
        f"sampler={sampler}" if sampler else None,
        f"mstep={choices['em/mstep']}" if choices.get("em/mstep") else None,
        f"population={choices['population']}" if choices.get("population") else None,
    ]
    w = (cfg.get("logger") or {}).get("wandb") or {}
    return {
        "group": w.get("group") or group,
        "name": name if w.get("name") in (None, cfg.get("name")) else w.get("name"),
        "tags": list(w.get("tags") or []) + [str(t) for t in tags if t],
    }


def _logger(cfg, run_dir: Path) -> tuple[str | None, dict]:
    from omegaconf import OmegaConf

    logger = cfg.get("logger") or {}
    if "wandb" in logger:
        w = logger.wandb
        full = OmegaConf.to_container(cfg, resolve=True)
        full.pop("hydra", None)
        return "wandb", {
            "project": w.get("project", "hierprior"),
            "entity": w.get("entity"),
            "mode": w.get("mode", "offline"),
            "job_type": "em",
            "config": full,
            **wandb_identity(cfg, run_dir),
        }
    return ("csv", {}) if "csv" in logger else (None, {})


def _set_progress(cfg, pieces) -> None:
    """``progress`` (true | false | null = auto: on in a terminal, off in batch logs and with
    ``$CI``) turns on the progress bars of the E-step, M-step and monitor, unless a piece's
    own ``progress`` option is set in its config section."""
    from hierprior.training.callbacks import progress_enabled

    try:
        on = progress_enabled(cfg.get("progress"))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for key, piece in pieces.items():
        node = cfg.em.get(key) or {}
        if hasattr(piece, "progress") and node.get("progress") is None:
            piece.progress = on


def _trainer_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    node = cfg.get("trainer") or {}
    keys = ("accelerator", "devices", "strategy", "num_nodes")
    return {k: OmegaConf.to_container(node, resolve=True)[k] for k in keys if k in node}


def check_devices_section(cfg) -> int:
    """The number of processes ``trainer`` asks for; a one-line ConfigError for several
    devices with a strategy that is not DDP, or on several nodes (not supported)."""
    from hierprior.em.estep import check_devices

    trainer = _trainer_dict(cfg)
    try:
        count = check_devices(trainer, "hierprior-em")
    except ValueError as err:
        raise ConfigError(f"trainer: {first_line(err)}") from err
    if int(trainer.get("num_nodes", 1) or 1) > 1:
        raise ConfigError("trainer.num_nodes > 1 is not supported: run one node")
    return count


def _single_device(cfg):
    """The config the round-0 prior is trained with in a multi-device run: its trainer on
    one device (rank 0's), so the prior and its cache key are the one-device ones."""
    import copy

    from omegaconf import open_dict

    from hierprior.em.estep import _is_gpu, local_device_index

    trainer = _trainer_dict(cfg)
    one = copy.deepcopy(cfg)
    with open_dict(one):
        one.trainer.devices = [local_device_index(trainer)] if _is_gpu(trainer) else 1
        for key in ("strategy", "num_nodes"):
            one.trainer.pop(key, None)
    return one


def launch_ranks(cfg, world: int) -> list:
    """Starts ranks 1..world-1 of this hydra job (this process becomes rank 0) with the
    environment of ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``); they die with this process. Returns their Popen objects."""
    import ctypes
    import signal
    import socket
    import subprocess
    import sys

    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(str(cfg.run_dir)).resolve()
    overrides = []
    if HydraConfig.initialized():
        overrides = [
            o
            for o in HydraConfig.get().overrides.task
            if not o.lstrip("+~").startswith("run_dir=")
        ]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world)}
    os.environ.update(common, RANK="0", LOCAL_RANK="0", NODE_RANK="0")

    def die_with_parent() -> None:  # Linux: SIGTERM when rank 0 dies, however it dies
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    children = []
    for rank in range(1, world):
        command = [
            sys.executable,
            "-c",
            "from hierprior.cli import em; em()",
            *overrides,
            f"run_dir={run_dir}",
            f"hydra.run.dir={run_dir / f'.rank{rank}'}",
            "hydra.output_subdir=null",
        ]
        env = dict(os.environ, **common, RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
        children.append(subprocess.Popen(command, env=env, preexec_fn=die_with_parent))
    log.info("started ranks 1..%d of %d (pids %s)", world - 1, world, [c.pid for c in children])
    return children


def _watch(children: list) -> None:
    """Ends this process (rank 0) when a rank it started fails: rank 0 would otherwise wait
    at its next barrier for a rank that is gone."""
    import threading
    import time

    def watch() -> None:
        while True:
            for child in children:
                code = child.poll()
                if code not in (None, 0):
                    log.error("rank process %d exited with status %s; stopping", child.pid, code)
                    for other in children:
                        if other.poll() is None:
                            other.terminate()
                    os._exit(code if code > 0 else 1)
            if all(c.poll() is not None for c in children):
                return
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="hierprior-ranks").start()


def run_from_config(cfg):
    """Runs EM as configured by a composed ``conf/em.yaml``; returns the EMResult.

    Raises ConfigError (one line, naming the key) or FileNotFoundError before any training
    for a bad value, an unknown option, a missing data root or initial prior.
    """
    import torch

    from hierprior.runs import hold_run_dir, stop_on_signal
    from hierprior.training import build_denoiser, check_train_config
    from hierprior.training.callbacks import quiet_lightning

    check_em_section(cfg)
    check_sampler_section(cfg)
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator} but CUDA is not available on this "
            "machine; use trainer=default (CPU)"
        )
    world = check_devices_section(cfg)
    estep = instantiate_checked(cfg.em.estep, "em.estep")
    mstep = instantiate_checked(cfg.em.mstep, "em.mstep")
    monitor = instantiate_checked(cfg.em.monitor, "em.monitor")
    stop = instantiate_checked(cfg.em.stop, "em.stop")
    _set_progress(cfg, {"estep": estep, "mstep": mstep, "monitor": monitor})
    quiet_lightning()
    if not cfg.em.initial_prior:
        if estep.method.name == "exact":
            raise ConfigError(
                "sampler=exact needs a Gaussian round-0 prior: set em.initial_prior to a "
                "Gaussian prior.ckpt (and em/mstep=gaussian)"
            )
        check_train_config(cfg)
    population = instantiate_checked(cfg.population, "population")
    try:  # e.g. a learned (non-Gaussian) noise model with mmps: refused before any training
        estep.check_noise(population)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sampler: {first_line(err)}") from err
    if not cfg.em.initial_prior:  # the prior to be trained must fit the population's signals
        try:
            build_denoiser(cfg, population.signal_shape)
        except ValueError as err:
            raise ConfigError(f"prior: {err}") from err

    threads = cfg.train.get("num_threads")
    if threads:  # torch CPU threads for the whole run (1 is steadiest on a shared 2-core box)
        torch.set_num_threads(int(threads))
    run_dir = Path(str(cfg.run_dir))
    if world == 1:
        # one live job per run directory; SIGUSR1/SIGUSR2 stop the run with its directory
        # consistent (status 75, or submitit's requeue), and rerunning the command resumes it
        with stop_on_signal(f"the EM run in {run_dir}"), hold_run_dir(run_dir):
            return _run(cfg, run_dir, population, estep, mstep, monitor, stop)
    return _run_ranks(cfg, world, run_dir, population, estep, mstep, monitor, stop)


def _run_ranks(cfg, world: int, run_dir: Path, *pieces):
    """A multi-device run: this process's rank of ``world`` (started here when no launcher
    set ``WORLD_SIZE``); rank 0 holds the run directory's lock."""
    from hierprior.em.estep import init_distributed
    from hierprior.runs import hold_run_dir, stop_on_signal

    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != world:
        raise ConfigError(
            f"trainer asks for {world} devices but the launcher started {launched} processes"
        )
    children = launch_ranks(cfg, world) if launched is None else []
    try:
        if children:
            _watch(children)
        rank, _ = init_distributed(_trainer_dict(cfg))
        with contextlib.ExitStack() as stack:
            stack.enter_context(stop_on_signal(f"the EM run in {run_dir} (rank {rank})"))
            if rank == 0:
                stack.enter_context(hold_run_dir(run_dir))
            result = _run(cfg, run_dir, *pieces)
        for child in children:
            child.wait()
        return result
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()


def _run(cfg, run_dir: Path, population, estep, mstep, monitor, stop):
    import torch
    from omegaconf import OmegaConf

    from hierprior.em import run_em
    from hierprior.em.bank import rank_and_world
    from hierprior.em.estep import barrier

    rank, world = rank_and_world()
    if world == 1:
        prior = _initial_prior(cfg, run_dir)
    else:  # rank 0 trains it (one device) while the others wait, then they load it
        if rank == 0:
            _initial_prior(_single_device(cfg), run_dir)
        barrier()
        prior = _initial_prior(_single_device(cfg), run_dir)
    try:
        estep.check(prior, population)
        mstep.check(prior)
    except (TypeError, ValueError) as err:
        raise ConfigError(first_line(err)) from err
    # TF32 stays off here: each step turns it on for itself only at precision "tf32"
    # (hierprior.precision.precision_scope)
    if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
        prior, population = prior.cuda(), population.to("cuda")
    oracle = None
    if cfg.em.get("oracle") and population.truth is not None:
        if world == 1:
            oracle = _oracle(cfg, run_dir, population)
        else:  # rank 0 trains it while the others wait
            if rank == 0:
                _oracle(_single_device(cfg), run_dir, population)
            barrier()
            oracle = _oracle(_single_device(cfg), run_dir, population)
    logger, logger_options = _logger(cfg, run_dir)
    result = run_em(
        prior,
        population,
        estep=estep,
        mstep=mstep,
        monitor=monitor,
        stop=stop,
        run_dir=run_dir,
        seed=int(cfg.seed),
        rounds=int(cfg.em.rounds),
        logger=logger,
        logger_options=logger_options,
        config={"population": OmegaConf.to_container(cfg.population, resolve=True)},
        oracle=None if oracle is None else oracle.to(population.y.device),
    )
    if rank == 0:
        print(f"\nEM run in {result.run_dir}: {result.stop_reason}\n")
        print(result.table())
    return result
