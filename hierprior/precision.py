r"""Numerical precision of a run's steps: one vocabulary, TF32 only when asked for.

Every step that runs a network (the E-step and its posterior solves, the monitor's prior
sampler, the M-step, the round-0 prior's training) takes one of :data:`PRECISIONS`:

- ``"32-true"``: plain fp32 everywhere, matmuls and cuDNN convolutions included (on CUDA the
  TF32 flags ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
  are turned *off* while the step runs: cuDNN's default is on);
- ``"tf32"``: fp32 tensors with TF32 matmuls and convolutions on CUDA (10-bit mantissa
  products, fp32 accumulation): faster on Ampere and later GPUs, ~1e-3 relative error per
  product;
- ``"bf16-mixed"``: the network under ``torch.autocast(bfloat16)``
  (:class:`hierprior.em.estep.NetworkAutocast` for sampling, Lightning's ``bf16-mixed`` for
  training); everything outside autocast (sampler updates, forward models, CG/GMRES solves,
  optimiser) in plain fp32, TF32 off.

:func:`precision_scope` sets the TF32 flags for the duration of a step and restores them after,
so no step changes them for another and nothing turns TF32 on globally. On the CPU (or any
other device) the flags do not apply and nothing changes. A run records its precision in its
identity (``EStep.options()``, ``Monitor.options()``, ``NetworkMStep.options()``), so a run
directory made at one precision is never continued at another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["PRECISIONS", "check_precision", "lightning_precision", "precision_scope"]

#: the precisions of the steps that run a network (aliases: "32", 32, "bf16")
PRECISIONS = ("32-true", "tf32", "bf16-mixed")
_ALIASES = {"32": "32-true", 32: "32-true", "bf16": "bf16-mixed"}


def check_precision(value: object, owner: str) -> str:
    """The canonical precision name (:data:`PRECISIONS`), or a one-line ValueError."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = _ALIASES.get(value, value)
    if value not in PRECISIONS:
        raise ValueError(f"{owner} precision must be one of {list(PRECISIONS)}, got {value!r}")
    return str(value)


def lightning_precision(precision: object) -> object:
    """The precision to give a Lightning ``Trainer``: ``"tf32"`` is Lightning's ``"32-true"``
    (run inside :func:`precision_scope`, which turns TF32 on); any other value is Lightning's
    own and passes unchanged."""
    return "32-true" if precision == "tf32" else precision


@contextlib.contextmanager
def precision_scope(precision: object, device) -> Iterator[None]:
    """While inside, on CUDA: TF32 matmuls and cuDNN convolutions on for ``"tf32"`` and off
    for every other precision (``"32-true"``, ``"bf16-mixed"``, or a Lightning precision);
    the previous flags are restored on exit. On any other device nothing changes.

    Arguments:
        precision: a name of :data:`PRECISIONS` (or a Lightning precision).
        device: the device the step runs on (a ``torch.device`` or a string).
    """
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    on = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
