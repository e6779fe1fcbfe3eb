"""Evaluation tools for hierprior experiments (digit and galaxy morphology classifiers, the
calibration of lens-parameter samples)."""

from hierprior.evaluation.digits import DigitClassifier, default_cache_dir, load_digit_classifier
from hierprior.evaluation.evaluators import DigitShare, SpiralShare
from hierprior.evaluation.lens_parameters import (
    LensParameterMetrics,
    blind_residual_chi2,
    lens_parameter_metrics,
)
from hierprior.evaluation.mass_map import MassMapMetrics, gaussian_smooth, power_spectrum
from hierprior.evaluation.morphology import MorphologyClassifier, load_morphology_classifier

__all__ = [
    "DigitClassifier",
    "DigitShare",
    "LensParameterMetrics",
    "MassMapMetrics",
    "MorphologyClassifier",
    "SpiralShare",
    "blind_residual_chi2",
    "default_cache_dir",
    "gaussian_smooth",
    "lens_parameter_metrics",
    "load_digit_classifier",
    "load_morphology_classifier",
    "power_spectrum",
]
