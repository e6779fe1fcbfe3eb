"""Metrics: PQMass two-sample test, TARP coverage, MIRA score, residual chi2, Sinkhorn."""

from hierprior.metrics.mira import MIRAResult, mira
from hierprior.metrics.pqmass import PQMassResult, pqmass
from hierprior.metrics.residual import residual_chi2
from hierprior.metrics.sinkhorn import (
    EntropicOTResult,
    SinkhornResult,
    entropic_ot,
    sinkhorn_divergence,
)
from hierprior.metrics.tarp import TARPResult, tarp

__all__ = [
    "EntropicOTResult",
    "MIRAResult",
    "PQMassResult",
    "SinkhornResult",
    "TARPResult",
    "entropic_ot",
    "mira",
    "pqmass",
    "residual_chi2",
    "sinkhorn_divergence",
    "tarp",
]
