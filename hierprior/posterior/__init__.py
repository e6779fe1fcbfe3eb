"""Posterior sampling under diffusion priors: MMPS, DPS, CLA, ΠGDM, DAPS, TDS, exact oracles."""

from hierprior.posterior.base import Observation, PosteriorDenoiser, PosteriorSamplingError
from hierprior.posterior.cla import CLADenoiser
from hierprior.posterior.diagnostics import (
    coverage_error,
    expected_coverage,
    gaussian_coverage,
    gaussian_fit,
    gaussian_w2,
)
from hierprior.posterior.dps import DPSDenoiser
from hierprior.posterior.exact import (
    exact_gaussian_posterior,
    exact_gmm_posterior,
    forward_matrix,
)
from hierprior.posterior.linalg import conjugate_gradient, gmres, solve
from hierprior.posterior.mmps import MMPSDenoiser
from hierprior.posterior.pigdm import PiGDMDenoiser
from hierprior.posterior.sampling import POSTERIOR_METHODS, PosteriorMethod, sample_posterior

__all__ = [
    "CLADenoiser",
    "DPSDenoiser",
    "MMPSDenoiser",
    "Observation",
    "POSTERIOR_METHODS",
    "PiGDMDenoiser",
    "PosteriorDenoiser",
    "PosteriorMethod",
    "PosteriorSamplingError",
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
    "sample_posterior",
    "solve",
]
