r"""A caustics lensing simulator as a hierprior forward model (source image in, image out).

`caustics <https://github.com/Ciela-Institute/caustics>`_ (Stone et al. 2024) builds
differentiable strong-lensing simulators from caskade modules: a ``LensSource`` simulator with a
``Pixelated`` source maps the source image and the lens parameters to a lensed image. Its
parameters are either *static* (fixed values) or *dynamic* (given at each call, in the order
of ``simulator.dynamic_params``, printed by ``simulator.param_order()``).

:func:`caustics_forward_model` takes such a simulator whose dynamic parameters are the source
image and, per observation :math:`i`, the other parameters :math:`\eta_i` (lens parameters,
PSF, ...), and returns a :class:`CausticsForwardModel`: a per-observation
:class:`~hierprior.physics.NonLinear` model :math:`x \mapsto f(x; \eta_i)` with

- input: the source image, shape (N, [S,] 1, h_s, w_s) (``input_shape`` changes the event
  shape, e.g. ``(h_s * w_s,)`` for a prior over flat vectors);
- output: the lensed image, shape (N, [S,] 1, H, W);
- row i evaluated with :math:`\eta_i` (broadcast over the S posterior samples), by
  ``torch.func.vmap`` of the simulator over the rows (caustics' simulators take one example);
- :meth:`~hierprior.physics.ForwardModel.vjp` by reverse-mode AD and
  :meth:`~hierprior.physics.ForwardModel.jvp` by forward-mode AD (caustics' bilinear
  interpolation is written with gathers, not ``grid_sample``, so forward mode works and is
  about 1.2x faster than the double-VJP fallback, ``forward_ad=False``);
- ``linear=True`` declares the simulator linear in the source (true for a lensed
  ``Pixelated`` source without lens light): then :math:`J = A`, ``jvp`` is a forward call,
  the adjoint is the VJP at zero, and the methods that need a linear model (``"exact"``,
  DAPS' exact likelihood step, TDS' ΠGDM twist) accept it.

The parameters :math:`\eta` may be given as a tensor (N, P) (the flat caustics parameter
vector without the source image's entries), a list of tensors (N, \*shape) in
``simulator.dynamic_params`` order (image left out), or a dict keyed by ``"module.param"``
(e.g. ``"sie.Rein"``) or by the bare parameter name when it is unique. Keyed input is safer:
a caustics redshift left as None becomes a dynamic parameter and shifts the flat vector.

Device and dtype: ``model.to(...)`` (or ``.double()``, ``.cuda()``) moves the stored
parameters and the simulator (``simulator.to(device=..., dtype=...)``; the simulator object is
shared by ``model[idx]`` subsets, so moving one moves it for all). Build float64 simulators
from tensors, not Python floats, or move them after construction.

References:
    Stone et al. (2024), Caustics: A Python Package for Accelerated Strong Gravitational
    Lensing Simulations, JOSS 9(103), 7081.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hierprior.checks import check_shape
from hierprior.physics.nonlinear import NonLinear

__all__ = ["CausticsForwardModel", "caustics_forward_model"]

INSTALL_HINT = (
    "the caustics interop needs the optional dependency caustics: pip install caustics "
    "(tested with 1.7.1), or hierprior's dev extra: pip install -e '.[dev]'"
)


def _require_caustics() -> Any:
    try:
        import caustics
    except ImportError as err:  # pragma: no cover - exercised only without caustics
        raise ImportError(INSTALL_HINT) from err
    return caustics


def _size2(size: object, name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    shape = check_shape(size, name)
    if len(shape) != 2:
        raise ValueError(f"{name} must be an int or (rows, columns); got {size!r}")
    return shape


def _param_key(param: Any) -> str:
    """``"module.param"``: the name caskade's ``param_order()`` prints for a parameter."""
    parents = getattr(param, "parents", ())
    owner = next(iter(parents)).name if parents else "?"
    return f"{owner}.{param.name}"


def _shape_matches(declared: Sequence[int | None], got: Sequence[int]) -> bool:
    return len(declared) == len(got) and all(d is None or d == g for d, g in zip(declared, got))


def _simulator_placement(simulator: Any) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the simulator's first floating-point parameter value."""
    for param in tuple(simulator.static_params) + tuple(simulator.dynamic_params):
        try:
            value = param.value
        except Exception:  # a pointer whose inputs are unset
            continue
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.device, value.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _static_digest(simulator: Any) -> Tensor:
    """The static parameter values, flattened into one float64 vector (for fingerprints)."""
    values = []
    for param in simulator.static_params:
        value = param.value
        if isinstance(value, Tensor) and not value.is_complex():
            values.append(value.detach().reshape(-1).to("cpu", torch.float64))
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


