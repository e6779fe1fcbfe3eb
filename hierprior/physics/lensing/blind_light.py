r"""Blind lensing with the lens galaxy's light: mass and light parameters both unknown.

A real lens image is

.. math:: y = A(\eta_m)\, x + L(\eta_l; a) + n, \qquad
    L(\eta_l; a) = \sum_k a_k B_k(\eta_l),

the lensed source plus the lens galaxy's light (:class:`~hierprior.physics.lensing.LensLight`).
:class:`BlindLensingWithLight` is a :class:`~hierprior.physics.lensing.BlindLensing` whose
parameter vector is :math:`\eta = (\eta_m, \eta_l)`: the mass parameters of its mass prior,
then the light profile's non-linear parameters, with the prior
:math:`p(\eta) = p(\eta_m) \prod_j p_j(\eta_{l,j})` (:class:`LensLightPrior`). The amplitudes
a are not in :math:`\eta`: given the data they are solved exactly,

.. math:: \hat a = (B^\top \Sigma^{-1} B)^{-1} B^\top \Sigma^{-1} (y - A(\eta_m)\, x),

(:meth:`BlindLensingWithLight.light_image`; the profile likelihood, as lenstronomy's linear
solver), so the joint posterior method (:mod:`hierprior.posterior.joint`) samples
:math:`(x, \eta_m, \eta_l)` with the light's amplitudes at their conditional optimum at every
step. :meth:`~BlindLensingWithLight.image`, :meth:`~BlindLensingWithLight.at` and
:meth:`~BlindLensingWithLight.rays` are the lensed source's (they read :math:`\eta_m`).

References:
    Warren & Dye (2003), ApJ 590, 673 (linear amplitudes solved at each non-linear step).
    Birrer & Amara (2018), lenstronomy, Phys. Dark Universe 22, 189.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from hierprior.physics.forward import ForwardModel
from hierprior.physics.lensing.blind import BlindLensing
from hierprior.physics.lensing.light import LensLight, _spd_solve
from hierprior.physics.lensing.priors import LensPrior, _as_prior

__all__ = ["BlindLensingWithLight", "LensLightPrior"]

#: light parameters that must be > 0 (Sérsic radius and index) or inside (-1, 1) (ellipticity)
_POSITIVE = ("R_sersic", "n_sersic")
_UNIT = ("e1", "e2")


class LensLightPrior(LensPrior):
    """The prior of (mass, light) parameters: a mass :class:`~hierprior.physics.lensing.
    LensPrior` and one :class:`~hierprior.physics.lensing.ParameterPrior` (or a number: fixed)
    per non-linear light parameter.

    Arguments:
        mass: the mass prior (its ``family`` is this prior's).
        light_names: the light profile's parameter names, in order
            (``LensLight.parameter_names``).
        light: mapping name -> prior, one entry per light parameter (a missing or unknown name
            is a one-line error).

    ``names`` are the mass names then the light names prefixed ``light_``; ``mass_dim`` the
    number of mass parameters.
    """

    def __init__(self, mass: LensPrior, light_names, light: Mapping[str, object]):
        if not isinstance(mass, LensPrior):
            raise TypeError(f"mass must be a LensPrior; got {type(mass).__name__}")
        light_names = tuple(str(n) for n in light_names)
        light = dict(light or {})
        unknown = sorted(set(light) - set(light_names))
        missing = [n for n in light_names if n not in light]
        if unknown or missing:
            raise ValueError(
                f"the light prior needs one entry per light parameter {list(light_names)}; "
                + (f"unknown: {unknown}" if unknown else f"missing: {missing}")
            )
        self.mass = mass
        self.components = mass.components
        self.family = mass.family
        self.mass_dim = mass.dim
        self.light_names = light_names
        self.light_priors = {n: _as_prior(light[n], n, "lens light") for n in light_names}
        for n, prior in self.light_priors.items():
            (low, high), name = prior.box()[0], f"the lens light's {n}"
            if n in _POSITIVE and not low > 0:
                raise ValueError(f"{name} must be > 0: its prior {prior!r} reaches {low}")
            if n in _UNIT and not (-1 < low and high < 1):
                raise ValueError(f"{name} must lie in (-1, 1): its prior is {prior!r}")
        entries = list(mass.entries)
        for j, n in enumerate(light_names):
            entries.append(([mass.dim + j], self.light_priors[n]))
        self.entries = entries
        self.names = tuple(mass.names) + tuple(f"light_{n}" for n in light_names)
        self.free = tuple(self.names[i] for idx, prior in entries if prior.free for i in idx)

    def options(self) -> dict:
        return {
            **self.mass.options(),
            "light": {n: p.options() for n, p in self.light_priors.items()},
        }

    def __repr__(self) -> str:
        return f"LensLightPrior({self.options()})"


class BlindLensingWithLight(BlindLensing):
    """A :class:`~hierprior.physics.lensing.BlindLensing` with the lens light (see the module
    docstring).

    Arguments:
        prior: the mass :class:`~hierprior.physics.lensing.LensPrior`.
        light: the :class:`~hierprior.physics.lensing.LensLight` (its image size and pixel
            scale must be the geometry's).
        light_prior: mapping light parameter name -> prior (or a number: fixed).
        image_size, pixel_scale, source_size, source_fov, supersample, psf, truth, flat: as
            for :class:`~hierprior.physics.lensing.BlindLensing` (truth: (N, d) of the full
            parameter vector).

    Shapes: parameters (N, [S,] d) with d = mass + light parameters; :meth:`light_image`
    returns (N, S, 1, n, n).
    """

    def __init__(
        self,
        prior: LensPrior,
        light: LensLight,
        light_prior: Mapping[str, object],
        image_size: int,
        pixel_scale: float,
        source_size: int,
        source_fov: float,
        supersample: int = 1,
        psf: float | Tensor | None = None,
        truth: Tensor | None = None,
        flat: bool = False,
    ):
        if not isinstance(light, LensLight):
            raise TypeError(f"light must be a LensLight; got {type(light).__name__}")
        if light.image_size != image_size or abs(light.pixel_scale - pixel_scale) > 1e-12:
            raise ValueError(
                f"the lens light's grid ({light.image_size} px at {light.pixel_scale}\") is not "
                f"the image's ({image_size} px at {pixel_scale}\")"
            )
        mass = prior.mass if isinstance(prior, LensLightPrior) else prior
        combined = LensLightPrior(mass, light.parameter_names, light_prior)
        super().__init__(
            combined,
            image_size,
            pixel_scale,
            source_size,
            source_fov,
            supersample,
            psf,
            truth,
            flat,
        )
        self.light = light
        self.mass_dim = combined.mass_dim
        self._mass = BlindLensing(
            mass, image_size, pixel_scale, source_size, source_fov, supersample, psf, None, flat
        )

    def mass_params(self, params: Tensor) -> Tensor:
        """The mass parameters (..., d_m) of params (..., d)."""
        return params[..., : self.mass_dim]

    def light_params(self, params: Tensor) -> Tensor:
        """The light's non-linear parameters (..., d_l) of params (..., d)."""
        return params[..., self.mass_dim :]

    def at(self, params: Tensor) -> ForwardModel:
        """The Lensing (of the source) at the mass part of params (N, [S,] d)."""
        self._check_full(params)
        return self._mass.at(self.mass_params(params))

    def rays(self, params: Tensor, dtype=None, device=None) -> Tensor:
        return self._mass.rays(self.mass_params(params), dtype, device)

    def _check_full(self, params: Tensor) -> None:
        d = self.prior.dim
        if not isinstance(params, Tensor) or params.dim() not in (2, 3) or params.shape[-1] != d:
            raise ValueError(
                f"lens parameters must have shape (N, [S,] d) with d = {d} ({self.names}); got "
                f"{tuple(getattr(params, 'shape', ()))}"
            )

    def light_amplitudes(self, params: Tensor, target: Tensor, noise) -> Tensor:
        """The weighted least-squares amplitudes (N, S, K) of the light at params (N, S, d)
        against target (N, S, 1, n, n) (what the light must explain: y - A x)."""
        return self.light.solve_amplitudes(self.light_params(params), target, noise)

    def light_image(self, params: Tensor, target: Tensor, noise) -> Tensor:
        """The lens light (N, S, 1, n, n) at params (N, S, d), its amplitudes solved by
        weighted least squares against target (N, S, 1, n, n) under the Gaussian noise
        model (differentiable in params and target)."""
        gram, rhs, basis = self.light._normal_equations(self.light_params(params), target, noise)
        amplitudes = _spd_solve(gram, rhs)
        return (amplitudes[..., None, None, None].to(basis.dtype) * basis).sum(dim=-4)

    def _select(self, index: Tensor) -> BlindLensingWithLight:
        g = self.geometry
        psf = None if g.blur is None else g.blur.psf
        if psf is not None and g.blur.num_obs is not None:
            psf = psf.index_select(0, index.to(psf.device))
        truth = (
            None if self.truth is None else self.truth.index_select(0, index.to(self.truth.device))
        )
        return BlindLensingWithLight(
            self.prior.mass,
            self.light,
            self.prior.light_priors,
            g.image_size,
            g.pixel_scale,
            g.source_size,
            g.source_fov,
            g.supersample,
            psf,
            truth,
            self.flat,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, light={self.light.profile!r}"
