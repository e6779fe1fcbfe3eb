r"""The latent-mass-map forward model: a lensed image as a function of a convergence correction.

When the physical lens model is misspecified (real lenses are not SIE + shear), the residual
mass is mapped to an over-parametrised latent: a pixelated convergence δκ on top of the known
analytic macro model. :class:`LatentMassMap` is the map

.. math:: \delta\kappa_i \mapsto A_i(\delta\kappa_i) = P_i * \Big[s_i\big(\boldsymbol\theta
    - \boldsymbol\alpha_{\text{macro},i}(\boldsymbol\theta)
    - \boldsymbol\alpha_{\delta\kappa_i}(\boldsymbol\theta)\big)\Big]

with the macro model (e.g. SIE + shear) and the source :math:`s_i` known per observation: the
rays of :class:`~hierprior.physics.lensing.Lensing` (k x k per image pixel, averaged), the
deflection of δκ by :class:`~hierprior.physics.lensing.PixelatedConvergence` (exact FFT
convolutions on the ray grid when the ray step divides the δκ pixel, else the exact direct
sum), a bilinear source lookup (zero outside its field) and the PSF. It is non-linear in δκ
(``linear = False``); its JVP and VJP come from automatic differentiation through the
deflection (linear in δκ) and ``grid_sample`` (bilinear in the rays), so every E-step method
for non-linear models works on it (MMPS linearised, DPS, DAPS with Langevin steps, TDS).

The macro rays are those of the inner :class:`Lensing` (traced once and cached there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hierprior.checks import check_int, check_positive
from hierprior.physics.forward import ForwardModel
from hierprior.physics.lensing.mass import MassModel
from hierprior.physics.lensing.pixelated import PixelatedConvergence
from hierprior.physics.lensing.simulator import Lensing

__all__ = ["LatentMassMap"]


class LatentMassMap(ForwardModel):
    r"""Lensed images as a function of a pixelated convergence correction δκ (see the module
    docstring).

    Arguments:
        macro: the known analytic mass model (per observation, ``num_obs = N``, or shared).
        source: the known sources, (N, 1, n_s, n_s) (or (1, n_s, n_s) / (n_s, n_s) shared).
        kappa_size: n, δκ pixels per side.
        kappa_fov: the δκ grid's side [arcsec], centred on 0.
        image_size, pixel_scale, source_fov, supersample, psf: as for
            :class:`~hierprior.physics.lensing.Lensing`.
        kappa_scale: the latent's unit: the signal x maps to δκ = kappa_scale · x (a prior
            is best trained on O(1) values, while δκ is typically ~0.01-0.1).

    Shapes: x = δκ / kappa_scale (N, [S,] 1, n, n) -> images (N, [S,] 1, image_size,
    image_size).
    """

    linear = False

    def __init__(
        self,
        macro: MassModel,
        source: Tensor,
        kappa_size: int,
        kappa_fov: float,
        image_size: int,
        pixel_scale: float,
        source_fov: float,
        supersample: int = 1,
        psf: float | Tensor | None = None,
        kappa_scale: float = 1.0,
    ):
        if not isinstance(macro, MassModel):
            raise TypeError(f"macro must be a hierprior MassModel; got {type(macro).__name__}")
        if not isinstance(source, Tensor) or source.dim() not in (2, 3, 4):
            raise ValueError(
                "source must be a tensor (N, 1, n_s, n_s), (1, n_s, n_s) or (n_s, n_s)"
            )
        if source.dim() == 2:
            source = source[None]
        if source.dim() == 3:
            source = source[None]
        if source.shape[1] != 1 or source.shape[-1] != source.shape[-2]:
            raise ValueError(f"source must be square with one channel; got {tuple(source.shape)}")
        if not torch.isfinite(source).all():
            raise ValueError("source is not finite")
        check_int(kappa_size, "kappa_size")
        check_positive(kappa_fov, "kappa_fov")
        check_positive(kappa_scale, "kappa_scale")
        lens = Lensing(
            macro, image_size, pixel_scale, source.shape[-1], source_fov, supersample, psf
        )
        counts = {c for c in (lens.num_obs, source.shape[0] if source.shape[0] > 1 else None) if c}
        if len(counts) > 1:
            raise ValueError(
                f"the macro model / PSF has {lens.num_obs} observations but the source "
                f"{source.shape[0]}"
            )
        num_obs = counts.pop() if counts else None
        super().__init__((1, kappa_size, kappa_size), (1, image_size, image_size), num_obs)
        self.lens = lens
        self.register_buffer("source", source)
        self.kappa_size, self.kappa_fov = kappa_size, float(kappa_fov)
        self.kappa_scale = float(kappa_scale)
        self._kernels: dict = {}  # PixelatedConvergence kernel transforms (geometry only)

    # ------------------------------------------------------------------ pieces
    def kappa_deflection(self, kappa: Tensor) -> tuple[Tensor, Tensor]:
        """The deflection of δκ maps (B, n, n) on the ray grid: (B, m, m) each."""
        pc = PixelatedConvergence(kappa, self.kappa_fov)
        pc._kernel_cache = self._kernels  # the kernels depend on the geometry only
        c = self.lens.image_grid(self.lens.supersample, kappa.dtype, kappa.device)[0][0]
        return pc.grid_deflection(c, c)

    # ------------------------------------------------------------------ the map
    def _forward(self, x: Tensor) -> Tensor:
        N, S = x.shape[:2]
        n = self.kappa_size
        ax, ay = self.kappa_deflection(self.kappa_scale * x.reshape(N * S, n, n))
        # the macro rays are Lensing's cached sampling grid (β / half, the macro model is fixed)
        macro = self.lens._sampling_grid(x)
        if macro.shape[0] > 1:
            macro = macro.repeat_interleave(S, dim=0)
        half = self.lens.source_fov / 2
        grid = macro - torch.stack((ax, ay), dim=-1) / half
        source = self.source.to(x.dtype)
        source = source.expand(N, *source.shape[1:]) if source.shape[0] == 1 else source
        source = source.repeat_interleave(S, dim=0)
        if grid.shape[0] != source.shape[0]:
            grid = grid.expand(source.shape[0], *grid.shape[1:])
        image = F.grid_sample(
            source, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        if self.lens.supersample > 1:
            image = F.avg_pool2d(image, self.lens.supersample)
        image = image.reshape(N, S, 1, self.lens.image_size, self.lens.image_size)
        return image if self.lens.blur is None else self.lens.blur._forward(image)

    def _jvp(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # reverse-over-reverse (grid_sample has no forward-mode derivative for the grid):
        # J v = d/du <J^T u, v>, from one forward pass
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            y = self._forward(xg)
            u = torch.zeros_like(y, requires_grad=True)
            (jtu,) = torch.autograd.grad(y, xg, u, create_graph=True)
            (jv,) = torch.autograd.grad(jtu, u, v)
        return y.detach(), jv

    def _select(self, index: Tensor) -> LatentMassMap:
        lens = self.lens[index]  # the macro model and a per-observation PSF, sliced
        source = self.source
        if source.shape[0] > 1:
            source = source.index_select(0, index.to(source.device))
        out = LatentMassMap(
            lens.mass,
            source,
            self.kappa_size,
            self.kappa_fov,
            lens.image_size,
            lens.pixel_scale,
            lens.source_fov,
            lens.supersample,
            None if lens.blur is None else lens.blur.psf,
            self.kappa_scale,
        )
        out._kernels = self._kernels
        return out
