r"""Analytic lens mass components, batched per observation, with lenstronomy's conventions.

A mass model gives the deflection :math:`\boldsymbol\alpha(\boldsymbol\theta)` of the lens
equation :math:`\boldsymbol\beta = \boldsymbol\theta - \boldsymbol\alpha(\boldsymbol\theta)`
and the convergence :math:`\kappa(\boldsymbol\theta)` (surface density in units of the critical
density), with angles in arcsec. Parameter names and definitions follow lenstronomy
(``LensModel(["SIE", "SHEAR", "SIS", "POINT_MASS"])``), the field's reference lens-modelling
code, which the tests use as the oracle:

- :class:`SIE` (singular isothermal ellipsoid), ``SIE(theta_E, e1, e2, center_x, center_y)``
  with axis ratio :math:`q = (1 - |e|) / (1 + |e|)` and position angle
  :math:`\varphi = \tfrac12 \operatorname{atan2}(e_2, e_1)` of the major axis from +x. In the
  frame :math:`(x', y')` rotated by :math:`\varphi` about the centre,

  .. math:: \kappa = \frac{\theta_E}{2 \sqrt{q x'^2 + y'^2 / q}}, \qquad
      \alpha_{x'} = \frac{\theta_E \sqrt q}{\sqrt{1 - q^2}}
      \arctan\frac{\sqrt{1 - q^2}\, x'}{\psi}, \qquad
      \alpha_{y'} = \frac{\theta_E \sqrt q}{\sqrt{1 - q^2}}
      \operatorname{artanh}\frac{\sqrt{1 - q^2}\, y'}{\psi},

  with :math:`\psi = \sqrt{q^2 x'^2 + y'^2}` (Kormann et al. 1994; Keeton 2001), rotated back
  by :math:`\varphi`. The Einstein radius is the intermediate-axis one, as in lenstronomy. Near
  :math:`q = 1` the quotients use their series, so a round SIE equals the :class:`SIS`.
- :class:`Shear` (external shear, lenstronomy's ``SHEAR`` with its origin at 0):
  :math:`\alpha_x = \gamma_1 x + \gamma_2 y`, :math:`\alpha_y = \gamma_2 x - \gamma_1 y`,
  :math:`\kappa = 0`.
- :class:`SIS`: :math:`\boldsymbol\alpha = \theta_E\, \hat{\mathbf r}`,
  :math:`\kappa = \theta_E / 2r`.
- :class:`PointMass`: :math:`\boldsymbol\alpha = \theta_E^2\, \mathbf r / r^2`,
  :math:`\kappa = 0` away from the centre.

**Batching.** Every parameter is a float or a tensor with shape (N,), one value per
observation. With tensor parameters the model has ``num_obs = N`` and coordinates must have
shape (N, \*) (row i uses the parameters of observation i); with float parameters only it is
shared (``num_obs = None``) and takes coordinates of any shape. Components add
(``SIE(...) + Shear(...)``) into a :class:`MassSum` with the same methods, and a model over a
subset of observations is ``mass[idx]`` (as for every forward model). Computations run in the
coordinates' dtype and device; Python floats are stored in float64, so float64 coordinates
get float64 parameters. Parameters are buffers (``.to(device)`` moves them) and stay
differentiable when given as tensors that require gradients.

**Parameters at call time.** The maths of every component is a pure function of its
parameters, :meth:`MassModel.deflection_at` / :meth:`MassModel.convergence_at` (class methods
that take a mapping name -> tensor, broadcast against the coordinates, and the component's
static options, e.g. a multipole's order); a model instance holds one set of parameter values
and calls them, and :class:`~hierprior.physics.lensing.ParametricMass` evaluates a sum of
components at a parameter tensor (N, [S,] d) passed in, with gradients flowing to it
(:mod:`hierprior.physics.lensing.parametric`). Each class states its parameters' physical
range: ``positive`` names (> 0), and ``unit_disc`` pairs that must lie inside the unit disc
(an SIE's :math:`|(e_1, e_2)| < 1`); ``polar_pairs`` names the pairs a prior may give as a
magnitude and an angle (:mod:`hierprior.physics.lensing.priors`).

At the centre of a singular profile (:math:`r = 0`) the deflection is set to 0 and the
convergence is infinite.

References:
    Kormann, Schneider and Bartelmann (1994), Isothermal elliptical gravitational lens models,
    A&A 284, 285.
    Keeton (2001), A catalog of mass models for gravitational lensing, astro-ph/0102341.
    Birrer and Amara (2018), lenstronomy: multi-purpose gravitational lens modelling software
    package, Phys. Dark Universe 22, 189.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from hierprior.physics.forward import ObservationCount, observation_index

__all__ = ["MassModel", "MassSum", "PointMass", "SIE", "SIS", "Shear", "ellipticity"]

_TINY = 1e-30


def _as_parameter(value: object, name: str, positive: bool = False) -> Tensor:
    """A float -> 0-d float64 tensor; a tensor -> checked 0-d or (N,) floating tensor."""
    if isinstance(value, bool):
        raise TypeError(f"lens parameter {name} must be a float or a tensor; got a bool")
    if isinstance(value, (int, float)):
        t = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, Tensor):
        t = value if value.dtype.is_floating_point else value.to(torch.get_default_dtype())
        if t.dim() > 1:  # 0-d: shared (as a float), (N,): one per observation
            raise ValueError(
                f"lens parameter {name} must be a float or a tensor with shape (N,); "
                f"got shape {tuple(t.shape)}"
            )
    else:
        raise TypeError(f"lens parameter {name} must be a float or a tensor; got {value!r}")
    if not torch.isfinite(t.detach()).all():
        raise ValueError(f"lens parameter {name} is not finite: {value}")
    if positive and not (t.detach() > 0).all():
        raise ValueError(f"lens parameter {name} must be > 0; got {value}")
    return t


class MassModel(ObservationCount, nn.Module):
    """Base class of mass models: deflection and convergence at angular positions (arcsec).

    Subclasses declare their parameter names in ``parameter_names`` and implement
    :meth:`_deflection` and :meth:`_convergence` on coordinates broadcast against the
    parameters. A subclass whose ``_deflection`` is elementwise in (x, y), so that it also
    takes x and y with different but broadcastable shapes (x (1, 1, m), y (1, m, 1): a
    separable image grid), sets ``elementwise = True``; :class:`~hierprior.physics.lensing.
    Lensing` then ray-traces without materialising the full coordinate grids.
    """

    parameter_names: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    #: pairs of parameters that must lie inside the unit disc (an SIE's (e1, e2))
    unit_disc: tuple[tuple[str, str], ...] = ()
    #: pairs a prior may give as (magnitude, angle): name -> (first, second) parameter
    polar_pairs: dict[str, tuple[str, str]] = {}
    #: constructor arguments that are options, not parameters (a multipole's order m)
    static_names: tuple[str, ...] = ()
    elementwise: bool = False

    def __init__(self, **params: object):
        super().__init__()
        counts = {}
        for name in self.parameter_names:
            if name not in params:
                raise TypeError(f"{type(self).__name__} needs the parameter {name}")
            t = _as_parameter(params[name], name, positive=name in self.positive)
            if t.dim() == 1:
                counts[name] = t.shape[0]
            self.register_buffer(name, t)
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"{type(self).__name__} parameters disagree on the number of observations: "
                + ", ".join(f"{k} has {v}" for k, v in counts.items())
            )
        self.num_obs = next(iter(counts.values())) if counts else None

    # ------------------------------------------------------------------ pure maths
    @classmethod
    def deflection_at(
        cls, params: Mapping[str, Tensor], x: Tensor, y: Tensor, **static: object
    ) -> tuple[Tensor, Tensor]:
        r"""The deflection of this profile with parameters ``params`` at (x, y).

        Arguments:
            params: every name of ``parameter_names`` -> a tensor that broadcasts against x
                (e.g. (N, 1, 1) for coordinates (N, m, m)); gradients flow to them.
            x, y: angular positions [arcsec], broadcastable against each other (an
                ``elementwise`` class takes a separable grid x (…, 1, m), y (…, m, 1)).
            static: the class's ``static_names`` (e.g. ``m`` of a multipole).

        Returns:
            (alpha_x, alpha_y), with the broadcast shape. No checks: the callers
            (:meth:`deflection`, :class:`~hierprior.physics.lensing.ParametricMass`) make them.
        """
        raise NotImplementedError(f"{cls.__name__} does not implement deflection_at")

    @classmethod
    def convergence_at(
        cls, params: Mapping[str, Tensor], x: Tensor, y: Tensor, **static: object
    ) -> Tensor:
        """The convergence with parameters ``params`` at (x, y) (see :meth:`deflection_at`)."""
        raise NotImplementedError(f"{cls.__name__} does not implement convergence_at")

    @classmethod
    def prior(cls, label: str | None = None, **priors: object):
        """The prior of this component's parameters, for a lens population or a joint sampler:
        a :class:`~hierprior.physics.lensing.priors.ComponentPrior`.

        Arguments:
            label: the component's name in a sum (default: the class name, lower case).
            priors: one entry per parameter (a distribution of
                :mod:`hierprior.physics.lensing.priors`, or a number: fixed), or per polar pair
                (``polar_pairs``, e.g. ``ellipticity`` of an SIE), and the ``static_names``;
                a parameter left out keeps its constructor default (fixed).
        """
        from hierprior.physics.lensing.priors import ComponentPrior

        return ComponentPrior(cls, label=label, **priors)

    @classmethod
    def check_static(cls, **static: object) -> None:
        """Raises a one-line error for options that are not this class's ``static_names``
        (subclasses with options check their values too)."""
        unknown = sorted(set(static) - set(cls.static_names))
        missing = sorted(set(cls.static_names) - set(static))
        if unknown or missing:
            raise ValueError(
                f"{cls.__name__} takes the options {list(cls.static_names)} besides its "
                f"parameters {list(cls.parameter_names)}; "
                + (f"unknown: {unknown}" if unknown else f"missing: {missing}")
            )

    def static(self) -> dict:
        """The values of ``static_names`` of this instance (e.g. ``{"m": 4}``)."""
        return {name: getattr(self, name) for name in self.static_names}

    def params(self, like: Tensor) -> dict[str, Tensor]:
        """Every parameter in like's dtype/device, shaped to broadcast against like."""
        return {name: self._param(name, like) for name in self.parameter_names}

    # ------------------------------------------------------------------ public API
    def deflection(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""The deflection :math:`(\alpha_x, \alpha_y)` at (x, y), each with the shape of x.

        Arguments:
            x, y: angular positions in arcsec, with shape (N, \*) for a per-observation model
                or any shape for a shared one.
        """
        x, y = self._check_coordinates(x, y)
        return self._deflection(x, y)

    def convergence(self, x: Tensor, y: Tensor) -> Tensor:
        r"""The convergence :math:`\kappa` at (x, y), with the shape of x (see
        :meth:`deflection`)."""
        x, y = self._check_coordinates(x, y)
        return self._convergence(x, y)

    def grid_deflection(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        r"""The deflection on the regular grid of columns xs and rows ys.

        Arguments:
            xs: the column (x) coordinates of the grid [arcsec], shape (m_x,).
            ys: the row (y) coordinates of the grid [arcsec], shape (m_y,).

        Returns:
            (alpha_x, alpha_y), each (N, m_y, m_x) for a per-observation model, else
            (m_y, m_x), with ``alpha[..., i, j]`` the deflection at ``(xs[j], ys[i])``. They may
            be broadcast (read-only) views.

        An ``elementwise`` model is evaluated on the separable grid (x (…, 1, m_x), y
        (…, m_y, 1)) without materialising it; others on the full grid. Subclasses with a
        faster exact evaluation on regular grids (:class:`~hierprior.physics.lensing.
        PixelatedConvergence`: FFT) override it; :class:`~hierprior.physics.lensing.Lensing`
        ray-traces through it.
        """
        xs, ys = self._check_grid(xs, ys)
        lead = (1,) if self.num_obs is not None else ()
        shape = (*((self.num_obs,) if lead else ()), ys.shape[0], xs.shape[0])
        if self.elementwise:
            # x varies along columns only, y along rows only: the offsets from each lens
            # centre cost O(N m), not O(N m^2), before they broadcast
            ax, ay = self._deflection(xs.reshape(*lead, 1, -1), ys.reshape(*lead, -1, 1))
            return torch.broadcast_to(ax, shape), torch.broadcast_to(ay, shape)
        x, y = xs[None, :].expand(shape[-2:]), ys[:, None].expand(shape[-2:])
        return self.deflection(x.expand(shape), y.expand(shape))

    def ray_shoot(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""Source-plane positions :math:`\boldsymbol\beta = \boldsymbol\theta -
        \boldsymbol\alpha(\boldsymbol\theta)` of the image-plane positions (x, y)."""
        ax, ay = self.deflection(x, y)
        return x - ax, y - ay

    def __add__(self, other: MassModel) -> MassSum:
        if not isinstance(other, MassModel):
            return NotImplemented
        return MassSum(self, other)

    def __getitem__(self, idx: object) -> MassModel:
        """The model over a subset of observations; a shared model returns itself."""
        if self.num_obs is None:
            return self
        index = observation_index(idx, self.num_obs)
        params = {}
        for name in self.parameter_names:
            t = getattr(self, name)
            params[name] = t.index_select(0, index.to(t.device)) if t.dim() == 1 else t
        return self._rebuild(params)

    def _rebuild(self, params: dict[str, Tensor]) -> MassModel:
        """A model of this type with the given parameters (subclasses with other constructor
        arguments, e.g. a multipole's order, override it)."""
        return type(self)(**params)

    def extra_repr(self) -> str:
        parts = []
        for name in self.parameter_names:
            t = getattr(self, name)
            parts.append(f"{name}={float(t):.4g}" if t.dim() == 0 else f"{name}=({len(t)},)")
        return ", ".join(parts)

    # ------------------------------------------------------------------ helpers
    def _check_coordinates(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating torch.Tensor; got {type(t).__name__}")
        if x.shape != y.shape:
            raise ValueError(
                f"x and y must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if self.num_obs is not None and (x.dim() < 1 or x.shape[0] != self.num_obs):
            raise ValueError(
                f"{type(self).__name__} has {self.num_obs} observations: coordinates must have "
                f"shape (N, *) with N = {self.num_obs}; got {tuple(x.shape)}"
            )
        return x, y

    @staticmethod
    def _check_grid(xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        for name, t in (("xs", xs), ("ys", ys)):
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating torch.Tensor; got {type(t).__name__}")
            if t.dim() != 1 or t.shape[0] < 1:
                raise ValueError(f"{name} must have shape (m,), m >= 1; got {tuple(t.shape)}")
        if xs.dtype != ys.dtype or xs.device != ys.device:
            raise ValueError(
                f"xs and ys must share dtype and device; got {xs.dtype} on {xs.device} and "
                f"{ys.dtype} on {ys.device}"
            )
        return xs, ys

    def _param(self, name: str, like: Tensor) -> Tensor:
        """Parameter ``name`` in like's dtype/device, shaped to broadcast against like."""
        t = getattr(self, name).to(dtype=like.dtype, device=like.device)
        if t.dim() == 1:
            t = t.reshape(-1, *([1] * (like.dim() - 1)))
        return t

    def _deflection(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.deflection_at(self.params(x), x, y, **self.static())

    def _convergence(self, x: Tensor, y: Tensor) -> Tensor:
        return self.convergence_at(self.params(x), x, y, **self.static())


class MassSum(MassModel):
    """The sum of mass models (deflections and convergences add).

    Arguments:
        components: the mass models; per-observation members must agree on N.
    """

    def __init__(self, *components: MassModel):
        nn.Module.__init__(self)
        flat: list[MassModel] = []
        for c in components:
            if not isinstance(c, MassModel):
                raise TypeError(f"a mass model can only add mass models; got {type(c).__name__}")
            flat.extend(c.components if isinstance(c, MassSum) else [c])
        if not flat:
            raise ValueError("MassSum needs at least one component")
        counts = {c.num_obs for c in flat if c.num_obs is not None}
        if len(counts) > 1:
            raise ValueError(f"mass components disagree on the number of observations: {counts}")
        self.num_obs = counts.pop() if counts else None
        self.components = nn.ModuleList(flat)
        self.elementwise = all(c.elementwise for c in flat)

    def __getitem__(self, idx: object) -> MassModel:
        if self.num_obs is None:
            return self
        index = observation_index(idx, self.num_obs)
        return MassSum(*(c[index] for c in self.components))

    def _deflection(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        ax, ay = self.components[0]._deflection(x, y)
        for c in self.components[1:]:
            dx, dy = c._deflection(x, y)
            ax, ay = ax + dx, ay + dy
        return ax, ay

    def _convergence(self, x: Tensor, y: Tensor) -> Tensor:
        return sum((c._convergence(x, y) for c in self.components), torch.zeros_like(x))

    def grid_deflection(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        """The deflection on a regular grid (see :meth:`MassModel.grid_deflection`): one
        separable evaluation when every component is elementwise, else the sum of the
        components' own grid deflections (each on its fastest path)."""
        if self.elementwise:
            return super().grid_deflection(xs, ys)
        xs, ys = self._check_grid(xs, ys)
        ax, ay = self.components[0].grid_deflection(xs, ys)
        for c in self.components[1:]:
            dx, dy = c.grid_deflection(xs, ys)
            ax, ay = ax + dx, ay + dy
        shape = (*(() if self.num_obs is None else (self.num_obs,)), ys.shape[0], xs.shape[0])
        return torch.broadcast_to(ax, shape), torch.broadcast_to(ay, shape)

    def extra_repr(self) -> str:
        return ""


def _over_t(fn, sign: float, t: Tensor, z: Tensor) -> Tensor:
    """fn(t z) / t for fn = atan (sign -1) or artanh (sign +1), with the series
    z (1 + sign t^2 z^2 / 3) where t < 1e-3 (a round lens)."""
    small = t < 1e-3
    safe = torch.where(small, torch.ones_like(t), t)
    return torch.where(small, z * (1 + sign * (t * z) ** 2 / 3), fn(safe * z) / safe)


def _atan_over(t: Tensor, z: Tensor) -> Tensor:
    """atan(t z) / t (series near t = 0)."""
    return _over_t(torch.atan, -1.0, t, z)


def _atanh_over(t: Tensor, z: Tensor) -> Tensor:
    """artanh(t z) / t (series near t = 0)."""
    return _over_t(torch.atanh, 1.0, t, z)


def _offsets(p: Mapping[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(x - center_x, y - center_y), for profiles with a centre."""
    return x - p["center_x"], y - p["center_y"]


class SIE(MassModel):
    r"""Singular isothermal ellipsoid (lenstronomy ``SIE``; see the module docstring).

    Arguments:
        theta_E: Einstein radius [arcsec], > 0.
        e1, e2: ellipticity components, :math:`|e| < 1`.
        center_x, center_y: the lens centre [arcsec].
    """

    elementwise = True
    parameter_names = ("theta_E", "e1", "e2", "center_x", "center_y")
    positive = ("theta_E",)
    unit_disc = (("e1", "e2"),)
    polar_pairs = {"ellipticity": ("e1", "e2")}

    def __init__(
        self,
        theta_E: float | Tensor,
        e1: float | Tensor,
        e2: float | Tensor,
        center_x: float | Tensor = 0.0,
        center_y: float | Tensor = 0.0,
    ):
        super().__init__(theta_E=theta_E, e1=e1, e2=e2, center_x=center_x, center_y=center_y)
        e = torch.hypot(self.e1.detach(), self.e2.detach())
        if not (e < 1).all():
            raise ValueError(f"SIE ellipticity |e| = sqrt(e1^2 + e2^2) must be < 1; got {e}")

    @staticmethod
    def _frame(p: Mapping[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        """Rotated offsets (x', y'), cos/sin of the position angle, and q."""
        e1, e2 = p["e1"], p["e2"]
        e = torch.hypot(e1, e2)
        q = (1 - e) / (1 + e)
        phi = 0.5 * torch.atan2(e2, e1)
        c, s = torch.cos(phi), torch.sin(phi)
        dx, dy = _offsets(p, x, y)
        return torch.addcmul(c * dx, s, dy), torch.addcmul(c * dy, -s, dx), c, s, q

    @classmethod
    def deflection_at(cls, params, x, y, **static):
        xr, yr, c, s, q = cls._frame(params, x, y)
        psi = torch.hypot(q * xr, yr).clamp_min(_TINY)
        t = torch.sqrt((1 - q**2).clamp_min(0))  # one value per observation
        b = params["theta_E"] * torch.sqrt(q)
        if bool((t < 1e-3).any()):  # a (nearly) round lens: the series branches
            axr = b * _atan_over(t, xr / psi)
            ayr = b * _atanh_over(t, yr / psi)
            return c * axr - s * ayr, s * axr + c * ayr
        # the common case, with as few full-size operations as possible (ray tracing's cost):
        # atan(t x'/psi) = atan2(t x', psi) as psi > 0; b / t and the rotation per observation
        f = b / t
        u = torch.atan2(t * xr, psi)
        v = torch.atanh(t * yr / psi)
        return torch.addcmul((-s * f) * v, c * f, u), torch.addcmul((c * f) * v, s * f, u)

    @classmethod
    def convergence_at(cls, params, x, y, **static):
        xr, yr, _, _, q = cls._frame(params, x, y)
        return params["theta_E"] / (2 * torch.sqrt(q * xr**2 + yr**2 / q))


class _CentredProfile(MassModel):
    """A circular profile with an Einstein radius and a centre (SIS, PointMass)."""

    elementwise = True
    parameter_names = ("theta_E", "center_x", "center_y")
    positive = ("theta_E",)

    def __init__(
        self,
        theta_E: float | Tensor,
        center_x: float | Tensor = 0.0,
        center_y: float | Tensor = 0.0,
    ):
        super().__init__(theta_E=theta_E, center_x=center_x, center_y=center_y)


class SIS(_CentredProfile):
    r"""Singular isothermal sphere (lenstronomy ``SIS``).

    Arguments:
        theta_E: Einstein radius [arcsec], > 0.
        center_x, center_y: the lens centre [arcsec].
    """

    @classmethod
    def deflection_at(cls, params, x, y, **static):
        dx, dy = _offsets(params, x, y)
        scale = params["theta_E"] / torch.hypot(dx, dy).clamp_min(_TINY)
        return scale * dx, scale * dy

    @classmethod
    def convergence_at(cls, params, x, y, **static):
        dx, dy = _offsets(params, x, y)
        return params["theta_E"] / (2 * torch.hypot(dx, dy))


class PointMass(_CentredProfile):
    r"""Point mass (lenstronomy ``POINT_MASS``): :math:`\boldsymbol\alpha = \theta_E^2
    \mathbf r / r^2`.

    Arguments:
        theta_E: Einstein radius [arcsec], > 0.
        center_x, center_y: the position of the mass [arcsec].
    """

    @classmethod
    def deflection_at(cls, params, x, y, **static):
        dx, dy = _offsets(params, x, y)
        scale = params["theta_E"] ** 2 / (dx**2 + dy**2).clamp_min(_TINY)
        return scale * dx, scale * dy

    @classmethod
    def convergence_at(cls, params, x, y, **static):
        return torch.zeros_like(torch.broadcast_tensors(x, y, params["theta_E"])[0])


class Shear(MassModel):
    r"""External shear (lenstronomy ``SHEAR``, origin at 0): :math:`\alpha_x = \gamma_1 x +
    \gamma_2 y`, :math:`\alpha_y = \gamma_2 x - \gamma_1 y`.

    Arguments:
        gamma1, gamma2: the shear components.
    """

    elementwise = True
    parameter_names = ("gamma1", "gamma2")
    polar_pairs = {"shear": ("gamma1", "gamma2")}

    def __init__(self, gamma1: float | Tensor, gamma2: float | Tensor):
        super().__init__(gamma1=gamma1, gamma2=gamma2)

    @classmethod
    def deflection_at(cls, params, x, y, **static):
        g1, g2 = params["gamma1"], params["gamma2"]
        return g1 * x + g2 * y, g2 * x - g1 * y

    @classmethod
    def convergence_at(cls, params, x, y, **static):
        return torch.zeros_like(torch.broadcast_tensors(x, y, params["gamma1"])[0])


# radians <-> lenstronomy ellipticity, for users converting from (q, phi)
def ellipticity(q: float | Tensor, phi: float | Tensor) -> tuple:
    r"""(e1, e2) of an axis ratio q and position angle phi [rad]:
    :math:`e = (1 - q) / (1 + q)`, :math:`(e_1, e_2) = e (\cos 2\varphi, \sin 2\varphi)`."""
    if isinstance(q, Tensor) or isinstance(phi, Tensor):
        e = (1 - torch.as_tensor(q)) / (1 + torch.as_tensor(q))
        return e * torch.cos(2 * torch.as_tensor(phi)), e * torch.sin(2 * torch.as_tensor(phi))
    e = (1 - q) / (1 + q)
    return e * math.cos(2 * phi), e * math.sin(2 * phi)
