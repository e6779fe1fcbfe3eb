"""Image data sets in the hierprior value convention: float32 (N, C, H, W) tensors with
intensities [0, 1] mapped linearly onto ``value_range`` (default (-1, 1))."""

from hierprior.data.fields import make_gaussian_random_fields
from hierprior.data.galaxies import (
    ELLIPTICAL_PARAMS,
    SPIRAL_PARAMS,
    Choice,
    LogUniform,
    Uniform,
    make_galaxies,
    sersic_b,
)
from hierprior.data.mnist import (
    check_value_range,
    from_value_range,
    load_mnist,
    to_value_range,
)

__all__ = [
    "Choice",
    "ELLIPTICAL_PARAMS",
    "LogUniform",
    "SPIRAL_PARAMS",
    "Uniform",
    "check_value_range",
    "from_value_range",
    "load_mnist",
    "make_galaxies",
    "make_gaussian_random_fields",
    "sersic_b",
    "to_value_range",
]
