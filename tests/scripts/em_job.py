"""A tiny neural EM run for the resume tests: ``python em_job.py RUN_DIR [--kill estep|mstep]``.

With ``--kill estep`` the process SIGKILLs itself right after the second bank shard of round 2
is written; with ``--kill mstep`` in round 1's M-step, after its step-10 checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch

from hierprior.diffusion import EDMDenoiser
from hierprior.em import EStep, Monitor, NetworkMStep, Population, SampleBank, StopRule, run_em
from hierprior.nn import MLP
from hierprior.physics import DenseLinear, GaussianNoise


def population(n: int = 48, d: int = 4, m: int = 2) -> Population:
    g = torch.Generator().manual_seed(0)
    truth = 1.5 + 0.5 * torch.randn(n, d, generator=g)
    A = torch.randn(n, m, d, generator=g) / d**0.5
    forward, noise = DenseLinear(A), GaussianNoise(0.1)
    y = forward(truth) + noise.sample((n, m), generator=g, dtype=torch.float32)
    return Population(y=y, forward=forward, noise=noise, truth=truth)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--kill", choices=["estep", "mstep"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.kill == "estep":
        write = SampleBank.write
        calls = {"n": 0}

        def write_then_die(self, indices, samples, params=None):
            out = write(self, indices, samples, params)
            if self.path.parent.name == "round_002":
                calls["n"] += 1
                if calls["n"] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        SampleBank.write = write_then_die
    elif args.kill == "mstep":
        from hierprior.training import PriorModule

        step = PriorModule.training_step

        def step_then_die(self, batch, batch_idx):
            if self.global_step == 15 and "round_001" in str(self.trainer.default_root_dir):
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, batch, batch_idx)

        PriorModule.training_step = step_then_die
    torch.manual_seed(0)  # network initialisation
    prior = EDMDenoiser(MLP(4, hidden=(32, 32)), (4,), sigma_data=1.0)
    run_em(
        prior,
        population(),
        estep=EStep({"method": "mmps", "steps": 8}, num_samples=2, batch_size=12),
        mstep=NetworkMStep(steps=30, batch_size=16, checkpoint_every=10),
        monitor=Monitor(
            num_prior_samples=64,
            steps=8,
            num_refs=8,
            re_tessellations=4,
            permutations=20,
            tarp_observations=0,
        ),
        stop=StopRule(min_rounds=3),  # never fires within the 2 rounds: every round runs
        rounds=2,
        run_dir=args.run_dir,
        seed=0,
        logger=None,
    )


if __name__ == "__main__":
    main()
