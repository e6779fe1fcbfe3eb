r"""E-step accuracy per network evaluation: every solver x every posterior wrapper.

W2 (and coverage error) to the exact posterior against the number of denoiser evaluations
(NFE 8, 16, 32, 64) for the samplers of :mod:`hierprior.diffusion.sampling` run under the
posterior wrappers of :mod:`hierprior.posterior` (mmps, dps, cla, pigdm), on the Gaussian
problems of the sampler study (``run_study.py``), with the network forward passes and VJPs
per sample counted.

Parts:

- **design**: DESIGN.md §4 (D = 8, dense 4 x 8 A, sigma_y = 0.1, one observation, 20,000
  samples), MMPS with k = 4 CG iterations (exact guidance), every solver on the "edm" and the
  "logsnr" grid, several instances (seeds) of the problem; W2 mean and max over the seeds,
  and the Monte-Carlo floor (the same number of exact posterior samples).
- **seeds**: the issue's target, W2 <= 0.061 at <= 16 evaluations per sample, on eleven
  instances of the DESIGN.md problem (20,000 samples each), for DDIM, 3M and UniPC.
- **grid**: the study's (D, M) in {(8, 4), (16, 4), (16, 12), (32, 8)}, every wrapper (mmps
  k = M and k = 1, dps zeta = sqrt(M)/sigma_y, cla, pigdm) x every solver on its grid;
  W2 (mean over a few observations, fewer samples than the study) and coverage error
  (many observations with truths from the prior, 32 samples each).

Counting: the prior (an analytic ``GaussianPrior``) is wrapped in a counter of the rows of its
forward calls ("network" forward passes) and of its VJPs: backward passes through its output
(DPS, PiGDM) plus closed-form products Cov[x | x_t] v (MMPS's CG: one VJP each for a network
prior). Both are divided by the number of samples.

Usage::

    python experiments/samplers/nfe.py            # ~8 min on 2 shared CPU cores, 1 thread
    python experiments/samplers/nfe.py --quick    # ~1 min: fewer seeds, samples, problems

It prints the tables and writes each into ``experiments/samplers/nfe.md`` (or ``--out``)
between its ``<!-- generated: part -->`` and ``<!-- end: part -->`` markers, replacing the
previous table of that part. Everything is seeded; float64.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_study import gaussian_problem, markdown_table, observe, write_generated  # noqa: E402

from hierprior.diffusion import GaussianPrior  # noqa: E402
from hierprior.diffusion.denoiser import Denoiser  # noqa: E402
from hierprior.diffusion.sampling import nfe as count_nfe  # noqa: E402
from hierprior.posterior import (  # noqa: E402
    coverage_error,
    exact_gaussian_posterior,
    expected_coverage,
    gaussian_fit,
    gaussian_w2,
    sample_posterior,
)

F64 = torch.float64
NFES = (8, 16, 32, 64)

#: (label, sampler, eta): every solver; the grid of each is chosen per part
SOLVERS = [
    ("ddpm", "ddpm", 0.0),
    ("ddim", "ddim", 0.0),
    ("heun", "heun", 0.0),
    ("dpm2m", "dpm2m", 0.0),
    ("dpm3m", "dpm3m", 0.0),
    ("unipc", "unipc", 0.0),
    ("sde-dpm2m", "dpm2m", 1.0),
]
#: the grid of each solver in the grid part: the default "edm" for the samplers that were
#: there before the multistep solvers (the baseline as users run it), else "logsnr"
GRID = {"ddpm": "edm", "ddim": "edm", "heun": "edm"}


class Counting(Denoiser):
    """A prior that counts its forward rows and its VJP / Cov-product rows."""

    def __init__(self, inner: GaussianPrior):
        super().__init__()
        self.inner = inner
        self.schedule = inner.schedule
        self.event_shape = inner.event_shape
        self.forward_rows = 0
        self.vjp_rows = 0

    def forward(self, x_t: Tensor, t) -> Tensor:
        self.forward_rows += x_t.shape[0]
        out = self.inner(x_t, t)
        if out.requires_grad:
            out.register_hook(self._on_grad)
        return out

    def _on_grad(self, grad: Tensor) -> None:
        self.vjp_rows += grad.shape[0]

    def tweedie_cov(self, x_t: Tensor, t, v: Tensor) -> Tensor:
        self.vjp_rows += x_t.shape[0]
        return self.inner.tweedie_cov(x_t, t, v)


def steps_for(sampler: str, nfe: int) -> int:
    """Steps with at most nfe evaluations (Heun: 2 steps - 1)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def run(prior, forward, noise, y, method, sampler, eta, spacing, nfe, s, seed, opts):
    """Samples (N, S, D), and evaluations, VJPs per sample and seconds."""
    counter = Counting(prior)
    steps = steps_for(sampler, nfe)
    start = time.perf_counter()
    xs = sample_posterior(
        counter,
        forward,
        noise,
        y,
        method,
        steps,
        s,
        torch.Generator().manual_seed(seed),
        sampler=sampler,
        eta=eta,
        spacing=spacing,
        **opts,
    )
    seconds = time.perf_counter() - start
    rows = xs.shape[0] * xs.shape[1]
    return xs, counter.forward_rows / rows, counter.vjp_rows / rows, seconds


