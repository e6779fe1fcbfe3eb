"""Forward models A_i and noise models n_i of the observations y_i = A_i(x_i) + n_i.

See :mod:`hierprior.physics.forward` for the shape conventions shared by every model.
"""

from hierprior.physics.correlated_noise import (
    CorrelatedNoise,
    noise_autocovariance,
    spectrum_from_autocovariance,
)
from hierprior.physics.forward import Compose, ForwardModel, Identity, observation_index
from hierprior.physics.learned_noise import LearnedNoise
from hierprior.physics.lensing import (
    SIE,
    SIS,
    BlindLensing,
    Lensing,
    LensLight,
    LensPrior,
    LightProfile,
    LightSum,
    MassModel,
    MultiGaussian,
    ParametricMass,
    PixelatedConvergence,
    PointMass,
    Sersic,
    Shear,
)
from hierprior.physics.linear import Blur, DenseLinear, Downsample, Mask, Reshape
from hierprior.physics.noise import (
    GaussianNoise,
    GaussianNoiseModel,
    NoiseModel,
    likelihood_score,
    noise_score,
)
from hierprior.physics.nonlinear import NonLinear

__all__ = [
    "ForwardModel",
    "Identity",
    "Compose",
    "DenseLinear",
    "Mask",
    "Blur",
    "Downsample",
    "Reshape",
    "NonLinear",
    "Lensing",
    "BlindLensing",
    "LensPrior",
    "MassModel",
    "ParametricMass",
    "SIE",
    "SIS",
    "Shear",
    "PointMass",
    "PixelatedConvergence",
    "LensLight",
    "LightProfile",
    "LightSum",
    "Sersic",
    "MultiGaussian",
    "NoiseModel",
    "GaussianNoiseModel",
    "GaussianNoise",
    "CorrelatedNoise",
    "noise_autocovariance",
    "spectrum_from_autocovariance",
    "LearnedNoise",
    "noise_score",
    "likelihood_score",
    "observation_index",
]
