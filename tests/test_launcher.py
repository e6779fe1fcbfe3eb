"""Sweeps and clusters: the submitit launchers (local and SLURM), the shared round-0 prior, the
run-directory lock and the clean stop on SIGUSR1/SIGUSR2 (hierprior.runs).

What needs no SLURM runs here: a 2-job ``hierprior-em -m hydra/launcher=local`` sweep whose jobs
share one prior trained once (~25 s), a ``hierprior-em`` stopped by SIGUSR1 while it trains
its prior and then rerun to completion (~35 s), the sbatch script submitit would write from
conf/hydra/launcher/slurm.yaml, slurm/em_gpu.sbatch's requeue logic with stand-ins for srun and
scontrol, and the lock and signal helpers in-process. ``slow``: the submitit requeue of a
signalled sweep job (what SLURM's time-out signal triggers, ~65 s) and EM runs stopped at three
points resuming to the metrics of an uninterrupted run (~55 s). The launcher tests need the
``slurm`` extra (skipped without it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hierprior.config import CONF_DIR, ConfigError
from hierprior.runs import (
    LOCK_NAME,
    PREEMPTED_EXIT,
    Preempted,
    RunDirLocked,
    hold_run_dir,
    lock_holder,
    safe_points,
    stop_on_signal,
    stop_requested,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:no MNIST under root"),
]

# the launcher configs need the plugin of the `slurm` extra (pip install -e ".[slurm]")
needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason='hydra-submitit-launcher is not installed (pip install -e ".[slurm]")',
)

# the mnist_shift_tiny experiment shrunk to seconds (as tests/test_em_experiment.py's SHORT),
# as a machine config (conf/local/default.yaml in a folder given with -cd): the command line
# then holds only the sweep, and the multirun folders are named by it alone
TINY_LOCAL = """\
# @package _global_
logger: null
trainer: {enable_progress_bar: false, enable_model_summary: false}
data: {source: bundled}
train: {steps: 4, warmup_steps: 1, checkpoint_every: 0, num_threads: 1}
sample: {n: 4, steps: 2}
population: {num_obs: 24}
sampler: {steps: 3}
em:
  rounds: 1
  oracle: false  # the launcher's tests: one shared round-0 prior, no oracle
  estep: {batch_size: 12}
  mstep: {steps: 3, warmup_steps: 1, checkpoint_every: 2}
  monitor: {num_prior_samples: 24, steps: 2, num_refs: 4, re_tessellations: 3,
            permutations: 5, tarp_observations: 8, tarp_samples: 4, grid_size: 4,
            evaluators: []}
  stop: {min_rounds: 2, num_refs: 4, re_tessellations: 3, level: 0.2, permutations: 25}
"""


def _script(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


@pytest.fixture
def cli(tmp_path):
    """``cli.start(*args)`` / ``cli.run(*args)``: hierprior-em in a subprocess, from an empty
    folder, with HIERPRIOR_ROOT (runs, priors) in tmp_path and the tiny machine config."""
    cwd, root, conf = tmp_path / "cwd", tmp_path / "root", tmp_path / "conf"
    cwd.mkdir()
    (conf / "local").mkdir(parents=True)
    (conf / "local" / "default.yaml").write_text(TINY_LOCAL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "SUBMITIT_"))}
    env.update(
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        HIERPRIOR_ROOT=str(root),
        HIERPRIOR_CACHE=str(tmp_path / "cache"),
    )

    class Cli:
        def start(self, *args: str) -> subprocess.Popen:
            return subprocess.Popen(
                [_script("hierprior-em"), "-cd", str(conf), *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        def run(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
            proc = self.start(*args)
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    c = Cli()
    c.root = root
    return c


def _wait_for(condition, timeout: float, what: str, proc=None) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the command ended before {what}: {err[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _step(ckpt: Path) -> int:
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


# ---------------------------------------------------------------------------------------------
# configs: the launchers and the multirun folders


def _compose(root: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(root, overrides=overrides, return_hydra_config=True)


@needs_submitit
@pytest.mark.parametrize("root", ["em", "train_prior"])
def test_launchers_compose_for_both_commands(root):
    local = _compose(root, ["hydra/launcher=local"]).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")
    slurm = _compose(root, ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
    assert launcher.additional_parameters.requeue is True
    sweep = OmegaConf.to_container(slurm.hydra.sweep, resolve=False)
    assert sweep["subdir"] == "${hydra.job.override_dirname}"
    excluded = slurm.hydra.job.config.override_dirname.exclude_keys
    assert {"run_dir", "experiment", "paths.priors"} <= set(excluded)


@needs_submitit
def test_slurm_launcher_writes_signal_and_requeue_into_sbatch(tmp_path, monkeypatch):
    """The sbatch script submitit writes from conf/hydra/launcher/slurm.yaml (no SLURM needed):
    every key is a valid submitit parameter; the time-out signal, requeue and resources."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    # submitit's SLURM executor looks for srun on construction; nothing is submitted here
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))

    cfg = _compose(
        "em",
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.signal_delay_s=90",
            f"run_dir={tmp_path}",
        ],
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    # what SlurmLauncher.launch does with them
    init = {"folder": params.pop("submitit_folder")}
    init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -m job", "uid")
    lines = set(text.splitlines())
    usr = submitit.slurm.slurm.SlurmJobEnvironment.USR_SIG
    for flag in (
        f"#SBATCH --signal={usr}@90",
        "#SBATCH --requeue",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --open-mode=append",
    ):
        assert flag in lines, (flag, text)
    assert str(tmp_path / "multirun" / ".submitit") in text


