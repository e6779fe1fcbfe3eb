r"""Mass models with their parameters passed at call time: one family, any parameter tensor.

A :class:`ParametricMass` is a sum of analytic components (``ParametricMass(SIE, Shear)``)
whose parameters are not stored but passed in, as a tensor :math:`\eta` with shape
(\*lead, d): (d,) for one lens, (N, d) for one lens per observation, (N, S, d) for S lenses per
observation (posterior samples), with the d parameters in the order of :attr:`ParametricMass.
names` (lenstronomy's names: ``theta_E, e1, e2, center_x, center_y, gamma1, gamma2`` for
SIE + SHEAR). The deflection, convergence and ray shooting are the components' pure class
methods (:meth:`~hierprior.physics.lensing.MassModel.deflection_at`) evaluated at those
values, so gradients flow to :math:`\eta` (MCMC on lens parameters, fitting) and
``torch.func`` transforms apply. The same family serves fixed lenses (:meth:`ParametricMass.
fixed` returns today's ``SIE(...) + Shear(...)`` instance at given values, and
:meth:`ParametricMass.parameters_of` reads them back), sampled lenses and populations
(:mod:`hierprior.physics.lensing.priors` puts a prior on every name).

**Coordinates** broadcast against the parameters' leading shape: with :math:`\eta` of shape
(\*lead, d), x and y have shape (\*lead, \*points) or any shape that broadcasts against it
(e.g. (1, 1, m) and (1, m, 1): a separable grid, :meth:`ParametricMass.grid_deflection`);
each parameter is reshaped to (\*lead, 1, ..., 1).

**Names.** A parameter's name is its component's name for it when no other component has the
same name, else ``<label>.<name>`` with the component's label (its class name in lower case,
numbered when a class appears twice: ``sis``, ``sis_2``). Components with options that are
not parameters (a multipole's order) are given as :class:`Component` (``Component(Multipole,
m=4)``).

References:
    Birrer and Amara (2018), lenstronomy, Phys. Dark Universe 22, 189 (one parameter
    vocabulary: ``kwargs_lens``).
    Stone et al. (2024), caustics: A Python Package for Accelerated Strong Gravitational
    Lensing Simulations, JOSS 9, 7081 (pure functions with parameters as inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierprior.physics.lensing.mass import MassModel, MassSum

__all__ = ["Component", "ParametricMass"]


class Component:
    """One analytic mass component of a :class:`ParametricMass`: its class, its options that
    are not parameters (``static_names``, e.g. a multipole's ``m``) and its label.

    Arguments:
        model: a :class:`~hierprior.physics.lensing.MassModel` subclass with pure class
            methods (every analytic component: SIE, Shear, SIS, PointMass, PseudoJaffe,
            Multipole).
        label: its name in a sum (default: the class name in lower case).
        static: the class's ``static_names``.
    """

    def __init__(self, model: type[MassModel], label: str | None = None, **static: object):
        if not (isinstance(model, type) and issubclass(model, MassModel)):
            raise TypeError(f"a mass component must be a MassModel subclass; got {model!r}")
        if model.deflection_at.__func__ is MassModel.deflection_at.__func__:
            raise TypeError(
                f"{model.__name__} has no pure deflection_at: it cannot take its parameters at "
                "call time (a pixelated convergence is a fixed map; add it to a fixed model)"
            )
        model.check_static(**static)
        if label is not None and (not isinstance(label, str) or not label):
            raise ValueError(f"a component label must be a non-empty string; got {label!r}")
        self.model = model
        self.label = label or model.__name__.lower()
        self.static = dict(static)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return self.model.parameter_names

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.static.items())
        return f"Component({self.model.__name__}, label={self.label!r}{opts})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Component) and (self.model, self.label, self.static) == (
            other.model,
            other.label,
            other.static,
        )

    def __hash__(self) -> int:
        return hash((self.model, self.label, tuple(sorted(self.static.items()))))


def _component(c: object) -> Component:
    if isinstance(c, Component):
        return c
    component = getattr(c, "component", None)  # a ComponentPrior
    if isinstance(component, Component):
        return component
    return Component(c)


class ParametricMass:
    r"""A sum of analytic mass components evaluated at parameters passed in (see the module
    docstring).

    Arguments:
        components: :class:`~hierprior.physics.lensing.MassModel` subclasses (``SIE``,
            ``Shear``, ...) or :class:`Component` objects, in order.

    Attributes:
        names: the d parameter names, in the order of the last axis of a parameter tensor.
        components: the :class:`Component` objects.
    """

    def __init__(self, *components: type[MassModel] | Component):
        if not components:
            raise ValueError("ParametricMass needs at least one component")
        comps = []
        seen: dict[str, int] = {}
        for c in map(_component, components):
            # unique labels: a label appearing again is numbered (sis, sis_2)
            seen[c.label] = seen.get(c.label, 0) + 1
            if seen[c.label] > 1:
                c = Component(c.model, f"{c.label}_{seen[c.label]}", **c.static)
            comps.append(c)
        labels = [c.label for c in comps]
        if len(set(labels)) != len(labels):
            raise ValueError(f"mass component labels must be unique; got {labels}")
        counts: dict[str, int] = {}
        for c in comps:
            for n in c.parameter_names:
                counts[n] = counts.get(n, 0) + 1
        names, slots = [], []
        for c in comps:
            own = []
            for n in c.parameter_names:
                names.append(n if counts[n] == 1 else f"{c.label}.{n}")
                own.append((n, len(names) - 1))
            slots.append(own)
        self.components = comps
        self.names: tuple[str, ...] = tuple(names)
        self._slots = slots

    @property
    def dim(self) -> int:
        """d, the number of parameters."""
        return len(self.names)

    def index(self, name: str) -> int:
        """The position of parameter ``name`` on the last axis (a one-line error if unknown)."""
        if name not in self.names:
            raise ValueError(f"unknown lens parameter {name!r}; this family has {self.names}")
        return self.names.index(name)

    def __repr__(self) -> str:
        return f"ParametricMass({', '.join(c.model.__name__ for c in self.components)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParametricMass) and self.components == other.components

    def __hash__(self) -> int:
        return hash(tuple(self.components))

    # ------------------------------------------------------------------ shapes
    def _check_params(self, params: Tensor) -> Tensor:
        if not isinstance(params, Tensor) or not params.dtype.is_floating_point:
            raise TypeError(
                f"lens parameters must be a floating tensor (*lead, {self.dim}); got "
                f"{type(params).__name__}"
            )
        if params.dim() < 1 or params.shape[-1] != self.dim:
            raise ValueError(
                f"lens parameters must have shape (*lead, d) with d = {self.dim} ({self.names});"
                f" got {tuple(params.shape)}"
            )
        return params

    def _split(self, params: Tensor, like: Tensor) -> list[dict[str, Tensor]]:
        """Per component: name -> parameter, (*lead, 1, ..., 1) against coordinates like."""
        lead = params.shape[:-1]
        extra = like.dim() - len(lead)
        if extra < 0:
            raise ValueError(
                f"coordinates with shape {tuple(like.shape)} cannot broadcast against lens "
                f"parameters with leading shape {tuple(lead)}: give (*lead, *points)"
            )
        p = params.to(dtype=like.dtype, device=like.device)
        shape = (*lead, *([1] * extra))
        return [{n: p[..., j].reshape(shape) for n, j in slots} for slots in self._slots]

    def _coordinates(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating torch.Tensor; got {type(t).__name__}")
        try:
            torch.broadcast_shapes(x.shape, y.shape)
        except RuntimeError:
            raise ValueError(
                f"x and y must broadcast; got {tuple(x.shape)} and {tuple(y.shape)}"
            ) from None
        return x, y

    # ------------------------------------------------------------------ maths
    def deflection(self, params: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""The deflection :math:`(\alpha_x, \alpha_y)` at (x, y) of the lenses ``params``.

        Arguments:
            params: (\*lead, d) parameters (gradients flow to them).
            x, y: positions [arcsec], (\*lead, \*points) or broadcastable against it.

        Returns:
            (alpha_x, alpha_y), each with the broadcast shape, in x's dtype and device.
        """
        params = self._check_params(params)
        x, y = self._coordinates(x, y)
        like = x if x.dim() >= y.dim() else y
        ax = ay = None
        for c, p in zip(self.components, self._split(params, like)):
            dx, dy = c.model.deflection_at(p, x, y, **c.static)
            ax, ay = (dx, dy) if ax is None else (ax + dx, ay + dy)
        return ax, ay

    def convergence(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        r"""The convergence :math:`\kappa` at (x, y) of the lenses ``params`` (see
        :meth:`deflection`)."""
        params = self._check_params(params)
        x, y = self._coordinates(x, y)
        like = x if x.dim() >= y.dim() else y
        out = None
        for c, p in zip(self.components, self._split(params, like)):
            k = c.model.convergence_at(p, x, y, **c.static)
            out = k if out is None else out + k
        return out

    def ray_shoot(self, params: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""Source-plane positions :math:`\boldsymbol\beta = \boldsymbol\theta -
        \boldsymbol\alpha(\boldsymbol\theta)` of (x, y) (see :meth:`deflection`)."""
        ax, ay = self.deflection(params, x, y)
        return x - ax, y - ay

    def grid_deflection(self, params: Tensor, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        r"""The deflection on the regular grid of columns xs (m_x,) and rows ys (m_y,):
        (alpha_x, alpha_y), each (\*lead, m_y, m_x), ``alpha[..., i, j]`` at (xs[j], ys[i]),
        evaluated on the separable grid (x varies along columns only, y along rows only)."""
        params = self._check_params(params)
        MassModel._check_grid(xs, ys)
        lead = (1,) * (params.dim() - 1)
        shape = (*params.shape[:-1], ys.shape[0], xs.shape[0])
        ax, ay = self.deflection(params, xs.reshape(*lead, 1, -1), ys.reshape(*lead, -1, 1))
        return torch.broadcast_to(ax, shape), torch.broadcast_to(ay, shape)

    # ------------------------------------------------------------------ fixed lenses
    def fixed(self, params: Tensor) -> MassModel:
        """Today's fixed-lens model at these values: ``SIE(...) + Shear(...)`` with tensor
        parameters (N,) for params (N, d) (leading axes flattened: (N, S, d) gives N·S
        lenses), or 0-d (shared) for params (d,). Checked like any fixed lens (θ_E > 0,
        \\|e\\| < 1, finite); gradients flow to ``params``."""
        params = self._check_params(params)
        flat = params.reshape(-1, self.dim) if params.dim() > 1 else params
        parts = []
        for c, slots in zip(self.components, self._slots):
            kwargs = {n: flat[..., j] for n, j in slots}
            parts.append(c.model(**c.static, **kwargs))
        return parts[0] if len(parts) == 1 else MassSum(*parts)

    def parameters_of(self, mass: MassModel) -> Tensor:
        """The parameter tensor (N, d) (or (d,) for a shared model) of a fixed model made of
        this family's components in order (e.g. ``fixed(params)``'s inverse)."""
        parts = list(mass.components) if isinstance(mass, MassSum) else [mass]
        if len(parts) != len(self.components) or any(
            type(p) is not c.model or p.static() != c.static
            for p, c in zip(parts, self.components)
        ):
            raise ValueError(
                f"the mass model {type(mass).__name__} is not made of this family's components "
                f"{[c.model.__name__ for c in self.components]}"
            )
        values = [getattr(p, n) for p, slots in zip(parts, self._slots) for n, _ in slots]
        n = {v.shape[0] for v in values if v.dim() == 1}
        if not n:
            return torch.stack(values)
        return torch.stack([v.expand(n.pop()) if v.dim() == 0 else v for v in values], dim=-1)

    # ------------------------------------------------------------------ checks
    def outside_physical_range(self, params: Tensor) -> list[str]:
        """One line per parameter set (row of the flattened leading axes) outside the
        components' physical range (non-finite, a ``positive`` one <= 0, a ``unit_disc`` pair
        with norm >= 1), e.g. ``"row 3: theta_E = -0.1 must be > 0"``; [] when all are
        inside."""
        params = self._check_params(params).detach()
        flat = params.reshape(-1, self.dim)
        lines = []
        bad = ~torch.isfinite(flat)
        for row in bad.any(1).nonzero().flatten().tolist():
            names = [self.names[j] for j in bad[row].nonzero().flatten().tolist()]
            lines.append(f"row {row}: {', '.join(names)} not finite")
        for c, slots in zip(self.components, self._slots):
            pos = dict(slots)
            for n in c.model.positive:
                j = pos[n]
                for row in (flat[:, j] <= 0).nonzero().flatten().tolist():
                    lines.append(
                        f"row {row}: {self.names[j]} = {float(flat[row, j]):.4g} must be > 0"
                    )
            for a, b in c.model.unit_disc:
                ja, jb = pos[a], pos[b]
                norm = torch.hypot(flat[:, ja], flat[:, jb])
                for row in (norm >= 1).nonzero().flatten().tolist():
                    lines.append(
                        f"row {row}: |({self.names[ja]}, {self.names[jb]})| = "
                        f"{float(norm[row]):.4g} must be < 1"
                    )
        return lines