class _CausticsCall:
    """fn(x, rows) for one example: the source image x and the parameters of its row."""

    def __init__(
        self,
        simulator: Any,
        image_index: int,
        keys: tuple[str, ...],
        source_hw: tuple[int, int],
        output_shape: tuple[int, ...],
    ):
        self.simulator = simulator
        self.image_index = image_index
        self.keys = keys
        self.source_hw = source_hw
        self.output_shape = output_shape

    def __call__(self, x: Tensor, rows: Mapping[str, Tensor] | None = None) -> Tensor:
        values = [rows[k] for k in self.keys] if rows is not None else []
        values.insert(self.image_index, x.reshape(self.source_hw))
        return self.simulator(params=values).reshape(self.output_shape)


class CausticsForwardModel(NonLinear):
    r"""A caustics simulator as a per-observation forward model (see the module docstring).

    Build it with :func:`caustics_forward_model`. Attributes besides
    :class:`~hierprior.physics.NonLinear`'s: ``simulator`` (the caustics module), ``image_param``
    (its source-image parameter), ``param_keys`` (the keys of the per-observation parameters,
    ``"module.param"``, in the simulator's order), ``source_size`` and ``image_size`` (rows,
    columns).
    """

    def __init__(
        self,
        simulator: Any,
        image_param: Any,
        params: dict[str, Tensor] | None,
        param_keys: tuple[str, ...],
        source_size: tuple[int, int],
        image_size: tuple[int, int],
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        linear: bool = False,
        forward_ad: bool = True,
    ):
        dynamic = tuple(simulator.dynamic_params)
        image_index = next(i for i, p in enumerate(dynamic) if p is image_param)
        internal = tuple(f"p{k}" for k in range(len(param_keys)))
        fn = _CausticsCall(simulator, image_index, internal, source_size, output_shape)
        super().__init__(
            fn,
            input_shape,
            output_shape,
            params,
            batched=False,
            forward_ad=forward_ad,
        )
        self.simulator = simulator
        self.image_param = image_param
        self.param_keys = param_keys
        self.source_size = source_size
        self.image_size = image_size
        self.linear = bool(linear)
        # part of Population.fingerprint(): a run directory refuses a changed PSF, redshift...
        self.register_buffer("simulator_static", _static_digest(simulator))

    @property
    def named_params(self) -> dict[str, Tensor] | None:
        """The per-observation parameters keyed by ``"module.param"`` (None when shared)."""
        params = self.params
        if params is None:
            return None
        return {key: params[f"p{k}"] for k, key in enumerate(self.param_keys)}

    def _select(self, index: Tensor) -> CausticsForwardModel:
        params = {k: v.index_select(0, index.to(v.device)) for k, v in self.params.items()}
        return CausticsForwardModel(
            self.simulator,
            self.image_param,
            params,
            self.param_keys,
            self.source_size,
            self.image_size,
            self.input_shape,
            self.output_shape,
            linear=self.linear,
            forward_ad=self.forward_ad,
        )

    def _apply(self, fn: Any, recurse: bool = True) -> CausticsForwardModel:
        out = super()._apply(fn, recurse)
        simulator = self.__dict__.get("simulator")
        if simulator is not None:
            device, dtype = _simulator_placement(simulator)
            probe = fn(torch.zeros((), dtype=dtype, device=device))
            if isinstance(probe, Tensor) and (probe.device, probe.dtype) != (device, dtype):
                simulator.to(device=probe.device, dtype=probe.dtype)
        return out

    def extra_repr(self) -> str:
        keys = ", ".join(self.param_keys)
        return (
            f"input_shape={self.input_shape}, output_shape={self.output_shape}, "
            f"num_obs={self.num_obs}, params=[{keys}], linear={self.linear}"
        )


