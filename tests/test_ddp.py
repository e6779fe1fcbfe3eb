"""Multi-device EM with one process per device (torch.distributed on gloo, CPU only).

The tests launch this file as a worker, ``python tests/test_ddp.py MODE DIR``, once per rank
with the environment ``torchrun`` sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``):

- ``estep``: one E-step of a tiny MLP prior (MMPS) into ``DIR/bank``; a 2-process bank must
  equal the 1-process bank shard for shard (``torch.equal``);
- ``em``: a 1-round EM run (E-step, DDP M-step, monitor with its own TARP E-step on rank 0)
  in ``DIR``, which must be complete and hold rank 0's files only.

Each test takes ~10-25 s on 2 CPU cores; all are in the default suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
N_OBS, BATCH = 60, 12  # 5 E-step batches: uneven over 2 ranks


def population(n: int = N_OBS, d: int = 4, m: int = 2):
    from hierprior.em import Population
    from hierprior.physics import DenseLinear, GaussianNoise

    g = torch.Generator().manual_seed(0)
    truth = 1.5 + 0.5 * torch.randn(n, d, generator=g)
    A = torch.randn(n, m, d, generator=g) / d**0.5
    forward, noise = DenseLinear(A), GaussianNoise(0.1)
    y = forward(truth) + noise.sample((n, m), generator=g, dtype=torch.float32)
    return Population(y=y, forward=forward, noise=noise, truth=truth)


def prior():
    from hierprior.diffusion import EDMDenoiser
    from hierprior.nn import MLP

    torch.manual_seed(0)  # network initialisation
    return EDMDenoiser(MLP(4, hidden=(32, 32)), (4,), sigma_data=1.0)


def estep(world: int):
    from hierprior.em import EStep

    trainer = {"accelerator": "cpu", "devices": world}
    return EStep({"method": "mmps", "steps": 8}, num_samples=2, batch_size=BATCH, trainer=trainer)


def run_estep(out: Path, world: int) -> None:
    from hierprior.em import SampleBank
    from hierprior.em.estep import init_distributed

    step = estep(world)
    init_distributed(step.trainer)
    pop = population()
    bank = SampleBank(out / "bank", len(pop), step.num_samples, pop.signal_shape)
    step(prior(), pop, bank, seed=0, round_index=0)
    assert bank.is_complete()


def run_tiny_em(out: Path, world: int):
    from hierprior.em import Monitor, NetworkMStep, StopRule, run_em

    trainer = {"accelerator": "cpu", "devices": world}
    return run_em(
        prior(),
        population(),
        estep=estep(world),
        mstep=NetworkMStep(steps=10, batch_size=8, checkpoint_every=5, trainer=trainer),
        monitor=Monitor(
            num_prior_samples=64,
            steps=8,
            num_refs=8,
            re_tessellations=4,
            permutations=20,
            tarp_observations=8,
            tarp_samples=4,  # > num_samples: the monitor runs its own E-step (rank 0 alone)
        ),
        stop=StopRule(min_rounds=3),
        rounds=1,
        run_dir=out,
        seed=0,
        logger="csv",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: Path, world: int = 2, timeout: float = 240) -> None:
    """Runs ``python tests/test_ddp.py mode out`` once per rank, as torchrun would."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), mode, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"


def _shards(folder: Path) -> dict[str, dict]:
    return {
        f.name: torch.load(f, map_location="cpu", weights_only=True)
        for f in sorted(folder.glob("shard_*.pt"))
    }


def test_two_process_estep_bank_equals_one_process_bank(tmp_path):
    torch.set_num_threads(1)
    run_estep(tmp_path / "one", world=1)
    launch("estep", tmp_path / "two")
    one, two = _shards(tmp_path / "one" / "bank"), _shards(tmp_path / "two" / "bank")
    assert len(one) == 5 and sorted(one) == sorted(two)
    for name in one:
        assert torch.equal(one[name]["indices"], two[name]["indices"]), name
        assert torch.equal(one[name]["samples"], two[name]["samples"]), name
    assert not list((tmp_path / "two" / "bank").glob(".*"))  # no temporary file left


def test_two_process_em_run_directory_is_complete(tmp_path):
    from hierprior.diffusion import load_prior
    from hierprior.em.report import write_metrics_csv  # noqa: F401  (the module loads)

    out = tmp_path / "run"
    launch("em", out)
    state = json.loads((out / "em_state.json").read_text())
    assert state["config"]["estep"]["batch_size"] == BATCH
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[1].startswith("0,") and rows[2].startswith("1,")
    for k in (0, 1):
        rdir = out / f"round_{k:03d}"
        load_prior(rdir / "prior.ckpt")
        assert json.loads((rdir / "metrics.json").read_text())["round"] == k
        assert len(list((rdir / "bank").glob("shard_*.pt"))) == 5
        assert (rdir / "tarp.json").exists() and (rdir / "prior_samples.pt").exists()
    assert (out / "round_001" / "train_state.pt").exists()
    assert (out / "round_001" / "mstep" / "loss.csv").exists()
    # rank 0's files only: nothing named after a rank, no temporary file anywhere
    names = [p.name for p in out.rglob("*")]
    assert not [n for n in names if "rank" in n or n.endswith(".tmp")], names


@pytest.mark.slow  # ~22 s; the bank and run-directory tests stay in the default suite
def test_hierprior_em_starts_its_ranks(tmp_path):
    """``hierprior-em trainer.devices=2 trainer.strategy=ddp trainer.accelerator=cpu`` on the
    shrunk tiny experiment of tests/test_em_experiment.py (~25 s on 2 cores)."""
    from test_em_experiment import SHORT

    run = tmp_path / "run"
    command = [
        sys.executable,
        "-c",
        "from hierprior.cli import em; em()",
        *SHORT,
        "em.monitor.evaluators=[]",
        f"run_dir={run}",
        f"paths.priors={tmp_path / 'priors'}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    for k in (0, 1):
        assert (run / f"round_{k:03d}" / "prior.ckpt").exists()
    assert (run / "em_state.json").exists() and (run / ".rank1" / "em.log").exists()
    assert out.stdout.count("EM run in") == 1  # rank 0 prints the table


def test_devices_without_ddp_fail_in_one_line(tmp_path):
    from test_em_experiment import SHORT

    command = [
        sys.executable,
        "-c",
        "from hierprior.cli import em; em()",
        *SHORT,
        f"run_dir={tmp_path / 'run'}",
        "trainer.devices=2",
        "trainer.strategy=fsdp",
        "trainer.accelerator=cpu",
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "needs strategy ddp" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "em_state.json").exists()  # (hydra makes the folder)


def test_several_devices_need_ddp_and_a_launch():
    from hierprior.em import EStep, NetworkMStep, run_em

    with pytest.raises(ValueError, match="needs strategy ddp"):
        EStep(trainer={"accelerator": "cpu", "devices": 2, "strategy": "fsdp"})
    with pytest.raises(ValueError, match="needs strategy ddp"):
        NetworkMStep(trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    with pytest.raises(RuntimeError, match="one process per device"):
        run_em(prior(), population(), estep=estep(2), rounds=0, logger=None)


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "estep":
        run_estep(folder, world_size)
    elif mode == "em":
        run_tiny_em(folder, world_size)
    else:
        raise SystemExit(f"unknown mode {mode}")
