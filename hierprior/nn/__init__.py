r"""Neural backbones for diffusion denoisers.

A backbone is the raw network F in EDM preconditioning,
D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), with the interface

    forward(x with shape (B, *event_shape), c_noise with shape (B)) -> (B, *event_shape)

where c_noise is a real noise-level code (ln(sigma) / 4 in EDM). Every backbone is built
from plain keyword arguments, keeps them in ``config`` (so ``type(m)(**m.config)`` rebuilds
it) and exposes ``event_shape``.

References:
    | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022)
    | https://arxiv.org/abs/2206.00364
"""

__all__ = [
    "MLP",
    "FourierEmbedding",
    "NoiseEmbedding",
    "PositionalEmbedding",
    "UNet",
]

from hierprior.nn.embedding import FourierEmbedding, NoiseEmbedding, PositionalEmbedding
from hierprior.nn.mlp import MLP
from hierprior.nn.unet import UNet
