"""Populations of corrupted observations built from parts: truths, forward models, noise.

A population is simulated by :func:`simulate_population` from three ``_target_``-able parts
and a seed: a truth generator (``(n, generator) -> (n, *signal_shape)``, e.g.
:class:`MNISTDigits`), a forward model (a :class:`~hierprior.physics.ForwardModel`, or a
generator of per-observation ones such as :class:`RandomMask`) and a noise model. A new
experiment adds a config under ``conf/population/`` and, at most, a truth or forward-model
generator in its own module here (:class:`RandomLens`: strong lenses, one per observation).
"""

from hierprior.populations.lensing import RandomLens
from hierprior.populations.manifold import SmoothManifold
from hierprior.populations.mass_map import simulate_mass_map_population, true_kappa_map
from hierprior.populations.operators import RandomMask, RandomProjection
from hierprior.populations.perturbed_lenses import LensDraw, PerturbedLenses
from hierprior.populations.simulate import simulate_population
from hierprior.populations.truths import GalaxyImages, GaussianSignals, MNISTDigits

__all__ = [
    "LensDraw",
    "PerturbedLenses",
    "simulate_mass_map_population",
    "true_kappa_map",
    "GalaxyImages",
    "GaussianSignals",
    "MNISTDigits",
    "RandomLens",
    "RandomMask",
    "RandomProjection",
    "SmoothManifold",
    "simulate_population",
]
