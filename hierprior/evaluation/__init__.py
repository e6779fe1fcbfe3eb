"""Evaluation tools for hierprior experiments (e.g. a digit classifier for MNIST priors)."""

from hierprior.evaluation.digits import DigitClassifier, default_cache_dir, load_digit_classifier
from hierprior.evaluation.evaluators import DigitShare

__all__ = ["DigitClassifier", "DigitShare", "default_cache_dir", "load_digit_classifier"]
