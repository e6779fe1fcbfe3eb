r"""Residual statistics and parameter tables of a lens model fitted to real imaging.

Shared by ``hierprior-lens`` (:mod:`hierprior.lensfit.cli`) and the lenstronomy reference fits
of ``experiments/slacs``, so that both are measured the same way:

- :func:`lens_table`: θ_E, q, φ (major axis, degrees counter-clockwise from +x, the columns),
  PA (= φ − 90°: east of north if north is +y and east is −x), γ, φ_γ and the centre from SIE +
  shear samples (e1, e2, γ1, γ2 in lenstronomy's conventions): :math:`q = (1 - |e|)/(1 + |e|)`,
  :math:`\varphi = \tfrac12 \operatorname{atan2}(e_2, e_1)`, :math:`\gamma = |(\gamma_1,
  \gamma_2)|`; :func:`summary` gives the median and 16–84% interval of each (angles about
  their circular mean, mod 180°);
- :func:`arc_mask`: the lensed-light mask, the model's lensed source ≥ 3σ of the noise map,
  dilated by 2 pixels, within 0.5–2 θ_E of the lens centre (inside, the lens light's cusp
  dominates);
- :func:`annuli`: the azimuthal average of normalised residuals in 0.1″ annuli inside a mask
  (mean and its standard error, annuli with ≥ 10 pixels);
- :func:`held_out_sky_whitened`: the whitened held-out blank sky under the image's correlated
  noise model (the reference distribution of the KS test);
- :func:`residual_statistics`: χ²/ν under the white noise map and under the learned
  (correlated) noise, the annulus means, the KS test of the whitened residuals in the arcs
  against the whitened held-out sky, and the residual images.

References:
    Bolton et al. (2008), The Sloan Lens ACS Survey. V, ApJ 682, 964.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "ANNULUS",
    "TABLE_ROWS",
    "annuli",
    "arc_mask",
    "held_out_sky_whitened",
    "interval",
    "lens_derived",
    "lens_table",
    "residual_statistics",
    "summary",
]

#: the width of the annuli of :func:`annuli` [arcsec]
ANNULUS = 0.1

#: (key, label, format) of the parameter table's rows
TABLE_ROWS = [
    ("theta_E", "θ_E [″]", "{:.4f}"),
    ("q", "q", "{:.3f}"),
    ("phi", "φ [°] (from +x)", "{:.1f}"),
    ("PA_sky", "PA [°] (φ − 90)", "{:.1f}"),
    ("gamma", "γ_ext", "{:.4f}"),
    ("phi_gamma", "φ_γ [°]", "{:.1f}"),
    ("center_x", "x_c [″]", "{:+.4f}"),
    ("center_y", "y_c [″]", "{:+.4f}"),
]

_CIRCULAR = ("phi", "PA_sky", "phi_gamma")


def summary(values: np.ndarray, circular: bool = False) -> dict[str, float]:
    """Median and 16 / 84% percentiles of samples (an axis angle in degrees: about its
    circular mean, mod 180)."""
    values = np.asarray(values, dtype=np.float64)
    if circular:
        mean = np.degrees(0.5 * np.angle(np.exp(2j * np.radians(values)).mean()))
        values = mean + (values - mean + 90.0) % 180.0 - 90.0
    lo, med, hi = np.percentile(values, [16, 50, 84])
    if circular:
        lo, med, hi = (float(v) % 180.0 for v in (lo, med, hi))
    return {"median": float(med), "p16": float(lo), "p84": float(hi)}


def lens_derived(columns: dict) -> dict[str, np.ndarray]:
    """θ_E, q, φ, PA_sky, γ, φ_γ, centre (arrays) from SIE + shear samples: a mapping with
    ``theta_E, e1, e2, gamma1, gamma2, center_x, center_y`` (arrays of the same length)."""
    c = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    e = np.hypot(c["e1"], c["e2"])
    phi = np.degrees(0.5 * np.arctan2(c["e2"], c["e1"]))
    return {
        "theta_E": c["theta_E"],
        "q": (1 - e) / (1 + e),
        "phi": np.mod(phi, 180.0),
        "PA_sky": np.mod(phi - 90.0, 180.0),
        "gamma": np.hypot(c["gamma1"], c["gamma2"]),
        "phi_gamma": np.mod(np.degrees(0.5 * np.arctan2(c["gamma2"], c["gamma1"])), 180.0),
        "center_x": c["center_x"],
        "center_y": c["center_y"],
    }


def lens_table(columns: dict) -> dict[str, dict[str, float]]:
    """:func:`summary` of every row of :data:`TABLE_ROWS` from SIE + shear samples (see
    :func:`lens_derived`)."""
    return {k: summary(v, circular=k in _CIRCULAR) for k, v in lens_derived(columns).items()}


def interval(stat: dict, fmt: str) -> str:
    """``median [p16, p84]`` formatted."""
    m, lo, hi = stat["median"], stat["p16"], stat["p84"]
    return f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def held_out_sky_whitened(data, max_lag: int = 2) -> np.ndarray:
    """z of the held-out sky patches of ``data`` (an :class:`~hierprior.data.ImagingData` with
    ``sky``) under the image's correlated model (one periodic CorrelatedNoise per patch grid,
    same autocovariance and relative scale), flattened."""
    from hierprior.physics import (
        CorrelatedNoise,
        noise_autocovariance,
        spectrum_from_autocovariance,
    )

    sky = data.sky
    level = sky.noise_level(False)
    acf = noise_autocovariance(sky.relative_residuals(held_out=False), max_lag=max_lag)
    r = sky.residuals(held_out=True)
    w = sky.noise_map[sky.held_out] / level
    model = CorrelatedNoise(
        spectrum_from_autocovariance(acf, r.shape[-2:]), w, obs_shape=r.shape[-2:]
    )
    return model.whiten(r).flatten().numpy()


def arc_mask(source: np.ndarray, sigma: np.ndarray, radius: np.ndarray, theta_e: float):
    """The lensed-light mask (bool, the image's shape): the model's lensed source ``source``
    >= 3 ``sigma``, dilated by 2 px, with ``radius`` (from the lens centre) in 0.5-2 θ_E."""
    from scipy import ndimage

    bright = ndimage.binary_dilation(source >= 3 * sigma, iterations=2)
    return bright & (radius >= 0.5 * theta_e) & (radius <= 2 * theta_e)


def annuli(values: np.ndarray, radius: np.ndarray, inside: np.ndarray) -> list[dict]:
    """Mean and standard error of ``values`` in annuli of :data:`ANNULUS` arcsec of
    ``radius`` inside the bool mask ``inside`` (annuli with >= 10 pixels): rows
    ``{"r_in", "pixels", "mean", "sem"}``."""
    rows = []
    if not inside.any():
        return rows
    for k in range(int(radius[inside].max() / ANNULUS) + 1):
        sel = inside & (radius >= k * ANNULUS) & (radius < (k + 1) * ANNULUS)
        if sel.sum() >= 10:
            v = values[sel]
            rows.append(
                {
                    "r_in": round(k * ANNULUS, 2),
                    "pixels": int(sel.sum()),
                    "mean": float(v.mean()),
                    "sem": float(v.std() / np.sqrt(sel.sum())),
                }
            )
    return rows


def residual_statistics(
    data,
    model: np.ndarray,
    source: np.ndarray,
    center: tuple[float, float],
    theta_e: float,
    nu: int,
    noise=None,
    max_lag: int = 2,
) -> dict:
    """The residual statistics of a model image of ``data`` (an
    :class:`~hierprior.data.ImagingData` with blank sky; its ``observed`` mask is the
    likelihood mask).

    Arguments:
        model: the model image (H, W) (lensed source + lens light), data units.
        source: the lensed source alone (H, W) (for the arc mask).
        center: the lens centre (x, y) [arcsec].
        theta_e: θ_E [arcsec] (for the arc mask).
        nu: the degrees of freedom of χ² (observed pixels minus fitted parameters).
        noise: the learned noise model (default: :func:`~hierprior.data.
            correlated_noise_from_sky` of ``data`` with ``max_lag``).

    Returns:
        ``chi2_nu_white``, ``chi2_nu_correlated``, ``nu``, ``arc_pixels``, ``annuli_white``,
        ``annuli_correlated``, ``ks_arcs_vs_sky`` ({statistic, p}), ``arc_z_sd`` and
        ``images`` (white, z (NaN where unobserved), arcs, keep).
    """
    from scipy import stats

    from hierprior.data import correlated_noise_from_sky

    keep = data.observed.numpy().astype(bool)
    image, sigma = data.image.numpy(), data.noise_map.numpy()
    resid = np.where(keep, image - model, 0.0)
    if noise is None:
        noise = correlated_noise_from_sky(data, max_lag=max_lag)
    z = noise.whiten(torch.from_numpy(resid)[None].double()).numpy()[0]
    white = np.where(keep, resid / sigma, 0.0)
    x, y = (g.numpy() for g in data.grid())
    radius = np.hypot(x - center[0], y - center[1])
    arcs = arc_mask(source, sigma, radius, theta_e) & keep
    sky_z = held_out_sky_whitened(data, max_lag=max_lag)
    ks = stats.ks_2samp(z[arcs], sky_z) if arcs.any() else None
    return {
        "chi2_nu_white": float((white[keep] ** 2).sum()) / nu,
        "chi2_nu_correlated": float((z**2).sum()) / nu,
        "nu": int(nu),
        "arc_pixels": int(arcs.sum()),
        "annuli_white": annuli(white, radius, arcs),
        "annuli_correlated": annuli(z, radius, arcs),
        "ks_arcs_vs_sky": None
        if ks is None
        else {"statistic": float(ks.statistic), "p": float(ks.pvalue)},
        "arc_z_sd": float(z[arcs].std()) if arcs.any() else float("nan"),
        "images": {
            "white": white,
            "z": np.where(keep, z, np.nan),
            "arcs": arcs,
            "keep": keep,
        },
    }
