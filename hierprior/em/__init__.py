"""Expectation-maximisation of a diffusion prior over a population of corrupted observations.

Four swappable pieces, each validated when built and each buildable by a hydra ``_target_``
(``conf/em/<piece>/``): :class:`EStep` (posterior sampling of every observation),
:class:`NetworkMStep` / :class:`GaussianMStep` (refit of the prior), :class:`Monitor` (what a
round is measured by) and :class:`StopRule` (a calibrated fixed-point test); :func:`run_em`
runs them round after round in a run directory that is the whole state of the run.
"""

from hierprior.em.bank import SampleBank
from hierprior.em.estep import EStep
from hierprior.em.loop import EMResult, build_pieces, run_em
from hierprior.em.monitor import Monitor
from hierprior.em.mstep import GaussianMStep, NetworkMStep
from hierprior.em.population import Population
from hierprior.em.stop import StopRule

__all__ = [
    "EMResult",
    "EStep",
    "GaussianMStep",
    "Monitor",
    "NetworkMStep",
    "Population",
    "SampleBank",
    "StopRule",
    "build_pieces",
    "run_em",
]
