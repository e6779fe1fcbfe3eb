r"""The noise of the bundled SLACS images, learned from their own blank sky, on held-out sky.

For each lens, the blank-sky patches (24 x 24, >= 5 arcsec from the lens, each minus a fitted
plane) are split by the bundle into fitting patches and held-out ones (a third). Noise models
are fitted on the fitting patches only and scored on the held-out ones:

- **white noise map**: N(0, diag(sigma_map^2)), the pipeline's noise map as it is;
- **white, rescaled**: the noise map times sigma_sky / level (level the noise map's median on
  the fitting patches, sigma_sky the standard deviation there of u = r / w, w = sigma_map /
  level: :meth:`hierprior.data.BlankSky.relative_residuals`): the right variance, no
  correlation;
- **correlated Gaussian**: n = w * u, u stationary with the autocovariance of the fitting
  patches' u at lags |Δx|, |Δy| <= L (:func:`hierprior.physics.noise_autocovariance`), i.e.
  :func:`hierprior.data.correlated_noise_from_sky`'s model. Scored exactly (dense covariance of
  the patch, non-periodic); the FFT model (:class:`hierprior.physics.CorrelatedNoise`) on the
  patch's periodic grid is scored too (its boundary approximation);
- **SLIC**: :class:`hierprior.physics.LearnedNoise` around a diffusion model trained on 16 x 16
  crops of the fitting patches' u / sigma_sky (``hierprior-train-prior experiment=slic_slacs``,
  cached in ``runs/train_prior/slic_<lens>``), n = w * sigma_sky * q with q ~ Q; its density
  Q_s (s = ``--smoothing``) evaluated by the
  probability-flow ODE with the exact divergence (Song et al. 2021): in EDM variables
  x = u + s ε, dx/ds = (x - D(x, s)) / s, so log Q_{s0}(u) = log N(x_1; 0, (1 + s_1^2) I) +
  ∫_{s0}^{s1} (d - tr ∂D/∂x) / s ds, integrated by Heun's method on a log-uniform grid of s
  with 32 and 64 steps and extrapolated to 0 step size (Richardson, second order; on an 16-d
  Gaussian with the exact denoiser this recovers the exact log-density to 1e-3 nats, against
  errors of 0.57 and 0.14 at 32 and 64 steps). ``LearnedNoise.log_prob`` (the straight-line
  integral of the score from 0) is reported beside it: that path crosses points far from the
  noise's typical set (|u| << sqrt(d)), where the network's error enters the score as δD/s².

Scores, on the central 16 x 16 crop of every held-out patch (the SLIC model's size) and, for
the Gaussian models, on the whole 24 x 24 patches: the log-likelihood per pixel (data units:
log p(n) = log Q(q) - sum log(w sigma_sky) for SLIC), and the whitened residuals
(z = L^-1 r with Σ = L L^T for the Gaussian models; r / sigma for the white ones): their
standard deviation, neighbour correlation, excess kurtosis, and the Kolmogorov-Smirnov test
against N(0, 1) (pixels pooled).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python experiments/slacs/noise_models.py   # trains SLIC once
    python experiments/slacs/noise_models.py --no-slic                       # Gaussian only

Writes ``results/noise_models.json``, ``results/noise_models.md`` and ``noise.png`` here.

References:
    Legin, Adam, Hezaveh & Perreault-Levasseur (2023), arXiv 2302.03046 (SLIC).
    Song et al. (2021), Score-Based Generative Modeling through SDEs, ICLR (ODE likelihoods).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from hierprior.data import SLACS_LENSES, load_slacs
from hierprior.io import atomic_write_bytes, atomic_write_text, figure_bytes
from hierprior.physics import CorrelatedNoise, noise_autocovariance, spectrum_from_autocovariance

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CROP = 16


def toeplitz_covariance(acf: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The stationary (non-periodic) covariance of an h x w patch: c(Δ) for |Δ| <= L, else 0."""
    lag = acf.shape[-1] // 2
    r = torch.arange(h * w) // w
    c = torch.arange(h * w) % w
    dy, dx = r[:, None] - r[None, :], c[:, None] - c[None, :]
    inside = (dy.abs() <= lag) & (dx.abs() <= lag)
    return torch.where(
        inside, acf[(dy + lag).clamp(0, 2 * lag), (dx + lag).clamp(0, 2 * lag)], 0.0
    )


