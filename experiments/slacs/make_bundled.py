r"""Builds the two SLACS lenses that ship with hierprior (``hierprior/data/slacs/``).

From the PyAutoLens workspace files (``image.fits``, ``noise_map.fits``, ``psf.fits``, 281 x 281
pixels of 0.05 arcsec, float64) of SDSS J1430+4105 and J2303+1422 it writes, per lens, one
float32 FITS file with the extensions

- ``IMAGE``, ``NOISE_MAP``: the 121 x 121 cut-out (6.05 arcsec) centred on pixel (140, 140),
  the lens (the Einstein rings have radii of ~1.5-1.6 arcsec and the outer arcs of J1430 reach
  ~2.3 arcsec, so 3 arcsec on each side leaves a margin of blank sky and lens light);
- ``PSF``: the 61 x 61 kernel normalised to unit sum;
- ``SKY_IMAGE``, ``SKY_NOISE_MAP`` (K, 24, 24), ``SKY_ORIGIN`` (K, 2), ``SKY_HELD_OUT`` (K,):
  blank-sky patches of the same exposure, for the noise models: 24 x 24 tiles of the frame
  (rows and columns 4 + 24 k) whose centres lie >= 100 px (5 arcsec) from the lens, with no
  masked pixel, no detected source (the image smoothed by a Gaussian of 2 px, minus a
  31-px median background, above 4 robust standard deviations of that map, dilated by 3 px),
  and, after
  a least-squares plane is removed, a standard deviation below 1.15 x the median over the
  candidate tiles and no pixel beyond 5 standard deviations. Every third kept tile in raster
  order is held out (the evaluation set of experiments/slacs/noise_models.py).

and ``manifest.json`` (provenance, sha256 of the inputs and outputs, the selection rules).

Usage::

    python experiments/slacs/make_bundled.py --data ../shared/data/slacs
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from hierprior.io import atomic_write_bytes, atomic_write_text

OUT = Path(__file__).resolve().parents[2] / "hierprior" / "data" / "slacs"
LENSES = {
    "slacs1430+4105": {
        "short": "J1430+4105",
        "z_lens": 0.285,
        "z_source": 0.575,
        "lens_light": True,
        "note": "lens light in the image; a star in a corner of the full frame (rows 252-265, "
        "columns 34-41) is masked by the noise map (1e8), outside the cut-out",
    },
    "slacs2303+1422": {
        "short": "J2303+1422",
        "z_lens": 0.155,
        "z_source": 0.517,
        "lens_light": False,
        "note": "lens light subtracted; the noise map keeps the lens light's Poisson noise; "
        "the subtraction leaves residuals within ~0.3 arcsec of the centre",
    },
}
CENTER, SIZE, PATCH, START, MIN_DIST = (140, 140), 121, 24, 4, 100
PIXEL_SCALE = 0.05
SENTINEL = 1e6


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sky_patches(image: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, ...]:
    """(origins (K, 2), held_out (K,)) of the blank-sky tiles (rules in the module docstring)."""
    masked = ~np.isfinite(noise) | (noise >= SENTINEL)
    img = np.where(masked, 0.0, image)
    smooth = ndimage.gaussian_filter(img, 2.0) - ndimage.median_filter(img, 31)
    values = smooth[~masked]
    level = 1.4826 * np.median(np.abs(values - np.median(values)))  # robust sd of the smooth map
    sources = ndimage.binary_dilation(smooth > 4 * level, iterations=3)
    candidates = []
    n = image.shape[0]
    c = np.arange(PATCH) - (PATCH - 1) / 2
    design = np.stack([np.ones(PATCH * PATCH), np.tile(c, PATCH), np.repeat(c, PATCH)], 1)
    for r0 in range(START, n - PATCH + 1, PATCH):
        for c0 in range(START, n - PATCH + 1, PATCH):
            win = (slice(r0, r0 + PATCH), slice(c0, c0 + PATCH))
            dist = np.hypot(r0 + PATCH / 2 - CENTER[0], c0 + PATCH / 2 - CENTER[1])
            if dist < MIN_DIST or masked[win].any() or sources[win].any():
                continue
            patch = image[win].ravel()
            resid = patch - design @ np.linalg.lstsq(design, patch, rcond=None)[0]
            candidates.append((r0, c0, resid.std(), np.abs(resid).max() / resid.std()))
    med = np.median([s for *_, s, _ in candidates])
    kept = [(r0, c0) for r0, c0, s, m in candidates if s < 1.15 * med and m < 5]
    origins = np.array(kept, dtype=np.int32).reshape(-1, 2)
    held_out = (np.arange(len(kept)) % 3 == 2).astype(np.int16)
    return origins, held_out, len(candidates)


def build(data: Path, name: str) -> dict:
    folder = data / name
    files = {k: folder / f"{k}.fits" for k in ("image", "noise_map", "psf")}
    image, noise, psf = (np.asarray(fits.getdata(f), dtype=np.float64) for f in files.values())
    r0, c0 = CENTER[0] - SIZE // 2, CENTER[1] - SIZE // 2
    win = (slice(r0, r0 + SIZE), slice(c0, c0 + SIZE))
    origins, held_out, n_candidates = sky_patches(image, noise)
    sky = np.stack([image[r : r + PATCH, c : c + PATCH] for r, c in origins])
    sky_noise = np.stack([noise[r : r + PATCH, c : c + PATCH] for r, c in origins])
    info = LENSES[name]
    header = fits.Header()
    header["OBJECT"] = info["short"]
    header["PIXSCALE"] = (PIXEL_SCALE, "arcsec per pixel")
    header["CUT_ROW0"] = (r0, "row of cut-out pixel 0 in the 281x281 frame")
    header["CUT_COL0"] = (c0, "column of cut-out pixel 0 in the 281x281 frame")
    header["Z_LENS"] = info["z_lens"]
    header["Z_SRC"] = info["z_source"]
    header["LENSLGHT"] = (info["lens_light"], "lens light present in the image")
    header["ORIGIN"] = "PyAutoLens autolens_workspace dataset/slacs (MIT)"
    header["COMMENT"] = "Images from the public HST archive (ACS), via the PyAutoLens workspace."
    header["COMMENT"] = "Built by experiments/slacs/make_bundled.py of hierprior."
    header["COMMENT"] = "Sky patches: 24x24 tiles >= 5 arcsec from the lens, no sources."
    hdus = [
        fits.PrimaryHDU(header=header),
        fits.ImageHDU(image[win].astype(np.float32), name="IMAGE"),
        fits.ImageHDU(noise[win].astype(np.float32), name="NOISE_MAP"),
        fits.ImageHDU((psf / psf.sum()).astype(np.float32), name="PSF"),
        fits.ImageHDU(sky.astype(np.float32), name="SKY_IMAGE"),
        fits.ImageHDU(sky_noise.astype(np.float32), name="SKY_NOISE_MAP"),
        fits.ImageHDU(origins, name="SKY_ORIGIN"),
        fits.ImageHDU(held_out, name="SKY_HELD_OUT"),
    ]
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    out = atomic_write_bytes(OUT / f"{name}.fits", buf.getvalue())
    out.chmod(0o644)
    return {
        **info,
        "file": out.name,
        "sha256": sha256(out),
        "bytes": out.stat().st_size,
        "cutout": {"size": SIZE, "center_in_frame": list(CENTER), "origin": [r0, c0]},
        "psf_shape": list(psf.shape),
        "sky": {
            "patch": PATCH,
            "candidates": n_candidates,
            "kept": int(len(origins)),
            "held_out": int(held_out.sum()),
        },
        "inputs": {k: {"file": f"{name}/{f.name}", "sha256": sha256(f)} for k, f in files.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/slacs"))
    args = parser.parse_args()
    lenses = {name: build(args.data, name) for name in LENSES}
    manifest = {
        "source": "PyAutoLens autolens_workspace, dataset/slacs (github.com/Jammy2211/"
        "autolens_workspace, MIT licence); images from the public HST archive (ACS)",
        "reference": "Bolton et al. (2008), ApJ 682, 964 (SLACS V)",
        "pixel_scale_arcsec": PIXEL_SCALE,
        "units": "as in the workspace files (not stated in their headers; e-/s is likely)",
        "orientation": "arrays as stored in the FITS files; no WCS in the inputs",
        "dtype": "float32",
        "built_by": "experiments/slacs/make_bundled.py",
        "lenses": lenses,
    }
    atomic_write_text(OUT / "manifest.json", json.dumps(manifest, indent=2) + "\n").chmod(0o644)
    for name, info in lenses.items():
        print(name, info["bytes"], "bytes;", info["sky"])


if __name__ == "__main__":
    main()
