r"""A lens mass component whose convergence lives on a pixel grid.

:class:`PixelatedConvergence` ``(kappa, fov)`` holds a convergence map :math:`\kappa` on an
n x n grid of side ``fov`` [arcsec] centred on 0, with the conventions of
:class:`~hierprior.physics.lensing.Lensing`: arrays indexed [..., row, column], x increasing
along columns and y along rows, pixel (i, j) centred at :math:`x = (j + \tfrac12) h - F/2`,
:math:`y = (i + \tfrac12) h - F/2` with :math:`h = F / n`. It has the interface of the analytic
components (:mod:`hierprior.physics.lensing.mass`): ``deflection``, ``convergence``, sums
(``SIE(...) + Shear(...) + PixelatedConvergence(...)``), ``mass[idx]``, float32/float64,
CPU/CUDA, and it is differentiable in :math:`\kappa` (a tensor that requires gradients stays
in the graph).

**The pixel model.** Each pixel is a *uniform square* of side h with its value of
:math:`\kappa` (so :meth:`~PixelatedConvergence.convergence` is piecewise constant, 0 outside
the grid). The deflection

.. math:: \boldsymbol\alpha(\boldsymbol\theta) = \frac1\pi \int
    \kappa(\boldsymbol\theta')\, \frac{\boldsymbol\theta - \boldsymbol\theta'}
    {|\boldsymbol\theta - \boldsymbol\theta'|^2}\, d^2\theta'

of a uniform square is finite everywhere, at pixel centres, edges and corners included (a
point mass per pixel would diverge at its centre), and has a closed form. With
:math:`u = x - x'`, :math:`v = y - y'` the offsets to the square's corners,

.. math:: \alpha_x = \frac{\kappa}{\pi} \sum_{\text{corners}} \pm G(u, v), \qquad
    \alpha_y = \frac{\kappa}{\pi} \sum_{\text{corners}} \pm G(v, u), \qquad
    G(u, v) = u \arctan\frac vu + \frac v2 \log(u^2 + v^2),

since :math:`\partial_u \partial_v G = u / (u^2 + v^2)`; the signs are those of a double
difference, + at (u_max, v_max) and (u_min, v_min). G is continuous, with the limits
:math:`u \arctan(v/u) \to 0` as :math:`u \to 0` and :math:`v \log(u^2 + v^2) \to 0` at the
corner itself. The kernel is evaluated in float64 (the double difference cancels
:math:`\sim (r/h)^2` digits far from a pixel) and cast to the working dtype.

**Evaluation.** At arbitrary positions (:meth:`~PixelatedConvergence.deflection`) the
deflection is the exact direct sum over pixels, O(P n^2) for P positions, in chunks of bounded
memory. On a regular grid (:meth:`~PixelatedConvergence.grid_deflection`, which
:class:`~hierprior.physics.lensing.Lensing` ray-traces through) whose step s divides the pixel
side, :math:`h / s = k` an integer (to 1e-9 relative; with any offset), the output splits into
:math:`k \times k` phases, :math:`x_{k a + b} = x_b + a h`: on each phase the offsets to the
pixel centres are :math:`(x_b - X_0) + (a - j) h`, so the deflection is the linear convolution
of :math:`\kappa` with the closed-form kernel sampled at those offsets, computed exactly by FFT
with zero padding (size >= n + A - 1 for A outputs per axis; for the pixel centres themselves a
(2n - 1)^2 kernel), inside and outside the :math:`\kappa` grid alike. The kernel transforms are
cached per (dtype, device, grid). A grid whose step does not divide h, or a tiny grid of a huge
k (the kernels would outgrow the direct sum), falls back to the direct sum.

**Other codes** (measured in tests/test_pixelated_convergence.py,
``test_comparison_with_lenstronomy_and_caustics``, a Gaussian :math:`\kappa` of width 3 pixels
on 32 x 32 pixels, differences as fractions of the maximum deflection). lenstronomy 1.14.2's
``convergence_integrals.deflection_from_kappa_grid`` treats each pixel as a point mass (its
kernel is 0 at the pixel itself) and returns the deflection at the pixel centres only: it is
the point-mass pixel sum to 1e-15 and differs from the uniform squares by 5.4e-4. caustics
1.7.1's ``PixelatedConvergence`` also uses point masses, but samples its (even-sized, 2n)
kernel at half-integer pixel offsets, so the map it returns at a pixel centre
:math:`\boldsymbol\theta` is the point-mass sum at :math:`\boldsymbol\theta + (h/2, h/2)`
(to 6.5e-7, for n = 32 and n = 33 alike): its deflection field is translated by half a
pixel towards -x and -y, the mass appearing at :math:`-(h/2, h/2)` from where it is (it then
interpolates that map bilinearly at other positions). Against this
model at the same positions it differs by 0.18; against this model at
:math:`\boldsymbol\theta + (h/2, h/2)` by 6e-3 (point masses vs squares).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hierprior.checks import check_positive
from hierprior.physics.forward import observation_index
from hierprior.physics.lensing.mass import MassModel

__all__ = ["PixelatedConvergence"]

# elements of one float64 (positions x corners) block in the direct sum: ~8 MiB a tensor
_CHUNK_ELEMENTS = 1 << 20
_CACHE_SIZE = 8
# the most kernel elements (phases x FFT size) of the FFT path, per component
_FFT_KERNEL_ELEMENTS = 1 << 25


def _fast_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    best = 1 << max(0, (n - 1).bit_length())
    f5 = 1
    while f5 < best:
        f3 = f5
        while f3 < best:
            f2 = f3
            while f2 < n:
                f2 *= 2
            best = min(best, f2)
            f3 *= 3
        f5 *= 5
    return best


def _square_kernel(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    r"""Deflection of uniform unit-convergence squares from the offsets to their corners.

    u (..., 1, S_u) and v (..., S_v, 1) are monotonic sequences of corner offsets (position
    minus corner) along x and y, in the same orientation on both axes; square (i, j) has the
    corners u[j], u[j + 1] and v[i], v[i + 1]. Returns (alpha_x, alpha_y), each
    (..., S_v - 1, S_u - 1).
    """
    half_log = 0.5 * torch.log((u * u + v * v).clamp_min(torch.finfo(u.dtype).tiny))
    nonzero = u != 0
    a = torch.where(nonzero, torch.atan(v / torch.where(nonzero, u, torch.ones_like(u))), 0.0)
    # G(u, v) = u atan(v/u) + v log(r)  and  G(v, u) = v atan(u/v) + u log(r), with
    # atan(u/v) = (pi/2) sgn(uv) - atan(v/u): one arctangent for both (both 0 where u = 0)
    gx = u * a + v * half_log
    gy = (0.5 * math.pi) * v.abs() * torch.sign(u) - v * a + u * half_log

    def double_difference(g: Tensor) -> Tensor:
        d = g[..., 1:] - g[..., :-1]
        return (d[..., 1:, :] - d[..., :-1, :]) / math.pi

    return double_difference(gx), double_difference(gy)


def _regular_grid(c: Tensor, h: float) -> tuple[int, float] | None:
    """(k, x_0) when c is the regular grid x_0 + t h / k (t = 0..m-1) for an integer k >= 1,
    else None. Tolerance: 1e-9 of the step, or the coordinates' own rounding (8 ulp)."""
    c64 = c.detach().to(device="cpu", dtype=torch.float64)
    m = c64.shape[0]
    if m == 1:
        return 1, float(c64[0])
    s = float(c64[-1] - c64[0]) / (m - 1)
    if not (math.isfinite(s) and s > 0):
        return None
    k = round(h / s)
    if k < 1 or abs(h / s - k) > 1e-6 * (h / s):
        return None
    step = h / k
    t = torch.arange(m, dtype=torch.float64) * step
    x0 = float((c64 - t).mean())
    tol = max(1e-9 * step, 8 * torch.finfo(c.dtype).eps * float(c64.abs().max()))
    if float((c64 - t - x0).abs().max()) > tol:
        return None
    return k, x0


