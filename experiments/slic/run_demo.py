r"""SLIC demo: calibrated parameter posteriors under non-Gaussian noise.

A Gaussian blob :math:`I(p) = F / (2\pi r^2) \exp(-|p - c|^2 / 2 r^2)` on a 16 x 16 pixel grid,
with parameters :math:`\eta = (F, x_0, y_0, \log r)` drawn from independent Gaussian priors,
is observed under realistic non-Gaussian noise (:mod:`hierprior.likelihood.simulate`):
spatially correlated Gaussian noise (half white, half smoothed by a Gaussian kernel of 1 px)
plus cosmic-ray tracks (Poisson(1) per image, 1-3 px, amplitude U(5, 25) sigma). For every
observation, the posterior of :math:`\eta` is sampled by Langevin dynamics
(:func:`hierprior.likelihood.langevin`, the same chains, seeds and settings) under three
likelihoods:

- **white Gaussian**: ``GaussianNoise(1)``, the pixel rms of the Gaussian part;
- **correlated Gaussian**: the exact covariance of the Gaussian part (no cosmic rays), through
  ``LearnedNoise`` around the analytic ``GaussianPrior(0, Sigma)`` (an oracle for the Gaussian
  part only);
- **SLIC**: ``LearnedNoise`` around a diffusion model trained on 50,000 noise realisations by
  ``hierprior-train-prior experiment=slic_noise`` (the run is made here by
  :func:`hierprior.training.fit_prior`, resumable: 5,000 steps of batch 64), its score
  evaluated at the noise levels ``--smoothing`` (default s = 0.1 and 0.3).

Langevin: 2 chains per observation from prior draws, 150 burn-in steps (the preconditioner
adapted 3 times to the inverse Hessian, capped by the prior covariance), then 50 samples
every 6 steps, tau = 0.1: 100 samples per observation, 200 observations.

Scores: TARP (:func:`hierprior.metrics.tarp`, bootstrap band over observations), bias and
spread of the z-scores (posterior mean - truth) / posterior sd, and the marginal coverage of
the central 68% / 95% intervals. A check of the learned noise model compares new realisations
drawn from it (``LearnedNoise.sample``) with true ones.

Usage::

    python experiments/slic/run_demo.py                      # trains, then infers
    python experiments/slic/run_demo.py --train-steps 20 --n-obs 16 --out /tmp/slic \
        --run-dir /tmp/slic/run                              # smoke test, ~1 min
    python experiments/slic/run_demo.py --no-slic --cosmic-ray-rate 0 --out /tmp/check
        # the sampler check: Gaussian noise only, where "correlated Gaussian" is exact

Writes ``results.md``, ``results.json``, ``coverage.png`` and ``noise.png`` to ``--out``
(default experiments/slic) and the noise model's run to ``--run-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from hierprior.diffusion import GaussianPrior, load_prior
from hierprior.likelihood import (
    correlated_noise_covariance,
    langevin,
    noise_realisations,
)
from hierprior.metrics import tarp
from hierprior.physics import GaussianNoise, LearnedNoise, NonLinear

PARAMS = ("F", "x0", "y0", "log r")
PRIOR_LOC = (30.0, 0.0, 0.0, math.log(1.5))
PRIOR_SD = (6.0, 1.0, 1.0, 0.2)
NOISE = {  # the noise of the observations (= the training data of conf/data/slic_noise.yaml)
    "white_fraction": 0.5,
    "correlation_length": 1.0,
    "cosmic_ray_rate": 1.0,
    "amplitude": (5.0, 25.0),
    "track_length": 3,
}


def blob_model(size: int) -> NonLinear:
    """The forward model eta (4,) -> image (1, size, size), pixel centres at i - (size-1)/2."""
    grid = torch.arange(size, dtype=torch.float64) - (size - 1) / 2

    def fn(eta: Tensor) -> Tensor:
        flux, x0, y0, log_r = eta.unbind(-1)
        c = grid.to(eta)
        r2 = torch.exp(2 * log_r)[:, None, None]
        d2 = (c[None, None, :] - x0[:, None, None]) ** 2 + (
            c[None, :, None] - y0[:, None, None]
        ) ** 2
        return (flux[:, None, None] / (2 * math.pi * r2) * torch.exp(-d2 / (2 * r2))).unsqueeze(1)

    return NonLinear(fn, (4,), (1, size, size))


def train_noise_model(run_dir: Path, steps: int | None, extra: list[str]) -> Path:
    """Trains (or resumes) the noise score model with hierprior-train-prior's config."""
    from hydra import compose, initialize_config_dir

    from hierprior.config import CONF_DIR
    from hierprior.training import fit_prior

    overrides = [
        "experiment=slic_noise",
        f"run_dir={run_dir}",
        "trainer.enable_progress_bar=false",
    ]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.warmup_steps={min(100, steps)}"]
    overrides += extra
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train_prior", overrides=overrides)
    return fit_prior(cfg).prior


