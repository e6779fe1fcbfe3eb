r"""Linear forward models :math:`y = A x` with explicit adjoints :math:`A^\top`.

- :class:`DenseLinear`: a dense matrix :math:`A_i \in \mathbb{R}^{M \times D}` per observation
  (or one shared), acting on the flattened signal.
- :class:`Mask`: inpainting, :math:`y = m_i \odot x` with a binary mask :math:`m_i`
  (self-adjoint).
- :class:`Blur`: convolution with a point-spread function (PSF) :math:`k_i`,

  .. math:: y[p] = \sum_q k_i[q]\, x[p + c - q], \qquad c = (h // 2, w // 2),

  i.e. the *linear* (zero-padded) convolution with the kernel centred on pixel :math:`c`, cropped
  to the input size ('same'). It is computed by FFT on a grid of at least
  :math:`(H + h - 1) \times (W + w - 1)` pixels, so nothing wraps around. The adjoint is the
  correlation with the same kernel, :math:`(A^\top y)[q] = \sum_p k_i[p + c - q]\, y[p]`.
- :class:`Reshape`: the same values in another event shape (e.g. a vector prior's samples seen
  as images), self-evidently orthogonal: its adjoint is the reshape back.
- :class:`Downsample`: average pooling over non-overlapping :math:`f \times f` blocks; its adjoint
  spreads each value uniformly over its block, divided by :math:`f^2`.

The conventions on shapes, per-observation parameters and subsets are those of
:class:`~hierprior.physics.forward.ForwardModel`. Parameters are buffers, so ``.to(device)``
moves them; floating parameters are cast to the dtype of the input on use.

References:
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712 (masked and blurred observations).
    Chung et al. (2023), Diffusion Posterior Sampling for General Noisy Inverse Problems,
    arXiv 2209.14687 (inpainting, deblurring, super-resolution benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hierprior.checks import check_int, check_shape, check_tensor
from hierprior.physics.forward import ForwardModel

__all__ = ["DenseLinear", "Mask", "Blur", "Downsample", "Reshape"]


def _fast_size(n: int) -> int:
    """Smallest even m >= n with prime factors in {2, 3, 5, 7} (fast real-FFT lengths)."""
    m = n + n % 2
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


class DenseLinear(ForwardModel):
    r"""Dense linear map :math:`y = A_i \operatorname{vec}(x)`.

    Arguments:
        A: the matrices, with shape (N, M, D) (one per observation) or (M, D) (shared).
        input_shape: event shape of x, with D elements in all (default (D,)); e.g. (C, H, W)
            with D = C * H * W to act on flattened images (row-major order).

    Output event shape (M,).
    """

    linear = True

    def __init__(self, A: Tensor, input_shape: Sequence[int] | None = None):
        check_tensor(A, "A", floating=True, finite=True)
        if A.dim() not in (2, 3):
            raise ValueError(f"A must have shape (N, M, D) or (M, D); got {tuple(A.shape)}")
        M, D = A.shape[-2:]
        input_shape = (D,) if input_shape is None else check_shape(input_shape, "input_shape")
        if math.prod(input_shape) != D:
            raise ValueError(
                f"input_shape {input_shape} has {math.prod(input_shape)} elements but A has "
                f"D = {D} columns"
            )
        super().__init__(input_shape, (M,), A.shape[0] if A.dim() == 3 else None)
        self.register_buffer("A", A)

    def _matrix(self, like: Tensor) -> Tensor:
        """A with shape (N or 1, M, D), in the dtype of like."""
        A = self.A if self.A.dim() == 3 else self.A.unsqueeze(0)
        return A.to(like.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        xf = x.reshape(*x.shape[:2], -1)
        return xf @ self._matrix(x).mT

    def _adjoint(self, y: Tensor) -> Tensor:
        return (y @ self._matrix(y)).reshape(*y.shape[:2], *self.input_shape)

    def _select(self, index: Tensor) -> DenseLinear:
        return DenseLinear(self.A.index_select(0, index.to(self.A.device)), self.input_shape)


class Mask(ForwardModel):
    r"""Inpainting :math:`y = m_i \odot x` with binary masks (1 = observed, 0 = missing).

    The output has the input's shape; missing entries of y are 0. A Gaussian likelihood over
    all entries (as the samplers use) is still correct: a missing entry's residual
    :math:`y_j - 0` does not depend on x, so it only adds a constant to the log-likelihood and
    carries no information (whether the data hold 0 or pure noise there). Use :attr:`observed`
    to restrict sums or metrics to the observed entries.

    Arguments:
        masks: {0, 1}-valued or boolean tensor, with shape (N, *input_shape) when
            ``per_observation`` (the default), else with shape input_shape (one shared mask).
        per_observation: whether masks has a leading observation axis.
    """

    linear = True

    def __init__(self, masks: Tensor, per_observation: bool = True):
        check_tensor(masks, "masks")
        if masks.dtype != torch.bool:
            if masks.dtype.is_complex or not ((masks == 0) | (masks == 1)).all():
                raise ValueError("masks must be boolean or contain only the values 0 and 1")
            masks = masks != 0
        if per_observation:
            if masks.dim() < 2:
                raise ValueError(
                    f"per-observation masks must have shape (N, *input_shape); got "
                    f"{tuple(masks.shape)} (pass per_observation=False for a shared mask)"
                )
            input_shape, num_obs = tuple(masks.shape[1:]), masks.shape[0]
        else:
            if masks.dim() < 1:
                raise ValueError("a shared mask must have at least one dimension")
            input_shape, num_obs = tuple(masks.shape), None
        super().__init__(input_shape, input_shape, num_obs)
        self.register_buffer("masks", masks)

    @property
    def observed(self) -> Tensor:
        """Boolean masks (True = observed), with shape (N, *input_shape) or input_shape."""
        return self.masks

    def _forward(self, x: Tensor) -> Tensor:
        m = self.masks if self.num_obs is not None else self.masks.unsqueeze(0)
        return x * m.unsqueeze(1).to(x.dtype)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._forward(y)

    def _select(self, index: Tensor) -> Mask:
        return Mask(self.masks.index_select(0, index.to(self.masks.device)), True)


class Blur(ForwardModel):
    r"""Convolution with a centred point-spread function, by FFT with zero padding.

    y is the linear convolution of x with the PSF, cropped to the size of x ('same'), with the
    PSF centred on its middle pixel; it equals ``F.conv2d(x, psf.flip(-2, -1), padding="same")``.
    The PSF is used as given (normalise it to unit sum for a flux-conserving blur).

    Arguments:
        psf: kernels with odd sizes h, w, with shape (N, h, w) or (N, C, h, w) (per observation)
            or (h, w) or (C, h, w) (shared); a channel axis of size C (or 1) applies one kernel
            per channel, otherwise the kernel applies to every channel.
        input_shape: image shape (C, H, W) or (H, W); the output has the same shape.
        per_observation: whether psf has a leading observation axis. By default it is inferred
            from psf.dim(): 2 -> shared, 4 -> per observation, 3 -> per observation for
            (H, W) images or when its first size is neither 1 nor C; otherwise a 3-D psf for
            (C, H, W) images is ambiguous and needs it explicitly.
    """

    linear = True

    def __init__(
        self,
        psf: Tensor,
        input_shape: Sequence[int],
        per_observation: bool | None = None,
    ):
        check_tensor(psf, "psf", floating=True, finite=True)
        input_shape = check_shape(input_shape, "input_shape")
        if len(input_shape) not in (2, 3):
            raise ValueError(f"Blur input_shape must be (C, H, W) or (H, W); got {input_shape}")
        has_c = len(input_shape) == 3
        if per_observation is None:
            if psf.dim() == 2:
                per_observation = False
            elif psf.dim() == 4 or (psf.dim() == 3 and not has_c):
                per_observation = True
            elif psf.dim() == 3 and psf.shape[0] not in (1, input_shape[0]):
                per_observation = True  # cannot be (C, h, w)
            elif psf.dim() == 3:
                raise ValueError(
                    f"a psf with shape {tuple(psf.shape)} for images {input_shape} is ambiguous: "
                    "pass per_observation=True for (N, h, w) kernels or per_observation=False "
                    "for (C, h, w) kernels"
                )
            else:
                raise ValueError(f"psf must have 2 to 4 dims; got shape {tuple(psf.shape)}")
        kernel_dims = psf.dim() - (1 if per_observation else 0)
        if kernel_dims not in ((2, 3) if has_c else (2,)):
            want = "(N, h, w) or (N, C, h, w)" if per_observation else "(h, w) or (C, h, w)"
            if not has_c:
                want = "(N, h, w)" if per_observation else "(h, w)"
            raise ValueError(
                f"psf for images {input_shape} must have shape {want}; got {tuple(psf.shape)}"
            )
        if kernel_dims == 3 and psf.shape[-3] not in (1, input_shape[0]):
            raise ValueError(
                f"psf has {psf.shape[-3]} channels but the images have C = {input_shape[0]}"
            )
        h, w = psf.shape[-2:]
        if h % 2 == 0 or w % 2 == 0:
            raise ValueError(f"psf sizes must be odd (centred kernel); got ({h}, {w})")
        super().__init__(input_shape, input_shape, psf.shape[0] if per_observation else None)
        self.register_buffer("psf", psf)
        self._otf_cache: dict = {}

    def _fft_size(self) -> tuple[int, int]:
        (H, W), (h, w) = self.input_shape[-2:], self.psf.shape[-2:]
        return _fast_size(H + h - 1), _fast_size(W + w - 1)

    def _otf(self, like: Tensor) -> Tensor:
        """rFFT of the zero-padded PSF, with shape (N or 1, 1, [C or 1,] L_H, L_W // 2 + 1)."""
        psf = self.psf
        key = (like.dtype, psf._version)
        entry = self._otf_cache.get(key)
        if entry is not None and entry[0] is psf:
            return entry[1]
        k = psf if self.num_obs is not None else psf.unsqueeze(0)
        if len(self.input_shape) == 3 and k.dim() == 3:
            k = k.unsqueeze(1)  # one kernel for every channel
        otf = torch.fft.rfft2(k.unsqueeze(1).to(like.dtype), s=self._fft_size())
        if not psf.requires_grad:  # a cached graph could not be backpropagated twice
            self._otf_cache = {key: (psf, otf)}
        return otf

    def _forward(self, x: Tensor) -> Tensor:
        (H, W), (h, w) = self.input_shape[-2:], self.psf.shape[-2:]
        size = self._fft_size()
        full = torch.fft.irfft2(torch.fft.rfft2(x, s=size) * self._otf(x), s=size)
        return full[..., h // 2 : h // 2 + H, w // 2 : w // 2 + W]

    def _adjoint(self, y: Tensor) -> Tensor:
        (H, W), (h, w) = self.input_shape[-2:], self.psf.shape[-2:]
        size = self._fft_size()
        z = F.pad(y, (w // 2, 0, h // 2, 0))  # y[p] sits at p + c on the full grid
        corr = torch.fft.irfft2(torch.fft.rfft2(z, s=size) * self._otf(y).conj(), s=size)
        return corr[..., :H, :W]

    def _select(self, index: Tensor) -> Blur:
        return Blur(self.psf.index_select(0, index.to(self.psf.device)), self.input_shape, True)


class Downsample(ForwardModel):
    r"""Average pooling by an integer factor f over the last two axes (shared).

    :math:`y[..., i, j] = f^{-2} \sum_{a, b < f} x[..., f i + a, f j + b]`.

    Arguments:
        factor: the pooling factor f >= 1.
        input_shape: (..., H, W) with H and W divisible by f; the output is (..., H/f, W/f).
    """

    linear = True

    def __init__(self, factor: int, input_shape: Sequence[int]):
        factor = check_int(factor, "factor")
        input_shape = check_shape(input_shape, "input_shape")
        if len(input_shape) < 2:
            raise ValueError(f"Downsample input_shape must be (..., H, W); got {input_shape}")
        H, W = input_shape[-2:]
        if H % factor or W % factor:
            raise ValueError(f"image size ({H}, {W}) is not divisible by factor {factor}")
        super().__init__(input_shape, (*input_shape[:-2], H // factor, W // factor), None)
        self.factor = factor

    def _forward(self, x: Tensor) -> Tensor:
        f, (h, w) = self.factor, self.output_shape[-2:]
        return x.reshape(*x.shape[:-2], h, f, w, f).mean(dim=(-3, -1))

    def _adjoint(self, y: Tensor) -> Tensor:
        f, (h, w) = self.factor, self.output_shape[-2:]
        up = y[..., :, None, :, None].expand(*y.shape[:-2], h, f, w, f)
        return up.reshape(*y.shape[:-2], h * f, w * f) / f**2

    def extra_repr(self) -> str:
        return f"factor={self.factor}, " + super().extra_repr()


class Reshape(ForwardModel):
    """The same values in another event shape (shared): y = x.reshape(*lead, *output_shape).

    Use it to chain a prior over vectors (D,) with an image forward model, e.g.
    ``Compose(Reshape((D,), (1, R, R)), lensing)``.

    Arguments:
        input_shape: the event shape of x.
        output_shape: the event shape of y, with as many elements.
    """

    linear = True

    def __init__(self, input_shape: Sequence[int], output_shape: Sequence[int]):
        input_shape = check_shape(input_shape, "input_shape")
        output_shape = check_shape(output_shape, "output_shape")
        if math.prod(input_shape) != math.prod(output_shape):
            raise ValueError(
                f"Reshape cannot map {input_shape} ({math.prod(input_shape)} elements) to "
                f"{output_shape} ({math.prod(output_shape)} elements)"
            )
        super().__init__(input_shape, output_shape, None)

    def _forward(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:2], *self.output_shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        return y.reshape(*y.shape[:2], *self.input_shape)
