"""Evaluation tools for hierprior experiments (digit and galaxy morphology classifiers,
Sinkhorn divergences to reference points)."""

from hierprior.evaluation.digits import DigitClassifier, default_cache_dir, load_digit_classifier
from hierprior.evaluation.evaluators import DigitShare, SpiralShare
from hierprior.evaluation.mass_map import MassMapMetrics, gaussian_smooth, power_spectrum
from hierprior.evaluation.morphology import MorphologyClassifier, load_morphology_classifier
from hierprior.evaluation.sinkhorn import SinkhornEvaluator

__all__ = [
    "DigitClassifier",
    "DigitShare",
    "MassMapMetrics",
    "MorphologyClassifier",
    "SinkhornEvaluator",
    "SpiralShare",
    "default_cache_dir",
    "gaussian_smooth",
    "load_digit_classifier",
    "load_morphology_classifier",
    "power_spectrum",
]