def summarise(samples: Tensor, truth: Tensor, seed: int) -> dict:
    """TARP (with its bootstrap band), z-score bias/spread, interval coverage."""
    res = tarp(samples, truth, num_refs=10, bootstrap=200, generator=seed)
    gap = res.ecp - res.alpha
    std = res.ecp_std
    inside = (gap.abs() <= 2 * std) | (std == 0) & (gap == 0)
    atc_boot = torch.trapezoid(res.ecp_bootstrap - res.alpha, res.alpha, dim=-1)
    lo, hi = torch.quantile(atc_boot, torch.tensor([0.025, 0.975], dtype=atc_boot.dtype))
    mean, sd = samples.mean(1), samples.std(1)
    z = (mean - truth) / sd
    q = torch.quantile(samples, torch.tensor([0.025, 0.16, 0.84, 0.975]), dim=1)  # (4, N, d)
    cov68 = ((truth >= q[1]) & (truth <= q[2])).double().mean(0)
    cov95 = ((truth >= q[0]) & (truth <= q[3])).double().mean(0)
    return {
        "tarp": res,
        "atc": res.atc,
        "atc_ci": (float(lo), float(hi)),
        "ks": res.ks_stat,
        "inside": float(inside.double().mean()),
        "max_dev_sd": float((gap.abs() / std.clamp_min(1e-12))[std > 0].max()),
        "bias": (mean - truth).mean(0).tolist(),
        "bias_se": ((mean - truth).std(0) / math.sqrt(len(truth))).tolist(),
        "z_mean": z.mean(0).tolist(),
        "z_rms": z.square().mean(0).sqrt().tolist(),
        "cov68": cov68.tolist(),
        "cov95": cov95.tolist(),
        "post_sd": sd.mean(0).tolist(),
    }


def noise_check(noise: LearnedNoise, size: int, n: int, seed: int) -> dict:
    """Pixel statistics of true and learned (LearnedNoise.sample) realisations."""
    true = noise_realisations(n, size, seed=seed + 1, **NOISE).double()
    learned = noise.sample((n, 1, size, size), generator=torch.Generator().manual_seed(seed))
    out = {}
    for name, x in (("true", true), ("learned", learned.double())):
        gauss = x.clamp(-4, 4)
        out[name] = {
            "rms (abs n < 4)": float(gauss[x.abs() < 4].std()),
            "lag-1 corr (abs n < 4)": float(
                (
                    (x[..., 1:] * x[..., :-1])[(x[..., 1:].abs() < 4) & (x[..., :-1].abs() < 4)]
                ).mean()
                / gauss[x.abs() < 4].var()
            ),
            "pixels > 4 per image": float((x > 4).double().sum() / n),
            "pixels < -4 per image": float((x < -4).double().sum() / n),
        }
    return {"stats": out, "true": true[:8], "learned": learned[:8].double()}


def plot(results: dict, check: dict | None, y: Tensor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        t = r["tarp"]
        a, e, s = t.alpha.numpy(), t.ecp.numpy(), t.ecp_std.numpy()
        ax.fill_between(a, e - 2 * s, e + 2 * s, color="C0", alpha=0.3, label="ECP ± 2σ bootstrap")
        ax.plot(a, e, color="C0", label="ECP")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        ax.set_title(
            f"{name.replace(' (', chr(10) + '(')}\natc {r['atc']:+.3f}; diagonal inside the "
            f"band at {r['inside']:.0%} of α",
            fontsize=9,
        )
        ax.set_xlabel("credibility level α")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("expected coverage")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "coverage.png", dpi=110)
    plt.close(fig)
    if check is None:
        return

    fig, axes = plt.subplots(3, 8, figsize=(12, 4.8))
    rows = (
        ("observations y", y[:8]),
        ("true noise", check["true"]),
        ("LearnedNoise.sample", check["learned"]),
    )
    for row, (label, imgs) in zip(axes, rows):
        for k, ax in enumerate(row):
            ax.imshow(imgs[k, 0].numpy(), cmap="gray", vmin=-3, vmax=6)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "noise.png", dpi=100)
    plt.close(fig)