def whitened_stats(z: torch.Tensor) -> dict:
    """z (K, h, w): std, neighbour correlations, excess kurtosis, KS against N(0, 1)."""
    flat = z.flatten().numpy()
    ks = stats.kstest(flat, "norm")
    var = float(z.var())
    return {
        "std": float(z.std()),
        "rho_x": float((z[..., :, 1:] * z[..., :, :-1]).mean()) / var,
        "rho_y": float((z[..., 1:, :] * z[..., :-1, :]).mean()) / var,
        "kurtosis": float(stats.kurtosis(flat)),
        "ks_stat": float(ks.statistic),
        "ks_p": float(ks.pvalue),
        "pixels": int(flat.size),
    }


def gaussian_scores(r: torch.Tensor, cov: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mean log-likelihood per pixel, whitened residuals) of r (K, h, w) under N(0, cov_k)
    with cov (K, hw, hw) or (hw, hw)."""
    k, h, w = r.shape
    chol = torch.linalg.cholesky(cov)
    x = r.reshape(k, -1, 1)
    z = torch.linalg.solve_triangular(chol.expand(k, -1, -1), x, upper=False)[..., 0]
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    lp = -0.5 * ((z**2).sum(-1) + logdet + h * w * math.log(2 * math.pi))
    return float(lp.sum()) / (k * h * w), z.reshape(k, h, w)


def pf_ode_log_likelihood(denoiser, u: torch.Tensor, s0: float, steps: int = 48) -> torch.Tensor:
    """log Q_{s0}(u) of the denoiser's data distribution smoothed by N(0, s0^2), u (B, *event).

    Heun steps in log s from s0 to s_max (t = 1); exact divergence by one VJP per coordinate.
    """
    schedule = denoiser.schedule
    s_max = float(schedule.ratio(torch.tensor(1.0, dtype=torch.float64)))
    grid = torch.exp(torch.linspace(math.log(s0), math.log(s_max), steps + 1, dtype=torch.float64))
    d = int(np.prod(denoiser.event_shape))
    eye = torch.eye(d).reshape(d, *denoiser.event_shape)

    def drift_div(x: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = schedule.t_from_ratio(torch.tensor(s, dtype=torch.float64))
        alpha = float(schedule.alpha(t))
        b = x.shape[0]
        xr = x.repeat_interleave(d, dim=0).requires_grad_(True)
        with torch.enable_grad():
            den = denoiser(alpha * xr, t)
            (grad,) = torch.autograd.grad(
                (den * eye.repeat(b, *([1] * len(denoiser.event_shape)))).sum(), xr
            )
        trace = (grad.reshape(b, d, d).diagonal(dim1=1, dim2=2)).sum(-1)  # tr dD/dx at x
        d0 = den.detach().reshape(b, d, *denoiser.event_shape)[:, 0]
        return (x - d0) / s, (d - trace) / s

    x = u.clone()
    integral = torch.zeros(u.shape[0])
    for s_a, s_b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        h = s_b - s_a
        v_a, div_a = drift_div(x, s_a)
        x_b = x + h * v_a
        v_b, div_b = drift_div(x_b, s_b)
        x = x + 0.5 * h * (v_a + v_b)
        integral += 0.5 * h * (div_a + div_b)
    var = 1.0 + s_max**2
    flat = x.reshape(x.shape[0], -1)
    log_end = -0.5 * ((flat**2).sum(-1) / var + d * math.log(2 * math.pi * var))
    return (log_end + integral).detach()


def train_slic(name: str, steps: int | None) -> Path:
    """Trains (or resumes, or reuses) the SLIC score model of a lens's blank sky."""
    from hydra import compose, initialize_config_dir

    from hierprior.config import CONF_DIR
    from hierprior.training import fit_prior

    overrides = [
        "experiment=slic_slacs",
        f"data.name={name}",
        f"run_dir={REPO / 'runs' / 'train_prior' / f'slic_{name}'}",
        "trainer.enable_progress_bar=false",
    ]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.warmup_steps={min(100, steps)}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train_prior", overrides=overrides)
    return fit_prior(cfg).prior


