r"""Generators of per-observation forward models: ``op(n, signal_shape, generator) -> model``.

- :class:`RandomMask`: inpainting :math:`y_i = m_i \odot x_i` with one random mask per
  observation: independent pixels (``kind="pixels"``: each pixel hidden with probability
  ``missing_fraction``) or one random square patch covering ``missing_fraction`` of the image
  (``kind="patch"``).
- :class:`RandomProjection`: :math:`y_i = A_i x_i` with :math:`A_i` an M x D matrix of
  independent :math:`\mathcal{N}(0, \text{scale}^2 / D)` entries per observation (rank-M views
  of a vector signal, the Gaussian EM test bed); with ``normalize=True`` each row is rescaled to
  norm ``scale``, i.e. drawn uniformly from the sphere of radius ``scale`` (the views of the
  DiEM manifold experiment, Rozet et al. 2024, §5.1).
"""

from __future__ import annotations

import torch

from hierprior.checks import check_int, check_positive
from hierprior.physics import DenseLinear, Mask

__all__ = ["RandomMask", "RandomProjection"]

MASK_KINDS = ("pixels", "patch")


class RandomMask:
    """Random observation masks (1 = observed), one per observation, for images (C, H, W).

    Arguments:
        kind: ``"pixels"`` or ``"patch"`` (see the module docstring).
        missing_fraction: the expected share of hidden pixels, in [0, 1).
    """

    def __init__(self, kind: str = "pixels", missing_fraction: float = 0.5):
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {kind!r}; expected one of {list(MASK_KINDS)}")
        if not 0.0 <= float(missing_fraction) < 1.0:
            raise ValueError(f"missing_fraction must lie in [0, 1), got {missing_fraction}")
        self.kind = kind
        self.missing_fraction = float(missing_fraction)

    def __call__(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Mask:
        if len(shape) != 3:
            raise ValueError(f"RandomMask needs image signals (C, H, W), got shape {shape}")
        c, h, w = shape
        if self.kind == "pixels":
            keep = torch.rand((n, 1, h, w), generator=generator) >= self.missing_fraction
        else:
            side = int(round((self.missing_fraction * h * w) ** 0.5))
            keep = torch.ones((n, 1, h, w), dtype=torch.bool)
            if side > 0:
                top = torch.randint(0, h - side + 1, (n,), generator=generator)
                left = torch.randint(0, w - side + 1, (n,), generator=generator)
                rows = torch.arange(h)[None, :, None]
                cols = torch.arange(w)[None, None, :]
                inside = (
                    (rows >= top[:, None, None])
                    & (rows < top[:, None, None] + side)
                    & (cols >= left[:, None, None])
                    & (cols < left[:, None, None] + side)
                )
                keep = ~inside[:, None]
        return Mask(keep.expand(n, c, h, w).contiguous())


class RandomProjection:
    """Random dense views :math:`A_i \\in R^{M \\times D}` of vector signals (D,).

    Arguments:
        num_measurements: M, measurements per observation.
        scale: the entries' standard deviation times sqrt(D) (with ``normalize``: the rows'
            norm).
        dtype: the matrices' dtype (default: torch's default dtype).
        normalize: rescale every row to norm ``scale`` (rows uniform on that sphere).
    """

    def __init__(
        self,
        num_measurements: int,
        scale: float = 1.0,
        dtype: str | None = None,
        normalize: bool = False,
    ):
        self.num_measurements = check_int(num_measurements, "num_measurements")
        self.scale = check_positive(scale, "scale")
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.normalize = bool(normalize)

    def __call__(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> DenseLinear:
        if len(shape) != 1:
            raise ValueError(f"RandomProjection needs vector signals (D,), got shape {shape}")
        d = shape[0]
        a = torch.randn((n, self.num_measurements, d), generator=generator, dtype=self.dtype)
        if self.normalize:
            return DenseLinear(a * (self.scale / a.norm(dim=-1, keepdim=True)))
        return DenseLinear(a * (self.scale / d**0.5))
