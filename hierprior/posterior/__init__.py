"""Posterior sampling under diffusion priors: MMPS, DPS, CLA, ΠGDM, DAPS, TDS, exact oracles,
and the joint (source, lens) sampler for lenses nobody has modelled.

Each method is a :class:`PosteriorMethod` registered in :data:`POSTERIOR_METHODS`
(:func:`posterior_method` builds one by name or from a config mapping);
:func:`sample_posterior` is the one-call entry point.
"""

# isort: off
# the method modules register their classes on import: this order is POSTERIOR_METHODS' order
from hierprior.posterior import mmps, dps, cla, pigdm, daps, smc, exact, joint  # noqa: F401

# isort: on
from hierprior.posterior.base import (
    POSTERIOR_METHODS,
    DenoiserMethod,
    Observation,
    PosteriorDenoiser,
    PosteriorMethod,
    PosteriorSamplingError,
    register_method,
)
from hierprior.posterior.cla import CLA, CLADenoiser
from hierprior.posterior.daps import DAPS
from hierprior.posterior.diagnostics import (
    coverage_error,
    expected_coverage,
    gaussian_coverage,
    gaussian_fit,
    gaussian_w2,
)
from hierprior.posterior.dps import DPS, DPSDenoiser
from hierprior.posterior.exact import (
    ExactGaussian,
    exact_gaussian_posterior,
    exact_gmm_posterior,
    forward_matrix,
    noise_covariance,
)
from hierprior.posterior.joint import (
    JOINT_SOURCES,
    Joint,
    LensChains,
    LensLikelihood,
    lens_posterior,
    lens_search,
)
from hierprior.posterior.linalg import conjugate_gradient, gmres, solve
from hierprior.posterior.mmps import MMPS, MMPSDenoiser
from hierprior.posterior.pigdm import PiGDM, PiGDMDenoiser
from hierprior.posterior.sampling import posterior_method, sample_posterior
from hierprior.posterior.smc import TDS

__all__ = [
    "CLA",
    "CLADenoiser",
    "DAPS",
    "DPS",
    "DPSDenoiser",
    "DenoiserMethod",
    "ExactGaussian",
    "JOINT_SOURCES",
    "Joint",
    "LensChains",
    "LensLikelihood",
    "MMPS",
    "MMPSDenoiser",
    "Observation",
    "POSTERIOR_METHODS",
    "PiGDM",
    "PiGDMDenoiser",
    "PosteriorDenoiser",
    "PosteriorMethod",
    "PosteriorSamplingError",
    "TDS",
    "conjugate_gradient",
    "coverage_error",
    "exact_gaussian_posterior",
    "exact_gmm_posterior",
    "expected_coverage",
    "forward_matrix",
    "gaussian_coverage",
    "gaussian_fit",
    "gaussian_w2",
    "gmres",
    "noise_covariance",
    "lens_posterior",
    "lens_search",
    "posterior_method",
    "register_method",
    "sample_posterior",
    "solve",
]