def evaluate(name: str, args: argparse.Namespace) -> dict:
    data = load_slacs(name)
    sky = data.sky
    fit_u = sky.relative_residuals(held_out=False)  # the stationary part u = r / w
    test_r = sky.residuals(held_out=True)
    test_nm = sky.noise_map[sky.held_out]
    level = sky.noise_level(held_out=False)
    sd = float(fit_u.std())
    out = {
        "patches_fit": int(len(fit_u)),
        "patches_held_out": int(len(test_r)),
        "sigma_sky": sd,
        "noise_map_level": level,
        "noise_map_over_sky": level / sd,
        "acf": {},
        "scores": {},
    }
    acf_full = noise_autocovariance(fit_u, max_lag=4)
    out["acf"] = (acf_full / acf_full[4, 4]).tolist()
    lo = (24 - CROP) // 2
    sets = {
        "crop16": (
            test_r[:, lo : lo + CROP, lo : lo + CROP],
            test_nm[:, lo : lo + CROP, lo : lo + CROP],
        ),
        "patch24": (test_r, test_nm),
    }
    for set_name, (r, nm) in sets.items():
        k, h, w = r.shape
        res = {}
        for label, sigma in (("white_noise_map", nm), ("white_rescaled", nm * sd / level)):
            z = r / sigma
            lp = torch.distributions.Normal(0.0, sigma).log_prob(r)
            res[label] = {"loglik_per_pixel": float(lp.mean()), **whitened_stats(z)}
        for lag in args.lags:
            acf = noise_autocovariance(fit_u, max_lag=lag)
            scale = (nm / level).reshape(k, -1)
            cov = scale[:, :, None] * toeplitz_covariance(acf, h, w)[None] * scale[:, None, :]
            lp, z = gaussian_scores(r, cov)
            res[f"correlated_L{lag}"] = {"loglik_per_pixel": lp, **whitened_stats(z)}
            # the FFT model itself, periodic on the patch's grid
            model = CorrelatedNoise(
                spectrum_from_autocovariance(acf, (h, w)), nm / level, obs_shape=(h, w)
            )
            lp_fft = model.log_prob(r, torch.zeros_like(r))  # one observation per patch: (K,)
            res[f"correlated_L{lag}"]["fft_periodic_loglik_per_pixel"] = float(lp_fft.sum()) / (
                k * h * w
            )
            res[f"correlated_L{lag}"]["fft_periodic"] = whitened_stats(model.whiten(r))
        out["scores"][set_name] = res
    if not args.no_slic:
        from hierprior.diffusion.checkpoint import load_prior
        from hierprior.physics import LearnedNoise

        t0 = time.time()
        path = train_slic(name, args.slic_steps)
        out["slic_train_s"] = time.time() - t0
        denoiser = load_prior(path).eval()
        r, nm = sets["crop16"]
        unit = nm * (sd / level)  # n = unit * q, q ~ Q (unit variance)
        log_jac = torch.log(unit).sum(dim=(-2, -1))
        t0 = time.time()
        for s in args.smoothing:
            q = (r / unit).unsqueeze(1).float()
            per_steps = {}
            for steps in args.ode_steps:
                lq = torch.cat(
                    [pf_ode_log_likelihood(denoiser, chunk, s, steps) for chunk in q.split(2)]
                )
                per_steps[steps] = float((lq.double() - log_jac).mean()) / (CROP * CROP)
            coarse, fine = sorted(args.ode_steps)[-2:] if len(args.ode_steps) > 1 else (None, None)
            entry = {f"loglik_per_pixel_ode{k}": v for k, v in per_steps.items()}
            if fine is not None:  # Heun is second order: Richardson extrapolation in 1/steps^2
                ratio = (fine / coarse) ** 2
                entry["loglik_per_pixel"] = per_steps[fine] + (
                    per_steps[fine] - per_steps[coarse]
                ) / (ratio - 1)
            else:
                entry["loglik_per_pixel"] = per_steps[args.ode_steps[0]]
            # LearnedNoise.log_prob (line integral of the score from 0) + the ODE's log Q_s(0)
            noise = LearnedNoise(denoiser, 1.0, smoothing=s)
            line = noise.log_prob(q, torch.zeros_like(q)).double()
            zero = pf_ode_log_likelihood(
                denoiser, torch.zeros(1, 1, CROP, CROP), s, max(args.ode_steps)
            )
            entry["line_integral_plus_ode_at_0_per_pixel"] = float(
                (line + zero.double() - log_jac).mean()
            ) / (CROP * CROP)
            out["scores"]["crop16"][f"slic_s{s}"] = entry
        out["slic_eval_s"] = time.time() - t0
    return out


