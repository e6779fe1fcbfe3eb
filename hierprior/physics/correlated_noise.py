r"""Stationary correlated Gaussian noise on an image grid, scaled per pixel, applied by FFT.

Drizzled HST images have noise that is correlated between neighbouring pixels and whose level
varies across the image (the Poisson noise of the lens and the arcs). :class:`CorrelatedNoise`
models the noise of an H x W image as

.. math::
    n = w \odot u, \qquad u \sim \mathcal{N}(0, C), \qquad
    C = F^{-1} \operatorname{diag}(S) F,

a stationary field u with power spectrum S (the eigenvalues of the covariance C on the
periodic H x W grid, F the 2-D DFT), scaled by a positive map w. So
:math:`\Sigma = W C W` with :math:`W = \operatorname{diag}(w)`, and every product with
:math:`\Sigma`, :math:`\Sigma^{-1}`, :math:`C^{\pm 1/2}` is two FFTs:
:math:`\Sigma^{-1} v = W^{-1} F^{-1} \operatorname{diag}(1/S) F W^{-1} v`.

**Periodicity.** C is the circulant extension of the noise's autocovariance c(Δ) to the torus
of the image (c(Δ) for lags within the support of c, wrapped at the edges). Within the image
the model equals the stationary field except that pixels on opposite edges, within the
correlation length, are correlated (the Whittle approximation); for the short-range correlation
of drizzled data (|Δ| <= 2 px) that affects a band of ~2 px along the edges.

**Unobserved pixels.** For pixels U marked unobserved (``observed`` False) the likelihood is
the exact marginal of the observed ones O, :math:`r_O \sim \mathcal{N}(0, \Sigma_{OO})`. With
the precision :math:`P = \Sigma^{-1}` (FFT), the Schur complement gives

.. math::
    \Sigma_{OO}^{-1} = P_{OO} - P_{OU} P_{UU}^{-1} P_{UO}, \qquad
    \log\det \Sigma_{OO} = \log\det \Sigma + \log\det P_{UU},

with :math:`P_{UU}` the |U| x |U| block (built from the inverse autocovariance, Cholesky-
factorised once): an action costs two FFT pairs and a triangular solve. Unobserved pixels get 0
from :meth:`~CorrelatedNoise.cov_action`, :meth:`~CorrelatedNoise.inv_cov_action` and
:meth:`~CorrelatedNoise.score`; what the data hold there is never read.

**Whitening.** :meth:`~CorrelatedNoise.whiten` returns
:math:`z = C^{-1/2} W^{-1} \tilde r` on the grid, where :math:`\tilde r = r` on O and, on U, the
conditional mean :math:`E[r_U \mid r_O] = -P_{UU}^{-1} P_{UO} r_O`. Then
:math:`\|z\|^2 = r_O^\top \Sigma_{OO}^{-1} r_O` exactly (the χ²), and for
:math:`r_O \sim \mathcal{N}(0, \Sigma_{OO})`, z is N(0, I) when every pixel is observed; with
unobserved pixels it is N(0, Π), Π a projector of rank |O| (pixels within a correlation length
of U have variance 1 - h, Σh = |U|).

**Estimation.** :func:`noise_autocovariance` estimates c(Δ) for |Δ_x|, |Δ_y| <= ``max_lag`` from
noise realisations (e.g. blank-sky patches, each averaged over its pixel pairs at that lag);
:func:`spectrum_from_autocovariance` wraps it onto the H x W torus and takes its DFT (it must be
positive: a non-positive-definite estimate is an error). :meth:`CorrelatedNoise.from_patches`
does both. The relative scale map w of a real image is its noise map divided by the noise map's
level on the blank sky (:func:`hierprior.data.imaging.BlankSky.noise_level`): the blank sky gives
the true level and correlation, the noise map only how the level changes across the image.

Shapes follow :class:`~hierprior.physics.GaussianNoise`: tensors (N, [S,] *obs_shape) for a
per-observation model (``num_obs = N``: a spectrum, scale map or mask with a leading N axis),
any leading dims for a shared one; ``obs_shape = (1, H, W)`` by default (the output of
:class:`~hierprior.physics.lensing.Lensing`).

References:
    Whittle (1953), The analysis of multiple stationary time series, JRSS B 15, 125.
    Casertano et al. (2000), WFPC2 observations of the Hubble Deep Field South, AJ 120, 2747
    (drizzle's correlated noise).
    Rasmussen & Williams (2006), Gaussian Processes for Machine Learning, appendix A.3
    (Schur complements of a partitioned precision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hierprior.checks import check_int
from hierprior.physics.noise import NoiseModel

__all__ = ["CorrelatedNoise", "noise_autocovariance", "spectrum_from_autocovariance"]

#: the most unobserved pixels per observation (a dense |U| x |U| Cholesky factor is kept)
MAX_UNOBSERVED = 4096


def noise_autocovariance(patches: Tensor | Sequence[Tensor], max_lag: int = 3) -> Tensor:
    r"""The autocovariance c(Δ) of stationary zero-mean noise from realisations.

    .. math:: \hat c(\Delta) = \frac{\sum_k \sum_{x} u_k(x) u_k(x + \Delta)}
        {\#\{(k, x): x, x + \Delta \in \text{patch } k\}}

    (each pair counted once per lag; patches of different sizes may be mixed by passing a
    list). The realisations should have zero mean (e.g. blank sky minus a fitted background).

    Arguments:
        patches: a tensor (K, p, q) or a list of 2-D tensors.
        max_lag: L, the largest lag along each axis, >= 0 and < the smallest patch side.

    Returns:
        A float64 tensor (2L + 1, 2L + 1), c at lags (Δy, Δx) = (i - L, j - L), symmetric
        under Δ -> -Δ.
    """
    max_lag = check_int(max_lag, "max_lag", 0)
    items = list(patches) if not isinstance(patches, Tensor) else list(patches.unbind(0))
    if isinstance(patches, Tensor) and patches.dim() != 3:
        raise ValueError(f"patches must have shape (K, p, q); got {tuple(patches.shape)}")
    if not items:
        raise ValueError("no noise patches given")
    size = 2 * max_lag + 1
    total = torch.zeros(size, size, dtype=torch.float64)
    count = torch.zeros(size, size, dtype=torch.float64)
    groups: dict[tuple[int, int], list[Tensor]] = {}
    for u in items:
        if not isinstance(u, Tensor) or u.dim() != 2:
            raise ValueError("each noise patch must be a 2-D tensor")
        groups.setdefault(tuple(u.shape), []).append(u.detach().to(torch.float64).cpu())
    lags = torch.arange(-max_lag, max_lag + 1)
    for (p, q), group in groups.items():  # one batched FFT per patch shape
        u = torch.stack(group)
        if not torch.isfinite(u).all():
            raise ValueError("a noise patch has NaN or infinite values")
        if max_lag >= min(p, q):
            raise ValueError(f"max_lag {max_lag} must be < the smallest patch side {min(p, q)}")
        shape = (p + max_lag, q + max_lag)  # zero padding: no wrapped pairs up to max_lag
        f = torch.fft.rfft2(u, s=shape)
        ones = torch.fft.rfft2(torch.ones(p, q, dtype=torch.float64), s=shape)
        corr = torch.fft.irfft2((f * f.conj()).sum(0), s=shape)
        pairs = torch.fft.irfft2(ones * ones.conj(), s=shape) * len(group)
        rows, cols = lags % shape[0], lags % shape[1]
        total += corr[rows][:, cols]
        count += pairs[rows][:, cols].round()
    return total / count


def spectrum_from_autocovariance(acf: Tensor, shape: Sequence[int]) -> Tensor:
    r"""The power spectrum S (eigenvalues of the circulant covariance) on an H x W grid.

    c(Δ) is placed at the wrapped lags (Δy mod H, Δx mod W) of the grid (zero elsewhere) and
    symmetrised; S = Re DFT(c). Raises a ``ValueError`` when S has a value <= 0 (the estimate
    is not a covariance on this grid; a smaller ``max_lag`` usually fixes it).

    Arguments:
        acf: (2L + 1, 2L + 1) (shared) or (N, 2L + 1, 2L + 1), centred lags; 2L + 1 <= H, W.
        shape: (H, W).

    Returns:
        S with shape (H, W) or (N, H, W), float64.
    """
    h, w = (check_int(int(v), "shape", 1) for v in shape)
    if not isinstance(acf, Tensor) or acf.dim() not in (2, 3):
        raise ValueError("acf must be a tensor (2L + 1, 2L + 1) or (N, 2L + 1, 2L + 1)")
    a = acf.detach().to(torch.float64).cpu()
    squeeze = a.dim() == 2
    a = a[None] if squeeze else a
    k = a.shape[-1]
    if a.shape[-2] != k or k % 2 == 0:
        raise ValueError(f"acf must be square with an odd side; got {tuple(acf.shape)}")
    if k > min(h, w):
        raise ValueError(f"the acf's support {k} exceeds the grid {h} x {w}")
    a = 0.5 * (a + a.flip(-1, -2))  # c(Δ) = c(-Δ)
    lag = k // 2
    lags = torch.arange(-lag, lag + 1)
    grid = torch.zeros(a.shape[0], h, w, dtype=torch.float64)
    grid[:, (lags % h)[:, None], (lags % w)[None, :]] = a
    spectrum = torch.fft.fft2(grid).real
    low = float(spectrum.min())
    if not low > 0:
        raise ValueError(
            f"the autocovariance is not positive definite on a {h} x {w} grid (smallest "
            f"spectral value {low:.3g}); estimate it with a smaller max_lag"
        )
    return spectrum[0] if squeeze else spectrum


class CorrelatedNoise(NoiseModel):
    r"""Gaussian noise :math:`n = w \odot u`, u stationary with power spectrum S (see above).

    Arguments:
        spectrum: S > 0, (H, W) (shared) or (N, H, W) (per observation), real, with
            S(k) = S(-k) (the DFT of a real, even autocovariance).
        scale: the map w > 0, (H, W) or (N, H, W); None for 1 everywhere.
        observed: bool (H, W) or (N, H, W), True where pixels carry data; None for all.
        obs_shape: (1, H, W) (default) or (H, W).

    Attributes:
        gaussian: True (``cov_action``, ``inv_cov_action``, ``whiten`` exist).
        num_obs: N, or None when spectrum, scale and mask are all shared.
    """

    gaussian = True

    def __init__(
        self,
        spectrum: Tensor,
        scale: Tensor | None = None,
        observed: Tensor | None = None,
        obs_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if not isinstance(spectrum, Tensor) or spectrum.dim() not in (2, 3):
            raise ValueError("spectrum must be a tensor (H, W) or (N, H, W)")
        s = spectrum.detach().to(torch.float64)
        h, w = s.shape[-2:]
        if not torch.isfinite(s).all() or not (s > 0).all():
            raise ValueError("the spectrum must be finite and > 0")
        flipped = torch.roll(s.flip(-2, -1), shifts=(1, 1), dims=(-2, -1))  # S(-k)
        if not torch.allclose(s, flipped, rtol=1e-8, atol=0):
            raise ValueError("the spectrum must satisfy S(k) = S(-k) (a real covariance)")
        counts = {}
        if s.dim() == 3:
            counts["spectrum"] = s.shape[0]
        if scale is not None:
            if not isinstance(scale, Tensor) or scale.dim() not in (2, 3):
                raise ValueError("scale must be a tensor (H, W) or (N, H, W)")
            scale = scale.detach().to(torch.float64)
            if tuple(scale.shape[-2:]) != (h, w):
                raise ValueError(f"scale {tuple(scale.shape)} does not match the grid ({h}, {w})")
            if not torch.isfinite(scale).all() or not (scale > 0).all():
                raise ValueError("the scale map must be finite and > 0")
            if scale.dim() == 3:
                counts["scale"] = scale.shape[0]
        if observed is not None:
            if not isinstance(observed, Tensor) or observed.dim() not in (2, 3):
                raise ValueError("observed must be a bool tensor (H, W) or (N, H, W)")
            if tuple(observed.shape[-2:]) != (h, w):
                raise ValueError(
                    f"observed {tuple(observed.shape)} does not match the grid ({h}, {w})"
                )
            observed = observed.detach().to(torch.bool).cpu()
            if observed.dim() == 3:
                counts["observed"] = observed.shape[0]
        if len(set(counts.values())) > 1:
            raise ValueError(f"per-observation inputs disagree on N: {counts}")
        self.num_obs = next(iter(counts.values())) if counts else None
        b = self.num_obs or 1
        if obs_shape is None:
            obs_shape = (1, h, w)
        obs_shape = tuple(int(v) for v in obs_shape)
        if obs_shape not in ((1, h, w), (h, w)):
            raise ValueError(f"obs_shape must be (1, {h}, {w}) or ({h}, {w}); got {obs_shape}")
        self.obs_shape = obs_shape
        self.grid_shape = (h, w)
        scale = torch.ones(h, w, dtype=torch.float64) if scale is None else scale
        observed = torch.ones(h, w, dtype=torch.bool) if observed is None else observed
        observed = observed.expand(b, h, w).clone()
        scale = torch.where(observed, scale.expand(b, h, w), torch.ones((), dtype=torch.float64))
        self.register_buffer("spectrum", s.expand(b, h, w).clone())
        self.register_buffer("scale", scale.clone())
        self.register_buffer("observed", observed)
        self._build_schur()

    # ------------------------------------------------------------------ set-up
    def _build_schur(self) -> None:
        """Cholesky factors of P_UU (padded to the largest |U|, identity on the padding)."""
        b, (h, w) = self.spectrum.shape[0], self.grid_shape
        unobs = ~self.observed.reshape(b, -1)
        m = int(unobs.sum(dim=1).max())
        if m > MAX_UNOBSERVED:
            raise ValueError(
                f"{m} unobserved pixels in one observation (at most {MAX_UNOBSERVED}); cut out "
                "a smaller image around the region of interest instead of masking most of it"
            )
        index = torch.zeros(b, m, dtype=torch.long)
        valid = torch.zeros(b, m, dtype=torch.bool)
        chol = torch.eye(m, dtype=torch.float64).repeat(b, 1, 1)
        logdet = torch.zeros(b, dtype=torch.float64)
        if m > 0:
            q = torch.fft.ifft2(1.0 / self.spectrum).real  # inverse autocovariance, (b, h, w)
            for i in range(b):
                idx = torch.nonzero(unobs[i]).flatten()
                k = len(idx)
                index[i, :k], valid[i, :k] = idx, True
                if k == 0:
                    continue
                r, c = idx // w, idx % w
                block = q[i][(r[:, None] - r[None, :]) % h, (c[:, None] - c[None, :]) % w]
                chol[i, :k, :k] = torch.linalg.cholesky(block)  # w = 1 on U
                logdet[i] = 2 * torch.log(torch.diagonal(chol[i, :k, :k])).sum()
        self.register_buffer("_u_index", index, persistent=False)
        self._u_valid = valid
        self.register_buffer("_u_chol", chol, persistent=False)
        self.register_buffer("_logdet_puu", logdet, persistent=False)
        self._has_unobserved = m > 0

    @classmethod
    def from_patches(
        cls,
        patches: Tensor | Sequence[Tensor],
        shape: Sequence[int],
        *,
        max_lag: int = 3,
        scale: Tensor | None = None,
        observed: Tensor | None = None,
        obs_shape: Sequence[int] | None = None,
    ) -> CorrelatedNoise:
        """The model estimated from noise realisations (:func:`noise_autocovariance`).

        Arguments:
            patches: zero-mean noise realisations in data units: a tensor (K, p, q) (one
                spectrum, shared) or a list of N such tensors (one spectrum per observation).
            shape: the image grid (H, W).
            max_lag, scale, observed, obs_shape: as in :func:`noise_autocovariance` and the
                constructor.
        """
        if isinstance(patches, Tensor):
            acf = noise_autocovariance(patches, max_lag)
        else:
            acf = torch.stack([noise_autocovariance(p, max_lag) for p in patches])
        return cls(spectrum_from_autocovariance(acf, shape), scale, observed, obs_shape)

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid_shape}, num_obs={self.num_obs}, "
            f"unobserved={int((~self.observed).sum())}"
        )

    # ------------------------------------------------------------------ shapes
    def _grid(self, t: Tensor, name: str) -> tuple[Tensor, tuple[int, ...]]:
        """t (N, [S,] *obs) or (*lead, *obs) -> (b, M, H, W) and the original shape."""
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        k = len(self.obs_shape)
        shape = tuple(t.shape)
        if len(shape) < k or shape[len(shape) - k :] != self.obs_shape:
            raise ValueError(
                f"noise with obs_shape {self.obs_shape} got {name} with shape {shape}"
            )
        lead = shape[: len(shape) - k]
        h, w = self.grid_shape
        if self.num_obs is None:
            return t.reshape(1, -1, h, w), shape
        if len(lead) not in (1, 2) or lead[0] != self.num_obs:
            raise ValueError(
                f"noise has {self.num_obs} observations: expected {name} with shape "
                f"(N, [S,] *{self.obs_shape}) with N = {self.num_obs}; got {shape}"
            )
        return t.reshape(self.num_obs, -1, h, w), shape

    def _buf(self, name: str, like: Tensor) -> Tensor:
        """A (b, 1, H, W) buffer in like's dtype and device."""
        return getattr(self, name).to(device=like.device, dtype=like.dtype).unsqueeze(1)

    # ------------------------------------------------------------------ FFT actions
    def _circulant(self, v: Tensor, power: float) -> Tensor:
        """C^power v for v (b, M, H, W) (C = F^-1 diag(S) F)."""
        h, w = self.grid_shape
        s = self._buf("spectrum", v)[..., : w // 2 + 1] ** power
        return torch.fft.irfft2(torch.fft.rfft2(v) * s, s=(h, w))

    def _precision(self, v: Tensor) -> Tensor:
        """P v = W^-1 C^-1 W^-1 v on the full grid, v (b, M, H, W)."""
        scale = self._buf("scale", v)
        return self._circulant(v / scale, -1.0) / scale

    def _schur(self, z: Tensor) -> Tensor:
        """t = P_UU^-1 z_U, scattered onto the grid (b, M, H, W) (0 off U)."""
        b, m_rows, h, w = z.shape
        index = self._u_index.to(z.device)
        valid = self._u_valid.to(z.device)
        flat = z.reshape(b, m_rows, h * w)
        zu = flat.gather(2, index[:, None, :].expand(b, m_rows, index.shape[1]))
        zu = torch.where(valid[:, None, :], zu, torch.zeros((), dtype=z.dtype, device=z.device))
        chol = self._u_chol.to(device=z.device, dtype=z.dtype)
        t = torch.cholesky_solve(zu.transpose(1, 2), chol).transpose(1, 2)
        t = torch.where(valid[:, None, :], t, torch.zeros((), dtype=z.dtype, device=z.device))
        out = torch.zeros_like(flat).scatter_add(
            2, index[:, None, :].expand(b, m_rows, index.shape[1]), t
        )
        return out.reshape(b, m_rows, h, w)

    def _inv_cov_grid(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """(Σ_OO^-1 v_O on O and 0 on U, the imputation term t) for v (b, M, H, W)."""
        obs = self._buf("observed", v) > 0
        v = torch.where(obs, v, torch.zeros((), dtype=v.dtype, device=v.device))
        z = self._precision(v)
        if not self._has_unobserved:
            return z, torch.zeros_like(z)
        t = self._schur(z)
        out = z - self._precision(t)
        return torch.where(obs, out, torch.zeros((), dtype=v.dtype, device=v.device)), t

    # ------------------------------------------------------------------ NoiseModel
    def std(self, like: Tensor) -> Tensor:
        """The marginal standard deviation w sqrt(c(0)) per pixel, broadcast to like's shape."""
        g, shape = self._grid(like, "like")
        c0 = self.spectrum.mean(dim=(-2, -1)).to(device=like.device, dtype=like.dtype)
        sd = self._buf("scale", like) * c0.sqrt()[:, None, None, None]
        return sd.expand_as(g).reshape(shape)

    def variance_like(self, y: Tensor) -> Tensor:
        """std(y)**2."""
        return self.std(y) ** 2

    def cov_action(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma_{OO} v_O` on observed pixels, 0 on unobserved ones (v's shape)."""
        g, shape = self._grid(v, "v")
        obs = self._buf("observed", g) > 0
        scale = self._buf("scale", g)
        g = torch.where(obs, g, torch.zeros((), dtype=g.dtype, device=g.device))
        out = self._circulant(g * scale, 1.0) * scale
        return torch.where(obs, out, torch.zeros((), dtype=g.dtype, device=g.device)).reshape(
            shape
        )

    def inv_cov_action(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma_{OO}^{-1} v_O` on observed pixels, 0 on unobserved ones (v's shape)."""
        g, shape = self._grid(v, "v")
        return self._inv_cov_grid(g)[0].reshape(shape)

    def score(self, n: Tensor) -> Tensor:
        r""":math:`\nabla_n \log p(n) = -\Sigma_{OO}^{-1} n_O` (0 on unobserved pixels)."""
        return -self.inv_cov_action(n)

    def standardize(self, n: Tensor) -> Tensor:
        """The whitened n (:meth:`whiten`), as every Gaussian model."""
        return self.whiten(n)

    def covariance_matrix(self, like: Tensor) -> Tensor:
        r"""The dense :math:`\Sigma_i` (N, M, M) in float64, by ``cov_action`` on unit vectors."""
        from hierprior.physics.noise import GaussianNoiseModel

        return GaussianNoiseModel.covariance_matrix(self, like)

    def whiten(self, r: Tensor) -> Tensor:
        r""":math:`z = C^{-1/2} W^{-1} \tilde r` (see the module docstring): r's shape,
        :math:`\|z\|^2 = r_O^\top \Sigma_{OO}^{-1} r_O`."""
        g, shape = self._grid(r, "r")
        obs = self._buf("observed", g) > 0
        g = torch.where(obs, g, torch.zeros((), dtype=g.dtype, device=g.device))
        if self._has_unobserved:
            g = g - self._schur(self._precision(g))  # r on O, E[r_U | r_O] on U
        return self._circulant(g / self._buf("scale", g), -0.5).reshape(shape)

    def log_det(self) -> Tensor:
        r""":math:`\log\det\Sigma_{OO}`, 0-d (shared) or (N,)."""
        s = self.spectrum
        logdet = (
            torch.log(s).sum(dim=(-2, -1))
            + 2 * torch.log(self.scale).sum(dim=(-2, -1))
            + self._logdet_puu
        )
        return logdet[0] if self.num_obs is None else logdet

    def num_observed(self) -> Tensor:
        """|O|, the observed pixels: 0-d (shared) or (N,)."""
        n = self.observed.sum(dim=(-2, -1))
        return n[0] if self.num_obs is None else n

    def log_prob(self, y: Tensor, y_pred: Tensor) -> Tensor:
        """The exact Gaussian log-likelihood of the observed pixels, per observation (and sample).

        Arguments:
            y: (N, *obs_shape) or (N, S, *obs_shape) (any leading dims when shared).
            y_pred: the same shapes (y broadcast over S).

        Returns:
            (N,) or (N, S) (the leading dims when shared).
        """
        for name, t in (("y", y), ("y_pred", y_pred)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
        k = len(self.obs_shape)
        if self.num_obs is not None and y.dim() != y_pred.dim():
            if y.dim() == k + 1 and y_pred.dim() == k + 2:
                y = y.unsqueeze(1)
            elif y_pred.dim() == k + 1 and y.dim() == k + 2:
                y_pred = y_pred.unsqueeze(1)
        try:
            r = y - y_pred
        except RuntimeError as err:
            raise ValueError(f"y and y_pred do not broadcast: {err}") from None
        g, shape = self._grid(r, "y - y_pred")
        lead = shape[: len(shape) - k]
        quad = (g * self._inv_cov_grid(g)[0]).sum(dim=(-2, -1))  # (b, M)
        logdet = self.log_det().to(device=g.device, dtype=g.dtype).reshape(-1, 1)
        count = self.num_observed().to(device=g.device, dtype=g.dtype).reshape(-1, 1)
        lp = -0.5 * (quad + logdet + count * math.log(2 * math.pi))
        return lp.reshape(lead)

    def curvature(self) -> Tensor:
        r"""An upper bound of the curvature of :math:`-\log p`, :math:`\lambda_{max}
        (\Sigma_{OO}^{-1}) \le 1 / (\min w^2 \min S)`: 0-d (shared) or (N,)."""
        bound = 1.0 / (self.scale.amin(dim=(-2, -1)) ** 2 * self.spectrum.amin(dim=(-2, -1)))
        return bound[0] if self.num_obs is None else bound

    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Noise with shape (N, [S,] *obs_shape) from ``generator`` only (never the global RNG).

        Every pixel is drawn (unobserved ones too: the observed ones have the marginal law).
        """
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(int(v) for v in shape)
        if generator is not None:
            device = generator.device if device is None else device
        device = self.spectrum.device if device is None else torch.device(device)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        g, _ = self._grid(eps, "shape")
        u = self._circulant(g, 0.5)
        return (u * self._buf("scale", u)).reshape(shape)

    def _select(self, index: Tensor) -> CorrelatedNoise:
        index = index.to(self.spectrum.device)
        sub = CorrelatedNoise.__new__(CorrelatedNoise)
        NoiseModel.__init__(sub)
        sub.num_obs, sub.obs_shape, sub.grid_shape = len(index), self.obs_shape, self.grid_shape
        sub.register_buffer("spectrum", self.spectrum.index_select(0, index))
        sub.register_buffer("scale", self.scale.index_select(0, index))
        sub.register_buffer("observed", self.observed.index_select(0, index.cpu()))
        sub.register_buffer("_u_index", self._u_index.index_select(0, index), persistent=False)
        sub._u_valid = self._u_valid.index_select(0, index.cpu())
        sub.register_buffer("_u_chol", self._u_chol.index_select(0, index), persistent=False)
        sub.register_buffer(
            "_logdet_puu", self._logdet_puu.index_select(0, index), persistent=False
        )
        sub._has_unobserved = bool((~sub.observed).any())
        return sub
