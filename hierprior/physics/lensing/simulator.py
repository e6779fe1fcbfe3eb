r"""The strong-lensing forward model: a pixelated source seen through a mass model.

:class:`Lensing` maps a source image :math:`s` (surface brightness on a square source-plane
grid) to the lensed image

.. math:: y = P * \bigl(D\, (s \circ \boldsymbol\beta)\bigr), \qquad
    \boldsymbol\beta(\boldsymbol\theta) = \boldsymbol\theta - \boldsymbol\alpha(\boldsymbol\theta),

where :math:`\boldsymbol\alpha` is the deflection of the mass model
(:mod:`hierprior.physics.lensing.mass`), :math:`s \circ \boldsymbol\beta` reads the source by
bilinear interpolation at the ray-traced positions of :math:`k \times k` sub-pixel centres per
image pixel (zero outside the source field), :math:`D` averages the :math:`k^2` sub-pixels
(``supersample = k``), and :math:`P` is the point-spread function, applied by FFT with zero
padding (:class:`~hierprior.physics.Blur`). Surface brightness is conserved by lensing, so a
uniform source of value 1 gives an image of 1 wherever the rays land inside the source field.

**Conventions.** Angles in arcsec. Both grids are centred on 0 and arrays are indexed
[..., row, column] with x increasing along columns and y increasing along rows: pixel (i, j) of
the image has its centre at :math:`x = (j + \tfrac12) p - F/2`, :math:`y = (i + \tfrac12) p -
F/2` (pixel scale p, field :math:`F = n p`), and the source pixels likewise with pixel
:math:`F_s / n_s`. A source pixel's value is the surface brightness at its centre; between
centres it is interpolated bilinearly. The source is zero outside its field: it is continued
by zero-valued pixels, so beyond the outer pixel centres the interpolation falls linearly to
zero, reached half a source pixel outside the field (``F.grid_sample`` with zero padding and
``align_corners=False``).

**Linearity.** The map is linear in the source, with the exact adjoint
:math:`A^\top = \text{(interpolation)}^\top D^\top P^\top` (a scatter-add of the bilinear
weights, the spreading of each pixel over its sub-pixels divided by :math:`k^2`, and the
correlation with the PSF), so ``Lensing.linear`` is True and every E-step method, the exact
Gaussian posterior included, applies. The ray-traced sampling grid depends on the lens only;
it is computed once per dtype and device and reused while the lens's parameters keep the
values it was traced with (they are compared on every call, so no change of the lens, in
place or by reassignment, can leave stale rays), unless a lens parameter requires gradients
(then it is traced on every call and the image is differentiable in the lens).

References:
    Schneider, Ehlers and Falco (1992), Gravitational Lenses, Springer (the lens equation).
    Warren and Dye (2003), Semilinear gravitational lens inversion, ApJ 590, 673 (the lensed
    image as a linear map of a pixelated source).
    Birrer and Amara (2018), lenstronomy, Phys. Dark Universe 22, 189 (conventions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hierprior.checks import check_int, check_positive
from hierprior.physics.forward import ForwardModel
from hierprior.physics.lensing.mass import MassModel
from hierprior.physics.linear import Blur

__all__ = ["Lensing", "gaussian_psf"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def gaussian_psf(fwhm: float | Tensor, pixel_scale: float, size: int | None = None) -> Tensor:
    r"""Circular Gaussian PSF kernels sampled at pixel centres and normalised to unit sum.

    Arguments:
        fwhm: the full width at half maximum [arcsec], a float or a tensor (N,) (one kernel per
            observation), > 0.
        pixel_scale: the pixel size [arcsec].
        size: the odd kernel side; default the smallest odd size covering :math:`\pm 4\sigma`
            of the widest kernel (at least 3).

    Returns:
        A float64 kernel with shape (size, size), or (N, size, size) for a tensor fwhm.
    """
    pixel_scale = check_positive(pixel_scale, "pixel_scale")
    per_obs = isinstance(fwhm, Tensor)
    f = (
        fwhm.detach().to(torch.float64).cpu()
        if per_obs
        else torch.tensor([float(fwhm)], dtype=torch.float64)
    )
    if f.dim() != 1:
        raise ValueError(f"PSF fwhm must be a float or a tensor (N,); got {tuple(f.shape)}")
    if not (torch.isfinite(f).all() and (f > 0).all()):
        raise ValueError(f"PSF fwhm must be positive and finite; got {fwhm}")
    sigma = f * FWHM_TO_SIGMA / pixel_scale  # in pixels
    if size is None:
        half = max(1, math.ceil(4 * float(sigma.max())))
        size = 2 * half + 1
    check_int(size, "PSF size")
    if size % 2 == 0:
        raise ValueError(f"PSF size must be odd (a kernel centred on a pixel); got {size}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    r2 = r[:, None] ** 2 + r[None, :] ** 2
    k = torch.exp(-r2 / (2 * sigma[:, None, None] ** 2))
    k = k / k.sum(dim=(-2, -1), keepdim=True)
    return k if per_obs else k[0]


def _psf_kernel(psf: object, pixel_scale: float) -> tuple[Tensor | None, bool]:
    """(kernel, per_observation) from None / FWHM float / FWHM tensor (N,) / kernel tensor."""
    if psf is None:
        return None, False
    if isinstance(psf, bool):
        raise TypeError("psf must be None, a FWHM in arcsec, or a kernel tensor; got a bool")
    if isinstance(psf, (int, float)):
        return gaussian_psf(float(psf), pixel_scale), False
    if not isinstance(psf, Tensor):
        raise TypeError(f"psf must be None, a FWHM in arcsec, or a kernel tensor; got {psf!r}")
    if psf.dim() == 1:
        return gaussian_psf(psf, pixel_scale), True
    if psf.dim() not in (2, 3):
        raise ValueError(
            f"a PSF kernel must have shape (h, w) or (N, h, w); got {tuple(psf.shape)}"
        )
    if not psf.dtype.is_floating_point or not torch.isfinite(psf).all():
        raise ValueError("the PSF kernel must be floating and finite")
    h, w = psf.shape[-2:]
    if h % 2 == 0 or w % 2 == 0:
        raise ValueError(f"the PSF kernel must have odd sizes (centred); got ({h}, {w})")
    sums = psf.detach().to(torch.float64).sum(dim=(-2, -1))
    if not torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=1e-4):
        raise ValueError(
            f"the PSF kernel must be normalised to unit sum; its sum is {sums.flatten()[:4]}"
        )
    return psf, psf.dim() == 3


class Lensing(ForwardModel):
    r"""The image of a pixelated source through a mass model (see the module docstring).

    Arguments:
        mass: a :class:`~hierprior.physics.lensing.MassModel` (shared, or with one set of
            parameters per observation), or None for no lens (:math:`\boldsymbol\beta =
            \boldsymbol\theta`: the source resampled onto the image grid, then the PSF).
        image_size: the image side n [pixels].
        pixel_scale: the image pixel size p [arcsec].
        source_size: the source side :math:`n_s` [pixels].
        source_fov: the source field side :math:`F_s` [arcsec].
        supersample: k, rays per image pixel side (k x k rays, averaged), >= 1.
        psf: None; a Gaussian FWHM [arcsec] (float) or one per observation (tensor (N,)); or a
            kernel with odd sizes and unit sum, (h, w) shared or (N, h, w) per observation.

    Shapes: source (N, [S,] 1, n_s, n_s) -> image (N, [S,] 1, n, n) for a per-observation
    model (``num_obs = N``, from the mass model or the PSF); any leading dims when shared.
    """

    linear = True

    def __init__(
        self,
        mass: MassModel | None,
        image_size: int,
        pixel_scale: float,
        source_size: int,
        source_fov: float,
        supersample: int = 1,
        psf: float | Tensor | None = None,
    ):
        if mass is not None and not isinstance(mass, MassModel):
            raise TypeError(f"mass must be a hierprior MassModel or None; got {type(mass)}")
        image_size = check_int(image_size, "image_size")
        source_size = check_int(source_size, "source_size")
        supersample = check_int(supersample, "supersample")
        pixel_scale = check_positive(pixel_scale, "pixel_scale")
        source_fov = check_positive(source_fov, "source_fov")
        kernel, psf_per_obs = _psf_kernel(psf, pixel_scale)
        counts = {}
        if mass is not None and mass.num_obs is not None:
            counts["mass"] = mass.num_obs
        if psf_per_obs:
            counts["psf"] = kernel.shape[0]
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"the mass model has {counts['mass']} observations but the PSF has {counts['psf']}"
            )
        num_obs = next(iter(counts.values())) if counts else None
        super().__init__((1, source_size, source_size), (1, image_size, image_size), num_obs)
        self.mass = mass
        self.image_size, self.pixel_scale = image_size, pixel_scale
        self.source_size, self.source_fov = source_size, source_fov
        self.supersample = supersample
        self.blur = (
            None
            if kernel is None
            else Blur(kernel, (1, image_size, image_size), per_observation=psf_per_obs)
        )
        self._grid_cache: dict = {}

    # ------------------------------------------------------------------ grids
    @property
    def fov(self) -> float:
        """The image field side n p [arcsec]."""
        return self.image_size * self.pixel_scale

    def image_grid(
        self,
        supersample: int = 1,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Pixel-centre coordinates (x, y) of the image [arcsec], each (n k, n k).

        With ``supersample = k`` the centres of the k x k sub-pixels of every pixel.
        """
        k = check_int(supersample, "supersample")
        m = self.image_size * k
        step = self.pixel_scale / k
        c = (torch.arange(m, dtype=dtype, device=device) + 0.5) * step - self.fov / 2
        return c[None, :].expand(m, m), c[:, None].expand(m, m)

    def source_grid(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """Pixel-centre coordinates (x, y) of the source [arcsec], each (n_s, n_s)."""
        n, step = self.source_size, self.source_fov / self.source_size
        c = (torch.arange(n, dtype=dtype, device=device) + 0.5) * step - self.source_fov / 2
        return c[None, :].expand(n, n), c[:, None].expand(n, n)

    def ray_trace(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Source-plane positions :math:`\boldsymbol\beta` of the (sub-)pixel centres.

        Returns:
            (beta_x, beta_y), each (N, n k, n k) for a per-observation mass model, else
            (n k, n k).
        """
        x, y = self.image_grid(self.supersample, dtype, device)
        if self.mass is None:
            return x, y
        # the grid is regular: the mass model evaluates it on its fastest exact path (the
        # separable grid for elementwise models, FFT for a pixelated convergence)
        c = x[0]
        ax, ay = self.mass.grid_deflection(c, c)
        lead = (1,) if self.mass.num_obs is not None else ()
        return c.reshape(*lead, 1, -1) - ax, c.reshape(*lead, -1, 1) - ay

    def _lens_state(self) -> list[Tensor]:
        """The lens as it is now: every tensor of the mass model (its parameters, a κ map)."""
        return [] if self.mass is None else list(self.mass.buffers())

    def _sampling_grid(self, like: Tensor) -> Tensor:
        """grid_sample coordinates of the rays, (N or 1, n k, n k, 2), in like's dtype.

        The grid is cached per (dtype, device) together with a copy of the lens's tensors, and
        reused only while the lens's tensors still *equal* that copy (shapes and values):
        a parameter changed in place or reassigned (``mass.theta_E = ...``) retraces the rays.
        Comparing the few parameters costs nothing next to ray tracing.
        """
        state = self._lens_state()
        if any(b.requires_grad for b in state):
            return self._trace_grid(like, cache=False)
        key = (like.dtype, like.device)
        hit = self._grid_cache.get(key)
        if hit is not None:
            saved, grid = hit
            if len(saved) == len(state) and all(
                a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))
                for a, b in zip(saved, state)
            ):
                return grid
        grid = self._trace_grid(like, cache=True)
        self._grid_cache = {key: ([b.detach().clone() for b in state], grid)}
        return grid

    def _trace_grid(self, like: Tensor, cache: bool) -> Tensor:
        """The ray-traced grid_sample coordinates, (N or 1, n k, n k, 2)."""
        lens_grad = not cache
        bx, by = self.ray_trace(like.dtype, like.device)
        half = self.source_fov / 2
        if lens_grad:
            grid = torch.stack((bx / half, by / half), dim=-1)
        else:  # written in place: no stack copy (ray tracing is the uncached call's cost)
            grid = torch.empty((*bx.shape, 2), dtype=bx.dtype, device=bx.device)
            torch.div(bx, half, out=grid[..., 0])
            torch.div(by, half, out=grid[..., 1])
        if grid.dim() == 3:
            grid = grid.unsqueeze(0)
        return grid

    # ------------------------------------------------------------------ the map
    def _batch(self, t: Tensor, event: tuple[int, ...], name: str) -> tuple[Tensor, tuple]:
        if name == "x" and isinstance(t, Tensor) and tuple(t.shape[-3:]) != event:
            raise ValueError(
                f"Lensing: the source has shape {tuple(t.shape)} but this model takes sources "
                f"(N, [S,] 1, {self.source_size}, {self.source_size}) (source_size = "
                f"{self.source_size})"
            )
        return super()._batch(t, event, name)

    def _expand_grid(self, grid: Tensor, n: int) -> Tensor:
        return grid if grid.shape[0] == n else grid.expand(n, *grid.shape[1:])

    def _forward(self, x: Tensor) -> Tensor:
        return self.render(x, self._sampling_grid(x))

    def render(self, x: Tensor, grid: Tensor) -> Tensor:
        """The image of sources x (N, S, 1, n_s, n_s) read at the ray positions ``grid``
        (grid_sample coordinates β / (F_s / 2), x then y): (N or 1, m, m, 2), one lens per
        observation shared by its S samples, or (N·S, m, m, 2), one lens per (observation,
        sample), observation-major; m = n k. Returns (N, S, 1, n, n) (supersampled pixels
        averaged, then the PSF). Differentiable in x and grid."""
        N, S = x.shape[:2]
        if S > 1 and grid.shape[0] == N * S:
            n_s = x.shape[-1]
            image = F.grid_sample(
                x.reshape(N * S, 1, n_s, n_s),
                grid,
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            ).reshape(N, S, *grid.shape[1:3])
        else:
            image = F.grid_sample(
                x[:, :, 0],
                self._expand_grid(grid, N),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        if self.supersample > 1:
            image = F.avg_pool2d(image, self.supersample)
        image = image.unsqueeze(2)
        return image if self.blur is None else self.blur._forward(image)

    def _adjoint(self, y: Tensor) -> Tensor:
        N, S = y.shape[:2]
        if self.blur is not None:
            y = self.blur._adjoint(y)
        y = y[:, :, 0]
        k = self.supersample
        if k > 1:
            y = y.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1) / k**2
        grid = self._expand_grid(self._sampling_grid(y), N)
        zeros = y.new_zeros(()).expand(N, S, self.source_size, self.source_size)
        source, _ = torch.ops.aten.grid_sampler_2d_backward(
            y.contiguous(), zeros, grid, 0, 0, False, [True, False]
        )
        return source.unsqueeze(2)

    def _select(self, index: Tensor) -> Lensing:
        mass = None if self.mass is None else self.mass[index]
        psf = None if self.blur is None else self.blur.psf  # a buffer: moved by .to()
        if psf is not None and self.blur.num_obs is not None:
            psf = psf.index_select(0, index.to(psf.device))
        return Lensing(
            mass,
            self.image_size,
            self.pixel_scale,
            self.source_size,
            self.source_fov,
            self.supersample,
            psf,
        )

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, pixel_scale={self.pixel_scale}, "
            f"source_size={self.source_size}, source_fov={self.source_fov}, "
            f"supersample={self.supersample}, num_obs={self.num_obs}"
        )
