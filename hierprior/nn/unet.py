r"""A noise-conditioned U-Net backbone for image denoisers.

The U-Net is the raw network F in EDM preconditioning,

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),

mapping images with shape (B, C, H, W) and a noise code with shape (B) to images with shape
(B, C_out, H, W). Its layout follows DDPM / ADM:

    h = conv_in(x)
    encoder, level l = 0..L-1 at resolution R / 2^l:
        num_res_blocks x [ResBlock -> (Attention if resolution in attention_resolutions)]
        then a stride-2 3x3 convolution (except at the last level); every output is a skip
    middle: ResBlock -> Attention -> ResBlock
    decoder, level l = L-1..0:
        (num_res_blocks + 1) x [concat(h, skip) -> ResBlock -> (Attention)]
        then nearest x2 upsampling + 3x3 convolution (except at level 0)
    F(x, c) = conv_out(SiLU(GroupNorm(h)))         conv_out zero-initialised, so F = 0 at init

A residual block modulates its second normalisation by the noise embedding (adaptive group
norm, a FiLM layer):

    h = conv_1(SiLU(GN(x)))
    h = conv_2(Dropout(SiLU(GN(h) (1 + a(emb)) + b(emb))))
    ResBlock(x) = skip(x) + h

Self-attention is multi-head dot-product attention over the H W positions,
x + proj(softmax(q^T k / sqrt(d)) v), with the output projection zero-initialised. Every
GroupNorm over C channels uses gcd(groups, C) groups, so any channel count works.

References:
    | Denoising Diffusion Probabilistic Models (Ho et al., 2020)
    | https://arxiv.org/abs/2006.11239
    | Diffusion Models Beat GANs on Image Synthesis (Dhariwal & Nichol, 2021)
    | https://arxiv.org/abs/2105.05233
    | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022)
    | https://arxiv.org/abs/2206.00364
"""

