r"""The bundled SLACS lenses fitted by lenstronomy (the field's reference code): PSO, then MCMC.

Model (lenstronomy 1.14.2 names): lens mass ``SIE + SHEAR`` (shear origin fixed at 0); source
``SERSIC_ELLIPSE + SHAPELETS`` (the shapelets centred on the Sérsic, ``n_max`` fixed, amplitudes
solved linearly); lens light ``SERSIC_ELLIPSE`` for J1430+4105 (none for J2303+1422, whose lens
light was subtracted). Data: the bundled 121 x 121 cut-out, its noise map (white, per pixel), the
61 x 61 PSF, supersampling 2 x 2 (no supersampled convolution). Masks (``likelihood_mask``):
J1430 none; J2303 the centre (r < 0.5 arcsec: residuals of the lens-light subtraction) and a
neighbouring galaxy at the lower-left edge (r < 0.6 arcsec around (-1.65, -2.65) arcsec).

Coordinates are hierprior's (:class:`~hierprior.physics.lensing.Lensing`): x along columns, y
along rows, pixel (i, j) at ((j + 1/2) p - F/2, (i + 1/2) p - F/2), lenstronomy's
``transform_pix2angle = diag(p, p)``; the lens is near (0, 0).

Fitting (numpy's global RNG seeded by ``--seed``, the only way to seed lenstronomy's PSO and
emcee): PSO with ``--particles`` x ``--iterations`` from a round lens of theta_E = 1.5 arcsec,
then emcee with ``walkerRatio`` walkers per parameter, ``--burn`` + ``--run`` steps from a ball
of 0.1 x the initial sigmas around the PSO optimum. One thread.

Writes into ``--out`` (default ``experiments/slacs/results``), per lens:
``lenstronomy_<lens>.json`` (settings, timings, best fit, posterior table, chi^2/nu under the
noise map, the shapelets' order), ``lenstronomy_<lens>_samples.npz`` (the MCMC samples, thinned,
and their names), ``lenstronomy_<lens>_model.npz`` (float32 model image, lensed source, lens
light, the likelihood mask and the lensed-light mask: model source >= 1 sigma of the noise map,
dilated by 2 px). experiments/slacs/report.py turns them into the README's tables and figures.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python experiments/slacs/fit_lenstronomy.py            # both
    python experiments/slacs/fit_lenstronomy.py --lens slacs2303+1422 --particles 10 \
        --iterations 5 --burn 2 --run 4 --out /tmp/lt                                    # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from hierprior.data import SLACS_LENSES, load_slacs
from hierprior.io import atomic_write_bytes, atomic_write_text
from hierprior.lensfit.statistics import lens_derived, summary

HERE = Path(__file__).resolve().parent
N_MAX = {"slacs1430+4105": 8, "slacs2303+1422": 6}


def circle(n: int, p: float, x0: float, y0: float, r: float) -> np.ndarray:
    c = (np.arange(n) + 0.5) * p - n * p / 2
    return np.hypot(c[None, :] - x0, c[:, None] - y0) < r


def likelihood_mask(name: str, n: int, p: float) -> np.ndarray:
    """1 where pixels enter the likelihood (lenstronomy's convention)."""
    keep = np.ones((n, n), dtype=bool)
    if name == "slacs2303+1422":
        keep &= ~circle(n, p, 0.0, 0.0, 0.5)
        keep &= ~circle(n, p, -1.65, -2.65, 0.6)
    return keep


def params(name: str) -> tuple[dict, dict]:
    """(kwargs_model, kwargs_params) of the model in the module docstring."""
    lens = [
        {"theta_E": 1.5, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},
        {"gamma1": 0.0, "gamma2": 0.0, "ra_0": 0.0, "dec_0": 0.0},
    ]
    lens_sigma = [
        {"theta_E": 0.2, "e1": 0.1, "e2": 0.1, "center_x": 0.05, "center_y": 0.05},
        {"gamma1": 0.05, "gamma2": 0.05},
    ]
    lens_fixed = [{}, {"ra_0": 0.0, "dec_0": 0.0}]
    lens_lower = [
        {"theta_E": 0.8, "e1": -0.5, "e2": -0.5, "center_x": -0.3, "center_y": -0.3},
        {"gamma1": -0.3, "gamma2": -0.3},
    ]
    lens_upper = [
        {"theta_E": 2.5, "e1": 0.5, "e2": 0.5, "center_x": 0.3, "center_y": 0.3},
        {"gamma1": 0.3, "gamma2": 0.3},
    ]
    n_max = N_MAX[name]
    source = [
        {"R_sersic": 0.2, "n_sersic": 1.0, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},
        {"beta": 0.1, "center_x": 0.0, "center_y": 0.0},
    ]
    source_sigma = [
        {"R_sersic": 0.1, "n_sersic": 0.5, "e1": 0.1, "e2": 0.1, "center_x": 0.2, "center_y": 0.2},
        {"beta": 0.05, "center_x": 0.2, "center_y": 0.2},
    ]
    source_fixed = [{}, {"n_max": n_max}]
    source_lower = [
        {"R_sersic": 0.01, "n_sersic": 0.3, "e1": -0.5, "e2": -0.5},
        {"beta": 0.01},
    ]
    source_upper = [
        {"R_sersic": 2.0, "n_sersic": 8.0, "e1": 0.5, "e2": 0.5},
        {"beta": 0.6},
    ]
    for d in source_lower:
        d.update(center_x=-1.5, center_y=-1.5)
    for d in source_upper:
        d.update(center_x=1.5, center_y=1.5)
    model = {
        "lens_model_list": ["SIE", "SHEAR"],
        "source_light_model_list": ["SERSIC_ELLIPSE", "SHAPELETS"],
    }
    kwargs_params = {
        "lens_model": [lens, lens_sigma, lens_fixed, lens_lower, lens_upper],
        "source_model": [source, source_sigma, source_fixed, source_lower, source_upper],
    }
    if slacs_light(name):
        model["lens_light_model_list"] = ["SERSIC_ELLIPSE"]
        light = [
            {
                "R_sersic": 1.5,
                "n_sersic": 4.0,
                "e1": 0.0,
                "e2": 0.0,
                "center_x": 0.0,
                "center_y": 0.0,
            }
        ]
        light_sigma = [
            {
                "R_sersic": 0.5,
                "n_sersic": 1.0,
                "e1": 0.1,
                "e2": 0.1,
                "center_x": 0.05,
                "center_y": 0.05,
            }
        ]
        light_lower = [
            {
                "R_sersic": 0.1,
                "n_sersic": 0.5,
                "e1": -0.5,
                "e2": -0.5,
                "center_x": -0.3,
                "center_y": -0.3,
            }
        ]
        light_upper = [
            {
                "R_sersic": 10.0,
                "n_sersic": 8.0,
                "e1": 0.5,
                "e2": 0.5,
                "center_x": 0.3,
                "center_y": 0.3,
            }
        ]
        kwargs_params["lens_light_model"] = [light, light_sigma, [{}], light_lower, light_upper]
    return model, kwargs_params


def slacs_light(name: str) -> bool:
    return name == "slacs1430+4105"


def derived(samples: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """theta_E, q, phi (deg, from +x counter-clockwise), PA_sky (assuming north = +y and east =
    -x), gamma, phi_gamma, centre, from the sampled lenstronomy parameters
    (:func:`hierprior.lensfit.statistics.lens_derived`)."""
    col = {n: samples[:, i] for i, n in enumerate(names)}
    keys = {"theta_E": "theta_E_lens0", "e1": "e1_lens0", "e2": "e2_lens0"}
    keys.update(gamma1="gamma1_lens1", gamma2="gamma2_lens1")
    keys.update(center_x="center_x_lens0", center_y="center_y_lens0")
    return lens_derived({k: col[v] for k, v in keys.items()})


def fit(name: str, args: argparse.Namespace) -> dict:
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_linear_solve import ImageLinearFit
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Workflow.fitting_sequence import FittingSequence

    np.random.seed(args.seed)
    data = load_slacs(name)
    n, p = data.shape[0], data.pixel_scale
    kwargs_data = {
        "image_data": data.image.numpy(),
        "noise_map": data.noise_map.numpy(),
        "ra_at_xy_0": -(n - 1) / 2 * p,
        "dec_at_xy_0": -(n - 1) / 2 * p,
        "transform_pix2angle": np.eye(2) * p,
    }
    kwargs_psf = {"psf_type": "PIXEL", "kernel_point_source": data.psf.numpy()}
    kwargs_numerics = {"supersampling_factor": args.supersample}
    mask = likelihood_mask(name, n, p)
    model, kwargs_params = params(name)
    constraints = {"joint_source_with_source": [[0, 1, ["center_x", "center_y"]]]}
    likelihood = {"image_likelihood_mask_list": [mask.astype(float)], "check_bounds": True}
    seq = FittingSequence(
        {
            "multi_band_list": [[kwargs_data, kwargs_psf, kwargs_numerics]],
            "multi_band_type": "single-band",
        },
        model,
        constraints,
        likelihood,
        kwargs_params,
    )
    timings = {}
    t0 = time.time()
    seq.fit_sequence(
        [
            [
                "PSO",
                {
                    "sigma_scale": 1.0,
                    "n_particles": args.particles,
                    "n_iterations": args.iterations,
                    "threadCount": 1,
                },
            ]
        ]
    )
    timings["pso_s"] = time.time() - t0
    t0 = time.time()
    chain = seq.fit_sequence(
        [
            [
                "MCMC",
                {
                    "n_burn": args.burn,
                    "n_run": args.run,
                    "walkerRatio": args.walker_ratio,
                    "sigma_scale": 0.1,
                    "threadCount": 1,
                    "progress": False,
                },
            ]
        ]
    )
    timings["mcmc_s"] = time.time() - t0
    _, samples, names, _ = chain[-1]
    best = seq.best_fit()
    # images of the best fit (amplitudes solved linearly by best_fit)
    fitter = ImageLinearFit(
        ImageData(**kwargs_data),
        PSF(**kwargs_psf),
        LensModel(model["lens_model_list"]),
        LightModel(model["source_light_model_list"]),
        LightModel(model.get("lens_light_model_list", [])),
        kwargs_numerics=kwargs_numerics,
        likelihood_mask=mask.astype(float),
    )
    kl, ks, kll = best["kwargs_lens"], best["kwargs_source"], best.get("kwargs_lens_light", [])
    wls_model, *_ = fitter.image_linear_solve(kl, ks, kll)
    source = fitter.source_surface_brightness(ks, kl)
    light = fitter.lens_surface_brightness(kll) if kll else np.zeros_like(source)
    resid = (data.image.numpy() - wls_model) / data.noise_map.numpy()
    n_linear = 1 + (N_MAX[name] + 1) * (N_MAX[name] + 2) // 2 + (1 if kll else 0)
    nu = int(mask.sum()) - len(names) - n_linear
    chi2 = float((resid[mask] ** 2).sum())
    arcs = ndimage.binary_dilation(source >= data.noise_map.numpy(), iterations=2) & mask
    table = {
        k: summary(v, circular=k in ("phi", "PA_sky", "phi_gamma"))
        for k, v in derived(samples, names).items()
    }
    thin = samples[:: max(1, len(samples) // 4000)]
    out = Path(args.out)
    buf = _npz(samples=thin.astype(np.float32), names=np.array(names))
    atomic_write_bytes(out / f"lenstronomy_{name}_samples.npz", buf)
    buf = _npz(
        model=wls_model.astype(np.float32),
        source=source.astype(np.float32),
        lens_light=light.astype(np.float32),
        likelihood_mask=mask,
        arc_mask=arcs,
    )
    atomic_write_bytes(out / f"lenstronomy_{name}_model.npz", buf)
    result = {
        "lens": name,
        "lenstronomy": __import__("lenstronomy").__version__,
        "settings": {
            "supersampling": args.supersample,
            "psf_shape": list(data.psf.shape),
            "shapelets_n_max": N_MAX[name],
            "pso": {"particles": args.particles, "iterations": args.iterations},
            "mcmc": {"walker_ratio": args.walker_ratio, "burn": args.burn, "run": args.run},
            "seed": args.seed,
            "masked_pixels": int((~mask).sum()),
        },
        "timings_s": timings,
        "n_samples": int(len(samples)),
        "param_names": list(names),
        "best_fit": {
            k: best[k] for k in ("kwargs_lens", "kwargs_source", "kwargs_lens_light") if k in best
        },
        "table": table,
        "chi2": chi2,
        "nu": nu,
        "chi2_nu_noise_map": chi2 / nu,
        "arc_mask_pixels": int(arcs.sum()),
    }
    atomic_write_text(
        out / f"lenstronomy_{name}.json", json.dumps(result, indent=2, default=_jsonable) + "\n"
    )
    return result


def _jsonable(value: object) -> object:
    return np.asarray(value).tolist()


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lens", choices=SLACS_LENSES, action="append")
    parser.add_argument("--particles", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--walker-ratio", type=int, default=2)
    parser.add_argument("--burn", type=int, default=100)
    parser.add_argument("--run", type=int, default=150)
    parser.add_argument("--supersample", type=int, default=2)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    for name in args.lens or SLACS_LENSES:
        t0 = time.time()
        r = fit(name, args)
        t = r["timings_s"]
        print(
            f"{name}: theta_E {r['table']['theta_E']['median']:.4f}, chi2/nu "
            f"{r['chi2_nu_noise_map']:.3f} ({time.time() - t0:.0f} s: PSO {t['pso_s']:.0f} s, "
            f"MCMC {t['mcmc_s']:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
