r"""Generator of per-observation strong lenses: ``RandomLens(...)(n, source_shape, generator)``.

Each observation i sees its source through its own lens, an :class:`~hierprior.physics.SIE`
plus external :class:`~hierprior.physics.Shear` (lenstronomy's parameters), with a Gaussian
PSF, as a :class:`~hierprior.physics.Lensing` forward model. The lens parameters are drawn
independently per observation:

=====================  ==========================================  ==========================
parameter              distribution (defaults)                     meaning
=====================  ==========================================  ==========================
``theta_E``            Uniform(0.9, 1.3) arcsec                    Einstein radius
axis ratio q           Uniform(0.6, 1.0)                           SIE minor / major axis
position angle         Uniform(0, pi)                              SIE major axis from +x
``center_x, _y``       Uniform(-0.15, 0.15) arcsec each            lens centre (source at 0)
shear magnitude        Uniform(0, 0.05)                            :math:`|\gamma|`
shear angle            Uniform(0, pi)                              :math:`\varphi_\gamma`
PSF FWHM               0.1 arcsec (or Uniform(a, b) per obs.)      Gaussian PSF
=====================  ==========================================  ==========================

with :math:`(e_1, e_2) = \frac{1 - q}{1 + q}(\cos 2\varphi, \sin 2\varphi)` and
:math:`(\gamma_1, \gamma_2) = |\gamma| (\cos 2\varphi_\gamma, \sin 2\varphi_\gamma)`. The lens
centre is offset from the source (which sits at the origin), so the images are arcs and
counter-images rather than full rings. With ``lensed=False`` the same images are made without
a lens (the source resampled onto the image grid, then the PSF): the unlensed variant of an
experiment. The lenses are known to the E-step in this setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hierprior.physics.lensing import SIE, Lensing, Shear, ellipticity

__all__ = ["RandomLens"]


def _bounds(value: object, name: str, low: float = -math.inf) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"RandomLens {name} must be a pair (low, high); got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and low <= a <= b):
        raise ValueError(f"RandomLens {name} must be finite, {low} <= low <= high; got {value}")
    return a, b


class RandomLens:
    """Random SIE + shear lenses with a Gaussian PSF, one per observation of a source (1, R, R).

    Arguments:
        image_size: the image side [pixels].
        pixel_scale: the image pixel size [arcsec].
        source_fov: the side of the source field [arcsec] (the source image spans it).
        supersample: rays per image pixel side.
        theta_E, axis_ratio, center, shear: (low, high) bounds of the uniform distributions in
            the module docstring (a number fixes the value).
        psf_fwhm: the PSF FWHM [arcsec], a number (shared) or (low, high) (one per observation);
            None for no PSF.
        lensed: False for the unlensed variant (PSF only).
        dtype: the dtype of the lens parameters (default float32).
    """

    def __init__(
        self,
        image_size: int = 48,
        pixel_scale: float = 0.08,
        source_fov: float = 2.0,
        supersample: int = 2,
        theta_E: Sequence[float] | float = (0.9, 1.3),
        axis_ratio: Sequence[float] | float = (0.6, 1.0),
        center: Sequence[float] | float = (-0.15, 0.15),
        shear: Sequence[float] | float = (0.0, 0.05),
        psf_fwhm: Sequence[float] | float | None = 0.1,
        lensed: bool = True,
        dtype: str | torch.dtype = "float32",
    ):
        self.image_size, self.supersample = image_size, supersample
        self.pixel_scale, self.source_fov = pixel_scale, source_fov
        self.theta_E = _bounds(theta_E, "theta_E", low=1e-6)
        self.axis_ratio = _bounds(axis_ratio, "axis_ratio", low=1e-3)
        if self.axis_ratio[1] > 1:
            raise ValueError(f"RandomLens axis_ratio must lie in (0, 1]; got {axis_ratio}")
        self.center = _bounds(center, "center")
        self.shear = _bounds(shear, "shear", low=0.0)
        self.psf_fwhm = None if psf_fwhm is None else _bounds(psf_fwhm, "psf_fwhm", low=1e-6)
        self.lensed = bool(lensed)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        # build a lens once so that bad geometry fails when the generator is built
        self(1, (1, 8, 8), torch.Generator().manual_seed(0))

    def __call__(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Lensing:
        if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]:
            raise ValueError(f"RandomLens needs square sources (1, R, R), got shape {shape}")
        u = torch.rand((n, 8), generator=generator, dtype=torch.float64)

        def uniform(col: int, bounds: tuple[float, float]) -> Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * u[:, col]

        e1, e2 = ellipticity(uniform(1, self.axis_ratio), math.pi * u[:, 2])
        g1, g2 = ellipticity(torch.zeros(n, dtype=torch.float64), math.pi * u[:, 6])
        g = uniform(5, self.shear)  # ellipticity(0, phi) is (cos 2 phi, sin 2 phi)
        mass = None
        if self.lensed:
            mass = SIE(
                uniform(0, self.theta_E).to(self.dtype),
                e1.to(self.dtype),
                e2.to(self.dtype),
                uniform(3, self.center).to(self.dtype),
                uniform(4, self.center).to(self.dtype),
            ) + Shear((g * g1).to(self.dtype), (g * g2).to(self.dtype))
        psf = None
        if self.psf_fwhm is not None:
            lo, hi = self.psf_fwhm
            psf = lo if lo == hi else uniform(7, self.psf_fwhm)
        return Lensing(
            mass,
            self.image_size,
            self.pixel_scale,
            shape[-1],
            self.source_fov,
            self.supersample,
            psf,
        )
