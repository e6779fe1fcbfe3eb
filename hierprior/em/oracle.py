r"""The oracle of an EM run: the same prior trained directly on the truths.

EM learns a prior from corrupted observations; the best it can do with a given network and
training budget is what that network learns from the clean truths themselves. The oracle is
the round-0 prior's configuration (network, schedule, ``train`` budget, seed) with the
population's truths as its training data. ``hierprior-em`` trains it once per configuration
(``em.oracle: true``; cached beside the round-0 priors) and :func:`hierprior.em.run_em`
(``oracle=``) reports every round's distance to the truths between round 0's and the
oracle's (the ``fidelity`` columns of :mod:`hierprior.em.monitor`).

The truths are used for evaluation only: the oracle never enters the E- or M-step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from hierprior.io import atomic_save

__all__ = ["save_truths", "load_truths"]


def save_truths(truth: Tensor, path: str | os.PathLike) -> Path:
    """Writes the truths (n, *event) atomically as the oracle's training data."""
    return atomic_save({"truth": truth.detach().float().cpu()}, Path(path))


def load_truths(path: str | os.PathLike, value_range: Sequence[float] | None = None) -> Tensor:
    """The truths written by :func:`save_truths` (a data ``_target_``: ``value_range`` is the
    data's range, kept in the config for the sample grids)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the oracle's truths {path} do not exist")
    return torch.load(path, map_location="cpu", weights_only=True)["truth"]
