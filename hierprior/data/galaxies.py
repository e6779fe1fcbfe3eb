r"""Procedural galaxy images: Sersic ellipticals and bulge + disk spirals with arms.

Every galaxy is drawn on the square field :math:`[-1, 1]^2` (x along columns, y along rows,
downwards), so all lengths below are in units of the image half-width and the same parameters
give the same galaxy at any resolution R. Each pixel is the mean of ``oversample``
:math:`\times` ``oversample`` sub-pixel samples; the image is convolved with a circular
Gaussian PSF (FWHM ``psf_fwhm``), normalised to peak 1 and mapped linearly onto
``value_range`` (see :mod:`hierprior.data.mnist` for the value convention); an optional
asinh ``stretch`` brightens faint light. Pixels stay linear in surface brightness otherwise.

**Ellipticals** follow a Sersic profile in the elliptical radius
:math:`r = \sqrt{u^2 + (v / q)^2}`, where :math:`(u, v)` are the offsets from the centre
:math:`(x_0, y_0)` rotated by the position angle :math:`\theta` (major axis along u):

.. math:: I(r) = I_e \exp\left(-b_n \left[(r / R_e)^{1/n} - 1\right]\right), \qquad
    b_n \approx 2n - \tfrac13 + \tfrac{4}{405 n} + \tfrac{46}{25515 n^2}
    + \tfrac{131}{1148175 n^3} - \tfrac{2194697}{30690717750 n^4},

so that :math:`R_e` encloses half the light (Ciotti & Bertin 1999).

**Spirals** are a Sersic bulge plus an exponential disk with m logarithmic arms. In the disk
plane, :math:`(u, v / \cos i)` in polar coordinates :math:`(r, \varphi)` (the inclination i
projects the disk with axis ratio :math:`\cos i`; :math:`\varphi` is mirrored for
``chirality = -1``),

.. math:: I_d(r, \varphi) = e^{-r/h} \left[1 + A\, T(r) \cos\left(m \left(\varphi
    - \frac{\ln(r / h)}{\tan p}\right) - \phi_0\right)\right]^+, \qquad
    T(r) = 1 - e^{-(r / r_{in})^2},

with pitch angle p, arm contrast A, phase :math:`\phi_0`, and a taper T that lets the arms
start at :math:`r_{in}` instead of winding without end into the centre. The bulge
(:math:`n \sim 4`, small :math:`R_e`, axis ratio ``bulge_axis_ratio``) is scaled so that
it carries the fraction ``bulge_fraction`` of the on-sky bulge + (unmodulated) disk light:
a Sersic profile holds :math:`2 \pi q I_e R_e^2 n e^{b_n} b_n^{-2n} \Gamma(2n)`, the
projected disk :math:`2 \pi h^2 \cos i`. Star-forming clumps are Gaussian knots
:math:`c\, e^{-r_c/h} (1 + A)\, \exp(-|\mathbf{r} - \mathbf{r}_c|^2 / 2 s^2)` in the disk
plane, placed on the crest of a random arm at radius :math:`r_c` (plus an azimuthal jitter).

**Parameter distributions** (per galaxy, independent; per clump for ``clump_*``):

============================  ===========================  =================================
name                          default                      meaning
============================  ===========================  =================================
elliptical ``sersic_n``       Uniform(1, 3)                Sersic index n
elliptical ``r_eff``          LogUniform(0.12, 0.4)        half-light semi-major axis R_e
elliptical ``axis_ratio``     Uniform(0.4, 1)              minor / major axis q
``position_angle``            Uniform(0, pi)               major axis angle from +x [rad]
``x0``, ``y0``                Uniform(-0.05, 0.05)         centre jitter
``psf_fwhm``                  Uniform(0.04, 0.08)          Gaussian PSF FWHM
spiral ``bulge_n``            Uniform(2, 4)                bulge Sersic index
spiral ``bulge_r_eff``        LogUniform(0.04, 0.1)        bulge half-light radius
spiral ``bulge_fraction``     Uniform(0.05, 0.25)          bulge / total light
spiral ``bulge_axis_ratio``   Uniform(0.7, 1)              bulge axis ratio
spiral ``disk_scale``         LogUniform(0.15, 0.3)        disk scale length h
spiral ``cos_inclination``    Uniform(0.4, 1)              disk axis ratio cos i
spiral ``n_arms``             Choice(2, 3, 4)              number of arms m
spiral ``pitch_angle``        Uniform(0.21, 0.45)          p [rad] (12 to 26 degrees)
spiral ``arm_contrast``       Uniform(0.7, 1.3)            A (above 1 the inter-arm is dark)
spiral ``arm_phase``          Uniform(0, 2 pi)             phase phi_0 [rad]
spiral ``arm_inner``          Uniform(0.06, 0.12)          taper radius r_in
spiral ``chirality``          Choice(-1, 1)                winding sense
spiral ``n_clumps``           Choice(0, 1, ..., 8)         number of clumps
spiral ``clump_radius``       Uniform(0.6, 2.5)            r_c / h
spiral ``clump_size``         LogUniform(0.012, 0.03)      Gaussian width s
spiral ``clump_brightness``   Uniform(0.5, 2)              c, relative to the arm crest
spiral ``clump_dphi``         Uniform(-0.15, 0.15)         azimuthal offset from the crest
============================  ===========================  =================================

The elliptical Sersic indices stop at 3 on purpose: with linear pixels an n = 4 profile is a
near point source at these sizes (its centre outshines R_e by ~2000x before the PSF); pass
``params={"sersic_n": (3, 6)}`` (perhaps with ``stretch``) for de Vaucouleurs-like cores.

Any entry can be overridden through ``params``: a distribution (:class:`Uniform`,
:class:`LogUniform`, :class:`Choice`), a pair/list (new bounds, or new choices, keeping the
default's kind), a number (the same value for every galaxy) or a tensor with shape (n,)
(``clump_*``: (n,) or (n, K)) giving one value per galaxy.

Randomness: one ``torch.rand`` draw of shape (n, D) from a generator seeded with ``seed``
(never the global RNG) supplies every parameter by inverse CDF, one column per parameter in
the table's order, whatever the overrides. Hence the same seed gives identical images, the
first k galaxies of a batch of n equal a batch of k, and overriding one parameter leaves the
others unchanged.

References:
    Sersic (1963), Influence of the atmospheric and instrumental dispersion on the brightness
    distribution in a galaxy, Bol. Asoc. Argentina Astron. 6, 41.
    Ciotti and Bertin (1999), Analytical properties of the R^{1/m} law, A&A 352, 447.
    Freeman (1970), On the disks of spiral and S0 galaxies, ApJ 160, 811.
    Lupton, Gunn and Szalay (1999), A modified magnitude system that produces well-behaved
    magnitudes, colors, and errors even for low signal-to-noise ratio measurements, AJ 118,
    1406 (asinh stretch).
    Ringermacher and Mead (2009), A new formula describing the scaffold structure of spiral
    galaxies, MNRAS 397, 164 (logarithmic spirals and pitch angles).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from hierprior.checks import check_int, check_positive
from hierprior.data.mnist import check_value_range, to_value_range

__all__ = [
    "Choice",
    "ELLIPTICAL_PARAMS",
    "LogUniform",
    "SPIRAL_PARAMS",
    "Uniform",
    "make_galaxies",
    "sersic_b",
]


@dataclass(frozen=True)
class Uniform:
    """Uniform distribution on [low, high]."""

    low: float
    high: float

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"Uniform needs finite low <= high, got ({self.low}, {self.high})")

    def from_unit(self, u: Tensor) -> Tensor:
        """Maps uniform draws in [0, 1), with shape (*), to this distribution."""

        return self.low + (self.high - self.low) * u


@dataclass(frozen=True)
class LogUniform:
    """Log-uniform distribution on [low, high], with 0 < low."""

    low: float
    high: float

    def __post_init__(self):
        ok = math.isfinite(self.low) and math.isfinite(self.high)
        if not ok or not 0 < self.low <= self.high:
            raise ValueError(
                f"LogUniform needs finite 0 < low <= high, got ({self.low}, {self.high})"
            )

    def from_unit(self, u: Tensor) -> Tensor:
        """Maps uniform draws in [0, 1), with shape (*), to this distribution."""

        lo, hi = math.log(self.low), math.log(self.high)
        return torch.exp(lo + (hi - lo) * u)


@dataclass(frozen=True)
class Choice:
    """Uniform choice among ``values``."""

    values: tuple[float, ...]

    def __post_init__(self):
        values = tuple(float(v) for v in self.values)
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"Choice needs a non-empty set of finite values, got {self.values}")
        object.__setattr__(self, "values", values)

    def from_unit(self, u: Tensor) -> Tensor:
        """Maps uniform draws in [0, 1), with shape (*), to this distribution."""

        values = torch.tensor(self.values, dtype=u.dtype, device=u.device)
        index = (u * len(values)).long().clamp_(0, len(values) - 1)
        return values[index]


Distribution = Uniform | LogUniform | Choice

_COMMON = {
    "position_angle": Uniform(0.0, math.pi),
    "x0": Uniform(-0.05, 0.05),
    "y0": Uniform(-0.05, 0.05),
    "psf_fwhm": Uniform(0.04, 0.08),
}

#: default parameter distributions of elliptical galaxies (read-only; override via ``params``)
ELLIPTICAL_PARAMS: Mapping[str, Distribution] = MappingProxyType(
    {
        "sersic_n": Uniform(1.0, 3.0),
        "r_eff": LogUniform(0.12, 0.4),
        "axis_ratio": Uniform(0.4, 1.0),
        **_COMMON,
    }
)

#: default parameter distributions of spiral galaxies (read-only; override via ``params``)
SPIRAL_PARAMS: Mapping[str, Distribution] = MappingProxyType(
    {
        "bulge_n": Uniform(2.0, 4.0),
        "bulge_r_eff": LogUniform(0.04, 0.1),
        "bulge_fraction": Uniform(0.05, 0.25),
        "bulge_axis_ratio": Uniform(0.7, 1.0),
        "disk_scale": LogUniform(0.15, 0.3),
        "cos_inclination": Uniform(0.4, 1.0),
        "n_arms": Choice((2, 3, 4)),
        "pitch_angle": Uniform(math.radians(12.0), math.radians(26.0)),
        "arm_contrast": Uniform(0.7, 1.3),
        "arm_phase": Uniform(0.0, 2 * math.pi),
        "arm_inner": Uniform(0.06, 0.12),
        "chirality": Choice((-1, 1)),
        "n_clumps": Choice(tuple(range(9))),
        **_COMMON,
        "clump_radius": Uniform(0.6, 2.5),
        "clump_size": LogUniform(0.012, 0.03),
        "clump_brightness": Uniform(0.5, 2.0),
        "clump_dphi": Uniform(-0.15, 0.15),
    }
)

# open (low, high) physical domains; values outside raise before rendering
_DOMAINS = {
    "sersic_n": (0.36, 20.0),
    "bulge_n": (0.36, 20.0),
    "r_eff": (0.0, math.inf),
    "bulge_r_eff": (0.0, math.inf),
    "disk_scale": (0.0, math.inf),
    "axis_ratio": (0.0, 1.0 + 1e-9),
    "bulge_axis_ratio": (0.0, 1.0 + 1e-9),
    "cos_inclination": (0.0, 1.0 + 1e-9),
    "bulge_fraction": (-1e-9, 1.0),
    "pitch_angle": (0.0, math.pi / 2),
    "arm_contrast": (-1e-9, math.inf),
    "arm_inner": (0.0, math.inf),
    "psf_fwhm": (-1e-9, math.inf),
    "n_arms": (0.5, math.inf),
    "n_clumps": (-0.5, math.inf),
    "clump_radius": (-1e-9, math.inf),
    "clump_size": (0.0, math.inf),
    "clump_brightness": (-1e-9, math.inf),
}
_INTEGER = ("n_arms", "n_clumps", "chirality")
_KINDS = {"elliptical": ELLIPTICAL_PARAMS, "spiral": SPIRAL_PARAMS}


def sersic_b(n: Tensor) -> Tensor:
    r"""Sersic :math:`b_n`, such that :math:`R_e` encloses half the light.

    Uses the asymptotic series of Ciotti & Bertin (1999); against the exact root of
    :math:`\Gamma(2n) = 2 \gamma(2n, b_n)` its relative error is below :math:`10^{-3}` for
    :math:`n \geq 0.36` and below :math:`3 \cdot 10^{-5}` for :math:`n \geq 1`.

    Arguments:
        n: The Sersic indices, with shape (*).

    Returns:
        :math:`b_n`, with shape (*).
    """

    return (
        2 * n
        - 1 / 3
        + 4 / (405 * n)
        + 46 / (25515 * n**2)
        + 131 / (1148175 * n**3)
        - 2194697 / (30690717750 * n**4)
    )


def _sersic(r: Tensor, n: Tensor, r_eff: Tensor) -> Tensor:
    """Sersic profile with I_e = 1; r with shape (B, H, W), n and r_eff with shape (B, 1, 1)."""

    return torch.exp(-sersic_b(n) * ((r / r_eff) ** (1 / n) - 1))


def _sersic_flux(n: Tensor, r_eff: Tensor, q: Tensor) -> Tensor:
    """Total light of a Sersic profile with I_e = 1."""

    b = sersic_b(n)
    log = torch.lgamma(2 * n) + b - 2 * n * torch.log(b)
    return 2 * math.pi * q * r_eff**2 * n * torch.exp(log)


def _resolve(name: str, default: Distribution, override: object, u: Tensor, n: int) -> Tensor:
    """Turns one spec (default or override) and its unit draws u, (n,) or (n, K), into values."""

    spec = default if override is None else override
    if isinstance(spec, Tensor):
        values = spec.detach().to(dtype=torch.float64, device="cpu")
        if values.ndim == 0:
            values = values.expand(n)
        if values.shape[0] != n or values.ndim > 2:
            raise ValueError(
                f"params[{name!r}] must have shape ({n},) or ({n}, K), got {tuple(spec.shape)}"
            )
        return values
    if isinstance(spec, bool):
        raise TypeError(f"params[{name!r}] must be a number, a distribution or a tensor")
    if isinstance(spec, (int, float)):
        return torch.full((n,), float(spec), dtype=torch.float64)
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        if isinstance(default, Choice):
            spec = Choice(tuple(spec))
        elif len(spec) == 2:
            spec = type(default)(float(spec[0]), float(spec[1]))
        else:
            raise ValueError(f"params[{name!r}] as a sequence must be (low, high), got {spec!r}")
    if not isinstance(spec, (Uniform, LogUniform, Choice)):
        raise TypeError(
            f"params[{name!r}] must be a Uniform, LogUniform, Choice, (low, high), a number "
            f"or a tensor, got {type(spec).__name__}"
        )
    return spec.from_unit(u)


def _check_domain(name: str, values: Tensor) -> None:
    if not torch.isfinite(values).all():
        raise ValueError(f"galaxy parameter {name!r} has non-finite values")
    if name in _DOMAINS:
        low, high = _DOMAINS[name]
        if not ((values > low) & (values < high)).all():
            bad = values[~((values > low) & (values < high))][0].item()
            raise ValueError(f"galaxy parameter {name!r} must lie in ({low}, {high}), got {bad}")
    if name == "chirality" and not ((values == 1) | (values == -1)).all():
        raise ValueError("galaxy parameter 'chirality' must be -1 or 1")
    if name in _INTEGER and not torch.equal(values, values.round()):
        raise ValueError(f"galaxy parameter {name!r} must be integer-valued")


def _max_clumps(spec: object) -> int:
    if isinstance(spec, Tensor):
        return int(spec.max().item()) if spec.numel() else 0
    if isinstance(spec, Choice):
        return int(max(spec.values))
    if isinstance(spec, (Uniform, LogUniform)):
        return int(spec.high)
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        return int(max(spec))
    return int(spec)


def _sample_params(
    kind: str, n: int, params: Mapping[str, object], generator: torch.Generator
) -> dict[str, Tensor]:
    defaults = _KINDS[kind]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(
            f"unknown {kind} galaxy parameters {sorted(unknown)}; known: {list(defaults)}"
        )
    galaxy_keys = [k for k in defaults if not k.startswith("clump_")]
    clump_keys = [k for k in defaults if k.startswith("clump_")]
    n_clumps = 0
    if clump_keys:
        n_clumps = _max_clumps(params.get("n_clumps", defaults["n_clumps"]))
    if n_clumps < 0:
        raise ValueError(f"n_clumps must be >= 0, got {n_clumps}")
    width = len(galaxy_keys) + n_clumps * len(clump_keys)
    draws = torch.rand(n, width, generator=generator, device=generator.device)
    draws = draws.to(device="cpu", dtype=torch.float64)
    out = {}
    for j, key in enumerate(galaxy_keys):
        values = _resolve(key, defaults[key], params.get(key), draws[:, j], n)
        if values.ndim != 1:
            raise ValueError(f"params[{key!r}] must have shape ({n},), got {tuple(values.shape)}")
        out[key] = values
    offset = len(galaxy_keys)
    for j, key in enumerate(clump_keys):
        u = draws[:, offset + j * n_clumps : offset + (j + 1) * n_clumps]
        values = _resolve(key, defaults[key], params.get(key), u, n)
        if values.ndim == 1:
            values = values[:, None].expand(n, n_clumps)
        if values.shape[1] != n_clumps:
            raise ValueError(
                f"params[{key!r}] must have shape ({n}, {n_clumps}), got {tuple(values.shape)}"
            )
        out[key] = values.contiguous()
    for key, values in out.items():
        _check_domain(key, values)
    for key in _INTEGER:
        if key in out:
            out[key] = out[key].round().long()
    if "n_clumps" in out and n_clumps and (out["n_clumps"] > n_clumps).any():
        raise ValueError(f"n_clumps exceeds the {n_clumps} clumps drawn")
    return out


def _grid(size: int, device: torch.device) -> Tensor:
    return -1.0 + (2 * torch.arange(size, device=device, dtype=torch.float32) + 1) / size


def _render_elliptical(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    dx, dy = x - p["x0"], y - p["y0"]
    cos, sin = torch.cos(p["position_angle"]), torch.sin(p["position_angle"])
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    r = torch.sqrt(u**2 + (v / p["axis_ratio"]) ** 2)
    return _sersic(r, p["sersic_n"], p["r_eff"])


def _render_spiral(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    dx, dy = x - p["x0"], y - p["y0"]
    cos, sin = torch.cos(p["position_angle"]), torch.sin(p["position_angle"])
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos

    # disk plane (deprojected) coordinates; chirality mirrors the winding
    h, qd = p["disk_scale"], p["cos_inclination"]
    ud, vd = u, v / qd * p["chirality"]
    r = torch.sqrt(ud**2 + vd**2).clamp_min(1e-6)
    phi = torch.atan2(vd, ud)
    m, tan_p, A = p["n_arms"], torch.tan(p["pitch_angle"]), p["arm_contrast"]
    taper = 1 - torch.exp(-((r / p["arm_inner"]) ** 2))
    arms = 1 + A * taper * torch.cos(m * (phi - torch.log(r / h) / tan_p) - p["arm_phase"])
    image = torch.exp(-r / h) * arms.clamp_min(0)

    # bulge carries bulge_fraction of bulge + unmodulated disk light
    nb, rb, qb = p["bulge_n"], p["bulge_r_eff"], p["bulge_axis_ratio"]
    disk_flux = 2 * math.pi * h**2 * qd
    bt = p["bulge_fraction"]
    amplitude = bt / (1 - bt) * disk_flux / _sersic_flux(nb, rb, qb)
    rbulge = torch.sqrt(u**2 + (v / qb) ** 2)
    image = image + amplitude * _sersic(rbulge, nb, rb)

    return _add_clumps(image, p, x.shape[-1])


def _add_clumps(image: Tensor, p: dict[str, Tensor], size: int) -> Tensor:
    """Adds the clumps, each evaluated on a small pixel patch around its centre (B, N, N)."""

    if p["clump_radius"].shape[1] == 0:
        return image
    # per-galaxy values come as (B, 1, 1); per-clump ones as (B, K)
    g = {k: v[:, :, 0] for k, v in p.items() if v.ndim == 3}
    h, m, tan_p, A = g["disk_scale"], g["n_arms"], torch.tan(g["pitch_angle"]), g["arm_contrast"]
    # crest of arm k: m (phi - ln(r/h) / tan p) - phase = 2 pi k
    rc = p["clump_radius"] * h
    phic = (g["arm_phase"] + 2 * math.pi * p["clump_arm"]) / m + torch.log(rc / h) / tan_p
    phic = phic + p["clump_dphi"]
    xc, yc = rc * torch.cos(phic), rc * torch.sin(phic)
    cos, sin = torch.cos(g["position_angle"]), torch.sin(g["position_angle"])
    u, v = xc, yc * g["cos_inclination"] * g["chirality"]
    cx, cy = g["x0"] + u * cos - v * sin, g["y0"] + u * sin + v * cos

    pixel = 2 / size
    half = int(math.ceil(4 * float(p["clump_size"].max()) / pixel)) + 1
    offsets = torch.arange(-half, half + 1, device=image.device)
    ix = torch.floor((cx + 1) / pixel).long()[..., None, None] + offsets[None, None, None, :]
    iy = torch.floor((cy + 1) / pixel).long()[..., None, None] + offsets[None, None, :, None]
    inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    px, py = -1 + (2 * ix + 1) * (pixel / 2), -1 + (2 * iy + 1) * (pixel / 2)

    def per_clump(value: Tensor) -> Tensor:
        return value[..., None, None]

    dx, dy = px - per_clump(g["x0"]), py - per_clump(g["y0"])
    cos, sin = per_clump(cos), per_clump(sin)
    du = dx * cos + dy * sin - per_clump(u)
    dv = (-dx * sin + dy * cos - per_clump(v)) / per_clump(g["cos_inclination"])
    s2 = 2 * per_clump(p["clump_size"]) ** 2
    on = torch.arange(rc.shape[1], device=image.device)[None, :] < g["n_clumps"]
    peak = p["clump_brightness"] * torch.exp(-rc / h) * (1 + A) * on
    value = per_clump(peak) * torch.exp(-(du**2 + dv**2) / s2) * inside
    index = (iy.clamp(0, size - 1) * size + ix.clamp(0, size - 1)).expand_as(value)
    flat = image.reshape(image.shape[0], -1).clone()
    flat.scatter_add_(1, index.reshape(image.shape[0], -1), value.reshape(image.shape[0], -1))
    return flat.view_as(image)


def _psf(image: Tensor, sigma_px: Tensor) -> Tensor:
    """Gaussian blur by FFT, zero padded against wrap-around; image (B, N, N), sigma (B,)."""

    size = image.shape[-1]
    margin = int(math.ceil(4 * float(sigma_px.max()))) + 1
    padded = size + margin
    fy = torch.fft.fftfreq(padded, device=image.device)
    fx = torch.fft.rfftfreq(padded, device=image.device)
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    transfer = torch.exp(-2 * math.pi**2 * sigma_px[:, None, None] ** 2 * f2)
    spectrum = torch.fft.rfft2(image, s=(padded, padded)) * transfer
    return torch.fft.irfft2(spectrum, s=(padded, padded))[..., :size, :size]


def make_galaxies(
    kind: str = "elliptical",
    n: int = 16,
    resolution: int = 64,
    seed: int | torch.Generator = 0,
    value_range: Sequence[float] = (-1.0, 1.0),
    params: Mapping[str, object] | None = None,
    return_params: bool = False,
    oversample: int | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 64,
    stretch: float | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Draws procedural galaxy images (see the module docstring for the model).

    Arguments:
        kind: "elliptical" or "spiral".
        n: The number of galaxies.
        resolution: The side R of the images.
        seed: An int seed or a torch.Generator for the parameter draws (global RNG untouched).
        value_range: The range (a, b) that intensities [0, 1] are mapped onto.
        params: Overrides of the default distributions (:data:`ELLIPTICAL_PARAMS`,
            :data:`SPIRAL_PARAMS`); see the module docstring.
        return_params: Also return the per-galaxy parameters.
        oversample: Sub-pixel samples per pixel side; default ``max(2, ceil(64 / R))``.
        device: Where to render (parameters are always drawn on the generator's device).
        chunk_size: Galaxies rendered at once (bounds memory; results do not depend on it).
        stretch: If given, an asinh softening beta > 0: the peak-normalised intensities u
            become asinh(u / beta) / asinh(1 / beta), which brings out faint outskirts
            (Lupton et al. 1999). None keeps intensities linear in surface brightness.

    Returns:
        The images, float32 with shape (n, 1, R, R), each with peak ``value_range[1]``;
        with ``return_params``, also a dict of float64 (int64 for ``n_arms``, ``n_clumps``,
        ``chirality``) tensors with shape (n,), or (n, K) for the K clump slots
        (``clump_*`` and ``clump_arm``, the arm each clump sits on; slots k >= ``n_clumps``
        are unused).

    Example:
        >>> x = make_galaxies("spiral", n=8, resolution=32, seed=1)
        >>> x.shape
        torch.Size([8, 1, 32, 32])
    """

    if kind not in _KINDS:
        raise ValueError(f"kind must be 'elliptical' or 'spiral', got {kind!r}")
    check_int(n, "n", 0)
    check_int(resolution, "resolution", 2)
    check_int(chunk_size, "chunk_size")
    if oversample is None:
        oversample = max(2, math.ceil(64 / resolution))
    check_int(oversample, "oversample")
    if stretch is not None:
        check_positive(stretch, "stretch")
    value_range = check_value_range(value_range)
    params = {} if params is None else dict(params)
    if isinstance(seed, torch.Generator):
        generator = seed
    elif isinstance(seed, int) and not isinstance(seed, bool):
        generator = torch.Generator().manual_seed(seed)
    else:
        raise TypeError(f"seed must be an int or a torch.Generator, got {seed!r}")
    device = torch.device("cpu") if device is None else torch.device(device)

    drawn = _sample_params(kind, n, params, generator)
    if kind == "spiral":
        # clump slot k sits on arm k mod m (the arm phase is random, so this is no pattern)
        slots = torch.arange(drawn["clump_radius"].shape[1])
        drawn["clump_arm"] = slots[None, :] % drawn["n_arms"][:, None]

    size = resolution * oversample
    coords = _grid(size, device)
    y, x = coords[None, :, None], coords[None, None, :]
    render = _render_elliptical if kind == "elliptical" else _render_spiral
    images = []
    for start in range(0, n, chunk_size):
        chunk = {}
        for key, value in drawn.items():
            value = value[start : start + chunk_size].to(device=device, dtype=torch.float32)
            chunk[key] = value[:, None, None] if value.ndim == 1 else value
        image = render(chunk, x, y)
        sigma_px = chunk["psf_fwhm"].flatten() / (2 * math.sqrt(2 * math.log(2))) * size / 2
        if float(sigma_px.max()) > 0:
            image = _psf(image, sigma_px)
        image = F.avg_pool2d(image[:, None], oversample).clamp_min_(0)
        peak = image.amax(dim=(-2, -1), keepdim=True)
        if not (peak > 0).all():
            raise ValueError("a galaxy has no light inside the field; check its parameters")
        image = image / peak
        if stretch is not None:
            image = torch.asinh(image / stretch) / math.asinh(1 / stretch)
        images.append(to_value_range(image, value_range))
    if images:
        out = torch.cat(images)
    else:
        out = torch.empty(0, 1, resolution, resolution, device=device)
    if return_params:
        return out, drawn
    return out
