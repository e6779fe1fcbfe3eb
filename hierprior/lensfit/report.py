r"""The report directory of ``hierprior-lens`` (:func:`write_report`).

Files (data units throughout: the sampler's units times ``flux_scale``):

- ``figure.png``: data | model | normalised residuals (whitened under the learned noise) |
  source posterior mean | source posterior std | lens light (when modelled); the model is the
  posterior mean of :math:`A(\eta_s) x_s + L_s` over the S joint samples;
- ``corner.png``: the lens parameters' posterior (θ_E, q, φ, γ, φ_γ, centre) from the pooled
  lens samples (:func:`~hierprior.posterior.joint.lens_posterior` at each source sample);
- ``table.md`` / ``table.json``: median and 16–84% interval of θ_E, q, φ, PA, γ, φ_γ, x_c, y_c
  (:func:`hierprior.lensfit.statistics.lens_table`), and the published SLACS b_SIE beside θ_E;
- ``statistics.json``: :func:`hierprior.lensfit.statistics.residual_statistics` of the model
  (χ²/ν under the white noise map and the learned noise, ν = observed pixels − free lens
  parameters − light amplitudes; annulus means in 0.1″ annuli inside the lensed-light mask; KS
  of the whitened residuals there against the whitened held-out blank sky), the issue's
  criteria (pass / fail), acceptance rates and timings;
- ``samples.npz``: ``sources`` (S, n_s, n_s), ``eta`` (S, d) (the joint samples),
  ``lens_samples`` (S·C·K, d), ``names``, ``lensed`` and ``light`` (S, H, W), ``model``;
- ``config.yaml``: the resolved config.

References:
    Bolton et al. (2008), The Sloan Lens ACS Survey. V, ApJ 682, 964 (Table 5: b_SIE).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from hierprior.lensfit.statistics import (
    TABLE_ROWS,
    interval,
    lens_derived,
    lens_table,
    residual_statistics,
)

__all__ = ["PUBLISHED_THETA_E", "criteria", "write_report"]

#: SLACS V (Bolton et al. 2008, Table 5) b_SIE [arcsec] of the bundled lenses
PUBLISHED_THETA_E = {"slacs1430+4105": 1.52, "slacs2303+1422": 1.62}

_MASS_KEYS = {"theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2"}


def _columns(samples: np.ndarray, names: list[str]) -> dict:
    col = {n: samples[:, i] for i, n in enumerate(names)}
    missing = sorted(_MASS_KEYS - set(col))
    if missing:
        raise ValueError(f"the lens must be SIE + shear for the table; missing {missing}")
    return {k: col[k] for k in _MASS_KEYS}


def criteria(table: dict, stats: dict, published: float | None) -> dict:
    """The issue's checks: θ_E within 3% of SLACS, its 68% interval <= 3%, χ²/ν (learned
    noise) in [0.9, 1.15], every annulus mean (whitened) within ±0.3, KS p >= 0.01."""
    th = table["theta_E"]
    out = {}
    if published is not None:
        dev = th["median"] / published - 1
        out["theta_E_within_3pct"] = {"value": dev, "pass": abs(dev) <= 0.03}
    width = (th["p84"] - th["p16"]) / th["median"]
    out["theta_E_interval_le_3pct"] = {"value": width, "pass": width <= 0.03}
    chi2 = stats["chi2_nu_correlated"]
    out["chi2_nu_in_0.9_1.15"] = {"value": chi2, "pass": 0.9 <= chi2 <= 1.15}
    means = [row["mean"] for row in stats["annuli_correlated"]]
    worst = max(means, key=abs) if means else float("nan")
    out["annuli_within_0.3"] = {"value": worst, "pass": bool(means) and abs(worst) <= 0.3}
    ks = stats["ks_arcs_vs_sky"]
    p = float("nan") if ks is None else ks["p"]
    out["ks_p_ge_0.01"] = {"value": p, "pass": ks is not None and p >= 0.01}
    return out


def _figure(data, images: dict, has_light: bool, title: str) -> bytes:
    from hierprior.io import figure_bytes

    n = data.shape[0]
    half = n * data.pixel_scale / 2
    ext = [-half, half, -half, half]

    def draw(fig):
        panels = 6 if has_light else 5
        axes = fig.subplots(1, panels)
        lo, hi = np.percentile(images["data"], [1, 99.5])

        def stretch(a):
            return np.arcsinh(a / (0.3 * hi))

        for ax, key, label in ((axes[0], "data", "data"), (axes[1], "model", "model")):
            ax.imshow(
                stretch(images[key]),
                origin="lower",
                cmap="gray",
                extent=ext,
                vmin=stretch(lo),
                vmax=stretch(hi),
            )
            ax.set_title(label)
        h = axes[2].imshow(images["z"], origin="lower", cmap="RdBu_r", vmin=-4, vmax=4, extent=ext)
        axes[2].contour(images["arcs"], levels=[0.5], colors="k", linewidths=0.5, extent=ext)
        axes[2].set_title("whitened residual")
        fig.colorbar(h, ax=axes[2], fraction=0.046)
        fov = images["source_fov"] / 2
        sext = [-fov, fov, -fov, fov]
        for ax, key, label in (
            (axes[3], "source_mean", "source mean"),
            (axes[4], "source_std", "source std"),
        ):
            h = ax.imshow(images[key], origin="lower", cmap="magma", extent=sext)
            ax.set_title(label)
            fig.colorbar(h, ax=ax, fraction=0.046)
        if has_light:
            axes[5].imshow(stretch(images["light"]), origin="lower", cmap="gray", extent=ext)
            axes[5].set_title("lens light")
        fig.suptitle(title)
        fig.tight_layout()

    return figure_bytes(draw, (3.2 * (6 if has_light else 5), 3.6), dpi=70)


def _corner(derived: dict, title: str) -> bytes:
    from hierprior.io import figure_bytes

    keys = [k for k, _, _ in TABLE_ROWS if k != "PA_sky"]
    labels = {k: label for k, label, _ in TABLE_ROWS}

    def draw(fig):
        k = len(keys)
        axes = fig.subplots(k, k)
        for i, a in enumerate(keys):
            for j, b in enumerate(keys):
                ax = axes[i, j]
                if j > i:
                    ax.axis("off")
                    continue
                if i == j:
                    ax.hist(derived[a], bins=30, color="C0")
                    ax.set_yticks([])
                else:
                    ax.plot(derived[b], derived[a], ".", ms=1, alpha=0.3, color="C0")
                if i == k - 1:
                    ax.set_xlabel(labels[b], fontsize=7)
                else:
                    ax.set_xticklabels([])
                if j == 0 and i > 0:
                    ax.set_ylabel(labels[a], fontsize=7)
                elif j > 0:
                    ax.set_yticklabels([])
                ax.tick_params(labelsize=5)
        fig.suptitle(title)

    return figure_bytes(draw, (10, 10), dpi=70)


def _table_markdown(table: dict, name: str, published: float | None) -> str:
    lines = [f"| parameter | {name} (median [16%, 84%]) |", "| --- | --- |"]
    for key, label, fmt in TABLE_ROWS:
        lines.append(f"| {label} | {interval(table[key], fmt)} |")
    if published is not None:
        lines.append(f"| SLACS b_SIE [″] (Bolton et al. 2008) | {published:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(
    run_dir: Path,
    problem,
    *,
    names: list[str],
    sources,
    eta,
    lens_samples,
    lensed,
    light,
    acceptance: dict,
    timings: dict,
    config: dict,
    has_light: bool,
    max_lag: int = 2,
) -> dict:
    """Writes the report files (see the module docstring) into run_dir; returns the
    statistics dict.

    Arguments:
        problem: the :class:`~hierprior.lensfit.cli.LensProblem` (data, scale, forward).
        names: the lens parameters' names (d).
        sources: (S, 1, n_s, n_s) source samples (the sampler's units).
        eta: (S, d) the joint samples' lens parameters.
        lens_samples: (M, d) pooled lens posterior samples.
        lensed, light: (S, 1, H, W) the lensed source and the lens light of each sample.
    """
    from omegaconf import OmegaConf

    from hierprior.io import atomic_write_bytes, atomic_write_text

    run_dir = Path(run_dir)
    data, scale = problem.data, problem.scale
    lensed = lensed.detach().double().cpu().numpy()[:, 0] * scale
    light = light.detach().double().cpu().numpy()[:, 0] * scale
    src = sources.detach().double().cpu().numpy()[:, 0] * scale
    model = (lensed + light).mean(0)
    samples = lens_samples.detach().double().cpu().numpy()
    eta = eta.detach().double().cpu().numpy()
    table = lens_table(_columns(samples, names))
    lens_name = str(config["lens"]["name"])
    published = PUBLISHED_THETA_E.get(lens_name)
    forward = problem.forward
    k_amp = forward.light.num_amplitudes if has_light else 0
    nu = int(data.observed.sum()) - forward.prior.zdim - k_amp
    th, c = table["theta_E"]["median"], (table["center_x"]["median"], table["center_y"]["median"])
    stats = residual_statistics(data, model, lensed.mean(0), c, th, nu, max_lag=max_lag)
    images = stats.pop("images")
    checks = criteria(table, stats, published)
    figure_images = {
        "data": data.image.numpy(),
        "model": model,
        "z": images["z"],
        "arcs": images["arcs"],
        "source_mean": src.mean(0),
        "source_std": src.std(0, ddof=1) if len(src) > 1 else np.zeros_like(src[0]),
        "light": light.mean(0),
        "source_fov": float(forward.geometry.source_fov),
    }
    title = f"{lens_name}: hierprior joint source + SIE + shear" + (
        " + lens light" if has_light else ""
    )
    atomic_write_bytes(run_dir / "figure.png", _figure(data, figure_images, has_light, title))
    derived = lens_derived(_columns(samples, names))
    atomic_write_bytes(run_dir / "corner.png", _corner(derived, f"{lens_name}: lens posterior"))
    atomic_write_text(
        run_dir / "table.json",
        json.dumps({"lens": lens_name, "table": table, "published_b_SIE": published}, indent=1)
        + "\n",
    )
    atomic_write_text(run_dir / "table.md", _table_markdown(table, lens_name, published))
    out = {
        "lens": lens_name,
        "flux_scale": scale,
        "noise": config["lens"]["noise"],
        **stats,
        "criteria": checks,
        "acceptance": acceptance,
        "timings_s": timings,
        "num_lens_samples": int(samples.shape[0]),
        "num_source_samples": int(src.shape[0]),
    }
    atomic_write_text(
        run_dir / "statistics.json", json.dumps(out, indent=1, default=_jsonable) + "\n"
    )
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        sources=src.astype(np.float32),
        eta=eta,
        lens_samples=samples,
        names=np.array(names),
        lensed=lensed.astype(np.float32),
        light=light.astype(np.float32),
        model=model.astype(np.float32),
        observed=data.observed.numpy(),
    )
    atomic_write_bytes(run_dir / "samples.npz", buf.getvalue())
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    return out


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
