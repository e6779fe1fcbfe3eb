r"""Forward models: the map from a signal to its noiseless observation.

A population holds :math:`N` observations :math:`y_i = A_i(x_i) + n_i`. A
:class:`ForwardModel` represents the maps :math:`A_1, \dots, A_N` together:

- *per-observation* models (``num_obs = N``) hold one set of parameters per observation
  (a matrix, a mask, a PSF) and are applied to tensors with shape (N, *input_shape) or
  (N, S, *input_shape), where row :math:`i` uses the parameters of observation :math:`i`,
  broadcast over the :math:`S` posterior samples of that observation;
- *shared* models (``num_obs = None``) apply the same map to any number of leading batch dims.

Linear models (``linear = True``) also provide the adjoint :math:`A^\top`, characterised by
:math:`\langle A x, y \rangle = \langle x, A^\top y \rangle` for every :math:`x, y`. Every model
provides its linearisation through :meth:`ForwardModel.jvp` (returns :math:`(A(x), J_x v)`) and
:meth:`ForwardModel.vjp` (returns :math:`(A(x), J_x^\top u)`); for a linear model
:math:`J_x = A`. Subsets of observations are taken with ``model[idx]``, the same way as for the
observations themselves, so that ``model[idx](x[idx]) == model(x)[idx]``.

Subclasses implement :meth:`ForwardModel._forward` (and, for linear models, optionally an
explicit :meth:`ForwardModel._adjoint`) on tensors with shape (N, S, *input_shape); the base
class handles the shape conventions, the checks and the default linearisations (``torch.func``
JVP/VJP, and the adjoint as the VJP at zero).

This module holds the base class, :class:`Identity` and :class:`Compose`; the concrete linear
models live in :mod:`hierprior.physics.linear` and the generic non-linear model in
:mod:`hierprior.physics.nonlinear`.

References:
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712.
    Barco et al. (2024), Tackling the Problem of Distributional Shifts: Correcting Misspecified,
    High-Dimensional Data-Driven Priors for Inverse Problems, arXiv 2407.17667.
"""

from __future__ import annotations

import abc
import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hierprior.checks import check_optional_int, check_shape, check_tensor

__all__ = ["ForwardModel", "Identity", "Compose", "observation_index"]


def observation_index(idx: object, num_obs: int) -> Tensor:
    """Normalises an observation selector to a 1-D LongTensor of indices (on the CPU).

    Arguments:
        idx: an int (kept as a length-1 selection, like ``idx:idx + 1``), a slice, a list or
            tuple of ints or of bools, or a 1-D integer or boolean tensor (or array). Negative
            integers count from the end; a boolean selector must have length ``num_obs``.
        num_obs: the number of observations N being indexed.

    Returns:
        The selected indices, with shape (K,), K >= 1, each in [0, N).
    """
    if isinstance(idx, bool):
        raise TypeError("an observation index cannot be a bool; use a boolean list or tensor")
    if isinstance(idx, slice):
        index = torch.arange(num_obs)[idx]
    else:
        if isinstance(idx, Tensor):
            index = idx.detach().cpu()
        elif isinstance(idx, (list, tuple)):
            index = torch.as_tensor(idx) if len(idx) > 0 else torch.zeros(0, dtype=torch.long)
        elif hasattr(idx, "__array__"):
            index = torch.as_tensor(idx)
        else:
            try:
                index = torch.tensor(operator.index(idx))
            except TypeError:
                raise TypeError(
                    "observation index must be an int, slice, list, or 1-D integer/bool "
                    f"tensor; got {type(idx).__name__}"
                ) from None
        if index.dim() == 0:
            if index.dtype == torch.bool:
                raise TypeError("an observation index cannot be a 0-d bool tensor")
            index = index.reshape(1)
        if index.dim() != 1:
            raise ValueError(f"observation index must be 1-D; got shape {tuple(index.shape)}")
        if index.dtype == torch.bool:
            if index.numel() != num_obs:
                raise ValueError(
                    f"boolean observation index has length {index.numel()}, expected {num_obs}"
                )
            index = index.nonzero().flatten()
        elif index.dtype.is_floating_point or index.dtype.is_complex:
            raise TypeError(f"observation index must be integer or bool; got {index.dtype}")
        index = index.long()
        if index.numel() > 0 and (index.min() < -num_obs or index.max() >= num_obs):
            raise IndexError(f"observation index out of range for {num_obs} observations")
        index = torch.where(index < 0, index + num_obs, index)
    if index.numel() == 0:
        raise ValueError("observation index selects no observations")
    return index


