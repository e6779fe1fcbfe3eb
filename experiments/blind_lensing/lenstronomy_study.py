r"""Blind lensing side by side: hierprior's joint sampler against lenstronomy's PSO + MCMC.

The same observations (the first ``--lenses`` of ``conf/population/galaxy_shift_blind.yaml``:
procedural spiral sources, SIE + shear lenses drawn from the population's lens prior, 48 x 48
images at 0.08", 2 x 2 rays per pixel, a 0.1" Gaussian PSF, sigma = 0.01) are modelled twice:

- **hierprior**: the joint (source, lens) method (``sampler=joint``, DAPS for the source, the
  population's lens prior), with a learned source prior (``--prior``: a ``prior.ckpt``, e.g. the
  last round of ``hierprior-em experiment=blind_lens_tiny``), S samples per lens;
- **lenstronomy 1.14.2**: ``SIE`` + ``SHEAR`` (origin fixed at 0) with a ``SERSIC_ELLIPSE``
  source, the same pixel grid (x along columns, y along rows, both increasing with the index,
  centred), the same PSF kernel (``gaussian_psf``, pixel type), 2 x 2 supersampling, the noise
  map sigma; uniform bounds equal to the support of the lens prior; ``FittingSequence`` with PSO
  then MCMC (emcee).

For each lens and parameter it records the posterior mean and standard deviation of both
(lenstronomy: of its MCMC chain) and the reduced chi2 of the residuals (hierprior: averaged
over its samples; lenstronomy: of its best fit), and writes a JSON file and a markdown table
(bias = mean over lenses of estimate minus truth, with its standard error; median |error| /
posterior sd). ``--lenses``, ``--pso``, ``--mcmc`` shrink it.

Usage:
    python experiments/blind_lensing/lenstronomy_study.py \
        --prior runs/em/blind_lens_tiny/round_003/prior.ckpt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hierprior.diffusion import load_prior
from hierprior.io import atomic_write_text
from hierprior.physics.lensing import gaussian_psf
from hierprior.posterior import posterior_method

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2")


def population(n: int):
    """The first n observations of galaxy_shift_blind (32 px spirals in [0, 1])."""
    cfg = OmegaConf.load(ROOT / "conf" / "population" / "galaxy_shift_blind.yaml")
    cfg.truth.resolution, cfg.truth.value_range = 32, [0.0, 1.0]
    cfg.num_obs = n
    return instantiate(cfg)


def hierprior_fit(pop, prior_path: str, samples: int, seed: int, source_variance: float):
    prior = load_prior(prior_path)
    method = posterior_method(
        {
            "method": "joint",
            "steps": 64,
            "source": {"method": "daps", "iterations": 10},
            "source_variance": source_variance,
            # blind_lens_tiny's: chains start at the back-projection lens search, lens steps
            # once the source has formed (from the prior: trapped, residual chi2/nu ~ 8)
            "init": "search",
            "search_draws": 96,
            "search_steps": 30,
            "lens_below": 0.1,
            "lens_steps": 2,
            "precondition_every": 16,
            "final_warmup": 20,
            "final_steps": 40,
        }
    )
    start = time.perf_counter()
    x, eta = method.sample_joint(
        prior, pop.forward, pop.noise, pop.y, samples, torch.Generator().manual_seed(seed)
    )
    seconds = time.perf_counter() - start
    pred = pop.forward.image(eta, x)
    chi2 = ((pop.y.unsqueeze(1) - pred) / 0.01).pow(2).flatten(2).mean(-1).mean(1)
    return {
        "mean": eta.mean(1).tolist(),
        "sd": eta.std(1).tolist(),
        "chi2_nu": chi2.tolist(),
        "seconds": seconds,
    }


def lenstronomy_fit(y: np.ndarray, kernel: np.ndarray, bounds, pso, mcmc, seed):
    """PSO + MCMC of SIE + SHEAR with a SERSIC_ELLIPSE source on one image (48 x 48)."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Workflow.fitting_sequence import FittingSequence

    n, pix = y.shape[0], 0.08
    origin = -(n - 1) / 2 * pix  # hierprior's pixel centres: (i + 1/2) p - F/2
    kwargs_data = {
        "image_data": y,
        "noise_map": np.full_like(y, 0.01),
        "ra_at_xy_0": origin,
        "dec_at_xy_0": origin,
        "transform_pix2angle": np.array([[pix, 0.0], [0.0, pix]]),  # x with columns, y rows
    }
    kwargs_psf = {"psf_type": "PIXEL", "kernel_point_source": kernel}
    kwargs_numerics = {"supersampling_factor": 2, "supersampling_convolution": False}
    lo, hi = bounds
    lens_init = [
        {k: 0.5 * (lo[k] + hi[k]) for k in NAMES[:5]},
        {"gamma1": 0.0, "gamma2": 0.0},
    ]
    lens_sigma = [{k: 0.25 * (hi[k] - lo[k]) for k in NAMES[:5]}, {"gamma1": 0.02, "gamma2": 0.02}]
    lens_fixed = [{}, {"ra_0": 0.0, "dec_0": 0.0}]
    lens_lower = [{k: lo[k] for k in NAMES[:5]}, {"gamma1": lo["gamma1"], "gamma2": lo["gamma2"]}]
    lens_upper = [{k: hi[k] for k in NAMES[:5]}, {"gamma1": hi["gamma1"], "gamma2": hi["gamma2"]}]
    src_init = [
        {"R_sersic": 0.3, "n_sersic": 1.5, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0}
    ]
    src_sigma = [
        {"R_sersic": 0.1, "n_sersic": 0.5, "e1": 0.1, "e2": 0.1, "center_x": 0.1, "center_y": 0.1}
    ]
    src_lower = [
        {
            "R_sersic": 0.02,
            "n_sersic": 0.5,
            "e1": -0.5,
            "e2": -0.5,
            "center_x": -0.6,
            "center_y": -0.6,
        }
    ]
    src_upper = [
        {"R_sersic": 2.0, "n_sersic": 6.0, "e1": 0.5, "e2": 0.5, "center_x": 0.6, "center_y": 0.6}
    ]
    kwargs_params = {
        "lens_model": [lens_init, lens_sigma, lens_fixed, lens_lower, lens_upper],
        "source_model": [src_init, src_sigma, [{}], src_lower, src_upper],
    }
    kwargs_model = {
        "lens_model_list": ["SIE", "SHEAR"],
        "source_light_model_list": ["SERSIC_ELLIPSE"],
    }
    data_joint = {
        "multi_band_list": [[kwargs_data, kwargs_psf, kwargs_numerics]],
        "multi_band_type": "single-band",
    }
    np.random.seed(seed)  # lenstronomy's PSO and emcee draw from numpy's global generator
    fit = FittingSequence(
        data_joint, kwargs_model, {}, {"check_bounds": True}, kwargs_params, verbose=False
    )
    start = time.perf_counter()
    chains = fit.fit_sequence(
        [
            ["PSO", {"sigma_scale": 1.0, "n_particles": pso[0], "n_iterations": pso[1]}],
            [
                "MCMC",
                {
                    "n_burn": mcmc[0],
                    "n_run": mcmc[1],
                    "walkerRatio": mcmc[2],
                    "sigma_scale": 0.1,
                    "progress": False,
                },
            ],
        ]
    )
    seconds = time.perf_counter() - start
    best = fit.best_fit()
    _, samples, names, _ = chains[-1]
    col = {name: i for i, name in enumerate(names)}
    keys = [f"{k}_lens0" for k in NAMES[:5]] + ["gamma1_lens1", "gamma2_lens1"]
    chain = np.stack([samples[:, col[k]] for k in keys], 1)
    data = ImageData(**kwargs_data)
    model = ImageModel(
        data,
        PSF(**kwargs_psf),
        lens_model_class=LensModel(["SIE", "SHEAR"]),
        source_model_class=LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics=kwargs_numerics,
    )
    image = model.image(best["kwargs_lens"], best["kwargs_source"])
    chi2 = float((((y - image) / 0.01) ** 2).mean())
    return {
        "mean": chain.mean(0).tolist(),
        "sd": chain.std(0).tolist(),
        "best": [best["kwargs_lens"][0][k] for k in NAMES[:5]]
        + [best["kwargs_lens"][1]["gamma1"], best["kwargs_lens"][1]["gamma2"]],
        "chi2_nu": chi2,
        "sersic": best["kwargs_source"][0],
        "seconds": seconds,
    }


