r"""hierprior-lens beside lenstronomy and SLACS on the bundled lenses: ``results/comparison.md``.

Reads the lenstronomy fits (``results/lenstronomy_<lens>.json``, ``results/lenstronomy_stats.json``
from fit_lenstronomy.py and report.py) and the hierprior-lens report directories copied to
``results/hierprior_<lens>/`` (``table.json``, ``statistics.json``), and writes one table per
lens: the lens parameters (median [16%, 84%]) of both codes and the SLACS b_SIE, the residual
statistics of both under the same definitions (:mod:`hierprior.lensfit.statistics`), and the
issue's criteria for hierprior.

Usage::

    cp -r runs/lens/slacs_j1430_tiny experiments/slacs/results/hierprior_slacs1430+4105  # etc.
    python experiments/slacs/compare.py
"""

from __future__ import annotations

import json
from pathlib import Path

from hierprior.data import SLACS_LENSES
from hierprior.io import atomic_write_text
from hierprior.lensfit.report import PUBLISHED_THETA_E
from hierprior.lensfit.statistics import TABLE_ROWS, interval

RESULTS = Path(__file__).resolve().parent / "results"


def _annuli(rows: list[dict]) -> str:
    if not rows:
        return "—"
    worst = max(rows, key=lambda row: abs(row["mean"]))
    means = [row["mean"] for row in rows]
    return f"{min(means):+.2f} … {max(means):+.2f} (worst at {worst['r_in']:.1f}″)"


def lens_section(name: str) -> str | None:
    ours_dir = RESULTS / f"hierprior_{name}"
    if not (ours_dir / "table.json").exists():
        return None
    ours = json.loads((ours_dir / "table.json").read_text())["table"]
    ostats = json.loads((ours_dir / "statistics.json").read_text())
    ref = json.loads((RESULTS / f"lenstronomy_{name}.json").read_text())["table"]
    rstats = json.loads((RESULTS / "lenstronomy_stats.json").read_text())[name]
    lines = [
        f"**{name}**",
        "",
        "| | hierprior-lens | lenstronomy | SLACS |",
        "| --- | --- | --- | --- |",
    ]
    for key, label, fmt in TABLE_ROWS:
        slacs = f"{PUBLISHED_THETA_E[name]:.2f}" if key == "theta_E" else "—"
        lines.append(
            f"| {label} | {interval(ours[key], fmt)} | {interval(ref[key], fmt)} | {slacs} |"
        )
    rows = [
        ("χ²/ν, white noise map", "chi2_nu_white", "{:.3f}"),
        ("χ²/ν, correlated noise from the sky", "chi2_nu_correlated", "{:.3f}"),
        ("ν", "nu", "{}"),
        ("arc-mask pixels", "arc_pixels", "{}"),
        ("sd of whitened residuals in the arcs", "arc_z_sd", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(ostats[key])} | {fmt.format(rstats[key])} | |")
    for label, key in (
        ("annulus means, r/σ_map", "annuli_white"),
        ("annulus means, whitened", "annuli_correlated"),
    ):
        lines.append(f"| {label} | {_annuli(ostats[key])} | {_annuli(rstats[key])} | |")
    ks_o, ks_r = ostats["ks_arcs_vs_sky"], rstats["ks_arcs_vs_sky"]
    cell = "—" if ks_o is None else f"D = {ks_o['statistic']:.3f}, p = {ks_o['p']:.2g}"
    lines.append(
        f"| KS, arcs vs held-out sky (whitened) | {cell} | D = {ks_r['statistic']:.3f}, "
        f"p = {ks_r['p']:.2g} | |"
    )
    lines += ["", "| criterion (hierprior-lens) | value | pass |", "| --- | --- | --- |"]
    for key, c in ostats["criteria"].items():
        value = c["value"]
        shown = "—" if value is None else f"{value:+.4g}"
        lines.append(f"| {key} | {shown} | {'yes' if c['pass'] else 'no'} |")
    t = ostats["timings_s"]
    lines += [
        "",
        f"Timings: source prior {t['prior_s']:.0f} s (loaded), "
        f"joint sampling {t['joint_s']:.0f} s, "
        f"lens posterior {t['lens_posterior_s']:.0f} s; acceptance (joint, final phase) "
        + ", ".join(f"{a:.2f}" for a in ostats["acceptance"]["joint"]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parts = [s for s in (lens_section(n) for n in SLACS_LENSES) if s]
    text = "\n".join(parts) + "\n"
    atomic_write_text(RESULTS / "comparison.md", text)
    print(text)


if __name__ == "__main__":
    main()
