"""Metrics: PQMass two-sample test, TARP coverage, residual chi2."""

from hierprior.metrics.pqmass import PQMassResult, pqmass
from hierprior.metrics.residual import residual_chi2
from hierprior.metrics.tarp import TARPResult, tarp

__all__ = ["PQMassResult", "TARPResult", "pqmass", "residual_chi2", "tarp"]
