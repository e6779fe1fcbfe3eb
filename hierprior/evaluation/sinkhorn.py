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
i.i.d.; the observations of a population are i.i.d. draws). With ``support=(lo, hi)`` the
points of the prior and of the bank with a value outside [lo, hi] are left out first; the
share left out among all of them is reported as ``sinkhorn_prior_outside`` and
``sinkhorn_posterior_outside``. DiEM keeps only the points inside (-3, 3)^5, both for its
divergence and for its next M-step (with squared distances, one far outlier among 1,024
points moves the divergence by its squared distance over 1,024).

References:
    Rozet, Andry, Lanusse & Louppe (2024), Learning Diffusion Priors from Observations by
    Expectation Maximization, arXiv 2405.13712 (§5.1 and its repository's
    ``experiments/manifold``).
"""

from __future__ import annotations

import math

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
        support: None, or (lo, hi): prior and bank points with a value outside are left out.
        dtype: the solver's dtype, ``"float32"`` or ``"float64"`` (float32 cannot reach a
            marginal error of 1e-3 at epsilon = 1e-3: its potentials' rounding is ~1e-6).
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
        support: tuple[float, float] | None = None,
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
        self.support = None
        if support is not None:
            lo, hi = (check_float(v, "support", -math.inf) for v in support)
            if not hi > lo:
                raise ValueError(f"support must be (lo, hi) with lo < hi, got {support}")
            self.support = (lo, hi)
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
            arms.append(("prior", prior_samples))
        if self.posterior and samples is not None:
            arms.append(("posterior", samples[:, 0]))
        for name, x in arms:
            x = x.detach().cpu().flatten(1)
            if self.support is not None:
                inside = ((x >= self.support[0]) & (x <= self.support[1])).all(1)
                out[f"sinkhorn_{name}_outside"] = float(1 - inside.double().mean())
                x = x[inside]
                if len(x) == 0:
                    out[f"sinkhorn_{name}"] = math.nan
                    continue
            s = self._divergence(x[:n], ref_a)
            out[f"sinkhorn_{name}"] = s.divergence
            if self.transport_cost:
                out[f"sinkhorn_{name}_cost"] = s.xy.cost - self._floor.xy.cost
        return out
