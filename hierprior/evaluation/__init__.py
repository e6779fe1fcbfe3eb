"""Evaluation tools for hierprior experiments (digit and galaxy morphology classifiers,
Sinkhorn divergences to reference points)."""

from hierprior.evaluation.digits import DigitClassifier, default_cache_dir, load_digit_classifier
from hierprior.evaluation.evaluators import ArmStrength, DigitShare, SpiralShare
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
    "MassMapMetrics",
    "MassMapStructure",
    "MorphologyClassifier",
    "SinkhornEvaluator",
    "SpiralShare",
    "default_cache_dir",
    "gaussian_smooth",
    "load_digit_classifier",
    "load_morphology_classifier",
    "power_spectrum",
    "arm_strength",
    "compact_peaks",
    "noise_level",
]
