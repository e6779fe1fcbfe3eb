r"""Run directories on shared machines and clusters: one live job per directory, and clean
stops on the signals a scheduler sends before a time limit.

- :func:`hold_run_dir` takes an exclusive lock on ``<run_dir>/.lock`` (``fcntl.flock``, which
  the kernel releases when the process dies, however it dies) and writes the holder's pid,
  host and job id into it. A second live process is refused with one line naming the
  directory and the holder (:class:`RunDirLocked`, a ``ConfigError``), or waits for it with
  ``wait=True``. A lock left by a dead process is taken over. Where the file system has no
  ``flock`` (some network mounts), the pid in the file decides: a dead pid on this host is
  taken over, a live one or one on another host is refused. Locks are re-entrant within a
  process (``hierprior-em`` holds its run directory while it trains a prior in another one).
- :func:`stop_on_signal` turns SIGUSR1 (``sbatch --signal=USR1@90``) and SIGUSR2 (submitit's
  time-out and preemption signal) into :class:`Preempted`, a ``SystemExit`` with status
  :data:`PREEMPTED_EXIT` (75). Every file hierprior writes is written atomically and every step
  resumes from its files, so any point between two Python instructions is a consistent state:
  the exception is raised at once, except inside :func:`safe_points` sections (prior training,
  which stops after the current optimiser step and saves ``checkpoints/last.ckpt``). When the
  signal had a handler before (submitit's checkpoint-and-requeue), it is called once the run
  has stopped, so submitit requeues the job; otherwise the process exits with status 75 and the
  caller (an sbatch script) requeues it. Rerunning the same command resumes.
- :func:`stop_point` marks named points of a run (``estep`` / ``tarp``: after each bank shard
  of an E-step, ``mstep``: after each M-step optimiser step, ``monitor``: when a round's
  monitor starts). When the environment variable :data:`STOP_AT_ENV` (``HIERPRIOR_STOP_AT``)
  names one, ``"<phase>:<round>[:<n>]"`` (the n-th visit of that phase in that round, 1 by
  default), the process sends itself SIGUSR1 there: a stop at a point the caller chooses
  (tests of resumption, drills), taking the same path as a scheduler's signal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from hierprior.config import ConfigError

__all__ = [
    "LOCK_NAME",
    "PREEMPTED_EXIT",
    "STOP_AT_ENV",
    "STOP_SIGNALS",
    "Preempted",
    "RunDirLocked",
    "check_stop",
    "hold_run_dir",
    "lock_holder",
    "safe_points",
    "stop_callback",
    "stop_on_signal",
    "stop_point",
    "stop_requested",
]

log = logging.getLogger(__name__)

#: the lock file inside a run directory
LOCK_NAME = ".lock"
#: exit status of a process stopped by a stop signal (EX_TEMPFAIL: rerun it to resume)
PREEMPTED_EXIT = 75
#: SIGUSR1 (plain sbatch ``--signal=USR1@90``) and SIGUSR2 (submitit's signal)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
#: seconds a safe-point section may take to stop before the stop is forced
FORCE_AFTER_S = 20.0
#: the environment variable naming the point at which a run stops itself (:func:`stop_point`)
STOP_AT_ENV = "HIERPRIOR_STOP_AT"

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class RunDirLocked(ConfigError):
    """Another live process holds the run directory (one-line message naming it)."""


class Preempted(SystemExit):
    """Raised in the main thread on a stop signal: unwinds the run, exits with status 75."""

    def __init__(self, signum: int):
        super().__init__(PREEMPTED_EXIT)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


# ------------------------------------------------------------------------------- locks


def _job_id() -> str | None:
    for key in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):
        if os.environ.get(key):
            return os.environ[key]
    return None


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "job": _job_id(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (no holder recorded)"
    text = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("job"):
        text += f" (job {holder['job']})"
    if holder.get("since"):
        text += f" since {holder['since']}"
    return text


def _read_fd(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        holder = json.loads(data) if data else None
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def lock_holder(run_dir: str | os.PathLike) -> dict | None:
    """What ``<run_dir>/.lock`` records (pid, host, job, since), or None when empty/absent.

    A record is left behind by a process that died; only the flock says whether it is live.
    """
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(holder: dict | None) -> bool:
    """Whether a recorded holder is gone for sure: none, this process, or a dead pid here."""
    if not holder or holder.get("pid") == os.getpid():
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        return not _pid_alive(int(holder["pid"]))
    except (KeyError, TypeError, ValueError):
        return True


def _flock(fd: int, path: Path, what: str, wait: bool) -> None:
    """Takes the flock (waiting when asked); falls back to the pid record without flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        holder = _read_fd(fd)
        if not wait:
            raise RunDirLocked(
                f"{what} {path} is in use by {_describe(holder)}; wait for that job to end or "
                "use another run_dir"
            ) from None
        log.warning("waiting for %s to release %s %s", _describe(holder), what, path)
        print(f"hierprior: waiting for {_describe(holder)} ({what} {path})", file=sys.stderr)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a stop signal interrupts the wait (Preempted)
        return
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
    log.warning("no flock on the file system of %s: the lock relies on the recorded pid", path)
    while True:
        holder = _read_fd(fd)
        if _stale(holder):
            return
        if not wait:
            raise RunDirLocked(
                f"{what} {path} is in use by {_describe(holder)} (no flock on this file "
                f"system: delete {path / LOCK_NAME} if that job is gone)"
            )
        time.sleep(5.0)


