r"""The lens galaxy's light: Sérsic and multi-Gaussian profiles with parameters at call time.

A real lens image is :math:`y = A(\eta_m)\,x + L(\eta_l) + n`: the lensed source plus the
light of the lens galaxy itself. :class:`LensLight` is :math:`L`: a surface-brightness profile
(:class:`LightProfile`) evaluated at :math:`k \times k` sub-pixel centres per pixel, averaged,
and convolved with the PSF, exactly as :class:`~hierprior.physics.lensing.Lensing` renders the
lensed source (same grid, same supersampling, same :class:`~hierprior.physics.Blur`). Light is
linear in its amplitudes :math:`a`,

.. math:: L(\eta_l; a) = \sum_{k=1}^{K} a_k B_k(\eta_l),

so the non-linear parameters :math:`\eta_l` are passed at call time as a tensor (N, [S,] d)
(with gradients), and the amplitudes are either given, solved exactly by weighted least squares
against the other components (:meth:`LensLight.solve_amplitudes`: the profile likelihood), or
drawn from their exact Gaussian conditional (:meth:`LensLight.sample_amplitudes`).

**Profiles** (lenstronomy's ``LightModel`` names and conventions; angles in arcsec):

- :class:`Sersic`, lenstronomy ``SERSIC_ELLIPSE``: parameters ``(R_sersic, n_sersic, e1, e2,
  center_x, center_y)``, amplitude ``amp`` = the surface brightness at ``R_sersic``:

  .. math:: I = \mathrm{amp}\, \exp\!\bigl(-b_n [(R / R_\mathrm{sersic})^{1/n} - 1]\bigr),
      \qquad b_n = \max(1.9992\, n - 0.3271,\ 10^{-5}),

  with the elliptical radius :math:`R = \sqrt{x'^2 + y'^2}`, :math:`x' = [(1 - e_1) \Delta x -
  e_2 \Delta y] / \nu`, :math:`y' = [-e_2 \Delta x + (1 + e_1) \Delta y] / \nu`,
  :math:`\nu = \sqrt{1 - e_1^2 - e_2^2}` (:math:`R^2 = q x_\varphi^2 + y_\varphi^2 / q` in the
  frame of the major axis :math:`\varphi = \tfrac12 \operatorname{atan2}(e_2, e_1)`, q =
  (1 - |e|)/(1 + |e|): ``R_sersic`` is the geometric-mean radius); R and ``R_sersic`` are
  floored at 1e-4 arcsec (lenstronomy's ``smoothing``). The :math:`b_n` above is lenstronomy's
  linear approximation (not the exact half-light value; :func:`hierprior.data.sersic_b` is).
- :class:`MultiGaussian`, lenstronomy ``MULTI_GAUSSIAN_ELLIPSE`` (a multi-Gaussian expansion
  with fixed widths :math:`\sigma_k`): parameters ``(e1, e2, center_x, center_y)``, one
  amplitude per Gaussian, the total flux :math:`I_k = a_k / (2\pi\sigma_k^2)
  \exp(-R^2 / 2\sigma_k^2)` with the same R; K = len(sigmas).
- :class:`LightSum` (``profile_a + profile_b``): parameters and amplitudes concatenated (e.g.
  two Sérsics, or a Sérsic and an MGE, where one Sérsic leaves residuals).

**Units.** ``LensLight`` returns the mean surface brightness over each pixel (like ``Lensing``);
lenstronomy's ``ImageModel`` returns flux per pixel, :math:`p^2` times it (p the pixel scale).

**Lens-light-subtracted data** have no light model: leave :class:`LensLight` out of the model
(``L = 0``).

References:
    Sérsic (1963), Boletín de la Asociación Argentina de Astronomía 6, 41.
    Cappellari (2002), Efficient multi-Gaussian expansion of galaxies, MNRAS 333, 400.
    Birrer and Amara (2018), lenstronomy, Phys. Dark Universe 22, 189 (conventions).
    Warren and Dye (2003), ApJ 590, 673 (amplitudes solved linearly).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hierprior.checks import check_int, check_positive
from hierprior.physics.lensing.simulator import _psf_kernel
from hierprior.physics.linear import Blur
from hierprior.physics.noise import NoiseModel

__all__ = ["LensLight", "LightProfile", "LightSum", "MultiGaussian", "Sersic"]

_SMOOTHING = 1e-4  # lenstronomy's floor of R and R_sersic [arcsec]


def _elliptical_radius(x: Tensor, y: Tensor, e1: Tensor, e2: Tensor) -> Tensor:
    """lenstronomy's ``transform_e1e2_product_average`` radius of the offsets (x, y)."""
    norm = torch.sqrt(torch.clamp(torch.abs(1 - e1**2 - e2**2), min=1e-6))
    xp = ((1 - e1) * x - e2 * y) / norm
    yp = (-e2 * x + (1 + e1) * y) / norm
    return torch.sqrt(xp**2 + yp**2)