class ObservationCount:
    """``len()`` = num_obs for per-observation models; shared ones (num_obs None) have none."""

    num_obs: int | None

    def __bool__(self) -> bool:
        return True  # len() raises for shared models; truth tests must not

    def __len__(self) -> int:
        if self.num_obs is None:
            raise TypeError(
                f"{type(self).__name__} is shared (num_obs is None) and has no length; "
                "check its num_obs instead"
            )
        return self.num_obs


class ForwardModel(ObservationCount, nn.Module, abc.ABC):
    r"""Base class of forward models :math:`x \mapsto A_i(x)` for N observations (or shared).

    Attributes:
        input_shape: event shape of a signal x, e.g. (D,) or (C, H, W).
        output_shape: event shape of an observation y, e.g. (M,) or (C, H', W').
        num_obs: number of observations N this model has parameters for, or None for a shared
            model that applies to any batch.
        linear: whether A is linear (then :meth:`adjoint` is available).

    Shapes: :meth:`forward` maps x with shape (N, *input_shape) or (N, S, *input_shape) to
    (N, *output_shape) or (N, S, *output_shape); for a shared model any leading dims are
    allowed (none included) and are kept.
    """

    linear: bool = False

    def __init__(
        self,
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        num_obs: int | None = None,
    ):
        super().__init__()
        self.input_shape = check_shape(input_shape, "input_shape")
        self.output_shape = check_shape(output_shape, "output_shape")
        self.num_obs = check_optional_int(num_obs, "num_obs")

    @property
    def shared(self) -> bool:
        """True when one map applies to every observation (``num_obs is None``)."""
        return self.num_obs is None

    @property
    def observed(self) -> Tensor | None:
        """Which output entries carry data: a boolean tensor broadcastable to (N, *output_shape)
        (per observation) or output_shape (shared), or None when every entry does.

        Metrics such as the residual chi2 count observed entries only.
        """
        return None

    def extra_repr(self) -> str:
        return (
            f"input_shape={self.input_shape}, output_shape={self.output_shape}, "
            f"num_obs={self.num_obs}"
        )

    # ----------------------------------------------------------------- shape handling
    def _batch(self, t: Tensor, event: tuple[int, ...], name: str) -> tuple[Tensor, tuple]:
        """Reshapes t (*lead, *event) to (N, S, *event); returns it and lead."""
        check_tensor(t, name)
        k = len(event)
        if t.dim() < k or tuple(t.shape[t.dim() - k :]) != event:
            raise ValueError(
                f"{type(self).__name__}: {name} must end with the event shape {event}; "
                f"got shape {tuple(t.shape)}"
            )
        lead = tuple(t.shape[: t.dim() - k])
        if self.num_obs is None:
            return t.reshape(1, math.prod(lead), *event), lead
        if len(lead) not in (1, 2) or lead[0] != self.num_obs:
            raise ValueError(
                f"{type(self).__name__} has {self.num_obs} observations: {name} must have "
                f"shape (N, *{event}) or (N, S, *{event}) with N = {self.num_obs}; "
                f"got shape {tuple(t.shape)}"
            )
        return (t.unsqueeze(1) if len(lead) == 1 else t), lead

    def _check_like(self, t: Tensor, shape: tuple[int, ...], name: str) -> None:
        check_tensor(t, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")

    # ----------------------------------------------------------------- public maps
    def forward(self, x: Tensor) -> Tensor:
        """A(x): x with shape (N, [S,] *input_shape) -> y with shape (N, [S,] *output_shape)."""
        xb, lead = self._batch(x, self.input_shape, "x")
        return self._forward(xb).reshape(*lead, *self.output_shape)

    def adjoint(self, y: Tensor) -> Tensor:
        """A^T y (linear models): y (N, [S,] *output_shape) -> x (N, [S,] *input_shape)."""
        if not self.linear:
            raise TypeError(
                f"{type(self).__name__} is not linear and has no adjoint; use vjp(x, u)"
            )
        yb, lead = self._batch(y, self.output_shape, "y")
        return self._adjoint(yb).reshape(*lead, *self.input_shape)

    def jvp(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`(A(x), J_x v)`.

        Arguments:
            x: linearisation point, with shape (N, [S,] *input_shape).
            v: tangent, with the shape of x.

        Returns:
            Two tensors with shape (N, [S,] *output_shape).
        """
        xb, lead = self._batch(x, self.input_shape, "x")
        self._check_like(v, tuple(x.shape), "v")
        if self.linear:
            y, jv = self._forward(xb), self._forward(v.reshape(xb.shape))
        else:
            y, jv = self._jvp(xb, v.reshape(xb.shape))
        out = (*lead, *self.output_shape)
        return y.reshape(out), jv.reshape(out)

    def vjp(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`(A(x), J_x^\top u)`.

        Arguments:
            x: linearisation point, with shape (N, [S,] *input_shape).
            u: cotangent, with shape (N, [S,] *output_shape) (the leading dims of x).

        Returns:
            A(x), with shape (N, [S,] *output_shape), and :math:`J_x^\top u`, with the shape of x.
        """
        xb, lead = self._batch(x, self.input_shape, "x")
        self._check_like(u, (*lead, *self.output_shape), "u")
        ub = u.reshape(*xb.shape[:2], *self.output_shape)
        if self.linear:
            y, jtu = self._forward(xb), self._adjoint(ub)
        else:
            y, jtu = self._vjp(xb, ub)
        return y.reshape(*lead, *self.output_shape), jtu.reshape(x.shape)

    def __getitem__(self, idx: object) -> ForwardModel:
        """The model over a subset of observations (see :func:`observation_index`).

        An int keeps a length-1 observation axis. A shared model returns itself.
        """
        if self.num_obs is None:
            return self
        return self._select(observation_index(idx, self.num_obs))

    # ----------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def _forward(self, x: Tensor) -> Tensor:
        """A on x with shape (N, S, *input_shape) -> (N, S, *output_shape).

        N equals num_obs for per-observation models; shared models accept any N.
        """

    def _adjoint(self, y: Tensor) -> Tensor:
        """A^T on y with shape (N, S, *output_shape); default: the VJP of A at zero."""
        x0 = y.new_zeros(*y.shape[:2], *self.input_shape)
        _, pullback = torch.func.vjp(self._forward, x0)
        return pullback(y)[0]

    def _jvp(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(A(x), J v) on tensors with shape (N, S, *input_shape); default: forward-mode AD."""
        return torch.func.jvp(self._forward, (x,), (v,))

    def _vjp(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """(A(x), J^T u) on (N, S, *input_shape) and (N, S, *output_shape); reverse-mode AD."""
        y, pullback = torch.func.vjp(self._forward, x)
        return y, pullback(u)[0]

    def _select(self, index: Tensor) -> ForwardModel:
        """The model over observations ``index`` (a 1-D LongTensor); per-observation models."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _select")


class Identity(ForwardModel):
    """The identity map y = x (shared), e.g. for denoising problems.

    Arguments:
        input_shape: event shape of x (and y).
    """

    linear = True

    def __init__(self, input_shape: Sequence[int]):
        super().__init__(input_shape, input_shape, None)

    def _forward(self, x: Tensor) -> Tensor:
        return x

    def _adjoint(self, y: Tensor) -> Tensor:
        return y


class Compose(ForwardModel):
    r"""The composition :math:`A = A_K \circ \dots \circ A_1` of forward models.

    ``Compose(blur, mask)`` applies ``blur`` first, then ``mask``. Per-observation members must
    agree on the number of observations; shared members are broadcast. The composition is linear
    when every member is, with adjoint :math:`A_1^\top \cdots A_K^\top`.

    Arguments:
        models: the forward models, in the order they are applied.
    """

    def __init__(self, *models: ForwardModel):
        if len(models) == 0:
            raise ValueError("Compose needs at least one forward model")
        for i, m in enumerate(models):
            if not isinstance(m, ForwardModel):
                raise TypeError(f"Compose member {i} is not a ForwardModel: {type(m).__name__}")
        for i, (a, b) in enumerate(zip(models[:-1], models[1:])):
            if a.output_shape != b.input_shape:
                raise ValueError(
                    f"Compose members {i} and {i + 1} do not chain: output_shape "
                    f"{a.output_shape} != input_shape {b.input_shape}"
                )
        counts = {m.num_obs for m in models if m.num_obs is not None}
        if len(counts) > 1:
            raise ValueError(f"Compose members disagree on num_obs: {sorted(counts)}")
        num_obs = counts.pop() if counts else None
        super().__init__(models[0].input_shape, models[-1].output_shape, num_obs)
        self.models = nn.ModuleList(models)
        self.linear = all(m.linear for m in models)

    def _forward(self, x: Tensor) -> Tensor:
        for m in self.models:
            x = m._forward(x)
        return x

    def _adjoint(self, y: Tensor) -> Tensor:
        for m in reversed(self.models):
            y = m._adjoint(y)
        return y

    @property
    def observed(self) -> Tensor | None:
        """The last member's observed entries (earlier members act before it)."""
        return self.models[-1].observed

    def _select(self, index: Tensor) -> Compose:
        return Compose(*(m[index] for m in self.models))
