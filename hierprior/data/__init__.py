"""Data: image data sets in the hierprior value convention (float32 (N, C, H, W) tensors with
intensities [0, 1] mapped linearly onto ``value_range``, default (-1, 1)), and real imaging
(:mod:`hierprior.data.imaging`: FITS image, noise map, PSF and mask in physical units; the
bundled SLACS lenses)."""

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
from hierprior.data.imaging import (
    SLACS_LENSES,
    BlankSky,
    ImagingData,
    correlated_noise_from_sky,
    load_imaging,
    load_slacs,
    prepare_psf,
    sky_noise_realisations,
    sky_noise_unit,
    slacs_info,
)
from hierprior.data.mnist import (
    check_value_range,
    from_value_range,
    load_mnist,
    to_value_range,
)

__all__ = [
    "BlankSky",
    "Choice",
    "ELLIPTICAL_PARAMS",
    "ImagingData",
    "LogUniform",
    "SLACS_LENSES",
    "SPIRAL_PARAMS",
    "Uniform",
    "check_value_range",
    "correlated_noise_from_sky",
    "from_value_range",
    "load_imaging",
    "load_mnist",
    "load_slacs",
    "make_galaxies",
    "make_gaussian_random_fields",
    "prepare_psf",
    "sersic_b",
    "sky_noise_realisations",
    "sky_noise_unit",
    "slacs_info",
    "to_value_range",
]
