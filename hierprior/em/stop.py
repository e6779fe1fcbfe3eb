r"""Stop rule: a calibrated test that the EM iteration has reached a fixed point.

Round k of EM has the prior :math:`\theta_k` (:math:`\theta_0` given; :math:`\theta_k` fitted by
the M-step to the bank of round k-1) and its bank :math:`B_k = \{x_{i}^{(s)} \sim
p_{\theta_k}(x \mid y_i)\}` drawn by the E-step in use. :math:`\theta_k` is a fixed point of
this E-step and M-step when (i) the E-step under :math:`\theta_k` gives what it gave under
:math:`\theta_{k-1}` and (ii) the M-step reached its target, :math:`\theta_k` reproducing the
bank it was fitted to. The rule tests both, each comparing like with like:

- **E-step stability**, :math:`B_k` against :math:`B_{k-1}`: both drawn by the *same* E-step
  (method, steps, options) from the *same* observations, so no sampler mismatch enters. Under
  :math:`H_0`: "the E-step under :math:`\theta_k` and :math:`\theta_{k-1}` give the same
  posterior for every :math:`y_i`", the samples of observation i in the two banks are
  exchangeable given the observations, so swapping them at random (all S samples of an
  observation together) generates the exact null distribution of any statistic, for any
  E-step, exact or approximate (PQMass's *paired* permutation null). Two statistics:
  ``fixedpoint_diff`` = PQMass(:math:`d`, :math:`-d`) of the pair differences
  :math:`d = x_k - x_{k-1}` (exchangeable pairs make d symmetric; the spread between
  observations cancels, so shifts of the posteriors are seen with the most power), and
  ``fixedpoint_pooled`` = PQMass(:math:`B_k`, :math:`B_{k-1}`) with the paired null (sees
  changes of spread, to which d is blind).
- **M-step fit**, ``mstep_fit`` = PQMass(samples of :math:`\theta_k`, one sample per
  observation of :math:`B_{k-1}`) with the ordinary permutation null: :math:`\theta_k` was
  trained on :math:`B_{k-1}`, so this asks whether the network and its sampler reproduce
  their own training data; the E-step's approximation does not enter. (One bank sample per
  observation: samples of different observations are independent, those of one are not.)
  A partial M-step (a few hundred fine-tuning steps) moves the prior only part of the way
  towards its bank; without this test, stable banks would stop EM while the prior still
  catches up.

- **Drift over several rounds** (``long_lag``, from round 3): ``fixedpoint_long_diff`` and
  ``fixedpoint_long_pooled``, the same two paired tests of :math:`B_k` against
  :math:`B_{\lfloor k/2 \rfloor}`. EM converges linearly: far from its fixed point a slow
  direction (e.g. a covariance seen through low-rank views) changes by less than one round
  resolves, round after round, while the sum of the changes since round k/2 does not hide.
  Comparing with the bank of round k/2, a lag that grows with k, the rule stops only when
  the whole second half of the run has not moved the posteriors: with a linear rate
  :math:`\lambda` the distance left at round k is :math:`\lambda^{k/2}` times the change since
  round k/2, which the test bounds by the resolution (the spirit of Aitken's acceleration:
  judge convergence from accumulated changes, not one step).

The decision p-value is the Bonferroni combination ``stop_pvalue`` =
:math:`\min(1, m \min_j p_j)` over the m = 3 (or, with the long-lag tests, 5) tests, a valid
p-value for the joint null. Measured on the Gaussian test bed (D=4, rank-2 views, N=300, S=2, exact
E-step, 20 seeds; ``experiments/stop_rule/README.md``): with the prior mean off by 0.5 sd,
``fixedpoint_diff`` rejected (at level/3) in 0.85 of the seeds and the pooled test in 0.50;
with the right prior the rule fired at round 1 in 20/20 seeds, off by 1 sd in 0/20.

**What a stop means.** The rule fires at round k when ``stop_pvalue`` exceeds ``level`` for
``patience`` consecutive rounds, k >= ``first_round`` = ``min_rounds`` + ``patience`` - 1
(``min_rounds`` >= 1: round 0 has no earlier bank). Then :math:`\theta_k` is certified as a
fixed point of the E-step and M-step in use, at level ``level``, to the resolution of N
observations: posterior sampling under :math:`\theta_k` reproduces the bank :math:`\theta_k`
was fitted to, and :math:`\theta_k` reproduces that bank itself. :math:`\theta_k` is the prior
returned (no further M-step is run).

What it cannot see: differences below the resolution of N observations (and of the prior
samples); an E-step whose posteriors barely depend on the prior makes (i) pass easily, so (ii)
carries the decision; the certified fixed point is that of the E-step in use, which an
approximate E-step biases, not the truth (the monitor's ``truth_*`` columns, when truths
exist, are the complement).

References:
    Lemos et al. (2024), PQMass, arXiv 2402.04355 (the statistic).
    Good (2005), Permutation, Parametric, and Bootstrap Tests of Hypotheses (paired
    permutation tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.checks import check_float, check_int
from hierprior.em.monitor import pqmass_metrics
from hierprior.seeds import derived_generator

__all__ = ["StopRule", "STOP_STATISTIC", "STOP_TESTS", "LONG_TESTS", "long_lag_round"]

#: the metric (p-value) the rule decides on, and its statistic
STOP_STATISTIC = "stop_pvalue"
#: the tests combined into it (the ``fixedpoint_long_*`` ones from round 3 on, when the bank of
#: round k // 2 is not the previous one)
STOP_TESTS = ("fixedpoint_diff", "fixedpoint_pooled", "mstep_fit")
LONG_TESTS = ("fixedpoint_long_diff", "fixedpoint_long_pooled")


def long_lag_round(k: int) -> int | None:
    """The earlier round whose bank round k is also compared with: k // 2, or None when that
    is round k - 1 (already compared) or earlier rounds do not exist."""
    j = k // 2
    return j if 0 <= j < k - 1 else None


class StopRule:
    """Fixed-point stop rule: E-step stability (paired PQMass of the banks of rounds k and k-1)
    and M-step fit (PQMass of prior k's samples against the bank it was fitted to).

    Arguments:
        level: the test's level alpha in (0, 1): the rule fires when the paired permutation
            p-value exceeds it (H0 "no change" not rejected) for ``patience`` rounds.
        min_rounds: the rule never fires before this round (>= 1; round 0 has no earlier bank).
        patience: consecutive rounds with p > level needed to fire.
        num_refs, re_tessellations: PQMass settings (references capped at a quarter of the
            pooled samples).
        permutations: permutations of each null (>= 5 / level - 1, so that p <= level is
            possible with the five tests combined from round 3 on).
        long_lag: also compare bank k with bank k // 2 (``fixedpoint_long_*``): drift that
            accumulates over several rounds, each below the resolution of one round.
    """

    def __init__(
        self,
        level: float = 0.01,
        min_rounds: int = 1,
        patience: int = 1,
        num_refs: int = 100,
        re_tessellations: int = 50,
        permutations: int = 1000,
        long_lag: bool = True,
    ):
        self.level = check_float(level, "stop level", 0.0, True, 1.0, strict_maximum=True)
        self.min_rounds = check_int(min_rounds, "stop min_rounds", 1)
        self.patience = check_int(patience, "stop patience", 1)
        self.num_refs = check_int(num_refs, "stop num_refs", 2)
        self.re_tessellations = check_int(re_tessellations, "stop re_tessellations", 1)
        self.permutations = check_int(permutations, "stop permutations", 1)
        if not isinstance(long_lag, bool):
            raise ValueError(f"stop long_lag must be true or false, got {long_lag!r}")
        self.long_lag = long_lag
        m = len(STOP_TESTS) + (len(LONG_TESTS) if long_lag else 0)
        if m / (1 + self.permutations) > self.level:  # the smallest Bonferroni p-value
            raise ValueError(
                f"stop permutations={self.permutations} cannot give a p-value <= level="
                f"{self.level}; use at least {math.ceil(m / self.level - 1)} permutations"
            )

    @property
    def first_round(self) -> int:
        """The earliest round at which the rule can fire."""
        return self.min_rounds + self.patience - 1

    def options(self) -> dict:
        keys = ("level", "min_rounds", "patience", "num_refs", "re_tessellations", "permutations")
        out = {k: getattr(self, k) for k in keys}
        if not self.long_lag:  # absent when on (the default): the run's identity records it
            out["long_lag"] = False
        return out

    def test(
        self,
        bank: Tensor,
        previous_bank: Tensor,
        prior_samples: Tensor,
        *,
        seed: int,
        round_index: int,
        earlier_bank: Tensor | None = None,
    ) -> dict:
        """The tests of round k and the decision p-value (see the module docstring).

        Arguments:
            bank: the bank of round k, with shape (N, S, *event).
            previous_bank: the bank of round k-1, same shape.
            prior_samples: samples of the prior of round k, with shape (n, *event).
            earlier_bank: the bank of round :func:`long_lag_round` (k), same shape, or None
                (no long-lag tests).

        Returns ``{test}_chi2`` and ``{test}_pvalue`` for the tests of :data:`STOP_TESTS`
        (and of :data:`LONG_TESTS` with ``earlier_bank``, with ``fixedpoint_long_round``),
        and ``stop_pvalue``.
        """
        for other, j in ((previous_bank, round_index - 1), (earlier_bank, None)):
            if other is not None and other.shape != bank.shape:
                raise ValueError(
                    f"the banks of rounds {round_index} and {j if j is not None else 'k // 2'} "
                    f"have shapes {tuple(bank.shape)} and {tuple(other.shape)}"
                )
        n, s = bank.shape[:2]
        x = bank.reshape(n * s, -1).double()
        y = previous_bank.reshape(n * s, -1).to(x)
        settings = dict(
            num_refs=self.num_refs,
            re_tessellations=self.re_tessellations,
            permutations=self.permutations,
        )
        paired = dict(paired=True, groups=torch.arange(n).repeat_interleave(s), **settings)
        comparisons = {
            "fixedpoint_diff": ((x - y, y - x), paired),
            "fixedpoint_pooled": ((x, y), paired),
            "mstep_fit": ((prior_samples.flatten(1), previous_bank[:, 0].flatten(1)), settings),
        }
        tests = list(STOP_TESTS)
        out = {}
        if self.long_lag and earlier_bank is not None:
            z = earlier_bank.reshape(n * s, -1).to(x)
            comparisons["fixedpoint_long_diff"] = ((x - z, z - x), paired)
            comparisons["fixedpoint_long_pooled"] = ((x, z), paired)
            tests += LONG_TESTS
            out["fixedpoint_long_round"] = long_lag_round(round_index)
        for tag, ((a, b), options) in comparisons.items():
            g = derived_generator(seed, round_index, "stop", tag)
            out.update(pqmass_metrics(a, b, tag, generator=g, **options))
        p = min(out[f"{tag}_pvalue"] for tag in tests)
        out[STOP_STATISTIC] = min(1.0, len(tests) * p) if math.isfinite(p) else float("nan")
        return out

    def decide(self, metrics: list[dict]) -> str | None:
        """The reason to stop after the last row of metrics (one dict per round), or None."""
        if not metrics:
            return None
        k = int(metrics[-1]["round"])
        if k < self.first_round:
            return None
        recent = metrics[-self.patience :]
        pvalues = [row.get(STOP_STATISTIC) for row in recent]
        if len(recent) < self.patience or any(
            p is None or not math.isfinite(p) or p <= self.level for p in pvalues
        ):
            return None
        return (
            f"fixed point at round {k}: for the last {self.patience} round(s) the bank is "
            f"indistinguishable from the previous one and the prior from the bank it was fitted "
            f"to (stop p-value {min(pvalues):.3g} > level {self.level}); prior {k} is returned"
        )