def _find_image_param(caustics: Any, simulator: Any, image_param: Any, source_hw) -> Any:
    dynamic = tuple(simulator.dynamic_params)
    if image_param is None:
        found = [p for p in dynamic if _shape_matches(tuple(p.shape), source_hw)]
        if len(found) != 1:
            names = [_param_key(p) for p in found] or "none"
            raise ValueError(
                f"cannot tell the source image among the simulator's dynamic parameters "
                f"(2-d parameters of shape {source_hw}: {names}); pass image_param= (the "
                "Pixelated source or its .image parameter)"
            )
        return found[0]
    if isinstance(image_param, caustics.Pixelated):
        image_param = image_param.image
    if not any(p is image_param for p in dynamic):
        raise ValueError(
            "image_param is not a dynamic parameter of the simulator: leave the Pixelated "
            "source's image as None (dynamic) when building it"
        )
    if not _shape_matches(tuple(image_param.shape), source_hw):
        raise ValueError(
            f"the source image parameter has shape {tuple(image_param.shape)}, but "
            f"source_size is {source_hw}"
        )
    return image_param


def _as_param_tensor(value: object, key: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"parameter {key!r} must be a tensor with shape (N, ...); got {value!r}")
    if not value.is_floating_point():
        value = value.to(torch.get_default_dtype())
    if value.dim() < 1:
        raise ValueError(f"parameter {key!r} needs a leading observation dim; got a 0-d tensor")
    return value


def _collect_params(params: object, others: tuple[Any, ...], keys: tuple[str, ...]):
    """The per-observation values of ``others`` as a tuple of tensors (N, *shape)."""
    expected = ", ".join(keys)
    if isinstance(params, Tensor):
        if params.dim() != 2:
            raise ValueError(
                f"a flat parameter tensor must have shape (N, P); got {tuple(params.shape)}"
            )
        sizes = []
        for p, key in zip(others, keys):
            if any(d is None for d in p.shape):
                raise ValueError(f"{key} has no fixed shape: pass the parameters as a dict")
            sizes.append(max(1, math.prod(p.shape)))
        if params.shape[1] != sum(sizes):
            raise ValueError(
                f"the flat parameter tensor has {params.shape[1]} columns, but the simulator's "
                f"dynamic parameters other than the source image take {sum(sizes)} "
                f"({expected})"
            )
        params = _as_param_tensor(params, "params")
        chunks = params.split(sizes, dim=1)
        return tuple(c.reshape(params.shape[0], *p.shape) for c, p in zip(chunks, others))
    if isinstance(params, Mapping):
        names = [p.name for p in others]
        lookup = {}
        for key, name in zip(keys, names):
            lookup[key] = key
            if names.count(name) == 1:
                lookup[name] = key
        values = {}
        for k, v in params.items():
            if k not in lookup:
                raise ValueError(f"unknown parameter {k!r}; the simulator expects {expected}")
            if lookup[k] in values:
                raise ValueError(f"parameter {lookup[k]!r} is given twice")
            values[lookup[k]] = _as_param_tensor(v, k)
        missing = [k for k in keys if k not in values]
        if missing:
            raise ValueError(f"missing parameter(s) {missing}; the simulator expects {expected}")
        return tuple(values[k] for k in keys)
    if isinstance(params, Sequence) and not isinstance(params, str):
        if len(params) != len(others):
            raise ValueError(
                f"got {len(params)} parameter tensors, but the simulator's dynamic parameters "
                f"other than the source image are {len(others)}: {expected}"
            )
        return tuple(_as_param_tensor(v, k) for v, k in zip(params, keys))
    raise TypeError(
        f"params must be a tensor (N, P), a list of tensors or a dict; got {type(params).__name__}"
    )


