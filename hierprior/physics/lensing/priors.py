r"""Priors on lens parameters: per-parameter distributions, unconstrained transforms, sampling.

A lens population (and the prior of a joint sampler over lens parameters) is declared, not
coded: a list of mass components, each with one distribution per parameter (lenstronomy's
names), e.g. in a config::

    _target_: hierprior.physics.lensing.LensPrior
    components:
      - _target_: hierprior.physics.lensing.SIE.prior
        theta_E: {_target_: hierprior.physics.lensing.Uniform, low: 0.9, high: 1.3}
        e1: {_target_: hierprior.physics.lensing.TruncatedNormal, loc: 0, scale: 0.15,
             low: -0.4, high: 0.4}
        ...
      - _target_: hierprior.physics.lensing.Shear.prior
        gamma1: ...

A new mass model is one class (with pure ``deflection_at`` / ``convergence_at``) and one such
config. :class:`LensPrior` is the joint prior :math:`p(\eta) = \prod_j p_j(\eta_j)` over the
family's parameters (:class:`~hierprior.physics.lensing.ParametricMass`), in the order of
its names; the same object draws a population's true lenses and is the prior of the joint
source + lens sampler (:mod:`hierprior.posterior.joint`).

**Distributions** (each a :class:`ParameterPrior`, with its log density, its support and a
smooth bijection to an unconstrained variable z with the log-Jacobian
:math:`\log |d\eta / dz|`):

======================================  ==================================  ==================
prior                                   support                             unconstrained z
======================================  ==================================  ==================
``Uniform(low, high)``                  (low, high)                         logit of the
                                                                            fraction
``Normal(loc, scale)``                  R                                   (η − loc) / scale
``LogNormal(loc, scale)``               (0, ∞), :math:`\log\eta \sim        (log η − loc) /
                                        N(loc, scale)`                      scale
``TruncatedNormal(loc, scale, low,      (low, high), either bound may be    logit (two bounds),
high)``                                 None                                log (one), affine
``Fixed(value)``                        {value}                             none (not sampled)
``AxisRatioAngle(axis_ratio, angle)``   a pair (e1, e2): axis ratio q ~     disc map
                                        U(a, b), position angle ~ U(0, π),
                                        :math:`|e| = (1 - q)/(1 + q)`
``MagnitudeAngle(magnitude)``           a pair (γ1, γ2): :math:`|\gamma|    disc map
                                        \sim U(a, b)`, angle ~ U(0, π)
======================================  ==================================  ==================

The pair priors are the polar draws of :class:`~hierprior.populations.RandomLens` (given under
the pair's name, ``ellipticity`` of an SIE, ``shear`` of a Shear). Their density in
:math:`(e_1, e_2)` is :math:`p_r(r) / (2\pi r)` (r the norm, the angle 2φ uniform), which is
singular at r = 0 when the radius range starts at 0; their unconstrained map is the disc map
:math:`(e_1, e_2) = R \tanh|z|\, z/|z|` onto the disc of the largest radius R, with
:math:`\log|J| = \log(R\,\mathrm{sech}^2|z|) + \log(R \tanh|z| / |z|)` (an inner hole, a
smallest radius > 0, has density 0). Per-parameter priors are the better choice for MCMC.

**Drawing.** :meth:`LensPrior.sample` maps uniform numbers by each prior's inverse CDF: one
uniform column per parameter (two per pair, (magnitude, angle)), in the order of the names,
a fixed parameter consuming its column too, so fixing one parameter leaves the others' draws
unchanged.

**Checks** (one line each, when the prior is built or before sampling): an unknown parameter
name, a prior whose support leaves the physical range of its parameter (θ_E must be > 0, an
SIE's :math:`|(e_1, e_2)|` < 1: a Normal θ_E, or a box of (e1, e2) whose corner lies outside
the unit disc, are refused), and, for given lens parameters, values outside the prior's
support, named by observation (:meth:`LensPrior.check`).

References:
    Carpenter et al. (2017), Stan: A Probabilistic Programming Language, J. Stat. Softw. 76
    (unconstrained parametrisations with their log-Jacobians).
    Birrer and Amara (2018), lenstronomy, Phys. Dark Universe 22, 189 (parameter names, polar
    ellipticity).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hierprior.physics.lensing.mass import MassModel, ellipticity
from hierprior.physics.lensing.parametric import Component, ParametricMass

__all__ = [
    "AxisRatioAngle",
    "ComponentPrior",
    "Fixed",
    "LensPrior",
    "LogNormal",
    "MagnitudeAngle",
    "Normal",
    "ParameterPrior",
    "TruncatedNormal",
    "Uniform",
]

_LOG_2PI = math.log(2 * math.pi)


def _number(value: object, name: str, owner: str, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner} {name} must be a number; got {value!r}")
    value = float(value)
    if math.isnan(value) or (not allow_inf and not math.isfinite(value)):
        raise ValueError(f"{owner} {name} must be finite; got {value!r}")
    return value


def _pair(value: object, name: str, owner: str) -> tuple[float, float]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{owner} {name} must be a pair (low, high); got {value!r}") from None
    a, b = _number(a, name, owner), _number(b, name, owner)
    if not a <= b:
        raise ValueError(f"{owner} {name} must satisfy low <= high; got {value!r}")
    return a, b


def _log_sigmoid_jacobian(z: Tensor) -> Tensor:
    """log(s (1 - s)) for s = sigmoid(z), stable for large |z|."""
    return -torch.nn.functional.softplus(z) - torch.nn.functional.softplus(-z)


class ParameterPrior:
    """Base class of the priors on one parameter (``dim = 1``) or a pair (``dim = 2``).

    Subclasses implement :meth:`from_uniform` (the inverse CDF), :meth:`log_prob`,
    :meth:`box` (a box containing the support), :meth:`inside`, :meth:`to_unconstrained` and
    :meth:`from_unconstrained`; values have shape (..., dim), unconstrained variables
    (..., zdim).
    """

    dim: int = 1
    #: uniform numbers consumed per draw
    columns: int = 1
    #: whether the parameter is sampled (Fixed: no)
    free: bool = True
    #: whether it has a density (and a transform) for samplers; a pair with a fixed norm
    #: (a = b) is for drawing only
    has_density: bool = True

    @property
    def zdim(self) -> int:
        """Unconstrained dimensions (dim, or 0 for a fixed parameter)."""
        return self.dim if self.free else 0

    def from_uniform(self, u: Tensor) -> Tensor:
        """Values (n, dim) from uniform numbers u (n, columns) in [0, 1)."""
        raise NotImplementedError

    def log_prob(self, v: Tensor) -> Tensor:
        """The log density at v (..., dim), with shape (...); -inf outside the support."""
        raise NotImplementedError

    def box(self) -> list[tuple[float, float]]:
        """Per value, (low, high) bounds of the support (±inf when unbounded)."""
        raise NotImplementedError

    def inside(self, v: Tensor) -> Tensor:
        """Whether v (..., dim) lies in the support, (...)."""
        lo, hi = zip(*self.box())
        lo = torch.tensor(lo, dtype=v.dtype, device=v.device)
        hi = torch.tensor(hi, dtype=v.dtype, device=v.device)
        return ((v > lo) & (v < hi)).all(-1) if self.free else (v == lo).all(-1)

    def to_unconstrained(self, v: Tensor) -> Tensor:
        """z (..., zdim) of values v (..., dim) inside the support."""
        raise NotImplementedError

    def from_unconstrained(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Values (..., dim) and :math:`\\log|d v / d z|` (...) of z (..., zdim)."""
        raise NotImplementedError

    def median(self) -> list[float]:
        """A central value per dim (the median of each marginal), e.g. for shape checks."""
        return self.from_uniform(torch.full((1, self.columns), 0.5, dtype=torch.float64))[
            0
        ].tolist()

    def options(self) -> dict:
        """The constructor arguments (JSON-able)."""
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {"prior": type(self).__name__, **{k: getattr(self, k) for k in names}}

    def __repr__(self) -> str:
        opts = self.options()
        del opts["prior"]
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParameterPrior) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash(repr(self))


