r"""Strong gravitational lensing: analytic mass models and the lensed-image forward model.

- :mod:`hierprior.physics.lensing.mass`: :class:`SIE`, :class:`Shear`, :class:`SIS`,
  :class:`PointMass` (lenstronomy's parameters and conventions), batched per observation, and
  their sums.
- :mod:`hierprior.physics.lensing.parametric`: :class:`ParametricMass`, a sum of components
  evaluated at a parameter tensor (N, [S,] d) passed in (gradients flow to it).
- :mod:`hierprior.physics.lensing.priors`: priors on lens parameters (:class:`LensPrior` of
  per-parameter :class:`Uniform`, :class:`Normal`, :class:`LogNormal`,
  :class:`TruncatedNormal`, :class:`Fixed`, ...), unconstrained transforms, sampling.
- :mod:`hierprior.physics.lensing.blind`: :class:`BlindLensing`, the forward model of lenses
  nobody has modelled (their parameters are random variables with a :class:`LensPrior`).
- :mod:`hierprior.physics.lensing.blind_light`: :class:`BlindLensingWithLight`, the same with
  the lens galaxy's light (its non-linear parameters in the lens vector, :class:`LensLightPrior`;
  amplitudes solved by weighted least squares at every evaluation).
- :mod:`hierprior.physics.lensing.pixelated`: :class:`PixelatedConvergence`, a convergence map
  on a pixel grid (uniform square pixels; exact direct sum, exact FFT on regular grids).
- :mod:`hierprior.physics.lensing.simulator`: :class:`Lensing`, the image of a pixelated source
  through a mass model (ray tracing, bilinear interpolation, supersampling, PSF), linear in the
  source with an exact adjoint; :func:`gaussian_psf`.
- :mod:`hierprior.physics.lensing.substructure`: :class:`PseudoJaffe` subhalos and
  :class:`Multipole` (m = 3, 4, ...) perturbations of the macro model
  (:func:`pseudo_jaffe_from_mass`).
- :mod:`hierprior.physics.lensing.latent`: :class:`LatentMassMap`, the forward model whose
  unknown is a pixelated convergence correction :math:`\delta\kappa` on top of a known macro
  model and source (the mass-map EM demo).
- :mod:`hierprior.physics.lensing.light`: the lens galaxy's light, :class:`LensLight` of a
  :class:`Sersic`, :class:`MultiGaussian` or their sum (:class:`LightSum`), non-linear
  parameters at call time, amplitudes solved by weighted least squares or sampled.
"""

from hierprior.physics.lensing.blind import BlindLensing
from hierprior.physics.lensing.blind_light import BlindLensingWithLight, LensLightPrior
from hierprior.physics.lensing.latent import LatentMassMap
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
from hierprior.physics.lensing.parametric import Component, ParametricMass
from hierprior.physics.lensing.pixelated import PixelatedConvergence
from hierprior.physics.lensing.priors import (
    AxisRatioAngle,
    ComponentPrior,
    Fixed,
    LensPrior,
    LogNormal,
    MagnitudeAngle,
    Normal,
    ParameterPrior,
    TruncatedNormal,
    Uniform,
)
from hierprior.physics.lensing.simulator import Lensing, gaussian_psf
from hierprior.physics.lensing.substructure import Multipole, PseudoJaffe, pseudo_jaffe_from_mass

__all__ = [
    "AxisRatioAngle",
    "BlindLensing",
    "BlindLensingWithLight",
    "LensLightPrior",
    "Component",
    "ComponentPrior",
    "Fixed",
    "LensPrior",
    "LogNormal",
    "MagnitudeAngle",
    "Normal",
    "ParameterPrior",
    "TruncatedNormal",
    "Uniform",
    "LatentMassMap",
    "LensLight",
    "Lensing",
    "LightProfile",
    "LightSum",
    "MultiGaussian",
    "MassModel",
    "MassSum",
    "Multipole",
    "ParametricMass",
    "PixelatedConvergence",
    "PointMass",
    "PseudoJaffe",
    "SIE",
    "SIS",
    "Sersic",
    "Shear",
    "ellipticity",
    "gaussian_psf",
    "pseudo_jaffe_from_mass",
]