def mean_w2(xs, mean, cov) -> float:
    return float(gaussian_w2(*gaussian_fit(xs), mean, cov).mean())


def design_part(args, rows: list[list[str]]) -> None:
    seeds = [84, 0] if args.quick else [84, 0, 1]
    s = 5000 if args.quick else 20_000
    problems = []
    floors = []
    for seed in seeds:
        prior, fw, nw, _, yw = gaussian_problem(8, 4, 1, 0.1, seed)
        mw, cw = exact_gaussian_posterior(prior, fw, nw, yw)
        problems.append((prior, fw, nw, yw, mw, cw))
        exact = sample_posterior(
            prior, fw, nw, yw, "exact", 1, s, torch.Generator().manual_seed(5)
        )
        floors.append(mean_w2(exact, mw, cw))
    floor = f"{sum(floors) / len(floors):.3f} ({max(floors):.3f})"
    rows.append(["exact samples (Monte-Carlo floor)", "-", *[floor] * len(NFES), "-", "-"])
    print(" | ".join(rows[-1]), flush=True)
    for label, sampler, eta in SOLVERS:
        for spacing in ("edm", "logsnr"):
            cells, evals, vjps = [], None, None
            for nfe in NFES:
                w = []
                for prior, fw, nw, yw, mw, cw in problems:
                    xs, evals, vjps, _ = run(
                        prior, fw, nw, yw, "mmps", sampler, eta, spacing, nfe, s, 5,
                        {"iterations": 4},
                    )  # fmt: skip
                    w.append(mean_w2(xs, mw, cw))
                real = count_nfe(sampler, steps_for(sampler, nfe))
                tag = "" if real == nfe else f" [{real}]"
                cells.append(f"{sum(w) / len(w):.3f} ({max(w):.3f}){tag}")
            rows.append([label, spacing, *cells, f"{evals:g}", f"{vjps:g}"])
            print(" | ".join(rows[-1]), flush=True)


def seeds_part(args, rows: list[list[str]]) -> None:
    """The issue's target (W2 <= 0.061 at <= 16 evaluations) over many instances."""
    seeds = [84, 0, 1] if args.quick else [84, *range(10)]
    s = 5000 if args.quick else 20_000
    configs = [("ddim", "edm", 16), ("dpm3m", "logsnr", 12), ("dpm3m", "logsnr", 16)]
    configs += [("unipc", "logsnr", 12), ("unipc", "logsnr", 16)]
    for seed in seeds:
        prior, fw, nw, _, yw = gaussian_problem(8, 4, 1, 0.1, seed)
        mw, cw = exact_gaussian_posterior(prior, fw, nw, yw)
        gen = torch.Generator().manual_seed(seed + 1)
        cells = [f"{mean_w2(sample_posterior(prior, fw, nw, yw, 'exact', 1, s, gen), mw, cw):.3f}"]
        for sampler, spacing, nfe in configs:
            xs, *_ = run(
                prior,
                fw,
                nw,
                yw,
                "mmps",
                sampler,
                0.0,
                spacing,
                nfe,
                s,
                seed + 1,
                {"iterations": 4},
            )
            cells.append(f"{mean_w2(xs, mw, cw):.3f}")
        rows.append([str(seed), *cells])
        print(" | ".join(rows[-1]), flush=True)
    worst = [max(float(r[i]) for r in rows) for i in range(1, len(rows[0]))]
    rows.append(["worst", *[f"**{w:.3f}**" for w in worst]])