def test_sbatch_scripts_stop_and_requeue():
    for script in sorted(Path(CONF_DIR).parent.joinpath("slurm").glob("*.sbatch")):
        text = script.read_text()
        assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text, script
        assert "scontrol requeue" in text and str(PREEMPTED_EXIT) in text, script


@pytest.mark.parametrize(
    "status, restarts, requeued",
    [(75, 0, True), (138, 3, True), (75, 10, False), (0, 0, False), (1, 0, False)],
)
def test_sbatch_script_requeues_a_stopped_run(tmp_path, status, restarts, requeued):
    """slurm/em_gpu.sbatch with stand-ins for srun (exits with the given status) and scontrol
    (records its arguments): exit status 75 (or 138) requeues the job, up to 10 times."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "srun $*"\nexit {status}\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = Path(CONF_DIR).parent / "slurm" / "em_gpu.sbatch"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    env["SLURM_RESTART_COUNT"] = str(restarts)
    result = subprocess.run(
        ["bash", str(script), "experiment=mnist_shift"], env=env, capture_output=True, text=True
    )
    assert result.returncode == status, result.stderr
    assert "srun hierprior-em experiment=mnist_shift" in result.stdout
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert calls == ("requeue 4242\n" if requeued else ""), calls


def test_prior_key_ignores_what_does_not_change_the_prior():
    import copy

    from hierprior.em.cli import initial_prior_key

    def compose_em(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("em", overrides=list(overrides))

    base_cfg = compose_em()
    base = initial_prior_key(base_cfg)[0]

    def key(key_value: str) -> str:
        name, value = key_value.split("=", 1)
        cfg = copy.deepcopy(base_cfg)
        OmegaConf.update(cfg, name, yaml.safe_load(value))
        return initial_prior_key(cfg)[0]

    same = [
        "population.forward.missing_fraction=0.3",
        "em.rounds=2",
        "em.mstep.lr=1e-4",
        "name=other",
        "run_dir=/elsewhere",
        "train.num_threads=2",
        "train.checkpoint_every=7",
        "trainer.enable_progress_bar=false",
    ]
    for override in same:
        assert key(override) == base, override
    for override in ["seed=1", "train.steps=7", "data.resolution=32", "trainer.precision=bf16"]:
        assert key(override) != base, override
    for group in ["sampler=dps", "logger=csv"]:  # group options outside the key
        assert initial_prior_key(compose_em(group))[0] == base, group
    assert initial_prior_key(compose_em("schedule=ve"))[0] != base


# ---------------------------------------------------------------------------------------------
# the run-directory lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from hierprior.runs import hold_run_dir
    with hold_run_dir(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_refused_in_one_line_and_a_waiter_gets_it(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run, 2.0)
    try:
        with pytest.raises(RunDirLocked) as err:
            with hold_run_dir(run):
                pass
        message = str(err.value)
        assert "\n" not in message and str(run) in message, message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message, message
        assert lock_holder(run)["pid"] == holder.pid
        start = time.monotonic()
        with hold_run_dir(run, wait=True):  # waits until the holder is done
            assert time.monotonic() - start > 1.0  # the holder kept it for 2 s
            assert lock_holder(run)["pid"] == os.getpid()
            with hold_run_dir(run):  # re-entrant in this process
                pass
        assert lock_holder(run) is None  # released cleanly: an empty record
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run, 60.0)
    holder.kill()  # SIGKILL: no cleanup, the record stays, the kernel drops the flock
    holder.wait()
    assert lock_holder(run)["pid"] == holder.pid
    with hold_run_dir(run):
        assert lock_holder(run)["pid"] == os.getpid()


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    import errno

    import hierprior.runs as runs

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runs.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    here = socket.gethostname()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": here}))
    with hold_run_dir(run):  # a dead pid on this host: taken over
        assert lock_holder(run)["pid"] == os.getpid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for holder in ({"pid": sleeper.pid, "host": here}, {"pid": 1, "host": "elsewhere"}):
            lock.write_text(json.dumps(holder))
            with pytest.raises(RunDirLocked, match=f"pid {holder['pid']} on {holder['host']}"):
                with hold_run_dir(run):
                    pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_em_refuses_a_run_directory_held_by_another_job(tmp_path):
    from test_em_experiment import short_config  # tests/ is on sys.path

    from hierprior.em.cli import run_from_config

    holder = _hold(tmp_path / "run", 60.0)
    try:
        with pytest.raises(
            ConfigError, match=f"run directory .*run is in use by pid {holder.pid}"
        ):
            run_from_config(short_config(tmp_path, f"paths.priors={tmp_path / 'priors'}"))
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "priors").exists()  # refused before any training


# ---------------------------------------------------------------------------------------------
# stop signals, in-process


def test_a_stop_signal_raises_preempted_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as err:
        with stop_on_signal("the test"):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # interrupted by the handler
            raise AssertionError("not stopped")
    assert err.value.code == PREEMPTED_EXIT and err.value.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    assert stop_requested() is None


def test_safe_points_defer_the_stop_and_a_previous_handler_takes_over():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with pytest.raises(Preempted):
            with stop_on_signal("the test"):
                with safe_points():
                    os.kill(os.getpid(), signal.SIGUSR2)
                    time.sleep(0.2)
                    assert stop_requested() == signal.SIGUSR2  # deferred, not raised
                    calls.append("after")
                raise AssertionError("safe_points did not raise at its end")
        assert calls == ["after", signal.SIGUSR2]  # submitit's handler is called last
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.slow
def test_em_stopped_anywhere_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    """SIGUSR1 at three named points of a 2-round EM run (HIERPRIOR_STOP_AT, see
    hierprior.runs.stop_point): after the first E-step shard of round 1, after the 7th M-step
    step of round 2 (its last checkpoint at step 5), and after the TARP E-step of round 1's
    monitor. Each stops with Preempted there, and rerunning gives the metrics of an
    uninterrupted run exactly. ~60 s."""
    import torch
    from omegaconf import open_dict
    from test_em_experiment import short_config

    from hierprior.em.cli import run_from_config
    from hierprior.runs import STOP_AT_ENV

    def config(name: str):
        cfg = short_config(
            tmp_path,
            f"paths.priors={tmp_path / 'priors'}",  # one prior for every run
            "em.rounds=2",
            "em.mstep.steps=20",
            "em.mstep.checkpoint_every=5",
        )
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path / name)
        return cfg

    def stopped_at(run: Path, point: str) -> bool:
        """What the run directory holds when the run stopped at that point, and nothing later."""
        if point == "estep:1:1":
            return len(list((run / "round_001" / "bank").glob("shard_*.pt"))) == 1
        if point == "mstep:2:7":
            return (run / "round_002" / "mstep" / "checkpoints" / "last.ckpt").exists() and not (
                run / "round_002" / "prior.ckpt"
            ).exists()
        tarp = run / "round_001" / "tarp_bank"
        return (
            len(list(tarp.glob("shard_*.pt"))) == 1
            and not (run / "round_001" / "metrics.json").exists()
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.delenv(STOP_AT_ENV, raising=False)
        reference = run_from_config(config("reference"))  # trains the prior and the classifier
        for point in ("estep:1:1", "mstep:2:7", "tarp:1:1"):
            name = f"stopped-{point.replace(':', '-')}"
            monkeypatch.setenv(STOP_AT_ENV, point)
            with pytest.raises(Preempted):
                run_from_config(config(name))
            monkeypatch.delenv(STOP_AT_ENV)
            assert lock_holder(tmp_path / name) is None
            assert stopped_at(tmp_path / name, point), point
            again = run_from_config(config(name))
            assert json.dumps(again.metrics) == json.dumps(reference.metrics), point
    finally:
        torch.set_num_threads(threads)


def test_stop_point_sends_the_signal_at_the_named_visit_only(monkeypatch):
    from hierprior.runs import STOP_AT_ENV, stop_point

    stop_point("estep", 1)  # outside stop_on_signal: nothing happens
    monkeypatch.setenv(STOP_AT_ENV, "mstep:2:3")
    with stop_on_signal("a test"):
        for _ in range(5):
            stop_point("mstep", 1)  # another round
        stop_point("estep", 2)  # another phase
        stop_point("mstep", 2)
        stop_point("mstep", 2)
        with pytest.raises(Preempted):
            stop_point("mstep", 2)
            time.sleep(1.0)  # the handler raises in the main thread at once
    monkeypatch.setenv(STOP_AT_ENV, "mstep")
    with stop_on_signal("a test"), pytest.raises(ValueError, match="HIERPRIOR_STOP_AT must"):
        stop_point("mstep", 2)


# ---------------------------------------------------------------------------------------------
# the command line: a local sweep, and a run stopped by SIGUSR1 then resumed


def _runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "runs" / "em").rglob("em_state.json"))


@needs_submitit
def test_local_sweep_runs_two_jobs_on_one_shared_prior(cli):
    start = time.perf_counter()
    result = cli.run("-m", "hydra/launcher=local", "population.forward.missing_fraction=0.4,0.7")
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = cli.root / "runs" / "em" / "mnist_shift_tiny" / "multirun"
    jobs = _runs(cli.root)
    assert [j.name for j in jobs] == [
        "population.forward.missing_fraction=0.4",
        "population.forward.missing_fraction=0.7",
    ], jobs
    assert all(j.parent == sweep for j in jobs)
    (entry,) = (cli.root / "runs" / "priors").iterdir()  # one prior for both jobs
    assert (entry / "DONE").is_file() and (entry / "key.json").is_file()
    trained = 0
    for job in jobs:
        rounds = [json.loads(p.read_text())["round"] for p in job.glob("round_*/metrics.json")]
        assert sorted(rounds) == [0, 1], job
        link = job / "initial_prior"
        assert link.is_symlink() and link.resolve() == entry.resolve()
        trained += (job / "em.log").read_text().count("training the round-0 prior")
        assert lock_holder(job) is None  # released
    assert trained == 1, "the shared prior was trained more than once"
    print(f"2-job local sweep: {seconds:.1f} s")


@pytest.mark.slow  # ~33 s; the 2-job sweep stays in the default suite
def test_sigusr1_stops_a_run_cleanly_and_the_rerun_completes(cli):
    """SIGUSR1 while the round-0 prior trains: the run stops after an optimiser step with
    checkpoints/last.ckpt written, exits 75 with one line; the same command then resumes."""
    args = ["train.steps=80", "train.checkpoint_every=10", "run_dir=run"]
    start = time.perf_counter()
    proc = cli.start(*args)
    priors = cli.root / "runs" / "priors"

    def checkpointed() -> bool:
        return any(priors.glob("*/checkpoints/last.ckpt"))

    _wait_for(checkpointed, 60, "the first checkpoint of the prior", proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("hierprior: SIGUSR1: stopped the EM run in run"), last
    assert "Traceback" not in err, err[-3000:]
    (entry,) = priors.iterdir()
    stopped = _step(entry / "checkpoints" / "last.ckpt")
    assert 10 <= stopped < 80 and not (entry / "DONE").exists()
    assert lock_holder(entry) is None and lock_holder(cli.root.parent / "cwd" / "run") is None

    again = cli.run(*args)
    seconds = time.perf_counter() - start
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    assert _step(entry / "checkpoints" / "last.ckpt") == 80 and (entry / "DONE").exists()
    run = cli.root.parent / "cwd" / "run"
    assert sorted(
        json.loads(p.read_text())["round"] for p in run.glob("round_*/metrics.json")
    ) == [
        0,
        1,
    ]
    print(f"SIGUSR1 at step {stopped}, stop + resume: {seconds:.1f} s")


@needs_submitit
@pytest.mark.slow
def test_a_signalled_sweep_job_is_requeued_by_submitit_and_completes(cli):
    """What SLURM's time-out signal does to a submitit job, on this machine: SIGUSR1 to one job
    while the shared prior trains; it stops, hands over to submitit, which requeues it (the
    local executor restarts it); the other job resumes the prior; both finish. ~55 s."""
    sweep = cli.root / "runs" / "em" / "mnist_shift_tiny" / "multirun"
    proc = cli.start(
        "-m",
        "hydra/launcher=local",
        "train.steps=150",
        "train.checkpoint_every=10",
        "population.forward.missing_fraction=0.4,0.7",
    )
    priors = cli.root / "runs" / "priors"
    _wait_for(lambda: any(priors.glob("*/checkpoints/last.ckpt")), 90, "a checkpoint", proc)
    (entry,) = priors.iterdir()
    trainer = lock_holder(entry)["pid"]  # the job training the prior
    os.kill(trainer, signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "stopped the EM run" in logs and "Requeued job" in logs, logs[-3000:]
    assert "resuming from" in logs
    for job in _runs(cli.root):
        rounds = [json.loads(p.read_text())["round"] for p in job.glob("round_*/metrics.json")]
        assert sorted(rounds) == [0, 1], job
    assert _step(entry / "checkpoints" / "last.ckpt") == 150
