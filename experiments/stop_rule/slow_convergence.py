"""Slow EM convergence and the stop rule: where does the rule stop, and how far is that prior
from the plateau EM reaches without a stop rule?

Gaussian population x ~ N(mu, Sigma) in D = 5 (a random SPD Sigma per seed), N observations
through random rank-2 views y_i = A_i x_i + 0.1 eps, an MMPS E-step (64 DDPM steps, 4 CG
iterations, S = 2; ``--estep exact``: exact posterior samples), the Gaussian M-step, initial
prior N(0, I). EM runs ``--rounds`` rounds
without stopping (the rule's tests are logged every round, its decision deferred), and the
covariance error ||Sigma_k - Sigma||_F / ||Sigma||_F of every round's prior is recorded. From
the logged p-values the table gives where the default rule (with the long-lag tests, as now)
and the rule of before (the three one-round tests only) would have stopped, and the error of
the prior each returns against the plateau (the mean error of the last three rounds).

    python experiments/stop_rule/slow_convergence.py                 # 3 seeds, N = 2000
    python experiments/stop_rule/slow_convergence.py --seeds 1 --rounds 12
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import torch
from calibrate import gaussian_population  # this folder's: python experiments/stop_rule/...

from hierprior.diffusion import GaussianPrior
from hierprior.em import EStep, GaussianMStep, Monitor, StopRule, run_em
from hierprior.em.stop import LONG_TESTS, STOP_TESTS


def problem(seed: int, n: int, d: int = 5, m: int = 2):
    population, _, cov = gaussian_population(seed, n, d, m, stream=2000)
    prior = GaussianPrior(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    return population, prior, cov


def decide(metrics: list[dict], tests: tuple[str, ...], level: float, first: int = 1):
    """The first round >= first whose Bonferroni p-value over ``tests`` exceeds level."""
    for row in metrics[first:]:
        ps = [row[f"{t}_pvalue"] for t in tests if f"{t}_pvalue" in row]
        if min(1.0, len(ps) * min(ps)) > level:
            return int(row["round"])
    return None


def run(seed: int, n: int, rounds: int, s: int, estep: str = "mmps", steps: int = 64) -> dict:
    population, prior, cov = problem(seed, n)
    sampler = {"method": "exact"} if estep == "exact" else {
        "method": "mmps", "steps": steps, "iterations": 4}  # fmt: skip
    result = run_em(
        prior,
        population,
        estep=EStep(sampler, num_samples=s, batch_size=n),
        mstep=GaussianMStep(),
        monitor=Monitor(num_prior_samples=300, permutations=0, re_tessellations=5,
                        num_refs=20, tarp_observations=0),
        stop=StopRule(min_rounds=rounds + 1),  # log the tests every round, decide below
        rounds=rounds,
        run_dir=tempfile.mkdtemp(prefix="stop_slow_"),
        seed=seed,
        logger=None,
    )  # fmt: skip
    errors = [
        float(torch.linalg.norm(p.cov - cov) / torch.linalg.norm(cov)) for p in result.priors
    ]
    level = StopRule().level
    now = decide(result.metrics, STOP_TESTS + LONG_TESTS, level)
    before = decide(result.metrics, STOP_TESTS, level)
    plateau = sum(errors[-3:]) / 3
    return {
        "seed": seed,
        "errors": errors,
        "plateau": plateau,
        "stop_now": now,
        "error_now": None if now is None else errors[now],
        "stop_before": before,
        "error_before": None if before is None else errors[before],
        "pvalues": [
            {k: v for k, v in row.items() if k.endswith("_pvalue") or k == "round"}
            for row in result.metrics
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--s", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--estep", choices=["mmps", "exact"], default="mmps")
    parser.add_argument("--steps", type=int, default=64, help="MMPS's DDPM steps")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    start = time.time()
    rows = []
    print("| seed | round-0 error | plateau (last 3) | rule now: stops at | error | ratio | "
          "rule before: stops at | error | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        r = run(seed, args.n, args.rounds, args.s, args.estep, args.steps)
        rows.append(r)

        def cells(k, e, plateau=r["plateau"]):
            return f"{k} | {e:.3f} | {e / plateau:.2f}" if k is not None else "- | - | -"

        print(f"| {seed} | {r['errors'][0]:.3f} | {r['plateau']:.3f} | "
              f"{cells(r['stop_now'], r['error_now'] or 0)} | "
              f"{cells(r['stop_before'], r['error_before'] or 0)} |", flush=True)  # fmt: skip
        print("  errors:", " ".join(f"{e:.3f}" for e in r["errors"]), flush=True)
    print(f"\n{time.time() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
