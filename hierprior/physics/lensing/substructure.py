r"""Perturbers of a macro lens: subhalos (pseudo-Jaffe) and circular multipoles.

Real lenses are not SIE + shear: subhalos and angular structure (multipoles) leave residuals
that no analytic macro model explains. These components generate such lenses (the truths of
the latent-mass-map experiments); they follow lenstronomy's names and conventions, like
:mod:`hierprior.physics.lensing.mass`, and are checked against lenstronomy 1.14.2 in
``tests/test_substructure.py``.

**Pseudo-Jaffe** (lenstronomy ``PJAFFE``), a truncated isothermal profile with a core:
:math:`\rho(r) \propto [(1 + r^2/R_a^2)(1 + r^2/R_s^2)]^{-1}`, :math:`R_a < R_s` (swapped if
given the other way round, as lenstronomy does), with convergence and deflection

.. math::
    \kappa(R) = \Sigma_0 \frac{R_a R_s}{R_s - R_a}\Big(\frac{1}{\sqrt{R_a^2 + R^2}}
        - \frac{1}{\sqrt{R_s^2 + R^2}}\Big), \qquad
    \boldsymbol\alpha = 2 \Sigma_0 \frac{R_a R_s}{R_s - R_a}\,\Big(\frac{1}{\sqrt{R_a^2 + R^2}
        + R_a} - \frac{1}{\sqrt{R_s^2 + R^2} + R_s}\Big)\,\mathbf R,

(the second form of :math:`(\sqrt{a^2 + R^2} - a)/R^2` has no cancellation at small R) and
total mass :math:`2\pi\Sigma_0 R_a R_s` (arcsec², in units of the critical density). With a
small core :math:`R_a` it is a truncated SIS of Einstein radius :math:`b \approx \pi\Sigma_0
R_a` and truncation radius :math:`R_s` (:func:`pseudo_jaffe_from_mass` converts).

**Multipole** (lenstronomy ``MULTIPOLE``, circular, m >= 2): potential
:math:`\psi = r\, a_m / (1 - m^2) \cos m(\varphi - \varphi_m)`, convergence
:math:`\kappa = a_m \cos m(\varphi - \varphi_m) / (2 r)`, deflection
:math:`\alpha_r = a_m/(1 - m^2) \cos m(\varphi - \varphi_m)`, :math:`\alpha_\varphi = -m\, a_m
/ (1 - m^2) \sin m(\varphi - \varphi_m)`. m = 4 gives boxy/disky isophotes, m = 3 lopsided
ones; :math:`a_m` is in arcsec (a deflection), typically :math:`|a_m| \lesssim 0.01\,\theta_E`.

References:
    Keeton (2001), A catalog of mass models for gravitational lensing, astro-ph/0102341.
    Eliasdottir et al. (2007), Where is the matter in the Merging Cluster Abell 2218?,
    arXiv 0710.5636 (pseudo-Jaffe).
    Van de Vyvere et al. (2022), Consequences of the lack of azimuthal freedom in the modeling
    of lensing galaxies, A&A 659, A127 (multipoles).
    Birrer & Amara (2018), lenstronomy, Phys. Dark Univ. 22, 189.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.checks import check_int
from hierprior.physics.lensing.mass import _TINY, MassModel, _offsets

__all__ = ["PseudoJaffe", "Multipole", "pseudo_jaffe_from_mass"]


class PseudoJaffe(MassModel):
    r"""Pseudo-Jaffe profile (lenstronomy ``PJAFFE``; see the module docstring).

    Arguments:
        sigma0: the density normalisation :math:`\Sigma_0` (in units of the critical density).
        Ra: core radius [arcsec], > 0.
        Rs: truncation radius [arcsec], > 0 (Ra and Rs are swapped where Ra > Rs; equal radii
            are an error).
        center_x, center_y: the centre [arcsec].
    """

    elementwise = True
    parameter_names = ("sigma0", "Ra", "Rs", "center_x", "center_y")
    positive = ("Ra", "Rs")

    def __init__(
        self,
        sigma0: float | Tensor,
        Ra: float | Tensor,
        Rs: float | Tensor,
        center_x: float | Tensor = 0.0,
        center_y: float | Tensor = 0.0,
    ):
        super().__init__(sigma0=sigma0, Ra=Ra, Rs=Rs, center_x=center_x, center_y=center_y)
        if not (self.Ra.detach() != self.Rs.detach()).all():
            raise ValueError("PseudoJaffe needs Ra != Rs (the core and truncation radii)")

    @staticmethod
    def _radii(p) -> tuple[Tensor, Tensor, Tensor]:
        ra, rs = p["Ra"], p["Rs"]
        a, s = torch.minimum(ra, rs), torch.maximum(ra, rs)
        return a, s, p["sigma0"] * a * s / (s - a)

    @classmethod
    def deflection_at(cls, params, x, y, **static):
        dx, dy = _offsets(params, x, y)
        a, s, norm = cls._radii(params)
        r2 = dx * dx + dy * dy
        f = 2 * norm * (1 / (torch.sqrt(a * a + r2) + a) - 1 / (torch.sqrt(s * s + r2) + s))
        return f * dx, f * dy

    @classmethod
    def convergence_at(cls, params, x, y, **static):
        dx, dy = _offsets(params, x, y)
        a, s, norm = cls._radii(params)
        r2 = dx * dx + dy * dy
        return norm * (torch.rsqrt(a * a + r2) - torch.rsqrt(s * s + r2))


def pseudo_jaffe_from_mass(
    mass: float | Tensor, Rs: float | Tensor, Ra: float | Tensor = 1e-3
) -> float | Tensor:
    r""":math:`\Sigma_0` of a pseudo-Jaffe profile with total mass ``mass`` (arcsec², in units
    of the critical density): :math:`\Sigma_0 = M / (2\pi R_a R_s)` (a float for float
    arguments, else a tensor)."""
    return mass / (2 * math.pi * Ra * Rs)


class Multipole(MassModel):
    r"""Circular multipole of order m >= 2 (lenstronomy ``MULTIPOLE``; see the module
    docstring).

    Arguments:
        m: the order (an integer >= 2, shared by all observations).
        a_m: the amplitude [arcsec] (any sign).
        phi_m: the orientation [rad].
        center_x, center_y: the centre [arcsec].
    """

    elementwise = True
    parameter_names = ("a_m", "phi_m", "center_x", "center_y")
    static_names = ("m",)

    def __init__(
        self,
        m: int,
        a_m: float | Tensor,
        phi_m: float | Tensor,
        center_x: float | Tensor = 0.0,
        center_y: float | Tensor = 0.0,
    ):
        m = check_int(m, "Multipole order m", 2)
        super().__init__(a_m=a_m, phi_m=phi_m, center_x=center_x, center_y=center_y)
        self.m = m

    def _rebuild(self, params: dict[str, Tensor]) -> MassModel:
        return Multipole(self.m, **params)

    @classmethod
    def check_static(cls, **static: object) -> None:
        super().check_static(**static)
        m = static["m"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            raise ValueError(f"Multipole order m must be an integer >= 2; got {m!r}")

    @staticmethod
    def _angles(p, x: Tensor, y: Tensor, m: int) -> tuple[Tensor, ...]:
        dx, dy = _offsets(p, x, y)
        phi = torch.atan2(dy, dx)
        return dx, dy, phi, m * (phi - p["phi_m"])

    @classmethod
    def deflection_at(cls, params, x, y, *, m: int, **static):
        _, _, phi, arg = cls._angles(params, x, y, m)
        amp = params["a_m"] / (1 - m**2)
        a_r = amp * torch.cos(arg)
        a_phi = -m * amp * torch.sin(arg)
        c, s = torch.cos(phi), torch.sin(phi)
        return c * a_r - s * a_phi, s * a_r + c * a_phi

    @classmethod
    def convergence_at(cls, params, x, y, *, m: int, **static):
        dx, dy, _, arg = cls._angles(params, x, y, m)
        r = torch.hypot(dx, dy).clamp_min(_TINY)
        return params["a_m"] * torch.cos(arg) / (2 * r)

    def extra_repr(self) -> str:
        return f"m={self.m}, " + super().extra_repr()