def plot(results: dict, path: Path) -> None:
    def draw(fig):
        lenses = list(results)
        axes = fig.subplots(len(lenses), 4)
        for row, name in zip(axes, lenses):
            data = load_slacs(name)
            sky = data.sky
            r = sky.residuals(held_out=True)[0]
            nm = sky.noise_map[sky.held_out][0]
            level, sd = results[name]["noise_map_level"], results[name]["sigma_sky"]
            lag = max(
                int(k.split("L")[1])
                for k in results[name]["scores"]["patch24"]
                if k.startswith("correlated")
            )
            acf = noise_autocovariance(sky.relative_residuals(held_out=False), max_lag=lag)
            cov = toeplitz_covariance(acf, 24, 24) * (
                (nm / level).flatten()[:, None] * (nm / level).flatten()[None, :]
            )
            _, z = gaussian_scores(r[None], cov)
            row[0].imshow(r / nm, origin="lower", cmap="RdBu_r", vmin=-3, vmax=3)
            row[0].set_title(f"{name}: held-out sky / noise map")
            row[1].imshow(z[0], origin="lower", cmap="RdBu_r", vmin=-3, vmax=3)
            row[1].set_title("whitened (correlated model)")
            a = np.array(results[name]["acf"])
            row[2].imshow(a, origin="lower", cmap="viridis", extent=[-4.5, 4.5, -4.5, 4.5])
            row[2].set_title("autocorrelation (fit patches)")
            row[2].set_xlabel("Δx [px]")
            row[2].set_ylabel("Δy [px]")
            grid = np.linspace(-5, 5, 201)
            all_r = sky.residuals(held_out=True)
            all_nm = sky.noise_map[sky.held_out]
            row[3].hist(
                (all_r / all_nm).flatten().numpy(),
                bins=80,
                density=True,
                histtype="step",
                label="r / noise map",
            )
            row[3].hist(
                (all_r / (all_nm * sd / level)).flatten().numpy(),
                bins=80,
                density=True,
                histtype="step",
                label="r / rescaled map",
            )
            w_all = (all_nm / level).reshape(len(all_r), -1)
            cov_all = (
                w_all[:, :, None] * toeplitz_covariance(acf, 24, 24)[None] * w_all[:, None, :]
            )
            _, z_all = gaussian_scores(all_r, cov_all)
            row[3].hist(
                z_all.flatten().numpy(),
                bins=80,
                density=True,
                histtype="step",
                label="whitened (correlated)",
            )
            row[3].plot(grid, stats.norm.pdf(grid), "k--", label="N(0, 1)")
            row[3].set_yscale("log")
            row[3].set_ylim(1e-4, 1)
            row[3].legend(fontsize=7)
            row[3].set_title("held-out pixels")
        fig.tight_layout()

    atomic_write_bytes(path, figure_bytes(draw, (16, 4 * len(results))))


def _row(label: str, loglik: float, st: dict | None) -> str:
    if st is None:
        return f"| {label} | {loglik:.4f} | | | | | | |"
    return (
        f"| {label} | {loglik:.4f} | {st['std']:.3f} | {st['rho_x']:+.3f} | {st['rho_y']:+.3f} "
        f"| {st['kurtosis']:+.3f} | {st['ks_stat']:.4f} | {st['ks_p']:.3g} |"
    )


def table(results: dict) -> str:
    lines = []
    for name, res in results.items():
        lines.append(
            f"**{name}**: {res['patches_fit']} fitting and {res['patches_held_out']} held-out "
            f"patches; sky sigma {res['sigma_sky']:.5f}, noise-map level "
            f"{res['noise_map_level']:.5f} ({res['noise_map_over_sky']:.3f} x the sky scatter)\n"
        )
        for set_name, scores in res["scores"].items():
            lines.append(f"\n{set_name} (held-out):\n")
            lines.append(
                "| model | log-lik / pixel | whitened sd | ρx | ρy | ex. kurtosis | KS D | KS p |"
            )
            lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for label, sc in scores.items():
                lines.append(_row(label, sc["loglik_per_pixel"], sc if "std" in sc else None))
            for label, sc in scores.items():
                if "fft_periodic" in sc:
                    lines.append(
                        _row(
                            f"{label} (FFT, periodic)",
                            sc["fft_periodic_loglik_per_pixel"],
                            sc["fft_periodic"],
                        )
                    )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lens", choices=SLACS_LENSES, action="append")
    parser.add_argument("--lags", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--no-slic", action="store_true")
    parser.add_argument("--slic-steps", type=int, default=None)
    parser.add_argument("--smoothing", type=float, nargs="+", default=[0.1])
    parser.add_argument("--ode-steps", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: evaluate(name, args) for name in args.lens or SLACS_LENSES}
    out = Path(args.out)
    atomic_write_text(out / "results" / "noise_models.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results" / "noise_models.md", table(results))
    plot(results, out / "noise.png")
    print(table(results))


if __name__ == "__main__":
    main()
