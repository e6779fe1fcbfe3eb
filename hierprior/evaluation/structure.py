r"""Structure statistics of images that a classifier can miss: arms, pixel noise, compact peaks.

A prior learned by EM can match a population's coarse statistics (size, amplitude) while
missing its structure, and it can learn its E-step's pixel noise. These statistics look at the
structure itself and need no training.

**Pixel noise** (:func:`noise_level`). The residual of an image after a 3 x 3 median filter,
:math:`r = x - \operatorname{med}_{3\times3}(x)`, is ~0 on smooth light and carries white pixel
noise. Its robust scale :math:`1.4826\,\operatorname{MAD}(r)`, divided by the factor
:data:`WHITE_NOISE_GAIN` that white Gaussian noise gets through the same operation (so that
white noise of standard deviation s returns s), and by the image's peak, estimates the
standard deviation of white pixel noise in units of the peak. A smooth image returns ~0.

**Arms** (:func:`arm_strength`): the deprojected log-spiral Fourier amplitude (Kalnajs 1975;
Puerari & Dottori 1992). Per image: the light-weighted centre and second moments of the pixels
above 5% of the peak give the centre, axis ratio q and position angle; coordinates are
deprojected to the disk plane (the minor axis stretched by 1/q) and written in log-polar form
:math:`(u = \ln r, \varphi)`. Between the radii enclosing 25% and 85% of the light, with
:math:`\bar I(r)` the mean over each log-radius ring, the light is decomposed on logarithmic
spirals,

.. math:: A(m, p) = \frac{\sum_j (I_j - \bar I(r_j))\, e^{-i (m \varphi_j + p u_j)}}
    {\sum_j \bar I(r_j)},

for :math:`m \in \{2, 3, 4\}` and pitch angles :math:`\arctan(m / |p|)` in ``pitch`` (both
winding senses); the :math:`p \approx 0` terms (ellipses, bars, deprojection errors) are left
out, so armless disks and ellipticals score ~0. A modulation
:math:`a\, \bar I \cos(m\varphi - p u - \phi_0)` gives :math:`|A| = a/2`.

Pixel noise must not read as arms: the maximum of :math:`|A|` over many (m, p) picks up noise.
So the pixels are split into the two colours of a checkerboard (independent white noise): each
half selects its best (m, p), the other half measures :math:`|A|^2` there, minus the
noise's expectation :math:`\sigma^2 \sum_j 1 / (\sum_j \bar I_j)^2` (σ from
:func:`noise_level`), and the arm strength is the square root of the mean of the two
(clamped at 0). On the procedural galaxies of :func:`hierprior.data.make_galaxies` at 32 px
(tests/test_fidelity.py): spirals 0.22 on average, armless disks and ellipticals 0.01, also
under white noise of 0.01 of the peak (at 0.03 the disks reach ~0.05).

**Compact peaks** (:func:`compact_peaks`): local maxima of a map above a threshold, with the
sum of the map over a disk around each (a subhalo's mass in convergence maps).

What these cannot see: :func:`arm_strength` is blind to the arm count and pitch distribution
of a set beyond their strength (see ``return_details``), to arms that are not logarithmic
spirals, and it reads any winding pattern of the right pitch as arms; spatially correlated
noise is only partly removed by the checkerboard. :func:`noise_level` reads sharp real
structure of a single pixel (e.g. a point source) as noise.

References:
    Kalnajs (1975), in La Dynamique des galaxies spirales, 103.
    Puerari & Dottori (1992), Fourier analysis of structure in spiral galaxies, A&AS 93, 469.
    Rousseeuw & Croux (1993), Alternatives to the median absolute deviation, JASA 88, 1273.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "WHITE_NOISE_GAIN",
    "noise_level",
    "arm_strength",
    "compact_peaks",
    "median_filter3",
]

#: robust scale of ``x - median3x3(x)`` for white Gaussian noise x of unit variance (measured on
#: 4 x 10^6 pixels, tests/test_fidelity.py checks it)
WHITE_NOISE_GAIN = 0.855


def _images(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[1] != 1):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} needs images (B, 1, H, W) or (B, H, W), got {shape}")
    x = x.detach().double().cpu()
    x = x[:, 0] if x.ndim == 4 else x
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: the images hold NaN or Inf")
    return x


def median_filter3(x: Tensor) -> Tensor:
    """3 x 3 median filter of images (B, H, W) (edges replicated), same shape."""
    padded = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")
    patches = F.unfold(padded, 3)  # (B, 9, H*W)
    return patches.median(1).values.reshape(x.shape)


def noise_level(images: Tensor, value_range: Sequence[float] = (0.0, 1.0)) -> Tensor:
    """White pixel noise per image in units of its peak, with shape (B,).

    Arguments:
        images: (B, 1, H, W) or (B, H, W).
        value_range: the data range (a, b); intensities are x - a, the peak their maximum.
    """
    x = _images(images, "noise_level") - float(value_range[0])
    r = (x - median_filter3(x)).flatten(1)
    mad = (r - r.median(1, keepdim=True).values).abs().median(1).values
    peak = x.flatten(1).amax(1).clamp_min(1e-12)
    return (1.4826 * mad / WHITE_NOISE_GAIN / peak).float()


def _enclosed_radius(r: Tensor, w: Tensor, fraction: float) -> Tensor:
    """Per row, the radius enclosing ``fraction`` of the weight w (rows of r, w: (B, P))."""
    order = r.argsort(1)
    rs, ws = r.gather(1, order), w.gather(1, order)
    cum = ws.cumsum(1) / ws.sum(1, keepdim=True).clamp_min(1e-300)
    idx = torch.searchsorted(cum, torch.full((len(r), 1), fraction, dtype=r.dtype))
    return rs.gather(1, idx.clamp_max(r.shape[1] - 1))[:, 0]


def arm_strength(
    images: Tensor,
    value_range: Sequence[float] = (0.0, 1.0),
    *,
    arms: Sequence[int] = (2, 3, 4),
    pitch: Sequence[float] = (8.0, 40.0),
    radii: Sequence[float] = (0.25, 0.85),
    rings: int = 12,
    chunk: int = 32,
    return_details: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Deprojected log-spiral Fourier amplitude of each image (see the module docstring).

    Arguments:
        images: (B, 1, H, W) or (B, H, W).
        value_range: the data range (a, b); intensities are x - a.
        arms: the arm multiplicities m searched.
        pitch: the range of pitch angles searched [degrees].
        radii: the light fractions whose enclosed radii bound the annulus measured.
        rings: log-radius rings of the azimuthal mean.
        chunk: images measured at once (bounds memory; results do not depend on it).
        return_details: also return the best ``m`` and pitch angle (degrees, signed by the
            winding sense) per image.

    Returns:
        The arm strength, float32 with shape (B,) (and the details).
    """
    x = _images(images, "arm_strength") - float(value_range[0])
    lo_p, hi_p = (float(v) for v in pitch)
    if not 0 < lo_p < hi_p < 90:
        raise ValueError(f"arm_strength pitch must satisfy 0 < low < high < 90, got {pitch}")
    f_lo, f_hi = (float(v) for v in radii)
    if not 0 < f_lo < f_hi < 1:
        raise ValueError(f"arm_strength radii must satisfy 0 < low < high < 1, got {radii}")
    # pitch angle arctan(m / |p|): p = m c with c = +-cot(pitch), the same c grid for every m
    c = torch.linspace(1 / math.tan(math.radians(hi_p)), 1 / math.tan(math.radians(lo_p)), 24)
    c = torch.cat([-c, c]).double()
    ms = torch.tensor([int(m) for m in arms], dtype=torch.long)
    if len(ms) == 0 or int(ms.min()) < 1:
        raise ValueError(f"arm_strength arms must be integers >= 1, got {arms}")
    out = [
        _arm_chunk(x[i : i + chunk], ms, c, (f_lo, f_hi), rings) for i in range(0, len(x), chunk)
    ]
    strength = torch.cat([o[0] for o in out]).float()
    if not return_details:
        return strength
    best = torch.cat([o[1] for o in out])  # index into the (m, c) grid, m-major
    m, cot = ms[best // len(c)], c[best % len(c)]
    return strength, {"m": m, "pitch": torch.rad2deg(torch.atan(1 / cot)).float()}


def _arm_chunk(x: Tensor, ms: Tensor, c: Tensor, radii: tuple[float, float], rings: int):
    """arm_strength of images (b, H, W) in intensity units; returns (strength, best mode)."""
    b, h, w = x.shape
    sigma = noise_level(x[:, None])  # in units of each image's peak
    x = x / x.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij"
    )
    xx, yy = xx.flatten(), yy.flatten()
    u = x.flatten(1)
    # centre, axis ratio and position angle from the light above 5% of the peak
    bright = torch.where(u > 0.05, u, torch.zeros_like(u))
    total = bright.sum(1).clamp_min(1e-12)
    dx = xx - ((bright * xx).sum(1) / total)[:, None]
    dy = yy - ((bright * yy).sum(1) / total)[:, None]
    mxx, myy = (bright * dx * dx).sum(1) / total, (bright * dy * dy).sum(1) / total
    mxy = (bright * dx * dy).sum(1) / total
    half_tr = (mxx + myy) / 2
    disc = (half_tr**2 - (mxx * myy - mxy**2).clamp_min(0)).clamp_min(0).sqrt()
    q = ((half_tr - disc).clamp_min(1e-12) / (half_tr + disc).clamp_min(1e-12)).sqrt()
    q = q.clamp(0.2, 1.0)[:, None]
    theta = (0.5 * torch.atan2(2 * mxy, mxx - myy))[:, None]
    major = torch.cos(theta) * dx + torch.sin(theta) * dy
    minor = (-torch.sin(theta) * dx + torch.cos(theta) * dy) / q
    r = torch.sqrt(major**2 + minor**2).clamp_min(1e-6)
    phi, lnr = torch.atan2(minor, major), torch.log(r)
    # the annulus between the radii enclosing radii[0] and radii[1] of the light
    light = u.clamp_min(0)
    r_lo = _enclosed_radius(r, light, radii[0]).clamp_min(1.0)[:, None]
    r_hi = torch.maximum(_enclosed_radius(r, light, radii[1])[:, None], 1.5 * r_lo)
    inside = ((r >= r_lo) & (r <= r_hi)).to(x.dtype)
    ring = ((lnr - r_lo.log()) / (r_hi / r_lo).log() * rings).floor().clamp(0, rings - 1).long()
    ring_sum = torch.zeros(b, rings, dtype=x.dtype).scatter_add_(1, ring, inside * u)
    ring_n = torch.zeros(b, rings, dtype=x.dtype).scatter_add_(1, ring, inside)
    mean = (ring_sum / ring_n.clamp_min(1)).gather(1, ring)  # the ring mean at each pixel
    delta = inside * (u - mean)
    # e^{-i (m phi + p ln r)} with p = m c is z^m, z = e^{-i (phi + c ln r)}: (b, c, pixels)
    angle = (phi[:, None, :] + c[None, :, None] * lnr[:, None, :]).float()
    z = torch.polar(torch.ones_like(angle), -angle)
    power_of = {1: z}
    for m in range(2, int(ms.max()) + 1):
        power_of[m] = power_of[m // 2] * power_of[m - m // 2]
    zm = torch.view_as_real(torch.stack([power_of[int(m)] for m in ms], 1))  # (b, m, c, px, 2)
    powers = []
    for colour in (0, 1):  # checkerboard halves: independent white noise
        half = inside * ((yy + xx) % 2 == colour).to(x.dtype)
        # the ring means' light, at least 1% of the peak per pixel: an annulus without light
        # (a compact or negative sample) cannot blow the normalised amplitude up
        norm = torch.maximum((half * mean.clamp_min(0)).sum(1), 0.01 * half.sum(1)).clamp_min(
            1e-12
        )
        d = (half * delta).float()
        coeff = torch.einsum("bmcjk,bj->bmck", zm, d).flatten(1, 2).double()  # (b, modes, 2)
        power = coeff.pow(2).sum(-1) / norm[:, None] ** 2  # modes m-major
        bias = sigma.double() ** 2 * half.sum(1) / norm**2  # E|noise term|^2
        powers.append((power, bias))
    (p0, b0), (p1, b1) = powers
    cross = 0.5 * (
        p1.gather(1, p0.argmax(1, keepdim=True))[:, 0]
        - b1
        + p0.gather(1, p1.argmax(1, keepdim=True))[:, 0]
        - b0
    )
    return cross.clamp_min(0).sqrt(), (p0 + p1).argmax(1)


def compact_peaks(
    maps: Tensor,
    threshold: float,
    *,
    radius: float = 1.5,
    pixel_area: float = 1.0,
) -> tuple[Tensor, list[Tensor]]:
    """Compact peaks of maps (B, 1, H, W) or (B, H, W): local maxima (3 x 3) above ``threshold``.

    Returns the number of peaks per map (B,) and, per map, the sums of the map over a disk of
    ``radius`` pixels around each peak times ``pixel_area`` (e.g. the mass of a convergence
    bump in units of the critical density times arcsec^2).
    """
    x = _images(maps, "compact_peaks")
    b, h, w = x.shape
    local_max = F.max_pool2d(x[:, None], 3, stride=1, padding=1)[:, 0]
    is_peak = (x >= local_max) & (x > float(threshold))
    half = math.ceil(radius)
    k = torch.arange(-half, half + 1, dtype=x.dtype)
    disk = ((k[:, None] ** 2 + k[None, :] ** 2) <= radius**2).to(x.dtype)
    sums = F.conv2d(F.pad(x[:, None], (half,) * 4), disk[None, None])[:, 0] * float(pixel_area)
    counts = is_peak.flatten(1).sum(1)
    masses = [sums[i][is_peak[i]].float() for i in range(b)]
    return counts, masses
