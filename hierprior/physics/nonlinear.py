r"""Generic differentiable non-linear forward model :math:`y = f(x; \eta_i)`.

:class:`NonLinear` wraps a user callable ``fn`` (a simulator such as a lensing ray-tracer) and
optional per-observation parameters :math:`\eta_i` (a dict of tensors with leading dim N). It
follows the conventions of :class:`~hierprior.physics.forward.ForwardModel`: x with shape
(N, [S,] *input_shape), row i evaluated with :math:`\eta_i`, broadcast over the S samples.

Its linearisation at x is the Jacobian :math:`J_x = \partial f / \partial x`:

- :meth:`~hierprior.physics.forward.ForwardModel.vjp` returns :math:`J_x^\top u` by reverse-mode
  AD (``torch.func.vjp``);
- :meth:`~hierprior.physics.forward.ForwardModel.jvp` returns :math:`J_x v` by forward-mode AD
  (``torch.func.jvp``), or, with ``forward_ad=False``, by the double-VJP identity
  :math:`J v = \nabla_u \langle J^\top u, v \rangle`, which needs only reverse mode (use it when
  ``fn`` calls operations without forward-mode derivatives, e.g. ``F.grid_sample``).

References:
    Chung et al. (2023), Diffusion Posterior Sampling for General Noisy Inverse Problems,
    arXiv 2209.14687.
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712 (linearisation of the MMPS likelihood).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from hierprior.physics.forward import ForwardModel

__all__ = ["NonLinear"]


class NonLinear(ForwardModel):
    r"""Forward model :math:`y = f(x; \eta_i)` defined by a differentiable callable.

    Arguments:
        fn: the simulator. With ``batched=True`` (default) it is called as ``fn(x)`` (shared) or
            ``fn(x, params)`` with x of shape (B, *input_shape) and params a dict of tensors
            with leading dim B (row b holds the parameters of x[b]), and must return
            (B, *output_shape). With ``batched=False`` it is written for one example,
            ``fn(x)`` / ``fn(x, params)`` with x of shape input_shape and params of one
            observation, and is vectorised with ``torch.func.vmap``. An ``nn.Module`` fn is
            registered as a submodule (moved by ``.to``).
        input_shape: event shape of x.
        output_shape: event shape of y.
        params: optional per-observation parameters, a dict of tensors with the same leading
            dim N (sliced by ``model[idx]``); None for a shared model.
        batched: whether fn handles a batch (see fn).
        forward_ad: compute :meth:`jvp` by forward-mode AD (True) or by a double VJP (False).
    """

    linear = False

    def __init__(
        self,
        fn: Callable[..., Tensor],
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        params: Mapping[str, Tensor] | None = None,
        batched: bool = True,
        forward_ad: bool = True,
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        num_obs = None
        if params is not None:
            if not isinstance(params, Mapping) or len(params) == 0:
                raise TypeError("params must be a non-empty dict of tensors (or None)")
            for name, value in params.items():
                if not isinstance(name, str) or not name.isidentifier():
                    raise ValueError(f"params keys must be identifiers; got {name!r}")
                if not isinstance(value, Tensor) or value.dim() < 1:
                    raise ValueError(
                        f"params[{name!r}] must be a tensor with a leading observation dim"
                    )
                if num_obs is None:
                    num_obs = value.shape[0]
                elif value.shape[0] != num_obs:
                    raise ValueError(
                        f"params disagree on the number of observations: params[{name!r}] has "
                        f"{value.shape[0]}, expected {num_obs}"
                    )
        super().__init__(input_shape, output_shape, num_obs)
        self.fn = fn
        self.batched = bool(batched)
        self.forward_ad = bool(forward_ad)
        self._param_names = tuple(params) if params is not None else ()
        for name in self._param_names:
            self.register_buffer(f"param_{name}", params[name])

    @property
    def params(self) -> dict[str, Tensor] | None:
        """The per-observation parameters (leading dim N), or None for a shared model."""
        if not self._param_names:
            return None
        return {name: getattr(self, f"param_{name}") for name in self._param_names}

    def _forward(self, x: Tensor) -> Tensor:
        N, S = x.shape[:2]
        flat = x.reshape(N * S, *self.input_shape)
        fn = self.fn if self.batched else torch.func.vmap(self.fn)
        params = self.params
        if params is None:
            y = fn(flat)
        else:
            rows = {
                k: v.unsqueeze(1).expand(N, S, *v.shape[1:]).reshape(N * S, *v.shape[1:])
                for k, v in params.items()
            }
            y = fn(flat, rows)
        if not isinstance(y, Tensor) or tuple(y.shape) != (N * S, *self.output_shape):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"fn returned {got}; expected shape {(N * S, *self.output_shape)} "
                "(batch, *output_shape)"
            )
        return y.reshape(N, S, *self.output_shape)

    def _jvp(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.forward_ad:
            return torch.func.jvp(self._forward, (x,), (v,))
        y, pullback = torch.func.vjp(self._forward, x)
        # u -> J^T u is linear, so its own VJP with cotangent v is J v (at any u)
        _, pullback_t = torch.func.vjp(lambda u: pullback(u)[0], torch.zeros_like(y))
        return y, pullback_t(v)[0]

    def _select(self, index: Tensor) -> NonLinear:
        params = {k: v.index_select(0, index.to(v.device)) for k, v in self.params.items()}
        return NonLinear(
            self.fn,
            self.input_shape,
            self.output_shape,
            params,
            batched=self.batched,
            forward_ad=self.forward_ad,
        )

    def extra_repr(self) -> str:
        names = ", ".join(self._param_names)
        return super().extra_repr() + (f", params=[{names}]" if names else "")
