r"""E-step solvers on the MNIST shift demo: outcome against network evaluations per sample.

Runs ``hierprior-em`` (the default experiment, ``mnist_shift_tiny``: MMPS k = 1 guidance on a
16 px U-Net prior of digits 0-4, 300 masked noisy observations of digits 5-9, 4 rounds) once
per E-step solver setting, every run from the same round-0 prior (trained once, or given with
``--initial-prior``), and tabulates after the last round:

- ``share_56789``: share of prior samples that an independent digit classifier (trained on
  digits disjoint from the population's) calls 5-9 (the demo's target: >= 0.5);
- ``truth_chi2``: PQMass chi2 of prior samples against the population's true digits (null
  about 39);
- the E-step's network evaluations per sample (forward passes) and VJPs per sample (MMPS with
  k = 1 CG iteration pays k + 1 = 2 per evaluation, as counted in ``nfe.py``): the E-step's
  cost, whatever the machine (wall times are in each run's ``em.log``: "E-step round r
  (estep) done in ... s").

Usage::

    python experiments/samplers/nfe_mnist.py --work /tmp/nfe_mnist   # ~15 min alone on 2 cores
    python experiments/samplers/nfe_mnist.py --work W --initial-prior PRIOR.ckpt   # reuse a prior

Each run directory under ``--work`` is a normal ``hierprior-em`` run: killed runs resume.
The table is printed and written into ``experiments/samplers/nfe.md`` between the
``<!-- generated: mnist -->`` and ``<!-- end: mnist -->`` markers.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_study import markdown_table, write_generated  # noqa: E402

#: (label, sampler, eta, spacing, steps): the E-step settings compared
SETTINGS = [
    ("ddpm", "ddpm", 0.0, "edm", 8),
    ("ddpm", "ddpm", 0.0, "edm", 16),
    ("sde-dpm2m", "dpm2m", 1.0, "logsnr", 8),
    ("unipc", "unipc", 0.0, "logsnr", 8),
]


def hierprior_em(run_dir: Path, overrides: list[str]) -> float:
    cmd = ["hierprior-em", f"run_dir={run_dir}", "trainer.enable_progress_bar=false", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="folder of the run directories")
    parser.add_argument("--initial-prior", default=None, help="round-0 prior checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("nfe.md")))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    threads = f"train.num_threads={args.threads}"
    prior = args.initial_prior
    if prior is None:  # one round-0 prior for every run: train it with a 0-round run
        hierprior_em(work / "prior", [threads, "em.rounds=0"])
        prior = str(work / "prior" / "initial_prior" / "prior.ckpt")
    header = ["E-step solver", "grid", "steps", "network evals / sample", "VJPs / sample",
              "share 5-9 (last round)", "truth_chi2 (last round)",
              "share 5-9 per round"]  # fmt: skip
    rows = []
    for label, sampler, eta, spacing, steps in SETTINGS:
        run = work / f"{label}_{spacing}_{steps}"
        run.mkdir(exist_ok=True)
        overrides = [threads, f"em.initial_prior={prior}", f"sampler.sampler={sampler}",
                     f"sampler.eta={eta}", f"sampler.spacing={spacing}",
                     f"sampler.steps={steps}"]  # fmt: skip
        hierprior_em(run, overrides)
        with open(run / "metrics.csv") as f:
            table = list(csv.DictReader(f))
        last = table[-1]
        shares = " → ".join(f"{float(r['share_56789']):.2f}" for r in table)
        rows.append([label, spacing, str(steps), str(steps), str(2 * steps),
                     f"{float(last['share_56789']):.2f}", f"{float(last['truth_chi2']):.1f}",
                     shares])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    title = "MNIST 0-4 → 5-9 (`hierprior-em` defaults, 4 rounds): outcome per E-step solver"
    block = (
        f"<!-- `python experiments/samplers/nfe_mnist.py --work W` "
        f"({args.threads} threads, one round-0 prior for every row) -->\n\n"
        + markdown_table(title, header, rows)
    )
    print("\n" + block, flush=True)
    write_generated(Path(args.out), "mnist", block)


if __name__ == "__main__":
    main()
