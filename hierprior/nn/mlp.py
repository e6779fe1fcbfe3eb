r"""A noise-conditioned residual MLP backbone for vector data.

The MLP is the raw network F in EDM preconditioning for data with shape (B, D),

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).

With widths h_0, ..., h_{L-1} and e = emb(c_noise) (:class:`~hierprior.nn.NoiseEmbedding`):

    z_0 = W_in x                                                  (B, h_0)
    z_l = skip(z_{l-1}) + W_2 act(W_1 act(LN(z_{l-1}) (1 + a_l(e)) + b_l(e)))
    F(x, c) = W_out act(LN(z_L))                                  W_out zero-initialised

Each block therefore reads the noise level through a per-layer FiLM of its layer norm
(adaptive layer norm), and F = 0 at initialisation, so the denoiser starts as c_skip x.

References:
    | Deep Residual Learning for Image Recognition (He et al., 2016)
    | https://arxiv.org/abs/1512.03385
    | FiLM: Visual Reasoning with a General Conditioning Layer (Perez et al., 2018)
    | https://arxiv.org/abs/1709.07871
    | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022)
    | https://arxiv.org/abs/2206.00364
"""

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "MLPBlock",
]

from collections.abc import Sequence

from torch import Tensor, nn

from hierprior.checks import check_int
from hierprior.nn.embedding import (
    EMBEDDINGS,
    NoiseEmbedding,
    _int_tuple,
    check_c_noise,
)

ACTIVATIONS = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class MLPBlock(nn.Module):
    r"""Creates a residual MLP block modulated by a noise embedding (adaptive layer norm).

    .. math:: y = \text{skip}(z) + W_2 \, \text{act}(W_1 \, \text{act}(
        \mathrm{LN}(z) (1 + a(e)) + b(e)))

    Arguments:
        in_features: The input width.
        out_features: The output width.
        emb_dim: The width of the noise embedding.
        activation: The name of the activation (a key of ``ACTIVATIONS``).
        dropout: The dropout rate in [0, 1), before W_2.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        emb_dim: int,
        activation: str = "silu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False)
        self.emb = nn.Linear(emb_dim, 2 * in_features)
        self.branch = nn.Sequential(
            _activation(activation),
            nn.Linear(in_features, out_features),
            _activation(activation),
            nn.Dropout(dropout),
            nn.Linear(out_features, out_features),
        )
        if in_features == out_features:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Linear(in_features, out_features)

    def forward(self, z: Tensor, emb: Tensor) -> Tensor:
        r"""
        Arguments:
            z: The input, with shape (B, in_features).
            emb: The noise embedding, with shape (B, emb_dim).

        Returns:
            The output, with shape (B, out_features).
        """
        scale, shift = self.emb(emb).chunk(2, dim=-1)
        return self.skip(z) + self.branch(self.norm(z) * (1 + scale) + shift)


class MLP(nn.Module):
    r"""Creates a noise-conditioned residual MLP, the backbone F of a vector denoiser.

    Arguments:
        features: The data dimension D.
        hidden: The widths of the residual blocks, one block per entry.
        emb_dim: The width of the noise embedding.
        activation: ``"silu"`` (default), ``"gelu"``, ``"relu"``, ``"elu"`` or ``"tanh"``.
        dropout: The dropout rate in [0, 1) inside the blocks.
        embedding: The noise-code features, ``"positional"`` or ``"fourier"``.

    References:
        | Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., 2022)
        | https://arxiv.org/abs/2206.00364
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (256, 256, 256),
        emb_dim: int = 64,
        activation: str = "silu",
        dropout: float = 0.0,
        embedding: str = "positional",
    ) -> None:
        super().__init__()
        features = check_int(features, "features")
        hidden = _int_tuple("hidden", hidden)
        emb_dim = check_int(emb_dim, "emb_dim")
        dropout = float(dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.act_out = _activation(activation)  # validates the name before any block
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")

        self.config = {
            "features": features,
            "hidden": list(hidden),
            "emb_dim": emb_dim,
            "activation": activation,
            "dropout": dropout,
            "embedding": embedding,
        }
        self.event_shape = (features,)

        self.embed = NoiseEmbedding(emb_dim, kind=embedding)
        self.input = nn.Linear(features, hidden[0])
        widths = (hidden[0], *hidden)
        self.blocks = nn.ModuleList(
            MLPBlock(w_in, w_out, emb_dim, activation, dropout)
            for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.norm_out = nn.LayerNorm(hidden[-1])
        self.output = nn.Linear(hidden[-1], features)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, c_noise: Tensor | float) -> Tensor:
        r"""
        Arguments:
            x: The (preconditioned) noisy vectors, with shape (B, D).
            c_noise: The noise-level codes, with shape (B) (a scalar is broadcast).

        Returns:
            The network output, with shape (B, D).
        """
        if x.ndim != 2 or tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"MLP expects input with shape (B, {self.event_shape[0]}), got {tuple(x.shape)}"
            )
        emb = self.embed(check_c_noise(c_noise, x.shape[0], x))
        z = self.input(x)
        for block in self.blocks:
            z = block(z, emb)
        return self.output(self.act_out(self.norm_out(z)))