def caustics_forward_model(
    simulator: Any,
    params: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None,
    source_size: int | tuple[int, int],
    image_size: int | tuple[int, int],
    *,
    image_param: Any = None,
    input_shape: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    linear: bool = False,
    forward_ad: bool = True,
) -> CausticsForwardModel:
    r"""Wraps a caustics simulator as a hierprior forward model: source image in, image out.

    Arguments:
        simulator: a caustics (caskade) module called as ``simulator(params=[...])`` that
            returns an image with shape image_size, e.g. ``caustics.LensSource`` with a
            ``caustics.Pixelated`` source whose ``image`` is dynamic (None). Its other dynamic
            parameters are the per-observation ``params``.
        params: the per-observation values :math:`\eta_i` of the simulator's dynamic
            parameters other than the source image: a tensor (N, P) laid out like caustics'
            flat parameter vector without the image's entries, a list of tensors
            (N, \*shape) in ``simulator.dynamic_params`` order, or a dict of tensors
            (N, \*shape) keyed by ``"module.param"`` (as ``simulator.param_order()`` prints
            them) or by a unique parameter name. None when the image is the only dynamic
            parameter: the model is then shared (any number of leading batch dims).
        source_size: the source image size, an int or (rows, columns).
        image_size: the simulated image size, an int or (rows, columns).
        image_param: the source image parameter (the ``Pixelated`` source or its ``.image``);
            default: the only dynamic 2-d parameter with shape source_size.
        input_shape: event shape of x (default (1, rows, columns)); any shape with as many
            entries, e.g. (rows * columns,) for a prior over flat vectors.
        output_shape: event shape of y (default (1, H, W)); any shape with H W entries.
        linear: declare the simulator linear in the source image (a lensed ``Pixelated``
            source without lens light is): jvp becomes a forward call and the methods that need
            a linear model accept it. Not checked: a wrong declaration gives wrong posteriors.
        forward_ad: compute Jacobian-vector products by forward-mode AD (default; works for
            caustics' gather-based interpolation) or by a double VJP (``False``), for
            simulators with operations that lack forward-mode derivatives.

    Returns:
        A :class:`CausticsForwardModel` (a :class:`~hierprior.physics.NonLinear`) with
        ``num_obs = N``, mapping x with shape (N, [S,] \*input_shape) to y with shape
        (N, [S,] \*output_shape).

    Raises:
        ImportError: caustics is not installed.
        TypeError, ValueError: parameters that do not match the simulator (the message lists
            the expected ``"module.param"`` keys in order).
    """
    caustics = _require_caustics()
    if not callable(simulator) or not hasattr(simulator, "dynamic_params"):
        raise TypeError(
            f"simulator must be a caustics/caskade Module; got {type(simulator).__name__}"
        )
    if len(getattr(simulator, "dynamic_param_groups", ())) > 1:
        raise ValueError("simulators with several dynamic parameter groups are not supported")
    source_hw = _size2(source_size, "source_size")
    image_hw = _size2(image_size, "image_size")
    image = _find_image_param(caustics, simulator, image_param, source_hw)
    others = tuple(p for p in simulator.dynamic_params if p is not image)
    keys = tuple(_param_key(p) for p in others)
    if len(set(keys)) != len(keys):
        raise ValueError(f"the simulator's parameter keys are not unique: {keys}; rename modules")

    in_shape = check_shape(input_shape or (1, *source_hw), "input_shape")
    out_shape = check_shape(output_shape or (1, *image_hw), "output_shape")
    if math.prod(in_shape) != math.prod(source_hw):
        raise ValueError(f"input_shape {in_shape} does not hold a {source_hw} source image")
    if math.prod(out_shape) != math.prod(image_hw):
        raise ValueError(f"output_shape {out_shape} does not hold a {image_hw} image")

    if not others:
        if params is not None:
            raise ValueError(
                "the source image is the simulator's only dynamic parameter: "
                "pass params=None (a shared model)"
            )
        stored = None
    else:
        if params is None:
            raise ValueError(f"params is None, but the simulator expects {', '.join(keys)}")
        values = _collect_params(params, others, keys)
        for value, p, key in zip(values, others, keys):
            if not _shape_matches(tuple(p.shape), tuple(value.shape[1:])):
                raise ValueError(
                    f"parameter {key!r} must have shape (N, *{tuple(p.shape)}); "
                    f"got {tuple(value.shape)}"
                )
        stored = {f"p{k}": v for k, v in enumerate(values)}
    model = CausticsForwardModel(
        simulator,
        image,
        stored,
        keys,
        source_hw,
        image_hw,
        in_shape,
        out_shape,
        linear=linear,
        forward_ad=forward_ad,
    )
    _check_output(model, image_hw)
    return model


def _check_output(model: CausticsForwardModel, image_hw: tuple[int, int]) -> None:
    """One call on row 0 (a zero source) so that a wrong image_size fails here, clearly."""
    device, dtype = _simulator_placement(model.simulator)
    x = torch.zeros(model.source_size, dtype=dtype, device=device)
    params = model.params
    values = [] if params is None else [v[0].to(device) for v in params.values()]
    values.insert(model.fn.image_index, x)
    with torch.no_grad():
        y = model.simulator(params=values)
    if (
        not isinstance(y, Tensor)
        or tuple(y.shape[-2:]) != image_hw
        or y.numel() != math.prod(image_hw)
    ):
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"the simulator returns {got}, not an image of size {image_hw}")
