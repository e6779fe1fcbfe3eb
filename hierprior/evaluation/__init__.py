"""Evaluation tools for hierprior experiments (digit and galaxy morphology classifiers,
Sinkhorn divergences to reference points, the calibration of lens-parameter samples, structure
statistics)."""

from hierprior.evaluation.digits import DigitClassifier, default_cache_dir, load_digit_classifier
from hierprior.evaluation.evaluators import ArmStrength, DigitShare, SpiralShare
from hierprior.evaluation.lens_parameters import (
    LensParameterMetrics,
    blind_residual_chi2,
    lens_parameter_metrics,
)
from hierprior.evaluation.mass_map import (
    MassMapMetrics,
    MassMapStructure,
    gaussian_smooth,
    power_spectrum,
)
from hierprior.evaluation.morphology import MorphologyClassifier, load_morphology_classifier
from hierprior.evaluation.sinkhorn import SinkhornEvaluator
from hierprior.evaluation.structure import arm_strength, compact_peaks, noise_level

__all__ = [
    "ArmStrength",
    "DigitClassifier",
    "DigitShare",
    "LensParameterMetrics",
    "MassMapMetrics",
    "MassMapStructure",
    "MorphologyClassifier",
    "SinkhornEvaluator",
    "SpiralShare",
    "blind_residual_chi2",
    "default_cache_dir",
    "gaussian_smooth",
    "lens_parameter_metrics",
    "load_digit_classifier",
    "load_morphology_classifier",
    "power_spectrum",
    "arm_strength",
    "compact_peaks",
    "noise_level",
]
