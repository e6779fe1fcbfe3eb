"""Metrics: PQMass two-sample test, TARP coverage, MIRA score, residual chi2."""

from hierprior.metrics.mira import MIRAResult, mira
from hierprior.metrics.pqmass import PQMassResult, pqmass
from hierprior.metrics.residual import residual_chi2
from hierprior.metrics.tarp import TARPResult, tarp

__all__ = ["MIRAResult", "PQMassResult", "TARPResult", "mira", "pqmass", "residual_chi2", "tarp"]
