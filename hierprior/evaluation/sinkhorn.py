r"""EM posterior evaluator: Sinkhorn divergences of the prior and of the bank to reference points.

:class:`SinkhornEvaluator` is a posterior evaluator of :class:`~hierprior.em.Monitor`
(``posterior_evaluators``): each round it compares, with the debiased Sinkhorn divergence
:math:`S_\varepsilon` of :func:`hierprior.metrics.sinkhorn_divergence` (squared Euclidean
cost), held-out truth points (``reference``, never seen by EM) with

- ``sinkhorn_prior``: the prior's samples (the monitor's prior samples of the round);
- ``sinkhorn_posterior``: one bank sample per observation, i.e. a sample of the aggregate
  posterior :math:`\int p_{\theta_k}(x \mid y)\, p(y)\, dy`, which equals the truth's
  distribution when the prior is right. This is the quantity DiEM (Rozet et al. 2024, §5.1)
  reports and plots as its model :math:`q_k`: their evaluation samples the E-step of the new
  model, not the prior;
- ``sinkhorn_floor``: the same divergence between two disjoint reference sets of the same
  size, the value a perfect model reaches at this number of points (the finite-sample bias of
  :math:`S_\varepsilon`; computed once).

With ``transport_cost=True`` it also reports DiEM's own estimator, built from POT's
``sinkhorn2`` (the transport cost :math:`W_\varepsilon = \langle P, C \rangle` of the
entropic plan, not the debiased divergence): ``sinkhorn_posterior_cost`` =
:math:`W_\varepsilon(\text{ref}_1, \text{bank}) - W_\varepsilon(\text{ref}_1, \text{ref}_2)`
(and ``sinkhorn_prior_cost`` likewise), with the plans already solved for the divergences
(no extra solve). DiEM clips it at 1e-6 from below; here it is reported as is (it can be
negative).

Every comparison uses ``num_points`` points of each side (the first ones: prior samples are
i.i.d.; the observations of a population are i.i.d. draws).

References:
    Rozet, Andry, Lanusse & Louppe (2024), Learning Diffusion Priors from Observations by
    Expectation Maximization, arXiv 2405.13712 (§5.1 and its repository's
    ``experiments/manifold``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierprior.checks import check_float, check_int
from hierprior.metrics import sinkhorn_divergence

__all__ = ["SinkhornEvaluator"]


class SinkhornEvaluator:
    """Sinkhorn divergences of the round's prior samples and bank to reference points.

    Arguments:
        reference: held-out truth points, with shape (R, *event), R >= num_points
            (>= 2 num_points for the floor and the transport-cost estimator).
        epsilon: the entropic regularisation (DiEM: 1e-3, in squared distance units).
        num_points: points per side of each comparison.
        prior: report ``sinkhorn_prior``.
        posterior: report ``sinkhorn_posterior`` (the bank's aggregate posterior).
        floor: report ``sinkhorn_floor``.
        transport_cost: also report DiEM's transport-cost estimator (module docstring).
        dtype: the solver's dtype, ``"float32"`` or ``"float64"``.
        solver: further options of :func:`~hierprior.metrics.entropic_ot` (``scaling``,
            ``overrelaxation``, ``tol``, ``stage_tol``, ``max_iter``, ``block_entries``).
    """

    def __init__(
        self,
        reference: Tensor,
        epsilon: float = 1e-3,
        num_points: int = 1024,
        prior: bool = True,
        posterior: bool = True,
        floor: bool = True,
        transport_cost: bool = False,
        dtype: str = "float64",
        **solver,
    ):
        self.epsilon = check_float(epsilon, "epsilon", 0.0, strict=True)
        self.num_points = check_int(num_points, "num_points", 2)
        self.prior, self.posterior = bool(prior), bool(posterior)
        self.floor, self.transport_cost = bool(floor), bool(transport_cost)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        reference = torch.as_tensor(reference).detach().cpu()
        need = self.num_points * (2 if (self.floor or self.transport_cost) else 1)
        if reference.ndim < 2 or len(reference) < need:
            raise ValueError(
                f"reference must have shape (R, *event) with R >= {need}, "
                f"got {tuple(reference.shape)}"
            )
        self.reference = reference
        self.solver = dict(solver)
        self._floor = None

    def _divergence(self, x: Tensor, y: Tensor):
        return sinkhorn_divergence(
            x.detach().cpu().flatten(1),
            y.flatten(1),
            self.epsilon,
            dtype=self.dtype,
            **self.solver,
        )

    def __call__(
        self,
        population=None,
        samples: Tensor | None = None,
        prior_samples: Tensor | None = None,
        round_dir=None,
        round_index: int | None = None,
    ) -> dict[str, float]:
        n = self.num_points
        ref_a, ref_b = self.reference[:n], self.reference[n : 2 * n]
        out: dict[str, float] = {}
        if self.floor or self.transport_cost:
            if self._floor is None:
                self._floor = self._divergence(ref_b, ref_a)
            if self.floor:
                out["sinkhorn_floor"] = self._floor.divergence
        arms = []
        if self.prior and prior_samples is not None:
            arms.append(("prior", prior_samples[:n]))
        if self.posterior and samples is not None:
            arms.append(("posterior", samples[:n, 0]))
        for name, x in arms:
            s = self._divergence(x, ref_a)
            out[f"sinkhorn_{name}"] = s.divergence
            if self.transport_cost:
                out[f"sinkhorn_{name}_cost"] = s.xy.cost - self._floor.xy.cost
        return out