class PixelatedConvergence(MassModel):
    r"""A convergence map on a pixel grid, each pixel a uniform square (see the module
    docstring).

    Arguments:
        kappa: the convergence, a tensor (N, n, n) (one map per observation, ``num_obs = N``)
            or (n, n) (shared); finite. Kept as given (a buffer, moved by ``.to()``; a tensor
            that requires gradients stays differentiable), arrays are converted to float64.
        fov: the side F of the square grid [arcsec], > 0, centred on 0; pixel side h = F / n.
    """

    elementwise = False

    def __init__(self, kappa: Tensor, fov: float):
        nn.Module.__init__(self)
        if isinstance(kappa, bool) or isinstance(kappa, (int, float)):
            raise TypeError(f"kappa must be a tensor (n, n) or (N, n, n); got {kappa!r}")
        if not isinstance(kappa, Tensor):
            kappa = torch.as_tensor(kappa, dtype=torch.float64)
        elif not kappa.dtype.is_floating_point:
            kappa = kappa.to(torch.get_default_dtype())
        if kappa.dim() not in (2, 3):
            raise ValueError(
                f"kappa must have shape (n, n) or (N, n, n); got shape {tuple(kappa.shape)}"
            )
        n = kappa.shape[-1]
        if kappa.shape[-2] != n or n < 1:
            raise ValueError(f"kappa must be square, n x n with n >= 1; got {tuple(kappa.shape)}")
        if kappa.dim() == 3 and kappa.shape[0] < 1:
            raise ValueError("kappa (N, n, n) needs at least one observation; got N = 0")
        if not torch.isfinite(kappa.detach()).all():
            raise ValueError("kappa is not finite")
        check_positive(fov, "fov")
        self.register_buffer("kappa", kappa)
        self.fov, self.size = float(fov), n
        self.num_obs = kappa.shape[0] if kappa.dim() == 3 else None
        self._kernel_cache: dict = {}

    @property
    def pixel_size(self) -> float:
        """The pixel side h = fov / n [arcsec]."""
        return self.fov / self.size

    def __getitem__(self, idx: object) -> PixelatedConvergence:
        """The model over a subset of observations; a shared model returns itself."""
        if self.num_obs is None:
            return self
        index = observation_index(idx, self.num_obs)
        kappa = self.kappa.index_select(0, index.to(self.kappa.device))
        out = PixelatedConvergence(kappa, self.fov)
        out._kernel_cache = self._kernel_cache  # the kernels depend on the geometry only
        return out

    def extra_repr(self) -> str:
        return f"kappa={tuple(self.kappa.shape)}, fov={self.fov:.4g}, num_obs={self.num_obs}"

    # ------------------------------------------------------------------ evaluation
    def _kappa(self, like: Tensor) -> Tensor:
        """kappa as (B, n, n) in like's dtype and device (B = N, or 1 when shared)."""
        k = self.kappa.to(dtype=like.dtype, device=like.device)
        return k if k.dim() == 3 else k.unsqueeze(0)

    def _convergence(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = torch.broadcast_tensors(x, y)
        n, h, half = self.size, self.pixel_size, self.fov / 2
        j = torch.floor((x + half) / h)
        i = torch.floor((y + half) / h)
        inside = (i >= 0) & (i < n) & (j >= 0) & (j < n)
        flat = torch.where(inside, i * n + j, torch.zeros_like(i)).long()
        kappa = self._kappa(x).flatten(1)
        if self.num_obs is None:
            values = kappa[0][flat]
        else:
            values = kappa.gather(1, flat.reshape(self.num_obs, -1)).reshape(x.shape)
        return torch.where(inside, values, torch.zeros_like(values))

    def _deflection(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x, y = torch.broadcast_tensors(x, y)
        shape = x.shape
        if self.num_obs is None:
            x, y = x.reshape(1, -1), y.reshape(1, -1)
        elif x.stride(0) == 0 and y.stride(0) == 0:  # the same positions for every map
            x, y = x[:1].reshape(1, -1), y[:1].reshape(1, -1)
        else:
            x, y = x.reshape(self.num_obs, -1), y.reshape(self.num_obs, -1)
        ax, ay = self._direct(self._kappa(x), x, y)
        return ax.reshape(shape), ay.reshape(shape)

    def _direct(self, kappa: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The exact direct sum over pixels: kappa (B, n, n), positions x, y (B or 1, P) ->
        (B, P) each, in chunks of positions of bounded memory."""
        n, dtype = self.size, kappa.dtype
        rows, P = x.shape
        edges = torch.arange(n + 1, dtype=torch.float64, device=x.device) * self.pixel_size
        edges = edges - self.fov / 2
        flat = kappa.reshape(kappa.shape[0], n * n)
        chunk = max(1, _CHUNK_ELEMENTS // (rows * (n + 1) ** 2))
        out_x, out_y = [], []
        for p0 in range(0, P, chunk):
            xc = x[:, p0 : p0 + chunk].to(torch.float64)
            yc = y[:, p0 : p0 + chunk].to(torch.float64)
            u = (xc[..., None] - edges).unsqueeze(-2)  # (rows, p, 1, n + 1)
            v = (yc[..., None] - edges).unsqueeze(-1)  # (rows, p, n + 1, 1)
            kx, ky = _square_kernel(u, v)  # (rows, p, n, n)
            kx, ky = kx.flatten(-2).to(dtype), ky.flatten(-2).to(dtype)
            if rows == 1:  # positions shared by every map: one matrix product
                out_x.append(flat @ kx[0].T)
                out_y.append(flat @ ky[0].T)
            else:
                out_x.append(torch.einsum("bpq,bq->bp", kx, flat))
                out_y.append(torch.einsum("bpq,bq->bp", ky, flat))
        if not out_x:
            empty = flat.new_zeros(flat.shape[0], 0)
            return empty, empty
        return torch.cat(out_x, dim=1), torch.cat(out_y, dim=1)

    def grid_deflection(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        r"""The deflection on the regular grid of columns xs (m_x,) and rows ys (m_y,):
        (alpha_x, alpha_y), each (N, m_y, m_x), or (m_y, m_x) when shared.

        Exact FFT convolutions when both steps divide the pixel side (h / s = k, an integer,
        any offset; see the module docstring) and the k^2 kernels are no larger than the
        direct sum's position-pixel pairs (and 2^25 elements), else the direct sum.
        """
        xs, ys = self._check_grid(xs, ys)
        kappa = self._kappa(xs)
        h = self.pixel_size
        gx, gy = _regular_grid(xs, h), _regular_grid(ys, h)
        if gx is not None and gy is not None:
            # the FFT pays when its kernels (k_y k_x phases of about (n + A)^2) are no larger
            # than the direct sum's position-pixel pairs, and fit in memory
            n, (mx, my) = self.size, (xs.shape[0], ys.shape[0])
            ax_, ay_ = -(-mx // gx[0]), -(-my // gy[0])
            kernel = gx[0] * gy[0] * (n + ax_) * (n + ay_)
            if kernel > min(_FFT_KERNEL_ELEMENTS, mx * my * n * n):
                gx = None
        if gx is None or gy is None:
            X = xs[None, :].expand(ys.shape[0], -1).reshape(1, -1)
            Y = ys[:, None].expand(-1, xs.shape[0]).reshape(1, -1)
            ax, ay = self._direct(kappa, X, Y)
        else:
            ax, ay = self._fft(kappa, gx, gy, xs.shape[0], ys.shape[0])
        ax = ax.reshape(-1, ys.shape[0], xs.shape[0])
        ay = ay.reshape(-1, ys.shape[0], xs.shape[0])
        return (ax[0], ay[0]) if self.num_obs is None else (ax, ay)

    def _kernel_transforms(
        self, grid_x: tuple, grid_y: tuple, shape: tuple, dtype: torch.dtype, device
    ) -> tuple[Tensor, Tensor]:
        """rfft2 of the square-pixel kernels of every phase, (k_y, k_x, L_y, L_x // 2 + 1)."""
        key = (dtype, torch.device(device), self.size, self.fov, grid_x, grid_y, shape)
        if key in self._kernel_cache:
            return self._kernel_cache[key]
        n, h = self.size, self.pixel_size
        x0_pixel = -self.fov / 2 + h / 2

        def corners(grid: tuple) -> Tensor:
            # phase b: offsets (x_b - X_0) + d h to the pixel centres, d = -(n - 1) .. A - 1;
            # their corners at -h/2, +h/2: (k, n + A) increasing offsets
            k, x0, A = grid
            phase = x0 + torch.arange(k, dtype=torch.float64, device=device) * (h / k)
            d = torch.arange(n + A, dtype=torch.float64, device=device) - (n - 1) - 0.5
            return (phase - x0_pixel)[:, None] + d * h

        u = corners(grid_x)[None, :, None, :]  # (1, k_x, 1, n + A_x)
        v = corners(grid_y)[:, None, :, None]  # (k_y, 1, n + A_y, 1)
        kx, ky = _square_kernel(u, v)  # (k_y, k_x, n + A_y - 1, n + A_x - 1)
        kx_hat = torch.fft.rfft2(kx.to(dtype), s=shape)
        ky_hat = torch.fft.rfft2(ky.to(dtype), s=shape)
        if len(self._kernel_cache) >= _CACHE_SIZE:
            self._kernel_cache.pop(next(iter(self._kernel_cache)))
        self._kernel_cache[key] = (kx_hat, ky_hat)
        return kx_hat, ky_hat

    def _fft(
        self, kappa: Tensor, gx: tuple[int, float], gy: tuple[int, float], mx: int, my: int
    ) -> tuple[Tensor, Tensor]:
        """The deflection on the grid x_0 + t h / k by k_y x k_x exact FFT convolutions:
        (B, m_y * m_x) each."""
        n = self.size
        (kx_, x0), (ky_, y0) = gx, gy
        Ax, Ay = -(-mx // kx_), -(-my // ky_)  # outputs per phase (the last ones cropped)
        shape = (_fast_size(n + Ay - 1), _fast_size(n + Ax - 1))
        kx_hat, ky_hat = self._kernel_transforms(
            (kx_, x0, Ax), (ky_, y0, Ay), shape, kappa.dtype, kappa.device
        )
        kappa_hat = torch.fft.rfft2(kappa, s=shape)[:, None]  # (B, 1, L_y, L_x // 2 + 1)
        B = kappa.shape[0]
        rows_x, rows_y = [], []
        for by in range(ky_):  # one phase row at a time: memory O(B k_x L^2)
            for kernel_hat, rows in ((kx_hat, rows_x), (ky_hat, rows_y)):
                conv = torch.fft.irfft2(kappa_hat * kernel_hat[by], s=shape)
                # output a sits at a + n - 1 of the linear convolution: (B, k_x, A_y, A_x)
                rows.append(conv[..., n - 1 : n - 1 + Ay, n - 1 : n - 1 + Ax])

        def interleave(rows: list[Tensor]) -> Tensor:
            # (B, k_y, k_x, A_y, A_x) -> (B, A_y, k_y, A_x, k_x): position k a + b
            out = torch.stack(rows, dim=1).permute(0, 3, 1, 4, 2)
            out = out.reshape(B, Ay * ky_, Ax * kx_)
            return out[:, :my, :mx].reshape(B, -1)

        return interleave(rows_x), interleave(rows_y)
