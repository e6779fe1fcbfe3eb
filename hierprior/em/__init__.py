"""Expectation-maximisation of a diffusion prior over a population of corrupted observations.

E-step: posterior samples of every observation under the current prior (``estep``); M-step:
refit of the prior on them (``mstep``); ``loop.run_em`` orchestrates rounds, monitors PQMass
drift and convergence, logs, and resumes from its run directory.
"""

from hierprior.em.bank import SampleBank
from hierprior.em.loop import EMResult, run_em
from hierprior.em.population import Population

__all__ = ["EMResult", "Population", "SampleBank", "run_em"]