_HELD: dict[str, list] = {}  # realpath of a lock file -> [fd, depth]
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def hold_run_dir(
    run_dir: str | os.PathLike, *, wait: bool = False, what: str = "the run directory"
) -> Iterator[Path]:
    """Holds ``<run_dir>/.lock`` for the block (creates the folder); see the module doc.

    Raises :class:`RunDirLocked` when another live process holds it (``wait=False``), else
    waits for it. Re-entrant within a process. Yields the run directory.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise PermissionError(f"{what} {run_dir} is not writable: {err}") from err
    key = os.path.realpath(path)
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        os.close(fd)
        try:
            yield run_dir
        finally:
            with _HELD_LOCK:
                held[1] -= 1
        return
    try:
        _flock(fd, run_dir, what, wait)
    except BaseException:
        os.close(fd)
        raise
    previous = _read_fd(fd)
    if previous and previous.get("pid") != os.getpid():
        log.warning("took over the lock of %s left by %s (no longer running)", run_dir, previous)
    record = (json.dumps(_holder()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    with _HELD_LOCK:
        _HELD[key] = held = [fd, 1]
    try:
        yield run_dir
    finally:
        with _HELD_LOCK:
            held[1] -= 1
            done = held[1] == 0
            if done:
                del _HELD[key]
        if done:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # an empty record: released cleanly
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# ----------------------------------------------------------------------------- signals


class _StopState:
    def __init__(self):
        self.depth = 0  # nested stop_on_signal blocks
        self.defer = 0  # nested safe_points blocks
        self.signum: int | None = None  # the stop signal received, if any
        self.since = 0.0
        self.previous: dict[int, object] = {}
        self.watchdog: threading.Event | None = None
        self.visits: dict[tuple[str, int], int] = {}  # stop_point visits in this block


_STATE = _StopState()


def stop_requested() -> int | None:
    """The stop signal received inside :func:`stop_on_signal`, or None."""
    return _STATE.signum


def check_stop() -> None:
    """Raises :class:`Preempted` when a stop signal was received (a safe point)."""
    if _STATE.signum is not None:
        raise Preempted(_STATE.signum)


def _handler(signum, frame) -> None:
    state = _STATE
    if state.signum is None:  # no I/O here: the main thread may be inside a write
        state.signum, state.since = signum, time.monotonic()
        _start_watchdog(signum)
    if state.defer == 0 or time.monotonic() - state.since >= FORCE_AFTER_S:
        raise Preempted(signum)


def _start_watchdog(signum: int) -> None:
    """Re-sends the signal every FORCE_AFTER_S seconds until the run has stopped: a raise that
    landed in a place that swallows it (a ``__del__``) or a slow safe-point section is retried,
    then forced."""
    stopped = threading.Event()
    _STATE.watchdog = stopped

    def resend() -> None:
        while not stopped.wait(FORCE_AFTER_S):
            os.kill(os.getpid(), signum)

    threading.Thread(target=resend, name="hierprior-stop", daemon=True).start()


@contextlib.contextmanager
def stop_on_signal(
    what: str = "the run", signals: tuple[int, ...] = STOP_SIGNALS
) -> Iterator[None]:
    """Stops the block cleanly on SIGUSR1/SIGUSR2 (see the module doc); nestable.

    The outermost block installs the handlers (main thread only; elsewhere it does nothing)
    and restores them on exit. When :class:`Preempted` leaves it, one line on stderr says that
    ``what`` stopped and resumes when rerun; then, when the signal (or, failing that, another
    stop signal) had a Python handler before, e.g. submitit's checkpoint-and-requeue, that
    handler is called; otherwise Preempted propagates (exit status 75).
    """
    state = _STATE
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if state.depth:
        state.depth += 1
        try:
            yield
        finally:
            state.depth -= 1
        return
    state.depth, state.defer, state.signum, state.visits = 1, 0, None, {}
    state.previous = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    except Preempted as stop:
        previous = _restore(state)
        name = signal.Signals(stop.signum).name
        line = f"{name}: stopped {what} at a safe point; rerun the same command to resume"
        log.warning(line)
        print(f"hierprior: {line}", file=sys.stderr, flush=True)
        chained = _chain(previous, stop.signum)
        if chained is not None:
            log.warning("handing the stop over to %r", chained)
            chained(stop.signum, None)  # submitit: checkpoint, requeue and exit
        raise
    finally:
        _restore(state)


def _restore(state: _StopState) -> dict:
    """Stops the watchdog and puts the previous handlers back; returns them."""
    previous, state.previous = state.previous, {}
    if state.watchdog is not None:
        state.watchdog.set()
        state.watchdog = None
    for s, handler in previous.items():
        signal.signal(s, handler)
    state.depth, state.defer, state.signum = 0, 0, None
    return previous


def _chain(previous: dict, signum: int):
    first = previous.get(signum)
    if callable(first):
        return first
    return next((h for h in previous.values() if callable(h)), None)


def stop_point(phase: str, round_index: int) -> None:
    """A named point of a run: sends this process SIGUSR1 when :data:`STOP_AT_ENV` names it.

    ``HIERPRIOR_STOP_AT="<phase>:<round>[:<n>]"`` stops at the n-th visit (default 1) of
    ``phase`` in round ``round_index``, counted since the outermost :func:`stop_on_signal`
    block began. Outside such a block (no handler to turn the signal into a clean stop) it
    does nothing.
    """
    state = _STATE
    if not state.depth:
        return
    key = (str(phase), int(round_index))
    state.visits[key] = visit = state.visits.get(key, 0) + 1
    target = os.environ.get(STOP_AT_ENV, "").strip()
    if not target:
        return
    parts = target.split(":")
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts[1:]):
        raise ValueError(
            f"{STOP_AT_ENV} must read <phase>:<round>[:<visit>], e.g. mstep:2:7; got {target!r}"
        )
    wanted = (parts[0].strip(), int(parts[1]), int(parts[2]) if len(parts) == 3 else 1)
    if wanted == (*key, visit):
        log.info("%s=%s: stopping here", STOP_AT_ENV, target)
        os.kill(os.getpid(), signal.SIGUSR1)


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """A section that stops itself at its own safe points (it polls :func:`stop_requested`);
    a stop signal then raises at the end of the section, or after FORCE_AFTER_S seconds."""
    _STATE.defer += 1
    try:
        yield
    finally:
        _STATE.defer = max(0, _STATE.defer - 1)
    check_stop()


def stop_callback():
    """A Lightning callback that ends ``fit`` after the current optimiser step on a stop
    signal (use inside :func:`safe_points`; the trainer's end-of-training hooks then write
    the checkpoints)."""
    import pytorch_lightning as pl

    class StopOnSignal(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if stop_requested() is not None:
                trainer.should_stop = True

    return StopOnSignal()
