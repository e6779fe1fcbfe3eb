r"""Sampler-accuracy study: every posterior method against closed-form posteriors.

Problems (all float64, one CPU thread):

- **Gaussian grid**: prior N(mu, Sigma) with Sigma = B B^T / D + 0.1 I (analytic denoiser),
  per-observation dense A_i with N(0, 1/D) entries, noise sigma_y = 0.1, for
  (D, M) in {(8, 4), (16, 4), (16, 12), (32, 8)} and steps in {64, 256}. Two runs per method:
  a **W2 run** (a few observations, many samples): mean over observations of W2 between the
  Gaussian fit of the samples and the exact posterior; a **coverage run** (many observations
  with truths drawn from the prior, fewer samples): max_alpha |ECP(alpha) - alpha|, ranking
  the truth among the samples by the exact posterior's Mahalanobis distance (HPD ellipsoids).
  The row ``exact sampler`` runs the same DDPM sampler on the exact posteriors (a batched
  per-observation Gaussian denoiser): its W2 is the discretisation + Monte-Carlo floor, its
  coverage error the Monte-Carlo floor of the coverage estimate.
- **DESIGN.md §4 configuration**: D = 8, dense 4 x 8 A, sigma_y = 0.1, 20,000 samples,
  256 DDPM steps (the peers' figures: floor 0.046, MMPS k=4 CG 0.043, MMPS k=1 0.41,
  DiffPIR 0.37, per-observation DPS 0.37 at best zeta), with a zeta sweep for DPS.
- **Gaussian mixture**: 2 components in D = 4, M = 2, sigma_y = 0.3; the closed-form posterior
  mixture gives the error of the posterior mean (max over coordinates, in posterior sds,
  averaged over observations) and of the component weights (max abs).

Usage::

    python experiments/samplers/run_study.py            # full, ~10-15 min on 2 CPU cores
    python experiments/samplers/run_study.py --quick    # ~2 min

Prints a markdown table and writes it to experiments/samplers/results.md (or --out).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from hierprior.diffusion import GaussianMixturePrior, GaussianPrior
from hierprior.diffusion.denoiser import Denoiser
from hierprior.diffusion.sampling import ddpm_sampler
from hierprior.physics import DenseLinear, GaussianNoise
from hierprior.posterior import (
    coverage_error,
    exact_gaussian_posterior,
    exact_gmm_posterior,
    expected_coverage,
    gaussian_fit,
    gaussian_w2,
    sample_posterior,
)

F64 = torch.float64


class BatchedGaussian(Denoiser):
    """Exact denoiser of N different Gaussians N(m_i, C_i), rows observation-major (S each)."""

    def __init__(self, mean: Tensor, cov: Tensor, num_samples: int, schedule):
        super().__init__()
        lam, u = torch.linalg.eigh(cov)
        self.register_buffer("mean", mean.repeat_interleave(num_samples, 0))
        self.register_buffer("lam", lam.clamp_min(0).repeat_interleave(num_samples, 0))
        self.register_buffer("u", u.repeat_interleave(num_samples, 0))
        self.schedule = schedule
        self.event_shape = (mean.shape[-1],)

    def forward(self, x_t: Tensor, t) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        gain = alpha * self.lam / (alpha**2 * self.lam + sigma**2)
        r = torch.einsum("bd,bde->be", x_t - alpha * self.mean, self.u)
        return self.mean + torch.einsum("be,bde->bd", gain * r, self.u)


def exact_sampler(mean, cov, num_samples, steps, schedule, generator) -> Tensor:
    n, d = mean.shape
    den = BatchedGaussian(mean, cov, num_samples, schedule)
    x = torch.randn(n * num_samples, d, generator=generator, dtype=F64)
    _, sigma = schedule.alpha_sigma(torch.tensor(1.0, dtype=F64))
    timesteps = schedule.timesteps(steps)
    with torch.no_grad():
        out = ddpm_sampler(den, float(sigma) * x, timesteps, generator=generator)
    return out.reshape(n, num_samples, d)


def gaussian_problem(d: int, m: int, n: int, sigma_y: float, seed: int):
    """Prior, forward model, noise, truths and observations of a linear-Gaussian problem."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d, d, generator=g, dtype=F64)
    prior = GaussianPrior(torch.randn(d, generator=g, dtype=F64), b @ b.T / d + 0.1 * torch.eye(d))
    return prior, *observe(prior, d, m, n, sigma_y, g)


def observe(prior, d, m, n, sigma_y, g):
    forward = DenseLinear(torch.randn(n, m, d, generator=g, dtype=F64) / math.sqrt(d))
    noise = GaussianNoise(sigma_y)
    x = prior.sample(n, generator=g)
    y = forward(x) + noise.sample((n, m), generator=g, dtype=F64)
    return forward, noise, x, y


