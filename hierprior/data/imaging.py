r"""Real imaging data: an image, its noise map, a PSF, a mask and the pixel scale, from FITS.

:func:`load_imaging` reads (or takes) the arrays, checks them and returns an
:class:`ImagingData`; :func:`load_slacs` returns one of the two strong lenses that ship with the
package (HST ACS imaging of SDSS J1430+4105 and J2303+1422, cut-outs around the lens and
blank-sky patches of the same exposures, see ``hierprior/data/slacs/README.md``).

**Conventions.** Arrays are indexed [row, column]. The image grid follows
:class:`~hierprior.physics.lensing.Lensing`: x along columns, y along rows, both increasing with
the index, pixel (i, j) centred at :math:`x = (j + \tfrac12) p - W p / 2`,
:math:`y = (i + \tfrac12) p - H p / 2` (pixel scale p, arcsec): the origin is the centre of the
array. A cut-out of odd size around pixel ``center`` therefore puts that pixel's centre at
(0, 0). FITS arrays are read as stored (astropy's order: the first row is the first row of the
file, y up in a ``origin='lower'`` display), so no flip happens anywhere.

**Masks.** ``observed`` is True where a pixel carries data. A pixel is unobserved when its
noise value is ``>= mask_above`` (the sentinel of many pipelines, e.g. 1e8 in the PyAutoLens
workspace), when the given ``mask`` marks it (True / non-zero = ignore, the numpy-masked-array
and PyAutoLens convention), or, with ``mask_nan=True``, when the image or the noise map is NaN
or infinite there. Unobserved pixels hold 0 in ``image`` and the median observed noise in
``noise_map`` (finite placeholders; every consumer must use ``observed``).

**PSF.** The kernel must have odd sizes and a positive sum; it is optionally cropped to
``psf_size`` (odd) around its centre pixel, then normalised to unit sum, and its brightest pixel
must be the centre pixel (a kernel centred on a pixel, as
:class:`~hierprior.physics.Blur` assumes).

**Errors.** Each bad input fails early with one line: a missing file (``FileNotFoundError``
naming it), a PSF with an even size or a sum <= 0 or not centred, arrays whose shapes disagree,
NaN / infinite values in unobserved-as-not-declared pixels, a noise value <= 0 in an observed
pixel, a cut-out outside the image, a non-positive pixel scale.

References:
    Bolton et al. (2008), The Sloan Lens ACS Survey. V. The Full ACS Strong-Lens Sample,
    ApJ 682, 964 (the two bundled lenses).
    Nightingale et al. (2018), PyAutoLens, MNRAS 478, 4738 (the workspace the files come from).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hierprior.checks import check_float, check_int

__all__ = [
    "BlankSky",
    "ImagingData",
    "SLACS_LENSES",
    "correlated_noise_from_sky",
    "load_imaging",
    "load_slacs",
    "prepare_psf",
    "sky_noise_realisations",
    "sky_noise_unit",
    "slacs_info",
]

#: the lenses bundled with the package (``load_slacs(name)``)
SLACS_LENSES = ("slacs1430+4105", "slacs2303+1422")


# --------------------------------------------------------------------------- reading
def _read(source: object, what: str, hdu: int | str = 0) -> np.ndarray:
    """A 2-D or 3-D float64 array from a FITS path, a ``(path, hdu)`` pair, or an array."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise TypeError(f"{what}: a tuple must be (path, hdu); got {source!r}")
        source, hdu = source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        from astropy.io import fits  # a main dependency; imported where FITS is read

        with fits.open(path, memmap=False) as hdul:
            try:
                data = hdul[hdu].data
            except (KeyError, IndexError):
                names = [h.name for h in hdul]
                raise ValueError(f"{what}: {path} has no HDU {hdu!r} (it has {names})") from None
            if data is None:
                raise ValueError(f"{what}: HDU {hdu!r} of {path} holds no data")
            array = np.array(data, dtype=np.float64)
    elif isinstance(source, Tensor):
        array = source.detach().cpu().to(torch.float64).numpy()
    elif isinstance(source, np.ndarray):
        if source.dtype.kind not in "fiub":
            raise TypeError(f"{what} must hold numbers; got dtype {source.dtype}")
        array = source.astype(np.float64)
    else:
        raise TypeError(
            f"{what} must be a FITS path, a (path, hdu) pair, an array or a tensor; "
            f"got {type(source).__name__}"
        )
    return array


