r"""Noise-level embeddings for diffusion backbones.

A backbone F(x, c_noise) receives the noise level as a real code c_noise, for instance
c_noise = ln(sigma) / 4 in EDM preconditioning, which lies roughly in [-3, 2]. The code is
lifted to a vector by a fixed sinusoidal feature map and then by a small MLP.

Positional (sinusoidal) features, the default (Vaswani et al. 2017; Ho et al. 2020):

    omega_k = max_positions^(-k / h),  k = 0, ..., h - 1,  h = dim / 2
    e(c) = [cos(s c omega_0), ..., cos(s c omega_{h-1}), sin(s c omega_0), ..., sin(...)]

with input scale s = 1000, so s c spans the same range as DDPM's integer timesteps
(0..999). The frequencies are geometric, from 1000 rad per unit of c down to 0.1 rad per
unit: the slowest features are nearly linear in c over its whole range and the fastest
resolve changes of sigma well below 1%. This is the default because a log-sigma code is a
smooth coordinate and a geometric ladder of frequencies covers all of its scales evenly.

Random Fourier features (Tancik et al. 2020; Song et al. 2021):

    f_k ~ N(0, scale^2)   (drawn once, from a fixed seed, never from the global RNG)
    e(c) = [cos(2 pi c f_1), ..., cos(2 pi c f_h), sin(2 pi c f_1), ..., sin(2 pi c f_h)]

Both are followed by :class:`NoiseEmbedding`'s MLP,
emb = SiLU(W_2 SiLU(W_1 e(c) + b_1) + b_2), which is what every residual block reads.

References:
    | Attention Is All You Need (Vaswani et al., 2017)
    | https://arxiv.org/abs/1706.03762
    | Denoising Diffusion Probabilistic Models (Ho et al., 2020)
    | https://arxiv.org/abs/2006.11239
    | Fourier Features Let Networks Learn High Frequency Functions (Tancik et al., 2020)
    | https://arxiv.org/abs/2006.10739
    | Score-Based Generative Modeling through SDEs (Song et al., 2021)
    | https://arxiv.org/abs/2011.13456
    | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022)
    | https://arxiv.org/abs/2206.00364
"""

__all__ = [
    "EMBEDDINGS",
    "FourierEmbedding",
    "NoiseEmbedding",
    "PositionalEmbedding",
    "check_c_noise",
]

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from hierprior.checks import check_int

EMBEDDINGS = ("positional", "fourier")