def method_list(m: int, sigma_y: float) -> list[tuple[str, str, dict]]:
    zeta = round(math.sqrt(m) / sigma_y, 1)
    return [
        (f"mmps k={m}", "mmps", {"iterations": m}),
        ("mmps k=1", "mmps", {"iterations": 1}),
        (f"dps zeta={zeta}", "dps", {"zeta": zeta}),
        ("cla", "cla", {}),
        ("pigdm", "pigdm", {}),
    ]


def grid_part(args, rows: list[list[str]]) -> None:
    configs = [(8, 4), (16, 12)] if args.quick else [(8, 4), (16, 4), (16, 12), (32, 8)]
    n_w, s_w = (2, 500) if args.quick else (2, 1000)
    n_c, s_c = (64, 32) if args.quick else (100, 32)
    for d, m in configs:
        seed = 1000 * d + m
        prior, fw, nw, _, yw = gaussian_problem(d, m, n_w, 0.1, seed)
        g = torch.Generator().manual_seed(seed + 1)
        fc, nc, xc, yc = observe(prior, d, m, n_c, 0.1, g)
        mw, cw = exact_gaussian_posterior(prior, fw, nw, yw)
        mc, cc = exact_gaussian_posterior(prior, fc, nc, yc)
        name = f"D={d} M={m}"
        gen = torch.Generator().manual_seed(7)
        xs_w = sample_posterior(prior, fw, nw, yw, "exact", 1, s_w, gen)
        xs_c = sample_posterior(prior, fc, nc, yc, "exact", 1, s_c, gen)
        w2 = f"{mean_w2(xs_w, mw, cw):.3f}"
        cov = f"{coverage_error(*expected_coverage(xs_c, xc, mc, cc)):.2f}"
        rows.append([name, "exact samples (floor)", "-", *[f"{w2} / {cov}"] * len(NFES), "-", "-"])
        print(" | ".join(rows[-1]), flush=True)
        for label, method, opts in method_list(m, 0.1):
            for solver, sampler, eta in SOLVERS:
                spacing = GRID.get(solver, "logsnr")
                cells, evals, vjps = [], None, None
                for nfe in NFES:
                    xs_w, *_ = run(
                        prior, fw, nw, yw, method, sampler, eta, spacing, nfe, s_w, 11, opts
                    )
                    xs_c, evals, vjps, _ = run(
                        prior, fc, nc, yc, method, sampler, eta, spacing, nfe, s_c, 12, opts
                    )
                    w2 = mean_w2(xs_w, mw, cw)
                    cov = coverage_error(*expected_coverage(xs_c, xc, mc, cc))
                    cells.append(f"{w2:.3f} / {cov:.2f}")
                vjp_per_eval = vjps / evals
                rows.append(
                    [
                        name,
                        label,
                        f"{solver} ({spacing})",
                        *cells,
                        f"{evals:g}",
                        f"{vjp_per_eval:g}",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, samples, problems")
    parser.add_argument("--out", default=str(Path(__file__).with_name("nfe.md")))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--parts", default="design,seeds,grid", help="comma-separated: design,seeds,grid"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    nfe_cols = [f"NFE {n}" for n in NFES]
    parts = {
        "design": (
            "DESIGN.md §4 problem, MMPS k=4 (exact guidance): W2 mean (max) over instances",
            ["solver", "grid", *nfe_cols, "evals / sample at NFE 64", "VJPs / sample at NFE 64"],
            design_part,
        ),
        "seeds": (
            "The target over instances: MMPS k=4, W2 per instance (seed of the problem)",
            ["seed", "exact samples", "ddim edm 16", "dpm3m logsnr 12", "dpm3m logsnr 16",
             "unipc logsnr 12", "unipc logsnr 16"],
            seeds_part,
        ),
        "grid": (
            "Study grid: W2 / coverage error per wrapper and solver",
            ["problem", "method", "solver (grid)", *nfe_cols, "evals / sample at NFE 64",
             "VJPs per evaluation"],
            grid_part,
        ),
    }  # fmt: skip
    out = Path(args.out)
    mode = " --quick" if args.quick else ""
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        title, header, fn = parts[part]
        print(f"\n## {title}\n" + " | ".join(header), flush=True)
        rows: list[list[str]] = []
        t0 = time.perf_counter()
        fn(args, rows)
        block = (
            f"<!-- `python experiments/samplers/nfe.py{mode} --parts {part}`: "
            f"{time.perf_counter() - t0:.0f} s, {args.threads} thread(s) -->\n\n"
            + markdown_table(title, header, rows)
        )
        print("\n" + block, flush=True)
        write_generated(out, part, block)
    total = time.perf_counter() - start
    print(f"wrote {out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