def _window(shape: tuple[int, int], center: object, size: int) -> tuple[int, int]:
    """(row, column) of the first pixel of a size x size window around ``center``, checked."""
    h, w = shape
    size = check_int(size, "size", 1)
    try:
        r, c = (int(v) for v in center)
    except (TypeError, ValueError):
        raise TypeError(f"center must be (row, column) integers; got {center!r}") from None
    r0, c0 = r - size // 2, c - size // 2
    if r0 < 0 or c0 < 0 or r0 + size > h or c0 + size > w:
        raise ValueError(
            f"a cut-out of size {size} around (row {r}, column {c}) leaves the {h} x {w} "
            f"image (rows {r0}..{r0 + size - 1}, columns {c0}..{c0 + size - 1})"
        )
    return r0, c0


def _first_bad(bad: np.ndarray) -> str:
    r, c = np.argwhere(bad)[0][-2:]
    return f"row {int(r)}, column {int(c)}"


def prepare_psf(psf: np.ndarray, psf_size: int | None = None) -> np.ndarray:
    """Checks a PSF kernel, crops it to ``psf_size`` around its centre and normalises it.

    Arguments:
        psf: the kernel, shape (h, w) with odd h and w.
        psf_size: the odd side of the cropped kernel (<= min(h, w)), or None (no crop).

    Returns:
        The kernel (float64), odd-sized, with unit sum, its brightest pixel at the centre.
    """
    if psf.ndim != 2:
        raise ValueError(f"the PSF must be a 2-D kernel; got shape {psf.shape}")
    h, w = psf.shape
    if h % 2 == 0 or w % 2 == 0:
        raise ValueError(
            f"the PSF must have odd sizes (a kernel centred on a pixel); got shape ({h}, {w})"
        )
    if not np.isfinite(psf).all():
        raise ValueError("the PSF has NaN or infinite values")
    if psf_size is not None:
        psf_size = check_int(psf_size, "psf_size", 1)
        if psf_size % 2 == 0 or psf_size > min(h, w):
            raise ValueError(
                f"psf_size must be odd and at most the PSF's size {min(h, w)}; got {psf_size}"
            )
        r0, c0, k = h // 2, w // 2, psf_size // 2
        psf = psf[r0 - k : r0 + k + 1, c0 - k : c0 + k + 1]
        h, w = psf.shape
    total = float(psf.sum())
    if not total > 1e-8 * float(np.abs(psf).sum()):  # zero up to rounding is zero
        raise ValueError(f"the PSF sums to {total:g}: it needs a positive sum to be normalised")
    peak = np.unravel_index(int(np.argmax(psf)), psf.shape)
    if peak != (h // 2, w // 2):
        raise ValueError(
            f"the PSF is not centred: its brightest pixel is at {tuple(int(v) for v in peak)}, "
            f"not at its centre ({h // 2}, {w // 2}); recentre the kernel"
        )
    return psf / total


# --------------------------------------------------------------------------- containers
@dataclass(frozen=True)
class BlankSky:
    r"""Blank-sky patches of an exposure: realisations of its noise away from every source.

    Attributes:
        image: the patches, float64 tensor with shape (K, p, p) (raw image values, background
            included).
        noise_map: the noise map on the patches, (K, p, p).
        origin: (K, 2) int64, the (row, column) of each patch's pixel (0, 0) in the original
            frame.
        held_out: (K,) bool, the patches kept out of every fit (the evaluation set).
    """

    image: Tensor
    noise_map: Tensor
    origin: Tensor
    held_out: Tensor

    def __post_init__(self):
        if self.image.dim() != 3 or self.image.shape[-1] != self.image.shape[-2]:
            raise ValueError(f"sky patches must have shape (K, p, p); got {self.image.shape}")
        if self.noise_map.shape != self.image.shape:
            raise ValueError(
                f"sky image {tuple(self.image.shape)} and noise map "
                f"{tuple(self.noise_map.shape)} have different shapes"
            )
        k = self.image.shape[0]
        if self.origin.shape != (k, 2) or self.held_out.shape != (k,):
            raise ValueError("sky origin must be (K, 2) and held_out (K,)")

    def __len__(self) -> int:
        return self.image.shape[0]

    def residuals(self, detrend: str = "plane", held_out: bool | None = False) -> Tensor:
        r"""Noise realisations: each patch minus its least-squares background.

        Arguments:
            detrend: ``"plane"`` (a + b x + c y per patch: removes the smooth light of the lens
                galaxy's outskirts), ``"mean"``, or ``"none"``.
            held_out: False (the fitting patches), True (the held-out ones) or None (all).

        Returns:
            A float64 tensor with shape (K', p, p). A plane fit removes 3 of the p² degrees of
            freedom of each patch (a variance bias of 3/p², 0.5% for p = 24).
        """
        if detrend not in ("plane", "mean", "none"):
            raise ValueError(f"unknown detrend {detrend!r}; expected 'plane', 'mean' or 'none'")
        x = self.image if held_out is None else self.image[self.held_out == held_out]
        if detrend == "none":
            return x.clone()
        p = x.shape[-1]
        if detrend == "mean":
            return x - x.mean(dim=(-2, -1), keepdim=True)
        c = torch.arange(p, dtype=x.dtype) - (p - 1) / 2
        design = torch.stack(
            (torch.ones(p, p, dtype=x.dtype), c[None, :].expand(p, p), c[:, None].expand(p, p))
        ).reshape(3, -1)
        coef = torch.linalg.lstsq(design.T, x.reshape(x.shape[0], -1).T).solution
        return x - (design.T @ coef).T.reshape(x.shape)

    def noise_level(self, held_out: bool | None = False) -> float:
        """The median of the noise map over the patches (the map's blank-sky level)."""
        nm = self.noise_map if held_out is None else self.noise_map[self.held_out == held_out]
        return float(nm.median())

    def relative_residuals(self, detrend: str = "plane", held_out: bool | None = False) -> Tensor:
        r"""The residuals divided by the relative noise map :math:`w = \sigma_{map} / \ell`
        (:math:`\ell` = :meth:`noise_level` of the fitting patches): realisations of the
        stationary part u of the noise model :math:`n = w \odot u` (see
        :class:`~hierprior.physics.CorrelatedNoise`), in data units at the sky level.
        Shape (K', p, p)."""
        nm = self.noise_map if held_out is None else self.noise_map[self.held_out == held_out]
        return self.residuals(detrend, held_out) * (self.noise_level(False) / nm)


@dataclass(frozen=True)
class ImagingData:
    r"""One image with its noise map, PSF, mask and pixel scale (see the module docstring).

    Attributes:
        image: (H, W) float64 tensor; 0 where unobserved.
        noise_map: (H, W) float64 tensor, the 1-sigma noise per pixel; > 0 and finite
            everywhere (unobserved pixels hold the median observed value).
        psf: (h, w) float64 tensor, odd sizes, unit sum, centred.
        observed: (H, W) bool tensor, True where a pixel carries data.
        pixel_scale: the pixel side [arcsec].
        origin: (row, column) of pixel (0, 0) in the frame it was cut from.
        sky: the exposure's blank-sky patches (:class:`BlankSky`) or None.
        meta: provenance and other facts (a dict of JSON values).
    """

    image: Tensor
    noise_map: Tensor
    psf: Tensor
    observed: Tensor
    pixel_scale: float
    origin: tuple[int, int] = (0, 0)
    sky: BlankSky | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.image.shape)

    @property
    def fov(self) -> tuple[float, float]:
        """The field (H p, W p) [arcsec]."""
        h, w = self.shape
        return h * self.pixel_scale, w * self.pixel_scale

    def grid(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """Pixel-centre coordinates (x, y) [arcsec], each (H, W), centred on the array."""
        h, w = self.shape
        p = self.pixel_scale
        xs = (torch.arange(w, dtype=dtype) + 0.5) * p - w * p / 2
        ys = (torch.arange(h, dtype=dtype) + 0.5) * p - h * p / 2
        return xs[None, :].expand(h, w), ys[:, None].expand(h, w)

    def cutout(self, center: tuple[int, int] | None = None, size: int | None = None):
        """The sub-image of side ``size`` around pixel ``center`` = (row, column).

        With an odd size the centre pixel is the middle pixel (its centre is the new origin);
        with an even size it is pixel (size/2, size/2). Default centre: the middle pixel.
        The PSF, pixel scale, sky patches and meta carry over; ``origin`` is updated.
        """
        h, w = self.shape
        if size is None:
            return self
        r0, c0 = _window(self.shape, (h // 2, w // 2) if center is None else center, size)
        win = (slice(r0, r0 + size), slice(c0, c0 + size))
        observed = self.observed[win]
        if not observed.any():
            raise ValueError("every pixel of the cut-out is masked")
        return replace(
            self,
            image=self.image[win].clone(),
            noise_map=self.noise_map[win].clone(),
            observed=observed.clone(),
            origin=(self.origin[0] + r0, self.origin[1] + c0),
        )

    def with_psf_size(self, psf_size: int):
        """The same data with the PSF cropped to an odd ``psf_size`` and renormalised."""
        psf = prepare_psf(self.psf.numpy(), psf_size)
        return replace(self, psf=torch.from_numpy(psf))

    def with_mask(self, mask: object):
        """The same data with the pixels of ``mask`` (True / non-zero = ignore) unobserved.

        ``mask`` is an (H, W) array / tensor, or a FITS path.
        """
        m = _read(mask, "mask") != 0
        if m.shape != self.shape:
            raise ValueError(f"mask {m.shape} and image {self.shape} have different shapes")
        observed = self.observed & ~torch.from_numpy(m)
        if not observed.any():
            raise ValueError("every pixel is masked")
        return replace(
            self,
            image=torch.where(observed, self.image, torch.zeros_like(self.image)),
            observed=observed,
        )


# --------------------------------------------------------------------------- loading
def load_imaging(
    image: object,
    noise_map: object,
    psf: object,
    pixel_scale: float,
    *,
    mask: object | None = None,
    mask_above: float = 1e6,
    mask_nan: bool = False,
    center: tuple[int, int] | None = None,
    size: int | None = None,
    psf_size: int | None = None,
    hdu: int | str = 0,
) -> ImagingData:
    r"""An :class:`ImagingData` from FITS files or arrays, checked (see the module docstring).

    Arguments:
        image, noise_map, psf: each a FITS path (HDU ``hdu``), a ``(path, hdu)`` pair, a 2-D
            numpy array or a tensor. The noise map is the 1-sigma noise per pixel.
        pixel_scale: the pixel side [arcsec], > 0.
        mask: optional, same shape as the image (or a FITS path): True / non-zero marks pixels
            to ignore.
        mask_above: noise-map values >= this are masked (the pipeline's sentinel); ``inf``
            turns the rule off.
        mask_nan: also mask pixels whose image or noise value is NaN / infinite (otherwise
            they are an error unless masked otherwise).
        center, size: cut out a ``size`` x ``size`` window around pixel ``center`` = (row,
            column) (:meth:`ImagingData.cutout`); ``size=None`` keeps the whole image.
        psf_size: crop the PSF to this odd side around its centre before normalising it.
        hdu: the HDU read from a path given alone.
    """
    pixel_scale = check_float(pixel_scale, "pixel_scale", 0.0, strict=True)
    if not isinstance(mask_nan, bool):
        raise TypeError(f"mask_nan must be a bool; got {mask_nan!r}")
    if isinstance(mask_above, bool) or not isinstance(mask_above, (int, float)):
        raise TypeError(f"mask_above must be a number; got {mask_above!r}")
    if not float(mask_above) > 0:
        raise ValueError(f"mask_above must be > 0; got {mask_above!r}")
    img = _read(image if not isinstance(image, (str, os.PathLike)) else (image, hdu), "image")
    nm = _read(
        noise_map if not isinstance(noise_map, (str, os.PathLike)) else (noise_map, hdu),
        "noise map",
    )
    kernel = _read(psf if not isinstance(psf, (str, os.PathLike)) else (psf, hdu), "PSF")
    for name, a in (("image", img), ("noise map", nm)):
        if a.ndim != 2:
            raise ValueError(f"the {name} must be 2-D; got shape {a.shape}")
    if nm.shape != img.shape:
        raise ValueError(f"image {img.shape} and noise map {nm.shape} have different shapes")
    ignore = np.zeros(img.shape, dtype=bool)
    if mask is not None:
        m = _read(mask if not isinstance(mask, (str, os.PathLike)) else (mask, hdu), "mask")
        if m.shape != img.shape:
            raise ValueError(f"mask {m.shape} and image {img.shape} have different shapes")
        ignore |= np.nan_to_num(m, nan=1.0) != 0
    kernel = prepare_psf(kernel, psf_size)
    finite = np.isfinite(img) & np.isfinite(nm)
    with np.errstate(invalid="ignore"):
        ignore |= np.isfinite(nm) & (nm >= float(mask_above))
    if mask_nan:
        ignore |= ~finite
    origin = (0, 0)
    if size is not None:
        # only the window is checked: a NaN far outside the cut-out does not concern it
        h, w = img.shape
        origin = _window(img.shape, (h // 2, w // 2) if center is None else center, size)
        win = (slice(origin[0], origin[0] + size), slice(origin[1], origin[1] + size))
        img, nm, ignore, finite = img[win], nm[win], ignore[win], finite[win]
    elif center is not None:
        raise ValueError("center needs a size (the side of the cut-out)")
    bad = ~finite & ~ignore
    if bad.any():
        which = "image" if (~np.isfinite(img) & ~ignore).any() else "noise map"
        raise ValueError(
            f"the {which} has {int(bad.sum())} NaN or infinite values in unmasked pixels "
            f"(first at {_first_bad(bad)}); mask them (mask=..., or mask_nan=True)"
        )
    observed = ~ignore
    if not observed.any():
        raise ValueError("every pixel is masked")
    nonpos = observed & (nm <= 0)
    if nonpos.any():
        raise ValueError(
            f"the noise map has {int(nonpos.sum())} values <= 0 in unmasked pixels (minimum "
            f"{float(nm[nonpos].min()):g} at {_first_bad(nonpos)}); the noise must be > 0"
        )
    fill = float(np.median(nm[observed]))
    return ImagingData(
        image=torch.from_numpy(np.where(observed, img, 0.0)),
        noise_map=torch.from_numpy(np.where(observed, nm, fill)),
        psf=torch.from_numpy(kernel),
        observed=torch.from_numpy(observed),
        pixel_scale=pixel_scale,
        origin=origin,
    )


# --------------------------------------------------------------------------- bundled lenses
def _bundled_path(name: str) -> Path:
    if name not in SLACS_LENSES:
        raise ValueError(f"unknown bundled lens {name!r}; expected one of {list(SLACS_LENSES)}")
    path = Path(str(resources.files("hierprior.data") / "slacs" / f"{name}.fits"))
    if not path.is_file():
        raise FileNotFoundError(f"bundled lens file not found: {path} (a broken install?)")
    return path


def slacs_info(name: str | None = None) -> dict:
    """The provenance and facts of the bundled lenses (``manifest.json``), or of one lens."""
    path = Path(str(resources.files("hierprior.data") / "slacs" / "manifest.json"))
    if not path.is_file():
        raise FileNotFoundError(f"bundled manifest not found: {path} (a broken install?)")
    info = json.loads(path.read_text())
    if name is None:
        return info
    if name not in SLACS_LENSES:
        raise ValueError(f"unknown bundled lens {name!r}; expected one of {list(SLACS_LENSES)}")
    return info["lenses"][name]


def load_slacs(
    name: str,
    *,
    size: int | None = None,
    psf_size: int | None = None,
    mask: object | None = None,
) -> ImagingData:
    r"""A bundled SLACS lens: the cut-out around the lens, its PSF and its blank-sky patches.

    Arguments:
        name: ``"slacs1430+4105"`` (lens light in the image) or ``"slacs2303+1422"`` (lens light
            subtracted).
        size: a smaller odd cut-out around the lens (default: the bundled 121 x 121 pixels,
            6.05 arcsec at 0.05 arcsec).
        psf_size: crop the 61 x 61 PSF to this odd side (renormalised).
        mask: pixels to ignore, (H, W) of the final cut-out (True / non-zero = ignore).

    Returns:
        An :class:`ImagingData` with ``sky`` (:class:`BlankSky`, 24 x 24 patches at least
        5 arcsec from the lens, a third of them held out) and ``meta`` (provenance, from the
        FITS header and ``manifest.json``). The lens centre is the middle pixel.
    """
    path = _bundled_path(name)
    info = slacs_info(name)
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        sky = BlankSky(
            image=torch.from_numpy(np.array(hdul["SKY_IMAGE"].data, dtype=np.float64)),
            noise_map=torch.from_numpy(np.array(hdul["SKY_NOISE_MAP"].data, dtype=np.float64)),
            origin=torch.from_numpy(np.array(hdul["SKY_ORIGIN"].data, dtype=np.int64)),
            held_out=torch.from_numpy(np.array(hdul["SKY_HELD_OUT"].data, dtype=np.int64) != 0),
        )
        origin = (int(hdul[0].header["CUT_ROW0"]), int(hdul[0].header["CUT_COL0"]))
        data = load_imaging(
            (path, "IMAGE"),
            (path, "NOISE_MAP"),
            (path, "PSF"),
            float(hdul[0].header["PIXSCALE"]),
            psf_size=psf_size,
        )
    n = data.shape[0]
    data = replace(data, origin=origin, sky=sky, meta=dict(info))
    if size is not None:
        size = check_int(size, "size", 1)
        if size % 2 == 0 or size > n:
            raise ValueError(f"size must be odd and at most {n}; got {size}")
        data = data.cutout((n // 2, n // 2), size)
    if mask is not None:
        data = data.with_mask(mask)
    return data


def sky_noise_realisations(
    name: str = "slacs1430+4105",
    n: int = 20_000,
    resolution: int = 16,
    *,
    detrend: str = "plane",
    seed: int = 0,
    value_range: tuple[float, float] | list[float] | None = None,
) -> Tensor:
    r"""Noise realisations of a bundled lens's exposure, for a SLIC noise model (a data
    ``_target_`` of ``hierprior-train-prior``: ``conf/data/slacs_sky_noise.yaml``).

    Random ``resolution`` x ``resolution`` crops of its blank-sky fitting patches (the held-out
    ones are never used), each patch minus its background (``detrend``) and divided by the relative
    noise map (:meth:`BlankSky.relative_residuals`), rotated by 180 degrees at random (a
    symmetry of stationary noise), in units of their standard deviation :math:`\sigma_{sky}`
    (:func:`sky_noise_unit`).

    Arguments:
        name: a bundled lens (:data:`SLACS_LENSES`).
        n: the number of crops.
        resolution: their side, <= the patch side (24).
        detrend: ``"plane"``, ``"mean"`` or ``"none"``.
        seed: the seed of the crops (a private generator).
        value_range: the display range of training sample grids (unused here).

    Returns:
        float32 (n, 1, size, size).
    """
    n = check_int(n, "n", 1)
    size = check_int(resolution, "resolution", 1)
    sky = load_slacs(name).sky
    patches = sky.relative_residuals(detrend, held_out=False)
    side = patches.shape[-1]
    if size > side:
        raise ValueError(f"resolution must be at most the patch side {side}; got {size}")
    patches = patches / patches.std()
    g = torch.Generator().manual_seed(int(seed))
    k = torch.randint(len(patches), (n,), generator=g)
    r0 = torch.randint(side - size + 1, (n,), generator=g)
    c0 = torch.randint(side - size + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    rows = r0[:, None] + torch.arange(size)[None, :]
    cols = c0[:, None] + torch.arange(size)[None, :]
    crops = patches[k[:, None, None], rows[:, :, None], cols[:, None, :]]
    crops = torch.where(flip[:, None, None], crops.flip(-2, -1), crops)
    return crops.unsqueeze(1).float()


def sky_noise_unit(name: str, detrend: str = "plane") -> float:
    """sigma_sky: the standard deviation of a bundled lens's relative blank-sky residuals
    (:meth:`BlankSky.relative_residuals` of the fitting patches), the unit of
    :func:`sky_noise_realisations` (the ``scale`` of a :class:`~hierprior.physics.LearnedNoise`
    trained on them, at the noise map's sky level)."""
    return float(load_slacs(name).sky.relative_residuals(detrend, held_out=False).std())


def correlated_noise_from_sky(data: ImagingData, max_lag: int = 2, detrend: str = "plane"):
    r"""The :class:`~hierprior.physics.CorrelatedNoise` of an image, learned from its blank sky.

    :math:`n = w \odot u` with :math:`w = \sigma_{map} / \ell` (the image's noise map over its
    blank-sky level :math:`\ell`, :meth:`BlankSky.noise_level`) and u stationary with the
    autocovariance of the relative sky residuals (:meth:`BlankSky.relative_residuals`, fitting
    patches only) at lags up to ``max_lag``: the blank sky sets the level and the correlation,
    the noise map only how the level changes across the image (the Poisson noise of the lens
    and the arcs). Unobserved pixels of ``data`` are marginalised.

    Returns:
        A shared ``CorrelatedNoise`` on ``data.shape`` with ``obs_shape`` (1, H, W).
    """
    from hierprior.physics import CorrelatedNoise  # data -> physics, never the reverse

    if data.sky is None:
        raise ValueError("the data have no blank-sky patches (data.sky is None)")
    u = data.sky.relative_residuals(detrend, held_out=False)
    scale = data.noise_map / data.sky.noise_level(False)
    return CorrelatedNoise.from_patches(
        u, data.shape, max_lag=max_lag, scale=scale, observed=data.observed
    )