def table(results: dict, timings: dict) -> str:
    lines = [
        "| likelihood | TARP atc [95% bootstrap] | KS | diagonal inside ±2σ band "
        "| max \\|ECP−α\\|/σ | time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lo, hi = r["atc_ci"]
        lines.append(
            f"| {name} | {r['atc']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['ks']:.3f} | "
            f"{r['inside']:.0%} | {r['max_dev_sd']:.1f} | {timings[name]:.0f} |"
        )
    lines += [
        "",
        "| likelihood | parameter | bias ± se | mean z | rms z | 68% cov. | 95% cov. "
        "| mean post. sd |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        for j, p in enumerate(PARAMS):
            lines.append(
                f"| {name} | {p} | {r['bias'][j]:+.3f} ± {r['bias_se'][j]:.3f} | "
                f"{r['z_mean'][j]:+.2f} | {r['z_rms'][j]:.2f} | {r['cov68'][j]:.2f} | "
                f"{r['cov95'][j]:.2f} | {r['post_sd'][j]:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/train_prior/slic_noise"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--train-steps", type=int, default=None, help="override train.steps")
    parser.add_argument(
        "--override", action="append", default=[], help="hydra override of the training config"
    )
    parser.add_argument("--n-obs", type=int, default=200)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--samples", type=int, default=50, help="kept per chain")
    parser.add_argument("--thin", type=int, default=6)
    parser.add_argument("--burn-in", type=int, default=150)
    parser.add_argument("--step-size", type=float, default=0.1)
    parser.add_argument(
        "--smoothing", type=float, nargs="+", default=[0.1, 0.3], help="SLIC noise levels s"
    )
    parser.add_argument("--noise-samples", type=int, default=256, help="for the noise check")
    parser.add_argument(
        "--cosmic-ray-rate",
        type=float,
        default=NOISE["cosmic_ray_rate"],
        help="of the observations (0: Gaussian noise only, the sampler check)",
    )
    parser.add_argument(
        "--no-slic", action="store_true", help="skip the noise model (training, SLIC rows)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    t0 = time.perf_counter()
    ckpt = (
        None if args.no_slic else train_noise_model(args.run_dir, args.train_steps, args.override)
    )
    timings = {"training": time.perf_counter() - t0}
    size = 16
    forward = blob_model(size).float()

    g = torch.Generator().manual_seed(args.seed)
    loc, sd = torch.tensor(PRIOR_LOC), torch.tensor(PRIOR_SD)
    prior = torch.distributions.Independent(torch.distributions.Normal(loc, sd), 1)
    n = args.n_obs
    truth = loc + sd * torch.randn(n, 4, generator=g)
    # the observations' noise: a seed the training data (seed 0) never used
    observed = {**NOISE, "cosmic_ray_rate": args.cosmic_ray_rate}
    y = forward(truth) + noise_realisations(n, size, seed=10_000 + args.seed, **observed)
    init = loc + sd * torch.randn(n, args.chains, 4, generator=g)

    cov = correlated_noise_covariance(
        size,
        white_fraction=NOISE["white_fraction"],
        correlation_length=NOISE["correlation_length"],
    )
    oracle = GaussianPrior(torch.zeros(size * size, dtype=torch.float64), cov).float()
    likelihoods = {
        "white Gaussian": GaussianNoise(1.0),
        "correlated Gaussian (exact Σ, no cosmic rays)": LearnedNoise(
            oracle, 1.0, 0.01, obs_shape=(1, size, size)
        ),
    }
    denoiser = None if ckpt is None else load_prior(ckpt)
    for s in args.smoothing if denoiser is not None else ():
        likelihoods[f"SLIC (learned, s = {s:g})"] = LearnedNoise(denoiser, 1.0, s, batch_size=1024)
    results = {}
    for name, noise in likelihoods.items():
        t0 = time.perf_counter()
        samples = langevin(
            forward,
            noise,
            y,
            prior,
            init,
            num_samples=args.samples,
            burn_in=args.burn_in,
            thin=args.thin,
            step_size=args.step_size,
            preconditioner=sd**2,
            adapt=3,
            generator=args.seed,
        )
        timings[name] = time.perf_counter() - t0
        results[name] = summarise(samples, truth, args.seed)
        r = results[name]
        print(
            f"{name}: {timings[name]:.0f} s, atc {r['atc']:+.3f} {r['atc_ci']}, ks {r['ks']:.3f}, "
            f"inside {r['inside']:.0%}, z rms {[round(v, 2) for v in r['z_rms']]}",
            flush=True,
        )
    t0 = time.perf_counter()
    check = None
    if denoiser is not None:
        check = noise_check(LearnedNoise(denoiser), size, args.noise_samples, args.seed)
    timings["noise check"] = time.perf_counter() - t0
    plot(results, check, y, args.out)
    timings["total"] = time.perf_counter() - start

    text = table(results, timings)
    stats = check["stats"] if check is not None else {}
    if stats:
        text += "\n\n| noise realisations | " + " | ".join(stats["true"]) + " |\n"
        text += "| --- |" + " --- |" * len(stats["true"]) + "\n"
        for name, row in stats.items():
            text += f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |\n"
    text += "\n" + ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()) + "\n"
    (args.out / "results.md").write_text(text)
    dump = {name: {k: v for k, v in r.items() if k != "tarp"} for name, r in results.items()}
    dump["noise check"] = stats
    dump["timings_s"] = timings
    dump["args"] = {k: str(v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps(dump, indent=1))
    print(text)


if __name__ == "__main__":
    main()
