"""Calibration and power of the EM stop rule (hierprior.em.StopRule) on Gaussian problems.

For each problem and seed, a population of N observations y_i = A_i x_i + n_i (x_i from a
Gaussian population, A_i random rank-m views, Gaussian noise) and an initial Gaussian prior are
drawn; ``run_em`` runs round 0 and round 1 with the stop rule's decision deferred
(``min_rounds`` large), and the round-1 p-values are recorded. The table gives, over the seeds,
the share where the rule would FIRE at round 1 (stop p-value > level) and the share where each
of its three tests rejects at level / 3.

- "right": the population is drawn from the initial prior itself (the rule should fire);
- "mean +a sd": the initial prior's mean is off by a population standard deviations in every
  coordinate (the rule should not fire at round 1: EM still moves);
- "var x b": the initial prior's covariance is b times the population's.

    python experiments/stop_rule/calibrate.py            # the table of README.md (~10 min)
    python experiments/stop_rule/calibrate.py --seeds 5  # a quick look
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch

from hierprior.diffusion import GaussianPrior
from hierprior.em import EStep, GaussianMStep, Monitor, StopRule, run_em
from hierprior.physics import GaussianNoise
from hierprior.populations import GaussianSignals, RandomProjection, simulate_population

PROBLEMS = {  # name: (mean offset in population sds, covariance factor)
    "right": (0.0, 1.0),
    "mean +0.5 sd": (0.5, 1.0),
    "mean +1 sd": (1.0, 1.0),
    "var x 2": (0.0, 2.0),
}


def gaussian_population(seed: int, n: int, d: int, m: int = 2, stream: int = 1000):
    """x ~ N(mean, cov) in D = d (a random SPD cov and mean from seed ``stream + seed``), n
    observations through random rank-m views y = A x + 0.1 eps: (population, mean, cov)."""
    g = torch.Generator().manual_seed(stream + seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    population = simulate_population(
        GaussianSignals(mean, cov), RandomProjection(m, dtype="float64"), GaussianNoise(0.1),
        num_obs=n, seed=seed,
    )  # fmt: skip
    return population, mean, cov


def problem(seed: int, offset: float, factor: float, n: int, d: int = 4, m: int = 2):
    population, mean, cov = gaussian_population(seed, n, d, m)
    prior = GaussianPrior(mean + offset * cov.diagonal().sqrt(), factor * cov)
    return population, prior


def round_one(seed: int, offset: float, factor: float, n: int, s: int, method: str) -> dict:
    population, prior = problem(seed, offset, factor, n)
    sampler = "exact" if method == "exact" else {"method": "mmps", "steps": 64, "iterations": 4}
    result = run_em(
        prior,
        population,
        estep=EStep(sampler, num_samples=s, batch_size=n),
        mstep=GaussianMStep(),
        monitor=Monitor(
            num_prior_samples=300,
            permutations=0,
            re_tessellations=5,
            num_refs=20,
            tarp_observations=0,
        ),  # fmt: skip
        stop=StopRule(min_rounds=99),  # decide below, from the logged p-values
        rounds=1,
        run_dir=tempfile.mkdtemp(prefix="stop_calibration_"),
        seed=seed,
        logger=None,
    )
    return result.metrics[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--s", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    level = StopRule().level
    tests = ("fixedpoint_diff", "fixedpoint_pooled", "mstep_fit")
    print(f"level {level}, {args.seeds} seeds, S = {args.s}, D = 4, rank-2 views, sigma 0.1\n")
    print("| problem | E-step | N | fires at round 1 | " + " | ".join(
        f"{t} rejects" for t in tests) + " |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * len(tests))
    start = time.time()
    for name, (offset, factor) in PROBLEMS.items():
        for method in ("exact", "mmps"):
            for n in args.n:
                rows = [round_one(k, offset, factor, n, args.s, method) for k in range(args.seeds)]
                fire = np.mean([r["stop_pvalue"] > level for r in rows])
                rejects = [np.mean([r[f"{t}_pvalue"] <= level / 3 for r in rows]) for t in tests]
                cells = " | ".join(f"{v:.2f}" for v in rejects)
                print(f"| {name} | {method} | {n} | {fire:.2f} | {cells} |", flush=True)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
