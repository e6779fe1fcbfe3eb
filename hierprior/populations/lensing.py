r"""Generator of per-observation strong lenses: ``RandomLens(...)(n, source_shape, generator)``.

Each observation i sees its source through its own lens, drawn from a declarative lens
population: a :class:`~hierprior.physics.lensing.LensPrior` (mass components and one
distribution per parameter, e.g. SIE + external shear in a config,
:mod:`hierprior.physics.lensing.priors`), with a Gaussian PSF, as a
:class:`~hierprior.physics.Lensing` forward model. Without ``lens`` the population is the
SIE + shear shorthand below, drawn independently per observation:

=====================  ==========================================  ==========================
parameter              distribution (defaults)                     meaning
=====================  ==========================================  ==========================
``theta_E``            Uniform(0.9, 1.3) arcsec                    Einstein radius
axis ratio q           Uniform(0.6, 1.0)                           SIE minor / major axis
position angle         Uniform(0, pi)                              SIE major axis from +x
``center_x, _y``       Uniform(-0.15, 0.15) arcsec each            lens centre (source at 0)
shear magnitude        Uniform(0, 0.05)                            :math:`|\gamma|`
shear angle            Uniform(0, pi)                              :math:`\varphi_\gamma`
PSF FWHM               0.1 arcsec (or Uniform(a, b) per obs.)      Gaussian PSF
=====================  ==========================================  ==========================

with :math:`(e_1, e_2) = \frac{1 - q}{1 + q}(\cos 2\varphi, \sin 2\varphi)` and
:math:`(\gamma_1, \gamma_2) = |\gamma| (\cos 2\varphi_\gamma, \sin 2\varphi_\gamma)`: the
:class:`~hierprior.physics.lensing.LensPrior` ``SIE.prior(theta_E=Uniform(...),
ellipticity=AxisRatioAngle(...), center_x=Uniform(...), center_y=Uniform(...)) +
Shear.prior(shear=MagnitudeAngle(...))`` (:meth:`RandomLens.shorthand`). Every draw maps one
set of uniform numbers, one column per parameter (two per polar pair) in the order of the
names, then one for the PSF FWHM, drawn whether or not it is used (so the shorthand's lenses are
those RandomLens drew before the lens population became declarative, bit for bit). The lens
centre is offset from the source (which sits at the origin), so the images are arcs and
counter-images rather than full rings. With ``lensed=False`` the same images are made without
a lens (the source resampled onto the image grid, then the PSF): the unlensed variant of an
experiment.

The lenses are known to the E-step by default. With ``blind=True`` they are not: the generator
returns a :class:`~hierprior.physics.lensing.BlindLensing` that holds the lens prior (the
population's own) and the true parameters for simulation and evaluation only, and only the
joint (source, lens) posterior method samples it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hierprior.physics import Compose, ForwardModel, Reshape
from hierprior.physics.lensing import SIE, Lensing, Shear
from hierprior.physics.lensing.blind import BlindLensing
from hierprior.physics.lensing.priors import (
    AxisRatioAngle,
    Fixed,
    LensPrior,
    MagnitudeAngle,
    ParameterPrior,
    Uniform,
)

__all__ = ["RandomLens"]


def _bounds(value: object, name: str, low: float = -math.inf) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"RandomLens {name} must be a pair (low, high); got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and low <= a <= b):
        raise ValueError(f"RandomLens {name} must be finite, {low} <= low <= high; got {value}")
    return a, b


def _uniform(bounds: tuple[float, float]) -> ParameterPrior:
    return Fixed(bounds[0]) if bounds[0] == bounds[1] else Uniform(*bounds)


#: the shorthand's defaults
SHORTHAND = {
    "theta_E": (0.9, 1.3),
    "axis_ratio": (0.6, 1.0),
    "center": (-0.15, 0.15),
    "shear": (0.0, 0.05),
}


class RandomLens:
    """Random lenses with a Gaussian PSF, one per observation of a source (1, R, R) (or a
    flat source (R²,): the forward model then starts with a Reshape).

    Arguments:
        image_size: the image side [pixels].
        pixel_scale: the image pixel size [arcsec].
        source_fov: the side of the source field [arcsec] (the source image spans it).
        supersample: rays per image pixel side.
        theta_E, axis_ratio, center, shear: the SIE + shear shorthand: (low, high) bounds of
            the uniform distributions in the module docstring (a number fixes the value;
            None: the default). Not allowed together with ``lens``.
        psf_fwhm: the PSF FWHM [arcsec], a number (shared) or (low, high) (one per observation);
            None for no PSF.
        lensed: False for the unlensed variant (PSF only).
        dtype: the dtype of the lens parameters (default float32).
        lens: the lens population, a :class:`~hierprior.physics.lensing.LensPrior` (its mass
            components and parameter distributions, e.g. from a config); None: the shorthand.
        blind: True: the E-step does not know the lenses (a
            :class:`~hierprior.physics.lensing.BlindLensing` with this population as its
            prior and the drawn lenses as its truth).
    """

    def __init__(
        self,
        image_size: int = 48,
        pixel_scale: float = 0.08,
        source_fov: float = 2.0,
        supersample: int = 2,
        theta_E: Sequence[float] | float | None = None,
        axis_ratio: Sequence[float] | float | None = None,
        center: Sequence[float] | float | None = None,
        shear: Sequence[float] | float | None = None,
        psf_fwhm: Sequence[float] | float | None = 0.1,
        lensed: bool = True,
        dtype: str | torch.dtype = "float32",
        lens: LensPrior | None = None,
        blind: bool = False,
    ):
        self.image_size, self.supersample = image_size, supersample
        self.pixel_scale, self.source_fov = pixel_scale, source_fov
        given = {
            k: v
            for k, v in {
                "theta_E": theta_E,
                "axis_ratio": axis_ratio,
                "center": center,
                "shear": shear,
            }.items()
            if v is not None
        }
        if lens is not None and given:
            raise ValueError(
                f"RandomLens takes either a lens population (lens) or the SIE + shear "
                f"shorthand, not both; got lens and {sorted(given)}"
            )
        if lens is None:
            lens = self.shorthand(**given)
        elif not isinstance(lens, LensPrior):
            raise TypeError(f"RandomLens lens must be a hierprior LensPrior; got {lens!r}")
        self.lens = lens
        self.psf_fwhm = None if psf_fwhm is None else _bounds(psf_fwhm, "psf_fwhm", low=1e-6)
        self.lensed = bool(lensed)
        self.blind = bool(blind)
        if self.blind and not self.lensed:
            raise ValueError("RandomLens blind=True needs lensed=True (there is no lens to hide)")
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        # build a lens once so that bad geometry fails when the generator is built
        self(1, (1, 8, 8), torch.Generator().manual_seed(0))

    @staticmethod
    def shorthand(
        theta_E: Sequence[float] | float = SHORTHAND["theta_E"],
        axis_ratio: Sequence[float] | float = SHORTHAND["axis_ratio"],
        center: Sequence[float] | float = SHORTHAND["center"],
        shear: Sequence[float] | float = SHORTHAND["shear"],
    ) -> LensPrior:
        """The SIE + shear lens population of the bounds in the module docstring."""
        theta = _bounds(theta_E, "theta_E", low=1e-6)
        q = _bounds(axis_ratio, "axis_ratio", low=1e-3)
        if q[1] > 1:
            raise ValueError(f"RandomLens axis_ratio must lie in (0, 1]; got {axis_ratio}")
        c = _bounds(center, "center")
        g = _bounds(shear, "shear", low=0.0)
        return LensPrior(
            [
                SIE.prior(
                    theta_E=_uniform(theta),
                    ellipticity=AxisRatioAngle(q),
                    center_x=_uniform(c),
                    center_y=_uniform(c),
                ),
                Shear.prior(shear=MagnitudeAngle(g)),
            ]
        )

    def __call__(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> ForwardModel:
        flat = len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]
        if not flat and (len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]):
            raise ValueError(
                f"RandomLens needs square sources (1, R, R) or (R²,) (flat), got shape {shape}"
            )
        side = math.isqrt(shape[0]) if flat else shape[-1]
        columns = self.lens.columns
        u = torch.rand((n, columns + 1), generator=generator, dtype=torch.float64)
        params = self.lens.from_uniform(u[:, :columns]).to(self.dtype)
        psf = None
        if self.psf_fwhm is not None:
            lo, hi = self.psf_fwhm
            psf = lo if lo == hi else lo + (hi - lo) * u[:, columns]
        geometry = (
            self.image_size,
            self.pixel_scale,
            side,
            self.source_fov,
            self.supersample,
        )
        if self.blind:
            return BlindLensing(self.lens, *geometry, psf, truth=params, flat=flat)
        mass = self.lens.family.fixed(params) if self.lensed else None
        lens = Lensing(mass, *geometry, psf)
        return Compose(Reshape(tuple(shape), lens.input_shape), lens) if flat else lens