def method_list(m: int, sigma_y: float, particles: int) -> list[tuple[str, str, dict]]:
    """(label, method, options) of every method in the grid."""
    zeta = round(math.sqrt(m) / sigma_y, 1)  # the Gaussian-matched DPS scale
    return [
        (f"mmps k={m} (cg)", "mmps", {"iterations": m}),
        ("mmps k=1 (cg)", "mmps", {"iterations": 1}),
        (f"dps zeta={zeta}", "dps", {"zeta": zeta}),
        ("cla", "cla", {}),
        ("pigdm", "pigdm", {}),
        ("daps (ode 1)", "daps", {}),
        (f"tds P={particles}", "tds", {"particles": particles}),
    ]


def timed(fn, *args, **kwargs):
    """fn(*args, **kwargs) and its wall time in seconds."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def gaussian_grid(args, rows: list[list[str]]) -> None:
    configs = [(8, 4), (16, 4), (16, 12), (32, 8)]
    steps_list = [64] if args.quick else [64, 256]
    n_w, s_w = (2, 500) if args.quick else (4, 2000)
    n_c, s_c = (64, 32) if args.quick else (200, 32)
    for d, m in configs:
        seed = 1000 * d + m
        prior, fw, nw, _, yw = gaussian_problem(d, m, n_w, 0.1, seed)
        g = torch.Generator().manual_seed(seed + 1)
        fc, nc, xc, yc = observe(prior, d, m, n_c, 0.1, g)
        mw, cw = exact_gaussian_posterior(prior, fw, nw, yw)
        mc, cc = exact_gaussian_posterior(prior, fc, nc, yc)
        w2_prior = float(gaussian_w2(prior.mean, prior.cov, mw, cw).mean())
        name = f"Gaussian D={d} M={m} (prior-posterior W2 {w2_prior:.2f})"
        for steps in steps_list:
            runs = [("exact sampler (DDPM on exact posterior)", None, {})]
            runs += method_list(m, 0.1, s_w)
            for label, method, opts in runs:
                if method is None:
                    gen = torch.Generator().manual_seed(7)
                    xs_w, t_w = timed(exact_sampler, mw, cw, s_w, steps, prior.schedule, gen)
                    xs_c, t_c = timed(exact_sampler, mc, cc, s_c, steps, prior.schedule, gen)
                else:
                    gen = torch.Generator().manual_seed(11)
                    xs_w, t_w = timed(
                        sample_posterior, prior, fw, nw, yw, method, steps, s_w, gen, **opts
                    )
                    opts_c = {**opts, "particles": s_c} if method == "tds" else opts
                    xs_c, t_c = timed(
                        sample_posterior, prior, fc, nc, yc, method, steps, s_c, gen, **opts_c
                    )
                w2 = float(gaussian_w2(*gaussian_fit(xs_w), mw, cw).mean())
                cov_err = coverage_error(*expected_coverage(xs_c, xc, mc, cc))
                rows.append(
                    [name, label, str(steps), f"{w2:.3f}", f"{cov_err:.3f}", f"{t_w + t_c:.1f}"]
                )
                print(" | ".join(rows[-1]), flush=True)


def design_config(args, rows: list[list[str]]) -> None:
    """DESIGN.md §4: D=8, dense 4x8 A, sigma_y 0.1, 20,000 samples, 256 steps."""
    s = 2000 if args.quick else 20_000
    steps = 64 if args.quick else 256
    n = 1
    prior, fw, nw, _, yw = gaussian_problem(8, 4, n, 0.1, seed=84)
    mw, cw = exact_gaussian_posterior(prior, fw, nw, yw)
    zetas = [10.0, 20.0] if args.quick else [5.0, 10.0, 20.0, 40.0, 80.0]
    runs = [("exact sampler (DDPM on exact posterior)", None, {})]
    runs += [
        ("mmps k=4 (cg)", "mmps", {"iterations": 4}),
        ("mmps k=1 (cg)", "mmps", {"iterations": 1}),
        ("mmps k=1 (gmres)", "mmps", {"iterations": 1, "solver": "gmres"}),
    ]
    runs += [(f"dps zeta={z}", "dps", {"zeta": z}) for z in zetas]
    runs += [
        ("cla", "cla", {}),
        ("pigdm", "pigdm", {}),
        ("daps (ode 1)", "daps", {}),
        ("daps (ode 5)", "daps", {"ode_steps": 5}),
        (f"tds P={s}", "tds", {"particles": s}),
    ]
    for label, method, opts in runs:
        gen = torch.Generator().manual_seed(5)
        if method is None:
            xs, t = timed(exact_sampler, mw, cw, s, steps, prior.schedule, gen)
        else:
            xs, t = timed(sample_posterior, prior, fw, nw, yw, method, steps, s, gen, **opts)
        w2 = float(gaussian_w2(*gaussian_fit(xs), mw, cw).mean())
        rows.append([label, str(steps), f"{w2:.3f}", f"{t:.1f}"])
        print(" | ".join(rows[-1]), flush=True)


def mixture_problem(args, rows: list[list[str]]) -> None:
    g = torch.Generator().manual_seed(20)
    d, m, n = 4, 2, 8
    means = torch.stack([torch.full((d,), -1.5), torch.full((d,), 1.5)]).double()
    means = means + 0.3 * torch.randn(2, d, generator=g, dtype=F64)
    b = torch.randn(2, d, d, generator=g, dtype=F64)
    prior = GaussianMixturePrior(
        torch.tensor([0.4, 0.6], dtype=F64), means, b @ b.mT / d + 0.2 * torch.eye(d)
    )
    forward = DenseLinear(torch.randn(n, m, d, generator=g, dtype=F64) / math.sqrt(d))
    noise = GaussianNoise(0.3)
    x = prior.sample(n, generator=g)
    y = forward(x) + noise.sample((n, m), generator=g, dtype=F64)
    w, mu, cov = exact_gmm_posterior(prior, forward, noise, y)
    post_mean = (w[..., None] * mu).sum(1)
    second = (w[..., None, None] * (cov + mu[..., None] * mu[..., None, :])).sum(1)
    sd = (
        (second - post_mean[..., None] * post_mean[..., None, :]).diagonal(dim1=-2, dim2=-1).sqrt()
    )
    s = 500 if args.quick else 1000
    steps_list = [64] if args.quick else [64, 256]
    bimodal = int((w.min(1).values > 0.02).sum())
    print(f"GMM: {bimodal}/{n} posteriors with both weights > 0.02", flush=True)
    for steps in steps_list:
        for label, method, opts in method_list(m, 0.3, s):
            gen = torch.Generator().manual_seed(21)
            xs, t = timed(
                sample_posterior, prior, forward, noise, y, method, steps, s, gen, **opts
            )
            comp = torch.distributions.MultivariateNormal(mu, cov)
            logp = comp.log_prob(xs.transpose(0, 1)[:, :, None])
            w_hat = torch.softmax(logp + torch.log(w), dim=-1).mean(0)
            mean_err = float(((xs.mean(1) - post_mean).abs() / sd).amax(1).mean())
            w_err = float((w_hat - w).abs().max())
            rows.append([label, str(steps), f"{mean_err:.3f}", f"{w_err:.3f}", f"{t:.1f}"])
            print(" | ".join(rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (~2 min)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tables = []
    for title, header, fn in (
        (
            "DESIGN.md §4 configuration (D=8, dense 4x8 A, sigma_y=0.1, one observation)",
            ["method", "steps", "W2 to exact", "time (s)"],
            design_config,
        ),
        (
            "Gaussian grid (W2: mean over observations; coverage: max |ECP - alpha|)",
            ["problem", "method", "steps", "W2 to exact", "coverage error", "time (s)"],
            gaussian_grid,
        ),
        (
            "Gaussian mixture, K=2, D=4, M=2, sigma_y=0.3, 8 observations",
            ["method", "steps", "mean error (sd)", "weight error", "time (s)"],
            mixture_problem,
        ),
    ):
        print(f"\n## {title}\n" + " | ".join(header), flush=True)
        rows: list[list[str]] = []
        fn(args, rows)
        tables.append(markdown_table(title, header, rows))
    total = time.perf_counter() - start
    mode = " --quick" if args.quick else ""
    text = (
        f"<!-- generated by `python experiments/samplers/run_study.py{mode}` in {total:.0f} s, "
        f"{args.threads} thread(s) -->\n\n" + "\n".join(tables)
    )
    print("\n" + text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({total:.0f} s)")


def write_generated(out: Path, part: str, block: str) -> None:
    """Writes ``block`` into ``out`` between its ``<!-- generated: part -->`` and
    ``<!-- end: part -->`` markers (replacing what was there; appended when absent); the rest
    of the file, edits made meanwhile included, is kept."""
    begin, end = f"<!-- generated: {part} -->", f"<!-- end: {part} -->"
    text = out.read_text() if out.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + block + end + rest.split(end, 1)[1]
    else:
        text += ("\n" if text else "") + begin + "\n" + block + end + "\n"
    out.write_text(text)


def markdown_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---" for _ in header) + " |")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
