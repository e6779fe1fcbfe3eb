"""TARP's ATC and MIRA's z of an EM run's TARP banks at several pooling factors (post hoc).

Each round's ``tarp_bank`` holds ``tarp_samples`` posterior samples of the first
``tarp_observations`` observations; samples and truths are average-pooled by p x p before the
two tests (p = 1: the full images).

    python experiments/galaxy_shift/calibration_pool.py <run_dir> [--observations 32]
        [--samples 4] [--pools 1 2 4 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from hierprior.em import SampleBank
from hierprior.metrics import mira, tarp
from hierprior.seeds import derived_generator


def pooled(x: torch.Tensor, p: int) -> torch.Tensor:
    """x (..., C, H, W) average-pooled by p x p (p = 1: x)."""
    return x if p == 1 else F.avg_pool2d(x.flatten(0, -4), p).unflatten(0, x.shape[:-3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--observations", type=int, default=32, help="tarp_observations of the run")
    ap.add_argument("--samples", type=int, default=4, help="tarp_samples of the run")
    ap.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    torch.set_num_threads(1)
    population = torch.load(args.run_dir / "population.pt", weights_only=True)
    rounds = sorted(args.run_dir.glob("round_*/tarp_bank"))
    if not rounds:
        raise SystemExit(f"no round_*/tarp_bank in {args.run_dir}")
    for folder in rounds:
        k = int(folder.parent.name.split("_")[1])
        n = args.observations
        truth = population["truth"][:n].float()
        bank = SampleBank(folder, n, args.samples, tuple(truth.shape[1:]))
        if not bank.is_complete():
            raise SystemExit(f"{folder} does not hold {n} x {args.samples} samples")
        post = bank.load().float()
        cells = []
        for p in args.pools:
            r = tarp(pooled(post, p), pooled(truth, p), bootstrap=0,
                     generator=derived_generator(0, k, "monitor", "tarp"))  # fmt: skip
            m = mira(pooled(post, p), pooled(truth, p),
                     generator=derived_generator(0, k, "monitor", "mira"))  # fmt: skip
            cells.append(f"p={p}: ATC {float(r.atc):.3f}, z {float(m.z):+.1f}")
        print(f"round {k} ({n} observations): " + " | ".join(cells))


if __name__ == "__main__":
    main()
