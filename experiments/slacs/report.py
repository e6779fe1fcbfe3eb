r"""Tables, residual statistics and figures of the lenstronomy fits (fit_lenstronomy.py).

For each bundled lens it reads ``results/lenstronomy_<lens>.json`` / ``_model.npz`` and

- the posterior table: theta_E, q, phi (major axis, degrees counter-clockwise from +x = the
  columns), PA (= phi - 90 deg: east of north if north is +y and east is -x), gamma, phi_gamma,
  centre: median and 16-84% interval of the MCMC samples;
- the residual statistics over the likelihood mask: chi^2/nu under the white noise map and under
  the correlated noise model learned from the blank sky
  (:func:`hierprior.data.correlated_noise_from_sky`, max_lag 2, the likelihood mask marginalised;
  chi^2 = ||whiten(r)||^2 exactly), with nu = pixels - non-linear - linear parameters;
- inside the lensed-light mask (the model's lensed source >= 3 sigma of the noise map, dilated
  by 2 px, within 0.5-2 theta_E of the lens centre): the
  azimuthal average of the normalised residuals in 0.1 arcsec annuli around the fitted lens
  centre (white: r / sigma_map; correlated: the whitened residual z), and the two-sample KS test
  of z there against z of the held-out blank sky under the same model;
- the lens light of the best fit rendered by :class:`hierprior.physics.lensing.LensLight` (same
  PSF, supersampling 2) against lenstronomy's (max |difference| / peak; float32 storage);
- ``residuals_<lens>.png``: data | model | lens light (J1430) | lensed source | r / sigma_map |
  whitened r, and the annulus profiles;

and writes ``results/lenstronomy.md`` and ``results/lenstronomy_stats.json``.

Usage::

    python experiments/slacs/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hierprior.data import SLACS_LENSES, load_slacs
from hierprior.io import atomic_write_bytes, atomic_write_text, figure_bytes
from hierprior.lensfit.statistics import ANNULUS, TABLE_ROWS, interval, residual_statistics

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROWS = TABLE_ROWS


def analyse(name: str) -> dict:
    fit = json.loads((RESULTS / f"lenstronomy_{name}.json").read_text())
    arrays = np.load(RESULTS / f"lenstronomy_{name}_model.npz")
    keep = arrays["likelihood_mask"].astype(bool)
    data = load_slacs(name, mask=~keep)
    image = data.image.numpy()
    cx, cy = fit["table"]["center_x"]["median"], fit["table"]["center_y"]["median"]
    res = residual_statistics(
        data,
        arrays["model"],
        arrays["source"],
        (cx, cy),
        fit["table"]["theta_E"]["median"],
        fit["nu"],
    )
    light_check = None
    kll = fit["best_fit"].get("kwargs_lens_light") or []
    if kll:  # hierprior's LensLight renders lenstronomy's best-fit lens light
        from hierprior.physics.lensing import LensLight, Sersic

        k = kll[0]
        light = LensLight(Sersic(), data.shape[0], data.pixel_scale, 2, data.psf)
        eta = torch.tensor([[k[n] for n in Sersic.parameter_names]], dtype=torch.float64)
        ours = light(eta, torch.tensor([[k["amp"]]], dtype=torch.float64))[0, 0].numpy()
        ours = ours * data.pixel_scale**2  # mean surface brightness -> flux per pixel
        ref = arrays["lens_light"].astype(np.float64)  # stored as float32
        light_check = float(np.abs(ours - ref).max() / np.abs(ref).max())
    images = res.pop("images")
    return {
        "fit": fit,
        **res,
        "hierprior_lens_light_max_rel_diff": light_check,
        "images": {
            "data": image,
            "model": arrays["model"],
            "source": arrays["source"],
            "lens_light": arrays["lens_light"],
            **images,
        },
    }


def figure(name: str, res: dict) -> bytes:
    im = res["images"]
    n = im["data"].shape[0]
    ext = [-n * 0.025, n * 0.025, -n * 0.025, n * 0.025]

    def draw(fig):
        panels = [("data", im["data"]), ("model", im["model"])]
        if np.abs(im["lens_light"]).max() > 0:
            panels.append(("lens light", im["lens_light"]))
        panels += [("lensed source", im["source"])]
        axes = fig.subplots(2, 4)
        flat = axes.flatten()
        lo, hi = np.percentile(im["data"], [1, 99.5])
        for ax, (title, a) in zip(flat, panels):
            ax.imshow(
                np.arcsinh(a / (0.3 * hi)),
                origin="lower",
                cmap="gray",
                extent=ext,
                vmin=np.arcsinh(lo / (0.3 * hi)),
                vmax=np.arcsinh(1 / 0.3),
            )
            ax.set_title(title)
        for ax, title, a in (
            (flat[4], "(data − model) / σ_map", im["white"]),
            (flat[5], "whitened residual (correlated model)", im["z"]),
        ):
            h = ax.imshow(a, origin="lower", cmap="RdBu_r", vmin=-4, vmax=4, extent=ext)
            ax.contour(im["arcs"], levels=[0.5], colors="k", linewidths=0.5, extent=ext)
            ax.set_title(title)
            fig.colorbar(h, ax=ax, fraction=0.046)
        ax = flat[6]
        for key, label in (("annuli_white", "r / σ_map"), ("annuli_correlated", "whitened")):
            rows = res[key]
            r = [row["r_in"] + ANNULUS / 2 for row in rows]
            ax.errorbar(
                r,
                [row["mean"] for row in rows],
                [row["sem"] for row in rows],
                marker="o",
                ms=3,
                label=label,
            )
        ax.axhspan(-0.3, 0.3, color="0.9")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("radius [″]")
        ax.set_title("annulus mean inside the arc mask")
        ax.legend(fontsize=7)
        flat[7].axis("off")
        for ax in flat[len(panels) : 4]:
            ax.axis("off")
        fig.suptitle(f"{name}: lenstronomy SIE + shear, Sérsic + shapelets source")
        fig.tight_layout()

    return figure_bytes(draw, (16, 8), dpi=60)


def markdown(all_res: dict) -> str:
    names = list(all_res)
    lines = ["| parameter | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key, label, fmt in ROWS:
        cells = [interval(all_res[n]["fit"]["table"][key], fmt) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| statistic | " + " | ".join(names) + " |")
    lines.append("| --- |" + " --- |" * len(names))
    for key, label in (
        ("chi2_nu_white", "χ²/ν, white noise map"),
        ("chi2_nu_correlated", "χ²/ν, correlated model from the sky"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{all_res[n][key]:.3f}" for n in names) + " |")
    lines.append("| ν | " + " | ".join(str(all_res[n]["nu"]) for n in names) + " |")
    lines.append(
        "| arc-mask pixels | " + " | ".join(str(all_res[n]["arc_pixels"]) for n in names) + " |"
    )
    for key, label in (("annuli_white", "white"), ("annuli_correlated", "whitened")):
        cells = []
        for n in names:
            means = [row["mean"] for row in all_res[n][key]]
            worst = max(all_res[n][key], key=lambda row: abs(row["mean"]))
            cells.append(f"{min(means):+.2f} … {max(means):+.2f} (worst at {worst['r_in']:.1f}″)")
        lines.append(f"| annulus means, {label} | " + " | ".join(cells) + " |")
    ks = [all_res[n]["ks_arcs_vs_sky"] for n in names]
    cells = [f"D = {k['statistic']:.3f}, p = {k['p']:.2g}" for k in ks]
    lines.append("| KS, arcs vs held-out sky (whitened) | " + " | ".join(cells) + " |")
    cells = [f"{all_res[n]['arc_z_sd']:.2f}" for n in names]
    lines.append("| sd of whitened residuals in the arcs | " + " | ".join(cells) + " |")
    cells = [
        "—"
        if all_res[n]["hierprior_lens_light_max_rel_diff"] is None
        else f"{all_res[n]['hierprior_lens_light_max_rel_diff']:.1e}"
        for n in names
    ]
    lines.append(
        "| hierprior LensLight vs lenstronomy, max \\|Δ\\|/peak | " + " | ".join(cells) + " |"
    )
    lines.append("")
    lines.append(
        "Annulus means of the normalised residuals in the lensed-light mask (r/σ_map; whitened):"
    )
    lines.append("")
    lines.append("| r [″] | " + " | ".join(f"{n}: r/σ_map | {n}: whitened" for n in names) + " |")
    lines.append("| --- |" + " --- | --- |" * len(names))
    radii = sorted({row["r_in"] for n in names for row in all_res[n]["annuli_white"]})
    for r0 in radii:
        cells = []
        for n in names:
            for key in ("annuli_white", "annuli_correlated"):
                row = next((x for x in all_res[n][key] if x["r_in"] == r0), None)
                cells.append("" if row is None else f"{row['mean']:+.2f} ± {row['sem']:.2f}")
        lines.append(f"| {r0:.1f}–{r0 + ANNULUS:.1f} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        s, t, fit = (
            all_res[n]["fit"]["settings"],
            all_res[n]["fit"]["timings_s"],
            all_res[n]["fit"],
        )
        mc = s["mcmc"]
        lines.append(
            f"- {n}: PSO {s['pso']['particles']} × {s['pso']['iterations']} "
            f"({t['pso_s'] / 60:.1f} min), emcee walker ratio {mc['walker_ratio']}, "
            f"{mc['burn']} burn-in + {mc['run']} steps ({t['mcmc_s'] / 60:.1f} min, "
            f"{fit['n_samples']} samples), shapelets n_max {s['shapelets_n_max']}, "
            f"supersampling {s['supersampling']}, PSF {s['psf_shape'][0]}², "
            f"{s['masked_pixels']} masked pixels"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    all_res = {}
    for name in SLACS_LENSES:
        if not (RESULTS / f"lenstronomy_{name}.json").exists():
            print(f"{name}: no fit yet (run fit_lenstronomy.py)")
            continue
        all_res[name] = analyse(name)
        atomic_write_bytes(HERE / f"residuals_{name}.png", figure(name, all_res[name]))
    text = markdown(all_res)
    atomic_write_text(RESULTS / "lenstronomy.md", text)
    slim = {
        n: {k: v for k, v in r.items() if k not in ("images", "fit")} for n, r in all_res.items()
    }
    atomic_write_text(RESULTS / "lenstronomy_stats.json", json.dumps(slim, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