def summarise(truth: np.ndarray, fits: dict[str, dict]) -> str:
    lines = [
        "| parameter | code | bias (mean ± s.e.) | mean \\|error\\| | median \\|error\\|/sd |",
        "| --- | --- | --- | --- | --- |",
    ]
    for j, name in enumerate(NAMES):
        for code, fit in fits.items():
            mean, sd = np.asarray(fit["mean"]), np.asarray(fit["sd"])
            err = mean[:, j] - truth[:, j]
            se = err.std(ddof=1) / math.sqrt(len(err))
            z = np.median(np.abs(err) / np.maximum(sd[:, j], 1e-12))
            lines.append(
                f"| {name} | {code} | {err.mean():+.4f} ± {se:.4f} | {np.abs(err).mean():.4f} "
                f"| {z:.2f} |"
            )
    lines += [
        "",
        "| code | χ²/ν mean | χ²/ν median | χ²/ν max | s / lens |",
        "| --- | --- | --- | --- | --- |",
    ]
    for code, fit in fits.items():
        c = np.asarray(fit["chi2_nu"])
        per = fit["seconds"] / len(c)
        lines.append(
            f"| {code} | {c.mean():.3f} | {np.median(c):.3f} | {c.max():.3f} | {per:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prior", default=None, help="the source prior (prior.ckpt); without: lenstronomy only"
    )
    parser.add_argument("--lenses", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8, help="hierprior samples per lens")
    parser.add_argument("--source-variance", type=float, default=1.0)
    parser.add_argument(
        "--pso", type=int, nargs=2, default=(50, 150), help="particles, iterations"
    )
    parser.add_argument(
        "--mcmc", type=int, nargs=3, default=(150, 150, 4), help="burn-in, run, walker ratio"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pop = population(args.lenses)
    truth = pop.forward.truth.double().numpy()
    prior = pop.forward.prior
    lo, hi = {}, {}
    for idx, p in prior.entries:
        for j, (a, b) in zip(idx, p.box()):
            lo[NAMES[j]], hi[NAMES[j]] = a, b
    fits = {}
    if args.prior:
        fits["hierprior (joint, learned prior)"] = hierprior_fit(
            pop, args.prior, args.samples, args.seed, args.source_variance
        )
        print(f"hierprior: {fits['hierprior (joint, learned prior)']['seconds']:.0f} s")
    kernel = gaussian_psf(0.1, 0.08).numpy()
    results = []
    for i in range(args.lenses):
        # one file per lens and setting: a rerun (e.g. with --prior) reuses the fits
        cache = out / f"lenstronomy_{i:03d}_pso{args.pso[0]}x{args.pso[1]}.json"
        if cache.exists():
            results.append(json.loads(cache.read_text()))
            continue
        y = pop.y[i, 0].double().numpy()
        results.append(lenstronomy_fit(y, kernel, (lo, hi), args.pso, args.mcmc, args.seed + i))
        atomic_write_text(cache, json.dumps(results[-1], default=float))
        print(f"lenstronomy lens {i}: chi2/nu {results[-1]['chi2_nu']:.2f}", flush=True)
    fits["lenstronomy (PSO + MCMC, Sérsic)"] = {
        "mean": [r["mean"] for r in results],
        "sd": [r["sd"] for r in results],
        "chi2_nu": [r["chi2_nu"] for r in results],
        "seconds": sum(r["seconds"] for r in results),
    }
    table = summarise(truth, fits)
    print(table)
    atomic_write_text(out / "lenstronomy_study.md", table + "\n")
    record = {"truth": truth.tolist(), "fits": fits, "lenstronomy": results, "args": vars(args)}
    atomic_write_text(out / "lenstronomy_study.json", json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