class _Interval(ParameterPrior):
    """Shared transform of a scalar on an interval (low, high), either bound possibly
    infinite: logit of the fraction (two bounds), log of the distance (one), affine (none)."""

    low: float = -math.inf
    high: float = math.inf
    #: affine map used when the interval is the whole line: v = centre + width z
    centre: float = 0.0
    width: float = 1.0

    def box(self) -> list[tuple[float, float]]:
        return [(self.low, self.high)]

    def to_unconstrained(self, v: Tensor) -> Tensor:
        lo, hi = self.low, self.high
        if math.isfinite(lo) and math.isfinite(hi):
            f = (v - lo) / (hi - lo)
            return torch.log(f) - torch.log1p(-f)
        if math.isfinite(lo):
            return torch.log(v - lo)
        if math.isfinite(hi):
            return torch.log(hi - v)
        return (v - self.centre) / self.width

    def from_unconstrained(self, z: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = self.low, self.high
        zs = z[..., 0]
        if math.isfinite(lo) and math.isfinite(hi):
            v = lo + (hi - lo) * torch.sigmoid(zs)
            logdet = math.log(hi - lo) + _log_sigmoid_jacobian(zs)
        elif math.isfinite(lo):
            v, logdet = lo + torch.exp(zs), zs
        elif math.isfinite(hi):
            v, logdet = hi - torch.exp(zs), zs
        else:
            v, logdet = self.centre + self.width * zs, torch.full_like(zs, math.log(self.width))
        return v.unsqueeze(-1), logdet


class Uniform(_Interval):
    """Uniform on (low, high).

    Arguments:
        low, high: the bounds, finite, low < high.
    """

    def __init__(self, low: float, high: float):
        self.low = _number(low, "low", "Uniform")
        self.high = _number(high, "high", "Uniform")
        if not self.low < self.high:
            raise ValueError(
                f"Uniform needs low < high; got ({low}, {high}) (a fixed value: Fixed(value))"
            )

    def from_uniform(self, u: Tensor) -> Tensor:
        return (self.low + (self.high - self.low) * u[:, 0]).unsqueeze(-1)

    def log_prob(self, v: Tensor) -> Tensor:
        v = v[..., 0]
        inside = (v > self.low) & (v < self.high)
        out = torch.full_like(v, -math.log(self.high - self.low))
        return torch.where(inside, out, torch.full_like(v, -math.inf))


class Normal(_Interval):
    """Normal with mean ``loc`` and standard deviation ``scale`` > 0 (support: the line).

    Arguments:
        loc, scale: mean and standard deviation.
    """

    def __init__(self, loc: float, scale: float):
        self.loc = _number(loc, "loc", "Normal")
        self.scale = _number(scale, "scale", "Normal")
        if not self.scale > 0:
            raise ValueError(f"Normal scale must be > 0; got {scale}")
        self.centre, self.width = self.loc, self.scale

    def from_uniform(self, u: Tensor) -> Tensor:
        return (self.loc + self.scale * torch.special.ndtri(u[:, 0])).unsqueeze(-1)

    def log_prob(self, v: Tensor) -> Tensor:
        r = (v[..., 0] - self.loc) / self.scale
        return -0.5 * r * r - math.log(self.scale) - 0.5 * _LOG_2PI


class LogNormal(ParameterPrior):
    """Log-normal: :math:`\\log v \\sim \\mathcal N(loc, scale^2)`, support (0, ∞).

    Arguments:
        loc, scale: mean and standard deviation of log v (scale > 0); the median is exp(loc).
    """

    def __init__(self, loc: float, scale: float):
        self.loc = _number(loc, "loc", "LogNormal")
        self.scale = _number(scale, "scale", "LogNormal")
        if not self.scale > 0:
            raise ValueError(f"LogNormal scale must be > 0; got {scale}")

    def box(self) -> list[tuple[float, float]]:
        return [(0.0, math.inf)]

    def from_uniform(self, u: Tensor) -> Tensor:
        return torch.exp(self.loc + self.scale * torch.special.ndtri(u[:, 0])).unsqueeze(-1)

    def log_prob(self, v: Tensor) -> Tensor:
        v = v[..., 0]
        pos = v > 0
        logv = torch.log(torch.where(pos, v, torch.ones_like(v)))
        r = (logv - self.loc) / self.scale
        out = -0.5 * r * r - math.log(self.scale) - 0.5 * _LOG_2PI - logv
        return torch.where(pos, out, torch.full_like(v, -math.inf))

    def to_unconstrained(self, v: Tensor) -> Tensor:
        return (torch.log(v) - self.loc) / self.scale

    def from_unconstrained(self, z: Tensor) -> tuple[Tensor, Tensor]:
        w = self.loc + self.scale * z[..., 0]
        return torch.exp(w).unsqueeze(-1), w + math.log(self.scale)


class TruncatedNormal(_Interval):
    """A normal (``loc``, ``scale``) restricted to (low, high); either bound may be None.

    Arguments:
        loc, scale: the mean and standard deviation of the untruncated normal (scale > 0).
        low, high: the bounds (None: unbounded on that side), low < high.

    The normaliser is :math:`\\Phi(b) - \\Phi(a)` of the standardised bounds; draws invert the
    CDF (fine for truncations within a few standard deviations of loc).
    """

    def __init__(
        self, loc: float, scale: float, low: float | None = None, high: float | None = None
    ):
        self.loc = _number(loc, "loc", "TruncatedNormal")
        self.scale = _number(scale, "scale", "TruncatedNormal")
        if not self.scale > 0:
            raise ValueError(f"TruncatedNormal scale must be > 0; got {scale}")
        lo = -math.inf if low is None else _number(low, "low", "TruncatedNormal", True)
        hi = math.inf if high is None else _number(high, "high", "TruncatedNormal", True)
        if not lo < hi:
            raise ValueError(f"TruncatedNormal needs low < high; got ({low}, {high})")
        self.low, self.high = lo, hi
        self.centre, self.width = self.loc, self.scale
        a = torch.tensor((lo - self.loc) / self.scale, dtype=torch.float64)
        b = torch.tensor((hi - self.loc) / self.scale, dtype=torch.float64)
        self._cdf = (float(torch.special.ndtr(a)), float(torch.special.ndtr(b)))
        mass = self._cdf[1] - self._cdf[0]
        if not mass > 1e-12:
            raise ValueError(
                f"TruncatedNormal({loc}, {scale}, {low}, {high}) holds no probability mass"
            )
        self._log_mass = math.log(mass)

    def options(self) -> dict:
        out = super().options()
        for k in ("low", "high"):
            out[k] = None if math.isinf(out[k]) else out[k]
        return out

    def from_uniform(self, u: Tensor) -> Tensor:
        a, b = self._cdf
        p = (a + (b - a) * u[:, 0]).clamp(1e-300, 1 - 1e-16)
        v = self.loc + self.scale * torch.special.ndtri(p)
        return v.clamp(self.low, self.high).unsqueeze(-1)

    def log_prob(self, v: Tensor) -> Tensor:
        v = v[..., 0]
        r = (v - self.loc) / self.scale
        out = -0.5 * r * r - math.log(self.scale) - 0.5 * _LOG_2PI - self._log_mass
        inside = (v > self.low) & (v < self.high)
        return torch.where(inside, out, torch.full_like(v, -math.inf))


class Fixed(ParameterPrior):
    """A parameter held at ``value`` (not sampled; it consumes its uniform column all the
    same, so that fixing it leaves the other parameters' draws unchanged).

    Arguments:
        value: the value.
    """

    free = False

    def __init__(self, value: float):
        self.value = _number(value, "value", "Fixed")

    def box(self) -> list[tuple[float, float]]:
        return [(self.value, self.value)]

    def from_uniform(self, u: Tensor) -> Tensor:
        return torch.full((u.shape[0], 1), self.value, dtype=u.dtype, device=u.device)

    def log_prob(self, v: Tensor) -> Tensor:
        v = v[..., 0]
        return torch.where(v == self.value, torch.zeros_like(v), torch.full_like(v, -math.inf))

    def to_unconstrained(self, v: Tensor) -> Tensor:
        return v[..., :0]

    def from_unconstrained(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shape = z.shape[:-1]
        v = torch.full((*shape, 1), self.value, dtype=z.dtype, device=z.device)
        return v, torch.zeros(shape, dtype=z.dtype, device=z.device)


class _Polar(ParameterPrior):
    """A pair (a cos 2φ, a sin 2φ) with a uniform radius variable and φ ~ U(0, π)."""

    dim = 2
    columns = 2
    bounds: tuple[float, float] = (0.0, 0.0)  # of the radius variable

    @property
    def has_density(self) -> bool:
        return self.bounds[0] < self.bounds[1]

    def radius(self, w: Tensor) -> Tensor:
        """The pair's norm r of the radius variable w."""
        raise NotImplementedError

    def radius_inverse(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """(w, log |dw/dr|) of a norm r."""
        raise NotImplementedError

    def radii(self) -> tuple[float, float]:
        """The smallest and largest norm."""
        a, b = (float(self.radius(torch.tensor(v, dtype=torch.float64))) for v in self.bounds)
        return min(a, b), max(a, b)

    def box(self) -> list[tuple[float, float]]:
        r = self.radii()[1]
        return [(-r, r), (-r, r)]

    def inside(self, v: Tensor) -> Tensor:
        lo, hi = self.radii()
        r = torch.hypot(v[..., 0], v[..., 1])
        return (r >= lo) & (r < hi)

    def log_prob(self, v: Tensor) -> Tensor:
        a, b = self.bounds
        r = torch.hypot(v[..., 0], v[..., 1])
        w, logjac = self.radius_inverse(r)
        inside = (w >= a) & (w <= b) & (r > 0)
        out = -math.log(b - a) + logjac - torch.log(r.clamp_min(1e-300)) - _LOG_2PI
        return torch.where(inside, out, torch.full_like(r, -math.inf))

    def to_unconstrained(self, v: Tensor) -> Tensor:
        big = self.radii()[1]
        r = torch.hypot(v[..., 0], v[..., 1])
        rho = torch.atanh((r / big).clamp(max=1 - 1e-15))
        scale = torch.where(r > 0, rho / r.clamp_min(1e-300), torch.full_like(r, 1 / big))
        return v * scale.unsqueeze(-1)

    def from_unconstrained(self, z: Tensor) -> tuple[Tensor, Tensor]:
        big = self.radii()[1]
        rho = torch.hypot(z[..., 0], z[..., 1])
        small = rho < 1e-6
        safe = torch.where(small, torch.ones_like(rho), rho)
        ratio = torch.where(small, 1 - rho * rho / 3, torch.tanh(safe) / safe)  # tanh(ρ)/ρ
        v = z * (big * ratio).unsqueeze(-1)
        # log|J| = log(R sech^2 ρ) + log(R tanh(ρ)/ρ); log sech^2 = -2 log cosh
        log_cosh = rho + torch.nn.functional.softplus(-2 * rho) - math.log(2)
        logdet = 2 * math.log(big) - 2 * log_cosh + torch.log(ratio)
        return v, logdet

    def median(self) -> list[float]:
        return [0.0, 0.0]


class AxisRatioAngle(_Polar):
    """An ellipticity pair (e1, e2) from an axis ratio q ~ U(a, b) and a position angle
    φ ~ U(0, π): :math:`(e_1, e_2) = \\frac{1 - q}{1 + q} (\\cos 2\\varphi, \\sin 2\\varphi)`
    (given as ``ellipticity`` of an SIE; RandomLens's draw).

    Arguments:
        axis_ratio: (a, b), 0 < a <= b <= 1 (a = b: a fixed norm, for drawing only).
    """

    def __init__(self, axis_ratio: Sequence[float] = (0.6, 1.0)):
        a, b = _pair(axis_ratio, "axis_ratio", "AxisRatioAngle")
        if not (0 < a <= b <= 1):
            raise ValueError(f"AxisRatioAngle axis_ratio needs 0 < a <= b <= 1; got {axis_ratio}")
        self.axis_ratio = [a, b]
        self.bounds = (a, b)

    def radius(self, w: Tensor) -> Tensor:
        return (1 - w) / (1 + w)

    def radius_inverse(self, r: Tensor) -> tuple[Tensor, Tensor]:
        return (1 - r) / (1 + r), math.log(2) - 2 * torch.log1p(r)

    def from_uniform(self, u: Tensor) -> Tensor:
        a, b = self.bounds
        e1, e2 = ellipticity(a + (b - a) * u[:, 0], math.pi * u[:, 1])
        return torch.stack((e1, e2), dim=-1)


class MagnitudeAngle(_Polar):
    """A pair (γ1, γ2) from a magnitude ~ U(a, b) and an angle φ ~ U(0, π):
    :math:`(\\gamma_1, \\gamma_2) = |\\gamma| (\\cos 2\\varphi, \\sin 2\\varphi)` (given as
    ``shear`` of a Shear; RandomLens's draw).

    Arguments:
        magnitude: (a, b), 0 <= a <= b (a = b: a fixed norm, for drawing only).
    """

    def __init__(self, magnitude: Sequence[float] = (0.0, 0.05)):
        a, b = _pair(magnitude, "magnitude", "MagnitudeAngle")
        if not (0 <= a <= b):
            raise ValueError(f"MagnitudeAngle magnitude needs 0 <= a <= b; got {magnitude}")
        self.magnitude = [a, b]
        self.bounds = (a, b)

    def radius(self, w: Tensor) -> Tensor:
        return w

    def radius_inverse(self, r: Tensor) -> tuple[Tensor, Tensor]:
        return r, torch.zeros_like(r)

    def from_uniform(self, u: Tensor) -> Tensor:
        a, b = self.bounds
        g = a + (b - a) * u[:, 0]
        phi = math.pi * u[:, 1]
        return torch.stack((g * torch.cos(2 * phi), g * torch.sin(2 * phi)), dim=-1)


# ----------------------------------------------------------------------------- components


def _as_prior(value: object, name: str, owner: str) -> ParameterPrior:
    if isinstance(value, ParameterPrior):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Fixed(value)
    raise TypeError(
        f"{owner} prior of {name} must be a hierprior lens prior (Uniform, Normal, LogNormal, "
        f"TruncatedNormal, Fixed, AxisRatioAngle, MagnitudeAngle) or a number; got {value!r}"
    )


class ComponentPrior:
    """The prior of one mass component's parameters (``SIE.prior(...)``).

    Arguments:
        model: the :class:`~hierprior.physics.lensing.MassModel` subclass.
        label: its name in a sum (default: the class name in lower case).
        priors: per parameter a :class:`ParameterPrior` or a number (fixed); per polar pair
            (``model.polar_pairs``, e.g. ``ellipticity``) a pair prior; and the model's
            ``static_names`` (e.g. ``m``). Parameters left out keep their constructor default
            (fixed); one without a default is an error.

    Raises (one line): an unknown name, a parameter given twice (alone and in a pair), a
    missing parameter, a support outside the physical range (``positive`` parameters must
    have support in (0, ∞); ``unit_disc`` pairs must lie inside the unit disc).
    """

    def __init__(self, model: type[MassModel], label: str | None = None, **priors: object):
        if not (isinstance(model, type) and issubclass(model, MassModel)):
            raise TypeError(f"ComponentPrior needs a MassModel subclass; got {model!r}")
        owner = model.__name__
        static = {k: priors.pop(k) for k in model.static_names if k in priors}
        self.component = Component(model, label, **static)
        names = model.parameter_names
        pairs = dict(model.polar_pairs)
        unknown = sorted(k for k in priors if k not in names and k not in pairs)
        if unknown:
            extra = f" (pairs: {sorted(pairs)})" if pairs else ""
            raise ValueError(
                f"unknown lens parameter(s) {unknown} for {owner}; its parameters are "
                f"{list(names)}{extra}"
            )
        defaults = {
            p.name: p.default
            for p in inspect.signature(model.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
        covered: dict[str, tuple[tuple[str, ...], ParameterPrior]] = {}
        for key, value in priors.items():
            if key in pairs:
                prior = value
                if not isinstance(prior, _Polar):
                    raise TypeError(
                        f"{owner} prior of the pair {key} {pairs[key]} must be a pair prior "
                        f"(AxisRatioAngle, MagnitudeAngle); got {value!r}"
                    )
                for n in pairs[key]:
                    if n in priors or n in covered:
                        raise ValueError(f"{owner} parameter {n} has two priors ({key} and {n})")
                    covered[n] = (pairs[key], prior)
            else:
                covered[key] = ((key,), _as_prior(value, key, owner))
        for n in names:
            if n not in covered:
                if n not in defaults:
                    raise ValueError(f"{owner} needs a prior for {n} (it has no default value)")
                covered[n] = ((n,), Fixed(float(defaults[n])))
        # entries in parameter order; a pair at its first parameter (pairs are adjacent)
        entries, done = [], set()
        for n in names:
            group, prior = covered[n]
            if group in done:
                continue
            if tuple(names[names.index(group[0]) : names.index(group[0]) + len(group)]) != group:
                raise ValueError(f"{owner} pair {group} is not adjacent in {names}")
            done.add(group)
            entries.append((group, prior))
        self.entries: list[tuple[tuple[str, ...], ParameterPrior]] = entries
        self._check_physical()

    @property
    def model(self) -> type[MassModel]:
        return self.component.model

    def _check_physical(self) -> None:
        owner = self.model.__name__
        box = {}
        for group, prior in self.entries:
            for n, b in zip(group, prior.box()):
                box[n] = b
        for n in self.model.positive:
            lo, hi = box[n]
            if not lo >= 0:
                raise ValueError(
                    f"the prior of {owner} {n} has support ({lo:g}, {hi:g}) but {n} must be > 0:"
                    " use a LogNormal, a Uniform or TruncatedNormal with low >= 0, or a Fixed"
                    " value > 0"
                )
            if lo == hi == 0:
                raise ValueError(f"{owner} {n} must be > 0; got Fixed(0)")
        for a, b in self.model.unit_disc:
            ra = max(abs(box[a][0]), abs(box[a][1]))
            rb = max(abs(box[b][0]), abs(box[b][1]))
            polar = [p for g, p in self.entries if g == (a, b)]
            r = polar[0].radii()[1] if polar else math.hypot(ra, rb)
            if not r < 1:
                raise ValueError(
                    f"the prior of {owner} ({a}, {b}) reaches |({a}, {b})| = {r:g}, but it "
                    f"must stay < 1: give bounded priors whose box lies inside the unit disc "
                    f"(max |{a}|^2 + max |{b}|^2 < 1)"
                )

    def options(self) -> dict:
        out: dict = {"model": self.model.__name__, "label": self.component.label}
        out.update(self.component.static)
        for group, prior in self.entries:
            out[",".join(group)] = prior.options()
        return out

    def __repr__(self) -> str:
        return f"ComponentPrior({self.options()})"


class LensPrior:
    r"""The prior :math:`p(\eta) = \prod_j p_j(\eta_j)` of a lens made of mass components.

    Arguments:
        components: :class:`ComponentPrior` objects (``SIE.prior(...)``), a list or a mapping
            label -> component prior (the label then names the component).

    Attributes:
        family: the :class:`~hierprior.physics.lensing.ParametricMass` of the components.
        names: its d parameter names; ``free`` the sampled ones (not Fixed).

    Shapes: lens parameters :math:`\eta` (..., d); unconstrained variables z (..., d_free)
    with ``d_free = zdim``.
    """

    def __init__(self, components: Sequence[ComponentPrior] | Mapping[str, ComponentPrior]):
        if isinstance(components, Mapping):
            items = []
            for label, c in components.items():
                if not isinstance(c, ComponentPrior):
                    raise TypeError(
                        f"lens component {label!r} must be a ComponentPrior; got {c!r}"
                    )
                c.component = Component(c.model, str(label), **c.component.static)
                items.append(c)
            components = items
        components = list(components or [])
        if not components:
            raise ValueError("a LensPrior needs at least one mass component")
        for c in components:
            if not isinstance(c, ComponentPrior):
                raise TypeError(
                    f"LensPrior components must be ComponentPrior objects (e.g. SIE.prior(...)); "
                    f"got {c!r}"
                )
        self.components = components
        self.family = ParametricMass(*(c.component for c in components))
        # flat entries: (indices into the d names, prior)
        entries, k = [], 0
        for c in components:
            for group, prior in c.entries:
                entries.append((list(range(k, k + len(group))), prior))
                k += len(group)
        self.entries = entries
        self.names = self.family.names
        self.free = tuple(self.names[i] for idx, prior in entries if prior.free for i in idx)

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def has_density(self) -> bool:
        """Whether every prior has a density and a transform (samplers need it; a pair prior
        with a fixed norm is for drawing only)."""
        return all(p.has_density for _, p in self.entries)

    @property
    def zdim(self) -> int:
        return sum(p.zdim for _, p in self.entries)

    @property
    def columns(self) -> int:
        """Uniform numbers per draw (one per parameter, two per pair)."""
        return sum(p.columns for _, p in self.entries)

    def options(self) -> dict:
        """The components and their priors (JSON-able), e.g. for a run's identity."""
        return {"components": [c.options() for c in self.components]}

    def __repr__(self) -> str:
        return f"LensPrior({self.options()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LensPrior) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash(repr(self))

    # ------------------------------------------------------------------ drawing
    def from_uniform(self, u: Tensor) -> Tensor:
        """Lens parameters (n, d) from uniform numbers u (n, columns) (inverse CDFs)."""
        if u.dim() != 2 or u.shape[1] != self.columns:
            raise ValueError(
                f"LensPrior.from_uniform needs u (n, {self.columns}); got {tuple(u.shape)}"
            )
        out, col = [], 0
        for _, prior in self.entries:
            out.append(prior.from_uniform(u[:, col : col + prior.columns]))
            col += prior.columns
        return torch.cat(out, dim=-1)

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float64
    ) -> Tensor:
        """n lenses (n, d) drawn from the prior (float64 arithmetic, cast to dtype)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1; got {n!r}")
        device = None if generator is None else generator.device
        u = torch.rand((n, self.columns), generator=generator, dtype=torch.float64, device=device)
        return self.from_uniform(u).to(dtype)

    def median(self, dtype=torch.float64) -> Tensor:
        """A central lens (d,): each prior's median (a pair's at (0, 0))."""
        values = [v for _, prior in self.entries for v in prior.median()]
        return torch.tensor(values, dtype=dtype)

    # ------------------------------------------------------------------ densities
    def _check_eta(self, eta: Tensor) -> Tensor:
        if not isinstance(eta, Tensor) or not eta.dtype.is_floating_point:
            raise TypeError(f"lens parameters must be a floating tensor; got {type(eta)}")
        if eta.dim() < 1 or eta.shape[-1] != self.dim:
            raise ValueError(
                f"lens parameters must have shape (..., {self.dim}) ({self.names}); got "
                f"{tuple(eta.shape)}"
            )
        return eta

    def log_prob(self, eta: Tensor) -> Tensor:
        """:math:`\\log p(\\eta)`, (...) for eta (..., d); -inf outside the support (a Fixed
        parameter contributes 0 at its value)."""
        eta = self._check_eta(eta)
        out = torch.zeros(eta.shape[:-1], dtype=eta.dtype, device=eta.device)
        for idx, prior in self.entries:
            out = out + prior.log_prob(eta[..., idx])
        return out

    def inside(self, eta: Tensor) -> Tensor:
        """Whether each lens (...) lies in the prior's support."""
        eta = self._check_eta(eta)
        ok = torch.ones(eta.shape[:-1], dtype=torch.bool, device=eta.device)
        for idx, prior in self.entries:
            ok = ok & prior.inside(eta[..., idx])
        return ok

    def check(self, eta: Tensor, what: str = "observation") -> None:
        """Raises a one-line ValueError naming the first rows (``what`` i: the leading index)
        and parameters of eta (N, [S,] d) that lie outside the prior's support."""
        eta = self._check_eta(eta).detach()
        if eta.dim() == 1:
            eta = eta[None]
        flat = eta.reshape(eta.shape[0], -1, self.dim)
        lines = []
        for idx, prior in self.entries:
            bad = ~prior.inside(flat[..., idx])  # (N, S)
            for i in bad.any(1).nonzero().flatten().tolist():
                names = ", ".join(self.names[j] for j in idx)
                values = flat[i][bad[i]][0, idx].tolist()
                shown = ", ".join(f"{v:.4g}" for v in values)
                lines.append(f"{what} {i}: {names} = {shown} is outside its prior {prior!r}")
        if lines:
            more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
            raise ValueError("; ".join(lines[:3]) + more)

    # ------------------------------------------------------------------ transforms
    def to_unconstrained(self, eta: Tensor) -> Tensor:
        """z (..., d_free) of lens parameters (..., d) inside the support."""
        eta = self._check_eta(eta)
        parts = [prior.to_unconstrained(eta[..., idx]) for idx, prior in self.entries]
        return torch.cat(parts, dim=-1)

    def from_unconstrained(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Lens parameters (..., d) and :math:`\\log|d\\eta/dz|` (...) of z (..., d_free)."""
        if z.shape[-1] != self.zdim:
            raise ValueError(f"z must have shape (..., {self.zdim}); got {tuple(z.shape)}")
        parts, logdet, k = [], 0.0, 0
        for _, prior in self.entries:
            v, ld = prior.from_unconstrained(z[..., k : k + prior.zdim])
            parts.append(v)
            logdet = logdet + ld
            k += prior.zdim
        return torch.cat(parts, dim=-1), logdet

    def log_prob_unconstrained(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(eta, log p(eta) + log|d eta/dz|): the prior's log density in z, (...)."""
        eta, logdet = self.from_unconstrained(z)
        return eta, self.log_prob(eta) + logdet