def _int_tuple(name: str, values: Iterable, allow_empty: bool = False) -> tuple[int, ...]:
    """Returns ``values`` (a list, tuple or hydra ``ListConfig``) as a tuple of positive ints."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of positive ints, got {values!r}")
    out = tuple(check_int(v, f"{name}[{i}]") for i, v in enumerate(values))
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return out


def check_c_noise(c_noise: Tensor | float, batch: int, like: Tensor) -> Tensor:
    r"""Validates a noise code and broadcasts a scalar to the batch.

    Arguments:
        c_noise: The noise-level code, a float, or a tensor with shape () or (B).
        batch: The batch size B.
        like: A tensor whose device the code is moved to.

    Returns:
        The code, with shape (B), on ``like``'s device.
    """
    if not torch.is_tensor(c_noise):
        if isinstance(c_noise, bool) or not isinstance(c_noise, (int, float)):
            raise TypeError(f"c_noise must be a tensor of shape (B,), got {type(c_noise)}")
        c_noise = torch.tensor(float(c_noise))
    c_noise = c_noise.to(device=like.device)
    if c_noise.ndim == 0:
        c_noise = c_noise.expand(batch)
    if c_noise.shape != (batch,):
        raise ValueError(
            f"c_noise must have shape ({batch},) to match the batch, got {tuple(c_noise.shape)}"
        )
    if not torch.is_floating_point(c_noise):
        c_noise = c_noise.float()
    return c_noise


class _CosSinFeatures(nn.Module):
    """Shared forward of the sinusoidal embeddings: [cos(c f_k), sin(c f_k)] for a buffer f."""

    freqs: Tensor

    def forward(self, c: Tensor) -> Tensor:
        r"""
        Arguments:
            c: The code, with shape (B).

        Returns:
            The features, with shape (B, d).
        """
        angles = c.to(self.freqs.dtype)[:, None] * self.freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class PositionalEmbedding(_CosSinFeatures):
    r"""Creates a sinusoidal (positional) embedding of a scalar code.

    .. math:: e(c) = [\cos(s c \omega_k), \sin(s c \omega_k)]_{k < d/2},
        \quad \omega_k = P^{-k / (d/2)}

    Arguments:
        dim: The embedding width d, even.
        max_positions: The ratio P between the fastest and slowest frequency.
        scale: The input scale s (1000 maps c in [0, 1] onto DDPM's timestep range).

    References:
        | Attention Is All You Need (Vaswani et al., 2017)
        | https://arxiv.org/abs/1706.03762
    """

    def __init__(self, dim: int, max_positions: int = 10000, scale: float = 1000.0) -> None:
        super().__init__()
        dim = check_int(dim, "dim")
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        if max_positions <= 1:
            raise ValueError(f"max_positions must be > 1, got {max_positions}")
        self.dim = dim
        self.max_positions = max_positions
        self.scale = float(scale)
        half = dim // 2
        freqs = float(max_positions) ** (-torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", (self.scale * freqs).float(), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_positions={self.max_positions}, scale={self.scale}"


class FourierEmbedding(_CosSinFeatures):
    r"""Creates a random Fourier feature embedding of a scalar code.

    .. math:: e(c) = [\cos(2 \pi c f_k), \sin(2 \pi c f_k)]_{k < d/2},
        \quad f_k \sim \mathcal{N}(0, \text{scale}^2)

    The frequencies are a buffer drawn once from ``torch.Generator().manual_seed(seed)``, so
    building the module neither reads nor advances the global RNG and two modules with the
    same arguments are identical.

    Arguments:
        dim: The embedding width d, even.
        scale: The standard deviation of the frequencies.
        seed: The seed of the frequencies.

    References:
        | Fourier Features Let Networks Learn High Frequency Functions (Tancik et al., 2020)
        | https://arxiv.org/abs/2006.10739
    """

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        dim = check_int(dim, "dim")
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.dim = dim
        self.scale = float(scale)
        self.seed = int(seed)
        g = torch.Generator().manual_seed(self.seed)
        freqs = torch.randn(dim // 2, generator=g) * self.scale
        self.register_buffer("freqs", 2 * math.pi * freqs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, seed={self.seed}"


class NoiseEmbedding(nn.Module):
    r"""Creates the noise-level embedding read by every block of a backbone.

    .. math:: \text{emb}(c) = \mathrm{SiLU}(W_2 \, \mathrm{SiLU}(W_1 e(c) + b_1) + b_2)

    where e is :class:`PositionalEmbedding` or :class:`FourierEmbedding`.

    Arguments:
        emb_dim: The output width.
        base_dim: The width of the sinusoidal features e(c) (default: ``emb_dim``), rounded
            up to an even number.
        kind: ``"positional"`` (default) or ``"fourier"``.
        fourier_scale: The frequency scale of the Fourier features.
        max_positions: The frequency ratio of the positional features.

    References:
        | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022)
        | https://arxiv.org/abs/2206.00364
    """

    def __init__(
        self,
        emb_dim: int,
        base_dim: int | None = None,
        kind: str = "positional",
        fourier_scale: float = 16.0,
        max_positions: int = 10000,
    ) -> None:
        super().__init__()
        emb_dim = check_int(emb_dim, "emb_dim")
        base_dim = emb_dim if base_dim is None else check_int(base_dim, "base_dim")
        base_dim += base_dim % 2  # sin/cos pairs need an even width
        if kind == "positional":
            self.base = PositionalEmbedding(base_dim, max_positions=max_positions)
        elif kind == "fourier":
            self.base = FourierEmbedding(base_dim, scale=fourier_scale)
        else:
            raise ValueError(f"embedding kind must be one of {EMBEDDINGS}, got {kind!r}")
        self.mlp = nn.Sequential(
            nn.Linear(base_dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
            nn.SiLU(),
        )

    def forward(self, c: Tensor) -> Tensor:
        r"""
        Arguments:
            c: The noise code, with shape (B).

        Returns:
            The embedding, with shape (B, emb_dim), in the dtype of the MLP weights.
        """
        e = self.base(c).to(self.mlp[0].weight.dtype)
        return self.mlp(e)
