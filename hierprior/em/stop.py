r"""Stop rule: a calibrated fixed-point test of the EM iteration, comparing like with like.

Round k of EM has the prior :math:`\theta_k` (:math:`\theta_0` given; :math:`\theta_k` fitted by
the M-step to the bank of round k-1) and its bank :math:`B_k = \{x_{i}^{(s)} \sim
p_{\theta_k}(x \mid y_i)\}` drawn by the E-step in use. The rule compares :math:`B_k` with
:math:`B_{k-1}`: both are drawn by the **same** E-step (same method, steps, options) from the
**same** observations, so the comparison holds no sampler mismatch. The test is PQMass with a
*paired* permutation null: the samples of observation i in the two banks form a pair, and
under

.. math:: H_0: \text{the E-step under } \theta_k \text{ and under } \theta_{k-1}
          \text{ give the same posterior for every } y_i

the two members of each pair are exchangeable given the observations, so swapping them at
random (all S samples of an observation together) generates the exact null distribution of any
statistic, for any E-step, exact or approximate. The null holds at a fixed point of the
iteration in use (:math:`\theta_k = \theta_{k-1}`), which is where EM with that E-step and
M-step converges; it is not a claim that the E-step is exact.

Two PQMass statistics use the pairing, since pooling the banks would bury a change under the
spread between observations:

- ``diff``: PQMass(:math:`d`, :math:`-d`) of the pair differences
  :math:`d = x_k - x_{k-1}` (exchangeable pairs make :math:`d` symmetric); the spread between
  observations cancels, so shifts of the posteriors are seen with the most power;
- ``joint``: PQMass(:math:`(x_k, x_{k-1})`, :math:`(x_{k-1}, x_k)`) of the concatenated
  pairs, which also sees changes of the posteriors' spread (invisible to ``diff``: two
  independent draws of equally centred posteriors give a symmetric difference).

The decision p-value is their Bonferroni combination
:math:`p = \min(1, 2 \min(p_\mathrm{diff}, p_\mathrm{joint}))`, a valid p-value. On the
Gaussian test bed (D=4, rank-2 views, N=300, S=2, exact E-step, prior mean off by 0.5 sd) the
share of 20 seeds rejected at p <= 0.01 was 0.95 for ``diff``, 0.80 for ``joint`` and 0.50
for PQMass of the pooled banks; with the prior variance off by 2x, 0.00, 0.25 and 0.15.

**What a stop means.** The rule fires at round k when the paired p-value exceeds ``level`` for
``patience`` consecutive rounds, k >= ``first_round`` = max(1, ``min_rounds``) + patience - 1.
Then :math:`\theta_k` is certified as a fixed point to the test's resolution: :math:`\theta_k`
was fitted to :math:`B_{k-1}`, and posterior sampling under :math:`\theta_k` reproduces
:math:`B_{k-1}` (its own training data) indistinguishably, at level ``level``, with N
observations. :math:`\theta_k` is the prior returned (no further M-step is run).

What it cannot see: a prior that stopped moving for another reason (an E-step whose
posteriors barely depend on the prior, a learning rate too small to move the network) passes
the test; differences below the resolution of N paired samples pass it; and the certified
fixed point is that of the E-step in use, which an approximate E-step biases. The monitor's
``truth_*`` (when truths exist) and ``drift_*`` columns are the complements.

References:
    Lemos et al. (2024), PQMass, arXiv 2402.04355 (the statistic).
    Good (2005), Permutation, Parametric, and Bootstrap Tests of Hypotheses (paired
    permutation tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.em.monitor import pqmass_metrics
from hierprior.seeds import derived_generator

__all__ = ["StopRule", "STOP_STATISTIC"]

#: the metric (p-value) the rule decides on, and its statistic
STOP_STATISTIC = "fixedpoint_pvalue"


def _int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"stop {name} must be an integer >= {minimum}, got {value!r}")
    return value


class StopRule:
    """Fixed-point stop rule: bank of round k vs bank of round k-1, paired PQMass tests.

    Arguments:
        level: the test's level alpha in (0, 1): the rule fires when the paired permutation
            p-value exceeds it (H0 "no change" not rejected) for ``patience`` rounds.
        min_rounds: the rule never fires before this round (>= 1; round 0 has no earlier bank).
        patience: consecutive rounds with p > level needed to fire.
        num_refs, re_tessellations: PQMass settings (references capped at a quarter of the
            pooled samples).
        permutations: permutations of each null (>= 2 / level - 1, so that p <= level is
            possible).
    """

    def __init__(
        self,
        level: float = 0.05,
        min_rounds: int = 1,
        patience: int = 1,
        num_refs: int = 100,
        re_tessellations: int = 50,
        permutations: int = 500,
    ):
        if isinstance(level, bool) or not isinstance(level, (int, float)):
            raise ValueError(f"stop level must be a number in (0, 1), got {level!r}")
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"stop level must lie in (0, 1), got {level}")
        self.level = float(level)
        self.min_rounds = _int(min_rounds, "min_rounds", 1)
        self.patience = _int(patience, "patience", 1)
        self.num_refs = _int(num_refs, "num_refs", 2)
        self.re_tessellations = _int(re_tessellations, "re_tessellations", 1)
        self.permutations = _int(permutations, "permutations", 1)
        if 2 / (1 + self.permutations) > self.level:  # the smallest Bonferroni p-value
            raise ValueError(
                f"stop permutations={self.permutations} cannot give a p-value <= level="
                f"{self.level}; use at least {math.ceil(2 / self.level - 1)} permutations"
            )

    @property
    def first_round(self) -> int:
        """The earliest round at which the rule can fire."""
        return self.min_rounds + self.patience - 1

    def options(self) -> dict:
        keys = ("level", "min_rounds", "patience", "num_refs", "re_tessellations", "permutations")
        return {k: getattr(self, k) for k in keys}

    def test(self, bank: Tensor, previous_bank: Tensor, *, seed: int, round_index: int) -> dict:
        """The fixed-point test of bank (N, S, *event) against the previous round's bank.

        Returns ``fixedpoint_{diff,joint}_chi2``, ``fixedpoint_{diff,joint}_pvalue`` and the
        decision p-value ``fixedpoint_pvalue`` (see the module docstring). Pairs are
        (observation i, sample s) of the two banks; the null swaps all S samples of an
        observation together.
        """
        if bank.shape != previous_bank.shape:
            raise ValueError(
                f"the banks of rounds {round_index} and {round_index - 1} have shapes "
                f"{tuple(bank.shape)} and {tuple(previous_bank.shape)}"
            )
        n, s = bank.shape[:2]
        x = bank.reshape(n * s, -1).double()
        y = previous_bank.reshape(n * s, -1).to(x)
        settings = dict(
            num_refs=self.num_refs,
            re_tessellations=self.re_tessellations,
            permutations=self.permutations,
            paired=True,
            groups=torch.arange(n).repeat_interleave(s),
        )
        out = {}
        for tag, (a, b) in (
            ("diff", (x - y, y - x)),
            ("joint", (torch.cat([x, y], 1), torch.cat([y, x], 1))),
        ):
            g = derived_generator(seed, round_index, "stop", tag)
            out.update(pqmass_metrics(a, b, f"fixedpoint_{tag}", generator=g, **settings))
        p = min(out["fixedpoint_diff_pvalue"], out["fixedpoint_joint_pvalue"])
        out[STOP_STATISTIC] = min(1.0, 2.0 * p) if math.isfinite(p) else float("nan")
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
            f"fixed point at round {k}: the bank of each of the last {self.patience} round(s) is "
            f"indistinguishable from the previous one (paired PQMass permutation p-value "
            f"{min(pvalues):.3g} > level {self.level}); prior {k} is returned"
        )
