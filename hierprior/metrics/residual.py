r"""Reduced chi2 of data residuals.

For an observation y with noise standard deviation :math:`\sigma` and a prediction
:math:`\hat y = A(\hat x)` (e.g. the forward model applied to a posterior sample),

.. math:: \chi^2_\nu = \frac{1}{M} \sum_{m=1}^{M} \left(\frac{y_m - \hat y_m}{\sigma_m}\right)^2,

with M the number of measured values per observation. When only some entries carry data (an
inpainting mask: missing entries hold 0 or pure noise), pass ``observed``: the sum and M then
run over the observed entries only; averaging over all entries instead would report
:math:`(1 - f) + f \chi^2_{\nu,\mathrm{obs}}` for an observed fraction f. For Gaussian noise
and the true signal,
:math:`M \chi^2_\nu \sim \chi^2(M)`, so :math:`\chi^2_\nu \approx 1 \pm \sqrt{2/M}`; values well
above 1 flag under-fitting (or misspecification), well below 1 over-fitting. (Strictly the
degrees of freedom are M minus the effective number of fitted parameters; with a prior over a
high-dimensional x there is no simple count, so M is used.)

References:
    Bevington & Robinson (2003), "Data Reduction and Error Analysis for the Physical
    Sciences", ch. 11; Barco et al. (2024), arXiv 2407.17667 (residual checks of posteriors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.checks import check_int, check_tensor

__all__ = ["residual_chi2"]


def residual_chi2(
    y: Tensor,
    y_pred: Tensor,
    sigma: float | Tensor,
    batch_dims: int = 1,
    observed: Tensor | None = None,
) -> Tensor:
    """Reduced chi2 per observation, sum of squared normalised residuals over M values.

    Args:
        y: Observations, with shape (N, *obs); or (N, S, *obs) (or (N, 1, *obs)) with
            ``batch_dims=2`` to score S predictions per observation.
        y_pred: Predictions, with the same number of dims as y and a shape broadcastable
            with it, e.g. (N, *obs), or (N, S, *obs) with ``batch_dims=2``.
        sigma: Noise standard deviation, a positive float or a tensor broadcastable to the
            broadcast shape of y and y_pred (e.g. (N, 1, *obs) per observation with
            ``batch_dims=2``).
        batch_dims: Number of leading dims that index observations (kept); all trailing dims
            are measured values (M = their product).
        observed: Optional boolean tensor broadcastable to the broadcast shape of y and
            y_pred, True where an entry carries data (e.g. ``Mask.observed``); M is then the
            number of observed entries of each row (every row needs at least one).

    Returns:
        The reduced chi2, with shape equal to the first ``batch_dims`` dims of the broadcast
        shape, e.g. (N,) or (N, S).

    Example:
        >>> y = torch.zeros(4, 16)
        >>> residual_chi2(y, y + 0.2, sigma=0.1)
        tensor([4., 4., 4., 4.])
    """
    for name, value in (("y", y), ("y_pred", y_pred)):
        check_tensor(value, name, floating=True, finite=True)
    check_int(batch_dims, "batch_dims")
    if y.ndim != y_pred.ndim:
        raise ValueError(
            f"y and y_pred must have the same number of dims, got shapes {tuple(y.shape)} and "
            f"{tuple(y_pred.shape)}"
        )
    try:
        shape = torch.broadcast_shapes(y.shape, y_pred.shape)
    except RuntimeError as err:
        raise ValueError(
            f"y {tuple(y.shape)} and y_pred {tuple(y_pred.shape)} do not broadcast"
        ) from err
    if len(shape) < batch_dims:
        raise ValueError(f"batch_dims={batch_dims} exceeds the number of dims of y ({y.ndim})")
    if isinstance(sigma, Tensor):
        if not bool(torch.isfinite(sigma).all()) or not bool((sigma > 0).all()):
            raise ValueError("sigma must be finite and positive everywhere")
        try:
            torch.broadcast_shapes(sigma.shape, shape)
        except RuntimeError as err:
            raise ValueError(
                f"sigma {tuple(sigma.shape)} does not broadcast to {tuple(shape)}"
            ) from err
        if torch.broadcast_shapes(sigma.shape, shape) != shape:
            raise ValueError(f"sigma {tuple(sigma.shape)} would enlarge the shape {tuple(shape)}")
    elif isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be finite and positive, got {sigma}")
    else:
        raise TypeError(f"sigma must be a float or a torch.Tensor, got {type(sigma)}")
    z2 = ((y - y_pred) / sigma).expand(shape).square().reshape(*shape[:batch_dims], -1)
    if observed is None:
        return z2.sum(-1) / math.prod(shape[batch_dims:])
    if not isinstance(observed, Tensor) or observed.dtype != torch.bool:
        raise TypeError("observed must be a boolean tensor")
    try:
        keep = observed.to(z2.device).expand(shape).reshape(z2.shape)
    except RuntimeError as err:
        raise ValueError(
            f"observed {tuple(observed.shape)} does not broadcast to {tuple(shape)}"
        ) from err
    m = keep.sum(-1)
    if bool((m == 0).any()):
        raise ValueError("some rows have no observed entry; their chi2 is undefined")
    return torch.where(keep, z2, torch.zeros_like(z2)).sum(-1) / m
