r"""Realistic lenses that SIE + shear cannot express: a truth generator for mass-map experiments.

:class:`PerturbedLenses` draws, for each of N lenses, a macro model (SIE + external shear, as
:class:`~hierprior.populations.RandomLens`) and a perturbation: pseudo-Jaffe subhalos and
circular multipoles (:mod:`hierprior.physics.lensing.substructure`). Deterministic per
generator. Parameters (uniform draws unless stated):

=====================  ===================================================================
parameter              distribution
=====================  ===================================================================
θ_E (arcsec)           U(theta_E)
q, φ                   q ~ U(axis_ratio), φ ~ U(0, π); (e1, e2) = ellipticity(q, φ)
lens centre (arcsec)   U(center) for x and y
shear                  |γ| ~ U(shear), angle ~ U(0, π)
subhalo count          Poisson(num_subhalos), capped at max_subhalos
subhalo mass M         power law dN/dM ∝ M^slope on subhalo_mass (arcsec², in units of the
                       critical density: ∫κ d²θ)
subhalo position       radius θ_E (1 + ring_width · N(0, 1)) around the lens centre, angle
                       U(0, 2π): subhalos favour the Einstein ring, where they are detectable
subhalo profile        pseudo-Jaffe with core Ra = subhalo_core and truncation radius
                       Rs = √(θ_E b) (tidal radius of an SIS subhalo of Einstein radius
                       b = (M / (π √θ_E))^{2/3}, so that M = π b Rs)
multipoles             one per order in multipole_orders, centred on the lens,
                       a_m = θ_E · multipole_amplitude · N(0, 1), φ_m ~ U(0, 2π / m)
=====================  ===================================================================

The subhalos are held in ``max_subhalos`` slots; absent ones have zero mass (Σ0 = 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hierprior.physics.lensing import SIE, MassModel, MassSum, Shear, ellipticity
from hierprior.physics.lensing.substructure import Multipole, PseudoJaffe

__all__ = ["PerturbedLenses", "LensDraw"]


def _pair(v: Sequence[float], name: str, positive: bool = False) -> tuple[float, float]:
    if isinstance(v, (int, float)):
        v = (float(v), float(v))
    lo, hi = (float(t) for t in v)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"PerturbedLenses: {name} must be a range [lo, hi]; got {v}")
    if positive and lo <= 0:
        raise ValueError(f"PerturbedLenses: {name} must be > 0; got {v}")
    return lo, hi


class LensDraw(dict):
    """The drawn parameters of N lenses (float64 tensors with a leading N), with the mass
    models built from them: :meth:`macro`, :meth:`perturbation`, :meth:`mass` (both)."""

    def __init__(self, params: dict[str, Tensor], orders: tuple[int, ...]):
        super().__init__(params)
        self.orders = orders

    def macro(self) -> MassModel:
        return SIE(
            self["theta_E"], self["e1"], self["e2"], self["center_x"], self["center_y"]
        ) + Shear(self["gamma1"], self["gamma2"])

    def perturbation(self) -> MassModel:
        parts: list[MassModel] = []
        for k in range(self["sub_sigma0"].shape[1]):
            parts.append(
                PseudoJaffe(
                    self["sub_sigma0"][:, k],
                    self["sub_Ra"][:, k],
                    self["sub_Rs"][:, k],
                    self["sub_x"][:, k],
                    self["sub_y"][:, k],
                )
            )
        for j, m in enumerate(self.orders):
            parts.append(
                Multipole(
                    m, self["a_m"][:, j], self["phi_m"][:, j], self["center_x"], self["center_y"]
                )
            )
        return MassSum(*parts)

    def mass(self) -> MassModel:
        return self.macro() + self.perturbation()


class PerturbedLenses:
    """Truth generator of perturbed lenses (see the module docstring for the parameters)."""

    def __init__(
        self,
        theta_E: Sequence[float] = (0.9, 1.3),
        axis_ratio: Sequence[float] = (0.6, 1.0),
        center: Sequence[float] = (-0.05, 0.05),
        shear: Sequence[float] = (0.0, 0.05),
        num_subhalos: float = 3.0,
        max_subhalos: int = 8,
        subhalo_mass: Sequence[float] = (2e-3, 2e-2),
        mass_slope: float = -1.9,
        ring_width: float = 0.15,
        subhalo_core: float = 0.01,
        multipole_orders: Sequence[int] = (3, 4),
        multipole_amplitude: float = 0.01,
    ):
        self.theta_E = _pair(theta_E, "theta_E", positive=True)
        self.axis_ratio = _pair(axis_ratio, "axis_ratio", positive=True)
        if self.axis_ratio[1] > 1:
            raise ValueError(f"PerturbedLenses: axis_ratio must lie in (0, 1]; got {axis_ratio}")
        self.center = _pair(center, "center")
        self.shear = _pair(shear, "shear")
        self.subhalo_mass = _pair(subhalo_mass, "subhalo_mass", positive=True)
        if not (num_subhalos >= 0 and math.isfinite(num_subhalos)):
            raise ValueError(f"PerturbedLenses: num_subhalos must be >= 0; got {num_subhalos}")
        if isinstance(max_subhalos, bool) or not isinstance(max_subhalos, int) or max_subhalos < 0:
            raise ValueError(
                f"PerturbedLenses: max_subhalos must be an int >= 0; got {max_subhalos}"
            )
        if not (subhalo_core > 0):
            raise ValueError(f"PerturbedLenses: subhalo_core must be > 0; got {subhalo_core}")
        self.num_subhalos = float(num_subhalos)
        self.max_subhalos = max_subhalos
        self.mass_slope = float(mass_slope)
        self.ring_width = float(ring_width)
        self.subhalo_core = float(subhalo_core)
        self.multipole_orders = tuple(int(m) for m in multipole_orders)
        self.multipole_amplitude = float(multipole_amplitude)

    def _power_law(self, shape, g: torch.Generator) -> Tensor:
        lo, hi = self.subhalo_mass
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        a = self.mass_slope + 1
        if abs(a) < 1e-12:  # dN/dM ∝ 1/M: log-uniform
            return lo * (hi / lo) ** u
        return (lo**a + u * (hi**a - lo**a)) ** (1 / a)

    def __call__(self, n: int, generator: torch.Generator) -> LensDraw:
        g, f64 = generator, torch.float64

        def u(lo_hi, shape=(n,)):
            lo, hi = lo_hi
            return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=f64)

        theta_E = u(self.theta_E)
        q = u(self.axis_ratio)
        phi = u((0.0, math.pi))
        e1, e2 = ellipticity(q, phi)
        cx, cy = u(self.center), u(self.center)
        gmag, gang = u(self.shear), u((0.0, math.pi))
        K = self.max_subhalos
        count = torch.poisson(torch.full((n,), self.num_subhalos, dtype=f64), generator=g)
        present = torch.arange(K, dtype=f64)[None, :] < count.clamp(max=K)[:, None]
        mass = self._power_law((n, K), g) * present
        radius = theta_E[:, None] * (
            1 + self.ring_width * torch.randn(n, K, generator=g, dtype=f64)
        )
        angle = u((0.0, 2 * math.pi), (n, K))
        b = (mass / (math.pi * theta_E[:, None].sqrt())) ** (2 / 3)
        rs = torch.sqrt(theta_E[:, None] * b).clamp_min(2 * self.subhalo_core)
        ra = torch.full((n, K), self.subhalo_core, dtype=f64)
        sigma0 = mass / (2 * math.pi * ra * rs)
        M = len(self.multipole_orders)
        a_m = (
            theta_E[:, None] * self.multipole_amplitude * torch.randn(n, M, generator=g, dtype=f64)
        )
        phi_m = torch.rand(n, M, generator=g, dtype=f64) * 2 * math.pi
        phi_m = phi_m / torch.tensor(self.multipole_orders or (1,), dtype=f64)[:M]
        params = {
            "theta_E": theta_E,
            "e1": torch.as_tensor(e1, dtype=f64),
            "e2": torch.as_tensor(e2, dtype=f64),
            "center_x": cx,
            "center_y": cy,
            "gamma1": gmag * torch.cos(2 * gang),
            "gamma2": gmag * torch.sin(2 * gang),
            "num_subhalos": present.sum(1).to(f64),
            "sub_mass": mass,
            "sub_sigma0": sigma0,
            "sub_Ra": ra,
            "sub_Rs": rs,
            "sub_x": cx[:, None] + radius * torch.cos(angle),
            "sub_y": cy[:, None] + radius * torch.sin(angle),
            "a_m": a_m,
            "phi_m": phi_m,
        }
        return LensDraw(params, self.multipole_orders)