__all__ = [
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "UNet",
    "Upsample",
]

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hierprior.checks import check_int
from hierprior.nn.embedding import (
    EMBEDDINGS,
    NoiseEmbedding,
    _int_tuple,
    check_c_noise,
)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with gcd(groups, channels) groups, which always divides ``channels``."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    r"""Creates a residual block modulated by a noise embedding (adaptive group norm).

    Arguments:
        in_channels: The number of input channels.
        out_channels: The number of output channels.
        emb_dim: The width of the noise embedding.
        dropout: The dropout rate in [0, 1).
        groups: The largest number of GroupNorm groups.

    References:
        | Diffusion Models Beat GANs on Image Synthesis (Dhariwal & Nichol, 2021)
        | https://arxiv.org/abs/2105.05233
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        groups: int = 32,
    ) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = _group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        if in_channels == out_channels:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        r"""
        Arguments:
            x: The input, with shape (B, C_in, H, W).
            emb: The noise embedding, with shape (B, emb_dim).

        Returns:
            The output, with shape (B, C_out, H, W).
        """
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    r"""Creates a multi-head self-attention block over the spatial positions.

    .. math:: y = x + W_o \, \mathrm{softmax}(Q K^T / \sqrt{d}) V, \quad
        (Q, K, V) = W_{qkv} \, \mathrm{GN}(x)

    Arguments:
        channels: The number of channels C, divisible by ``num_heads``.
        num_heads: The number of attention heads.
        groups: The largest number of GroupNorm groups.

    References:
        | Attention Is All You Need (Vaswani et al., 2017)
        | https://arxiv.org/abs/1706.03762
    """

    def __init__(self, channels: int, num_heads: int = 1, groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"attention channels ({channels}) must be divisible by num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        r"""
        Arguments:
            x: The input, with shape (B, C, H, W).

        Returns:
            The output, with shape (B, C, H, W).
        """
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, C / heads)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(y)


class Downsample(nn.Module):
    r"""Halves the resolution with a stride-2 3x3 convolution.

    Arguments:
        channels: The number of channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        r"""Maps (B, C, H, W) to (B, C, H / 2, W / 2)."""
        return self.conv(x)


class Upsample(nn.Module):
    r"""Doubles the resolution by nearest-neighbour interpolation and a 3x3 convolution.

    Arguments:
        channels: The number of channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        r"""Maps (B, C, H, W) to (B, C, 2 H, 2 W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    r"""Creates a noise-conditioned U-Net, the backbone F of an image denoiser.

    The defaults give 6.9M parameters; ``channels=(32, 64), num_res_blocks=1`` gives 0.76M,
    small enough for CPU tests. The ~9M benchmark configuration at 32x32 (9,145,857
    parameters with one input channel) is ``UNet(in_channels=1, image_size=32,
    channels=(64, 128, 128), num_res_blocks=3, attention_resolutions=(16,))``; note that
    ``channels=(128, 256, 256), num_res_blocks=2`` is 27.7M with this layout.

    Arguments:
        in_channels: The number of image channels C.
        out_channels: The number of output channels (default: C).
        image_size: The side R of the square images; divisible by 2^(len(channels) - 1).
        channels: The number of channels at each resolution level R, R/2, ...
        num_res_blocks: The number of residual blocks per level in the encoder (the decoder
            has one more per level).
        attention_resolutions: The resolutions at which self-attention follows each residual
            block; each must be one of R, R/2, ... Attention in the middle block is
            controlled by ``mid_attention``.
        emb_dim: The width of the noise embedding (default: 4 channels[0]).
        dropout: The dropout rate in [0, 1) inside residual blocks.
        num_heads: The number of attention heads.
        groups: The largest number of GroupNorm groups; a norm over C channels uses
            gcd(groups, C).
        embedding: The noise-code features, ``"positional"`` or ``"fourier"``.
        mid_attention: Whether the middle block has self-attention.

    References:
        | Diffusion Models Beat GANs on Image Synthesis (Dhariwal & Nichol, 2021)
        | https://arxiv.org/abs/2105.05233
        | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022)
        | https://arxiv.org/abs/2206.00364
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 32,
        channels: Sequence[int] = (64, 128, 128),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        emb_dim: int | None = None,
        dropout: float = 0.0,
        num_heads: int = 1,
        groups: int = 32,
        embedding: str = "positional",
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "in_channels")
        out_channels = (
            in_channels if out_channels is None else check_int(out_channels, "out_channels")
        )
        image_size = check_int(image_size, "image_size")
        channels = _int_tuple("channels", channels)
        num_res_blocks = check_int(num_res_blocks, "num_res_blocks")
        attention_resolutions = _int_tuple(
            "attention_resolutions", attention_resolutions, allow_empty=True
        )
        emb_dim = 4 * channels[0] if emb_dim is None else check_int(emb_dim, "emb_dim")
        num_heads = check_int(num_heads, "num_heads")
        groups = check_int(groups, "groups")
        dropout = float(dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")

        factor = 2 ** (len(channels) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size ({image_size}) must be divisible by 2**(len(channels) - 1) = "
                f"{factor} for {len(channels)} resolution levels; pad or crop the images, "
                f"or use fewer levels"
            )
        resolutions = [image_size // 2**level for level in range(len(channels))]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} are not among the U-Net's resolutions "
                f"{resolutions}"
            )

        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "image_size": image_size,
            "channels": list(channels),
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attention_resolutions),
            "emb_dim": emb_dim,
            "dropout": dropout,
            "num_heads": num_heads,
            "groups": groups,
            "embedding": embedding,
            "mid_attention": bool(mid_attention),
        }
        self.event_shape = (in_channels, image_size, image_size)
        self.out_shape = (out_channels, image_size, image_size)

        self.embed = NoiseEmbedding(emb_dim, base_dim=channels[0], kind=embedding)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        def attention(c: int, res: int) -> nn.Module:
            if res in attention_resolutions:
                return AttentionBlock(c, num_heads, groups)
            return nn.Identity()

        # Encoder: every block output is kept as a skip for the decoder.
        self.down = nn.ModuleList()
        skips = [channels[0]]
        c = channels[0]
        for level, (width, res) in enumerate(zip(channels, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(
                    nn.ModuleList(
                        [ResBlock(c, width, emb_dim, dropout, groups), attention(width, res)]
                    )
                )
                c = width
                skips.append(c)
            if level < len(channels) - 1:
                self.down.append(Downsample(c))
                skips.append(c)

        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, emb_dim, dropout, groups),
                AttentionBlock(c, num_heads, groups) if mid_attention else nn.Identity(),
                ResBlock(c, c, emb_dim, dropout, groups),
            ]
        )

        # Decoder: one extra block per level consumes the downsampling skip.
        self.up = nn.ModuleList()
        for level in reversed(range(len(channels))):
            width, res = channels[level], resolutions[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    nn.ModuleList(
                        [
                            ResBlock(c + skips.pop(), width, emb_dim, dropout, groups),
                            attention(width, res),
                        ]
                    )
                )
                c = width
            if level > 0:
                self.up.append(Upsample(c))

        self.norm_out = _group_norm(c, groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor | float) -> Tensor:
        r"""
        Arguments:
            x: The (preconditioned) noisy images, with shape (B, C, R, R).
            c_noise: The noise-level codes, with shape (B) (a scalar is broadcast).

        Returns:
            The network output, with shape (B, C_out, R, R).
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"UNet expects input with shape (B, {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(x.shape)}"
            )
        emb = self.embed(check_c_noise(c_noise, x.shape[0], x))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            if isinstance(block, Downsample):
                h = block(h)
            else:
                res, attn = block
                h = attn(res(h, emb))
            skips.append(h)

        res1, attn, res2 = self.mid
        h = res2(attn(res1(h, emb)), emb)

        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                res, attn = block
                h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))

        return self.conv_out(F.silu(self.norm_out(h)))
