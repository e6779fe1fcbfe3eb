r"""Strong gravitational lensing: analytic mass models and the lensed-image forward model.

- :mod:`hierprior.physics.lensing.mass`: :class:`SIE`, :class:`Shear`, :class:`SIS`,
  :class:`PointMass` (lenstronomy's parameters and conventions), batched per observation, and
  their sums.
- :mod:`hierprior.physics.lensing.pixelated`: :class:`PixelatedConvergence`, a convergence map
  on a pixel grid (uniform square pixels; exact direct sum, exact FFT on regular grids).
- :mod:`hierprior.physics.lensing.simulator`: :class:`Lensing`, the image of a pixelated source
  through a mass model (ray tracing, bilinear interpolation, supersampling, PSF), linear in the
  source with an exact adjoint; :func:`gaussian_psf`.
- :mod:`hierprior.physics.lensing.light`: the lens galaxy's light, :class:`LensLight` of a
  :class:`Sersic`, :class:`MultiGaussian` or their sum (:class:`LightSum`), non-linear
  parameters at call time, amplitudes solved by weighted least squares or sampled.
"""

from hierprior.physics.lensing.light import (
    LensLight,
    LightProfile,
    LightSum,
    MultiGaussian,
    Sersic,
)
from hierprior.physics.lensing.mass import (
    SIE,
    SIS,
    MassModel,
    MassSum,
    PointMass,
    Shear,
    ellipticity,
)
from hierprior.physics.lensing.pixelated import PixelatedConvergence
from hierprior.physics.lensing.simulator import Lensing, gaussian_psf

__all__ = [
    "LensLight",
    "Lensing",
    "LightProfile",
    "LightSum",
    "MultiGaussian",
    "MassModel",
    "MassSum",
    "PixelatedConvergence",
    "PointMass",
    "SIE",
    "SIS",
    "Sersic",
    "Shear",
    "ellipticity",
    "gaussian_psf",
]
