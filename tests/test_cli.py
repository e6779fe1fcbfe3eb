"""The console scripts as a user runs them: hydra flags and overrides in any order, and every
bad argument ending the command with exit status 2 and one line on stderr, before training.

Each test runs the installed script (``hierprior-em``, ``hierprior-train-prior``,
``hierprior-sample``) in a subprocess from an empty folder, with ``HIERPRIOR_ROOT`` in a
temporary folder (so runs and data paths stay there), ``WANDB_MODE=disabled`` and one thread.
A command that fails in its config check before torch is imported takes about a second; one
that fails after building the population or loading Lightning takes 5-10 s on a shared 2-core
machine, so only one of each kind runs by default (a junk checkpoint for hierprior-em, a bad
train value for hierprior-train-prior) and the rest are ``slow``: their in-process twins in
tests/test_em_experiment.py run by default, and the one-line exit is the same code path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hierprior.config import CONF_DIR

SAMPLERS = sorted(p.stem for p in (Path(CONF_DIR) / "sampler").glob("*.yaml"))


def _script(name: str) -> str:
    """The console script next to this interpreter (a venv's bin/), else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    assert found, f"console script {name} is not installed (pip install -e .)"
    return found


@pytest.fixture
def run(tmp_path):
    """``run("hierprior-em", *args)``: the script in a subprocess; returns (result, seconds)."""
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    env.update(
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        HIERPRIOR_ROOT=str(root),
        HIERPRIOR_CACHE=str(tmp_path / "cache"),
    )

    def call(name: str, *args: str, timeout: float = 180):
        start = time.perf_counter()
        result = subprocess.run(
            [_script(name), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return result, time.perf_counter() - start

    call.root = root
    return call


def _one_error_line(result, prog: str) -> str:
    """The command's one error line: exit 2, no traceback; any other stderr line is a Python
    warning (``file:line: UserWarning: ...`` and its source line), e.g. load_mnist's."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"{prog}: "), result.stderr[-3000:]
    for line in lines[:-1]:
        assert "Warning: " in line or line.startswith("  "), result.stderr[-3000:]
    return lines[-1]


def _trained_nothing(root: Path) -> bool:
    return not any(root.rglob("initial_prior")) and not any(root.rglob("*.ckpt"))


# ---------------------------------------------------------------------------------------------
# hydra flags and overrides in any order


@pytest.mark.parametrize(
    "args",
    [["--cfg", "job", "sampler=dps"], ["sampler=dps", "--cfg", "job"]],
    ids=["flag-first", "override-first"],
)
def test_cfg_job_prints_the_composed_config_in_any_order(run, args):
    result, _ = run("hierprior-em", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    sampler = result.stdout.split("\nsampler:\n", 1)[1]
    assert sampler.splitlines()[0].strip() == "method: dps"
    assert "\npopulation:\n" in result.stdout and "\nem:\n" in result.stdout


def test_cfg_job_with_a_value_override(run):
    result, _ = run("hierprior-em", "em.rounds=3", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-3000:]
    em = result.stdout.split("\nem:\n", 1)[1]
    assert em.splitlines()[0].strip() == "rounds: 3"


def test_train_prior_cfg_job_and_em_help(run):
    result, _ = run("hierprior-train-prior", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\ntrain:\n" in result.stdout and "\npopulation:" not in result.stdout
    result, _ = run("hierprior-em", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampler:" in result.stdout and "em/stop:" in result.stdout  # the groups


# ---------------------------------------------------------------------------------------------
# unknown group options: one line naming the choices, before hydra starts


def test_unknown_sampler_names_every_choice_in_one_line(run):
    result, _ = run("hierprior-em", "sampler=nope", "--cfg", "job")
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("hierprior-em: ") and "'nope'" in line
    assert all(choice in line for choice in SAMPLERS), line


def test_unknown_em_group_option_is_one_line(run):
    result, _ = run("hierprior-em", "em/stop=nope")
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "em/stop" in line and "fixed_point" in line, line
    assert _trained_nothing(run.root)


# ---------------------------------------------------------------------------------------------
# bad values: one line naming the key, before any training


def test_negative_rounds_fail_fast(run):
    result, seconds = run("hierprior-em", "em.rounds=-1")
    line = _one_error_line(result, "hierprior-em")
    assert "em.rounds" in line, line
    assert seconds < 10, f"em.rounds=-1 took {seconds:.1f} s to fail"
    assert _trained_nothing(run.root)


def test_missing_initial_prior_is_one_line(run, tmp_path):
    result, _ = run("hierprior-em", f"em.initial_prior={tmp_path / 'missing.ckpt'}")
    line = _one_error_line(result, "hierprior-em")
    assert "no prior checkpoint" in line and "missing.ckpt" in line, line


def test_train_prior_experiment_under_em_is_one_line(run):
    result, _ = run("hierprior-em", "experiment=mnist04_prior_tiny")
    line = _one_error_line(result, "hierprior-em")
    assert "no population" in line, line
    assert _trained_nothing(run.root)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "override, key",
    [
        # an option the sampler does not take
        pytest.param("+sampler.bogus=1", "sampler", marks=SLOW),
        pytest.param("em.mstep.steps=0", "em.mstep", marks=SLOW),
        pytest.param("em.monitor.permutations=-1", "em.monitor", marks=SLOW),
        pytest.param("em.stop.level=2", "em.stop", marks=SLOW),
        pytest.param("em.estep.num_samples=0", "em.estep", marks=SLOW),
        pytest.param("sampler.iterations=0", "sampler", marks=SLOW),  # mmps
    ],
)
def test_bad_em_values_are_one_line_naming_the_key(run, override, key):
    result, _ = run("hierprior-em", override)
    line = _one_error_line(result, "hierprior-em")
    assert line.startswith(f"hierprior-em: {key}"), line
    if "bogus" in override:
        assert "bogus" in line, line
    assert _trained_nothing(run.root)


def test_junk_initial_prior_is_one_line(run, tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(bytes(range(256)) * 8)
    result, _ = run("hierprior-em", f"em.initial_prior={junk}")
    line = _one_error_line(result, "hierprior-em")
    assert "not a loadable hierprior prior checkpoint" in line, line
    assert _trained_nothing(run.root)


def test_train_prior_bad_value_is_one_line(run):
    result, _ = run("hierprior-train-prior", "train.steps=0")
    line = _one_error_line(result, "hierprior-train-prior")
    assert "train.steps" in line, line
    assert _trained_nothing(run.root)


def test_sample_script_still_answers(run, tmp_path):
    # (it samples in tests/test_configs.py::test_sample_cli_on_a_trained_checkpoint)
    result, _ = run("hierprior-sample", f"ckpt={tmp_path / 'missing.ckpt'}", "n=2")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"no prior checkpoint at {tmp_path / 'missing.ckpt'}")
    )


# ---------------------------------------------------------------------------------------------
# no import cycle between the command modules


@pytest.mark.parametrize("module", ["hierprior.config", "hierprior.cli", "hierprior.em.cli"])
def test_command_modules_import_alone(module):
    code = f"import {module}"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_config_module_imports_no_torch():
    # what lets a bad em.rounds or group option fail in a second
    code = "import sys, hierprior.config, hierprior.cli; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