class LightProfile(nn.Module, abc.ABC):
    r"""A family of surface-brightness profiles, linear in K amplitudes.

    Subclasses declare ``parameter_names`` (the d non-linear parameters, in order) and
    ``num_amplitudes`` (K), and implement :meth:`_basis`.
    """

    parameter_names: tuple[str, ...] = ()
    num_amplitudes: int = 1

    @property
    def num_parameters(self) -> int:
        """d, the number of non-linear parameters."""
        return len(self.parameter_names)

    def basis(self, params: Tensor, x: Tensor, y: Tensor) -> Tensor:
        r"""The K unit-amplitude surface brightnesses at (x, y).

        Arguments:
            params: the non-linear parameters, shape (*lead, d), in ``parameter_names`` order.
            x, y: coordinates [arcsec] with one shape (*grid) (shared by every row of params).

        Returns:
            (*lead, K, *grid).
        """
        if not isinstance(params, Tensor) or not params.is_floating_point():
            raise TypeError("params must be a floating-point tensor (*lead, d)")
        if params.dim() < 1 or params.shape[-1] != self.num_parameters:
            raise ValueError(
                f"{type(self).__name__} takes params (..., {self.num_parameters}) "
                f"({', '.join(self.parameter_names)}); got shape {tuple(params.shape)}"
            )
        if x.shape != y.shape:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ")
        lead, grid = params.shape[:-1], x.shape
        p = params.reshape(*lead, *([1] * (len(grid) + 1)), self.num_parameters)
        out = self._basis(p.unbind(-1), x.to(params.dtype), y.to(params.dtype))
        return out.expand(*lead, self.num_amplitudes, *grid)

    @abc.abstractmethod
    def _basis(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Each parameter (*lead, 1, [1 per grid dim]); x, y (*grid) -> (*lead, K, *grid)."""

    def surface_brightness(self, params: Tensor, amplitudes: Tensor, x: Tensor, y: Tensor):
        """Σ_k a_k B_k at (x, y): params (*lead, d), amplitudes (*lead, K) -> (*lead, *grid)."""
        b = self.basis(params, x, y)
        a = amplitudes.reshape(*amplitudes.shape, *([1] * x.dim()))
        return (a * b).sum(dim=-x.dim() - 1)

    def __add__(self, other: LightProfile) -> LightSum:
        if not isinstance(other, LightProfile):
            return NotImplemented
        return LightSum(self, other)


class Sersic(LightProfile):
    r"""lenstronomy's ``SERSIC_ELLIPSE`` (see the module docstring); amplitude ``amp``."""

    parameter_names = ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")
    num_amplitudes = 1

    def _basis(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        r_s, n, e1, e2, cx, cy = params
        r = torch.clamp(_elliptical_radius(x - cx, y - cy, e1, e2), min=_SMOOTHING)
        bn = torch.clamp(1.9992 * n - 0.3271, min=1e-5)
        return torch.exp(-bn * ((r / torch.clamp(r_s, min=_SMOOTHING)) ** (1 / n) - 1))


class MultiGaussian(LightProfile):
    r"""lenstronomy's ``MULTI_GAUSSIAN_ELLIPSE`` with fixed widths: K Gaussians, one per sigma.

    Arguments:
        sigmas: the widths [arcsec], > 0, a sequence or a 1-D tensor (e.g. log-spaced from a
            fraction of the PSF to the galaxy's extent).
    """

    parameter_names = ("e1", "e2", "center_x", "center_y")

    def __init__(self, sigmas: Sequence[float] | Tensor):
        super().__init__()
        s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if s.numel() < 1 or not torch.isfinite(s).all() or not (s > 0).all():
            raise ValueError(f"sigmas must be finite and > 0 (at least one); got {sigmas}")
        self.register_buffer("sigmas", s)
        self.num_amplitudes = s.numel()

    def _basis(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        e1, e2, cx, cy = params
        r2 = _elliptical_radius(x - cx, y - cy, e1, e2) ** 2
        s = self.sigmas.to(r2.dtype).reshape(-1, *([1] * x.dim()))
        return torch.exp(-r2 / (2 * s**2)) / (2 * math.pi * s**2)

    def extra_repr(self) -> str:
        return f"sigmas={[round(float(v), 4) for v in self.sigmas]}"


class LightSum(LightProfile):
    """A sum of profiles: parameters and amplitudes concatenated in component order.

    ``parameter_names`` are the components' names suffixed with ``_<i>`` (i = 0, 1, ...).
    """

    def __init__(self, *components: LightProfile):
        super().__init__()
        flat = []
        for c in components:
            if not isinstance(c, LightProfile):
                raise TypeError(f"components must be LightProfiles; got {type(c).__name__}")
            flat.extend(c.components if isinstance(c, LightSum) else [c])
        if not flat:
            raise ValueError("a LightSum needs at least one component")
        self.components = nn.ModuleList(flat)
        self.parameter_names = tuple(
            f"{n}_{i}" for i, c in enumerate(flat) for n in c.parameter_names
        )
        self.num_amplitudes = sum(c.num_amplitudes for c in flat)

    def split(self, params: Tensor) -> list[Tensor]:
        """The components' parameter tensors (*lead, d_i) of params (*lead, d)."""
        return list(params.split([c.num_parameters for c in self.components], dim=-1))

    def _basis(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        out, start = [], 0
        lead = params[0].shape[: params[0].dim() - 1 - x.dim()]
        for c in self.components:
            part = params[start : start + c.num_parameters]
            start += c.num_parameters
            out.append(c._basis(part, x, y).expand(*lead, c.num_amplitudes, *x.shape))
        return torch.cat(out, dim=-x.dim() - 1)


class LensLight(nn.Module):
    r"""Images of a light profile on a pixel grid: supersampled, pixel-averaged, PSF-convolved.

    Arguments:
        profile: a :class:`LightProfile`.
        image_size: n, the image side [pixels].
        pixel_scale: p [arcsec].
        supersample: k, sub-pixels per pixel side (k x k, averaged), >= 1.
        psf: None, a Gaussian FWHM [arcsec] (float, or a tensor (N,)), or a kernel (h, w) or
            (N, h, w) with odd sizes and unit sum (as for :class:`~hierprior.physics.lensing.
            Lensing`).

    Shapes: params (N, [S,] d) -> images (N, [S,] 1, n, n); amplitudes (N, [S,] K). With a
    per-observation PSF (``num_obs = N``) the first axis is the observation axis; otherwise
    any leading dims.
    """

    def __init__(
        self,
        profile: LightProfile,
        image_size: int,
        pixel_scale: float,
        supersample: int = 1,
        psf: float | Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(profile, LightProfile):
            raise TypeError(f"profile must be a LightProfile; got {type(profile).__name__}")
        self.profile = profile
        self.image_size = check_int(image_size, "image_size", 1)
        self.pixel_scale = check_positive(pixel_scale, "pixel_scale")
        self.supersample = check_int(supersample, "supersample", 1)
        kernel, per_obs = _psf_kernel(psf, self.pixel_scale)
        n = self.image_size
        self.blur = None if kernel is None else Blur(kernel, (1, n, n), per_observation=per_obs)
        self.num_obs = kernel.shape[0] if per_obs else None

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return self.profile.parameter_names

    @property
    def num_amplitudes(self) -> int:
        return self.profile.num_amplitudes

    def image_grid(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """Sub-pixel centres (x, y) [arcsec], each (n k, n k), on Lensing's grid."""
        m, k = self.image_size * self.supersample, self.supersample
        step = self.pixel_scale / k
        c = (torch.arange(m, dtype=dtype, device=device) + 0.5) * step - self.image_size * (
            self.pixel_scale / 2
        )
        return c[None, :].expand(m, m), c[:, None].expand(m, m)

    def basis(self, params: Tensor) -> Tensor:
        """The K unit-amplitude images: params (N, [S,] d) -> (N, [S,] K, 1, n, n)."""
        x, y = self.image_grid(params.dtype, params.device)
        b = self.profile.basis(params, x, y)  # (*lead, K, nk, nk)
        lead, kk = b.shape[:-3], b.shape[-3]
        b = b.reshape(-1, 1, *b.shape[-2:])
        if self.supersample > 1:
            b = F.avg_pool2d(b, self.supersample)
        b = b.reshape(*lead, kk, 1, self.image_size, self.image_size)
        if self.blur is None:
            return b
        if self.num_obs is None:
            return self.blur(b)
        if len(lead) == 0 or lead[0] != self.num_obs:
            raise ValueError(
                f"LensLight has a PSF per observation ({self.num_obs}): params must have shape "
                f"(N, [S,] d) with N = {self.num_obs}; got {tuple(params.shape)}"
            )
        flat = b.reshape(self.num_obs, -1, 1, self.image_size, self.image_size)
        return self.blur(flat).reshape(b.shape)

    def forward(self, params: Tensor, amplitudes: Tensor) -> Tensor:
        """The light image Σ_k a_k B_k: params (N, [S,] d), amplitudes (N, [S,] K) ->
        (N, [S,] 1, n, n)."""
        b = self.basis(params)
        if amplitudes.shape != b.shape[:-3]:
            raise ValueError(
                f"amplitudes must have shape {tuple(b.shape[:-3])} (params' leading dims and "
                f"K = {self.num_amplitudes}); got {tuple(amplitudes.shape)}"
            )
        return (amplitudes[..., None, None, None].to(b.dtype) * b).sum(dim=-4)

    # ------------------------------------------------------------------ amplitudes
    def _normal_equations(
        self, params: Tensor, target: Tensor, noise: NoiseModel
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(G, h, B): G = B^T Σ^-1 B (*lead, K, K), h = B^T Σ^-1 target (*lead, K)."""
        if getattr(noise, "gaussian", True) is False or not hasattr(noise, "inv_cov_action"):
            raise TypeError(
                f"solving the light amplitudes needs a Gaussian noise model (inv_cov_action); "
                f"got {type(noise).__name__}"
            )
        b = self.basis(params)  # (*lead, K, 1, n, n)
        lead = b.shape[:-4]
        if target.shape[-3:] != b.shape[-3:]:
            raise ValueError(
                f"target must end with (1, {self.image_size}, {self.image_size}); got "
                f"{tuple(target.shape)}"
            )
        target = target.to(b.dtype)
        if target.dim() < b.dim() - 1:
            target = target.reshape(
                *target.shape[:-3], *([1] * (b.dim() - 1 - target.dim())), *target.shape[-3:]
            )
        target = target.expand(*lead, *target.shape[-3:])
        if noise.num_obs is None:
            wb = noise.inv_cov_action(b)
        else:  # the noise takes (N, S', *obs): fold every other axis into S'
            n_obs = noise.num_obs
            wb = noise.inv_cov_action(b.reshape(n_obs, -1, *b.shape[-3:])).reshape(b.shape)
        gram = torch.einsum("...kchw,...lchw->...kl", b, wb)
        rhs = torch.einsum("...kchw,...chw->...k", wb, target)
        gram = 0.5 * (gram + gram.transpose(-1, -2))
        return gram, rhs, b

    def solve_amplitudes(self, params: Tensor, target: Tensor, noise: NoiseModel) -> Tensor:
        r"""The weighted least-squares amplitudes :math:`\hat a = (B^\top \Sigma^{-1} B)^{-1}
        B^\top \Sigma^{-1} t` (the maximum-likelihood, profile-likelihood amplitudes).

        Arguments:
            params: (N, [S,] d) non-linear parameters (gradients flow through).
            target: what the light must explain, y minus the other components, (N, 1, n, n) or
                (N, S, 1, n, n).
            noise: a Gaussian noise model with ``inv_cov_action`` (``GaussianNoise``,
                ``CorrelatedNoise``).

        Returns:
            (N, [S,] K). Amplitudes are unconstrained (as lenstronomy's linear solver).
        """
        gram, rhs, _ = self._normal_equations(params, target, noise)
        return _spd_solve(gram, rhs)

    def amplitude_posterior(
        self, params: Tensor, target: Tensor, noise: NoiseModel
    ) -> tuple[Tensor, Tensor]:
        r"""The Gaussian conditional of the amplitudes under a flat prior:
        :math:`a \mid \eta_l, t \sim \mathcal{N}(\hat a, (B^\top \Sigma^{-1} B)^{-1})`.

        Returns:
            (mean (N, [S,] K), covariance (N, [S,] K, K)).
        """
        gram, rhs, _ = self._normal_equations(params, target, noise)
        cov = torch.linalg.inv(gram)
        return _spd_solve(gram, rhs), 0.5 * (cov + cov.transpose(-1, -2))

    def sample_amplitudes(
        self,
        params: Tensor,
        target: Tensor,
        noise: NoiseModel,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One draw of the amplitudes from :meth:`amplitude_posterior` (from ``generator``)."""
        mean, cov = self.amplitude_posterior(params, target, noise)
        chol = torch.linalg.cholesky(cov)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + (chol @ eps[..., None])[..., 0]

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, pixel_scale={self.pixel_scale}, "
            f"supersample={self.supersample}, K={self.num_amplitudes}, num_obs={self.num_obs}"
        )


def _spd_solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """G^-1 h for symmetric positive-definite G (Cholesky; a clear error if it is singular)."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        raise ValueError(
            "the light basis is degenerate (B^T Sigma^-1 B is not positive definite): two "
            "components have the same images, or one is zero on the grid"
        )
    return torch.cholesky_solve(rhs[..., None], chol)[..., 0]
