r"""Truth generator: points on a random smooth low-dimensional manifold (the DiEM manifold).

A random smooth manifold of dimension m in :math:`\mathbb R^D` (Zenke & Vogels 2021, the
"randman" construction that Rozet et al. 2024 use in §5.1): with :math:`a, b, c` drawn i.i.d.
from U(0, 1) once per manifold, one random Fourier series per output coordinate j and latent
coordinate l,

.. math::
    f_{jl}(z) = \sum_{k=1}^{K} \frac{a_{jlk}}{k^{\alpha}}
        \sin\bigl(2\pi (k\, b_{jlk}\, z + c_{jlk})\bigr), \qquad
    K = \lceil \epsilon^{-1/\alpha} \rceil,

and a point is :math:`x_j = \prod_l f_{jl}(z_l)` with :math:`z \sim U(0, 1)^m`. The smoothness
:math:`\alpha` damps the k-th harmonic by :math:`k^{-\alpha}`; the series is cut where that
falls below :math:`\epsilon`. Each coordinate is then mapped affinely onto ``value_range``
(DiEM: [-2, 2]) with the coordinate's range over the manifold, computed once when the
generator is built (on a grid of :math:`2^{16} + 1` latent values for m = 1, on :math:`2^{16}`
random latent points otherwise), so every draw, population or held-out set, comes from the
same distribution (DiEM rescales by the range of its own sample instead).

The manifold is fixed by ``seed`` (its own stream); ``gen(n, generator)`` draws only the
latent z from the generator it is given, so a population stays a deterministic function of
its seed and a second generator with the same ``seed`` gives held-out points of the same
manifold.

References:
    Zenke & Vogels (2021), The remarkable robustness of surrogate gradient learning for
    instilling complex function in spiking neural networks, Neural Computation 33(4).
    Rozet, Andry, Lanusse & Louppe (2024), Learning Diffusion Priors from Observations by
    Expectation Maximization, arXiv 2405.13712, §5.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hierprior.checks import check_float, check_int
from hierprior.seeds import derived_generator

__all__ = ["SmoothManifold"]


class SmoothManifold:
    """Points on a random smooth manifold of dimension m in R^D, shape (n, D).

    Arguments:
        features: D, the dimension of the points.
        manifold_dim: m, the dimension of the manifold.
        alpha: the smoothness exponent (harmonic k damped by k^-alpha).
        epsilon: the amplitude below which harmonics are cut, K = ceil(epsilon^(-1/alpha)).
        seed: the manifold's seed (its Fourier coefficients).
        value_range: the interval each coordinate is mapped onto.
        dtype: e.g. ``"float64"`` (default: torch's default dtype).
    """

    def __init__(
        self,
        features: int = 5,
        manifold_dim: int = 1,
        alpha: float = 3.0,
        epsilon: float = 1e-3,
        seed: int = 0,
        value_range: Sequence[float] = (-2.0, 2.0),
        dtype: str | torch.dtype | None = None,
    ):
        self.features = check_int(features, "features", 1)
        self.manifold_dim = check_int(manifold_dim, "manifold_dim", 1)
        self.alpha = check_float(alpha, "alpha", 0.0, strict=True)
        self.epsilon = check_float(epsilon, "epsilon", 0.0, strict=True, maximum=1.0)
        self.seed = check_int(seed, "seed", 0)
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must satisfy a < b, got {value_range}")
        self.value_range = (lo, hi)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.dtype = dtype or torch.get_default_dtype()
        self.harmonics = math.ceil(self.epsilon ** (-1.0 / self.alpha))
        g = derived_generator(self.seed, "manifold")
        shape = (3, self.features, self.manifold_dim, self.harmonics)
        self.a, self.b, self.c = torch.rand(shape, generator=g, dtype=torch.float64)
        if self.manifold_dim == 1:
            z = torch.linspace(0.0, 1.0, 2**16 + 1, dtype=torch.float64)[:, None]
        else:
            z = torch.rand((2**16, self.manifold_dim), generator=g, dtype=torch.float64)
        raw = self.embed(z)
        self.low, self.high = raw.min(0).values, raw.max(0).values
        if not (self.high > self.low).all():
            raise ValueError("a coordinate of the manifold is constant; use another seed")

    def embed(self, z: Tensor) -> Tensor:
        """The raw (unscaled) points of latent coordinates z (n, m) in [0, 1]^m, (n, D)."""
        k = torch.arange(1, self.harmonics + 1, dtype=torch.float64)
        z = z.to(torch.float64)[:, None, :, None]  # (n, 1, m, 1)
        phase = 2 * math.pi * (k * self.b * z + self.c)  # (n, D, m, K)
        return (self.a / k**self.alpha * torch.sin(phase)).sum(-1).prod(-1)

    def from_latent(self, z: Tensor) -> Tensor:
        """The points of latent coordinates z (n, m) in [0, 1]^m, mapped onto value_range."""
        lo, hi = self.value_range
        unit = (self.embed(z) - self.low) / (self.high - self.low)
        return (lo + (hi - lo) * unit).to(self.dtype)

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        n = check_int(n, "n", 1)
        z = torch.rand((n, self.manifold_dim), generator=generator, dtype=torch.float64)
        return self.from_latent(z)
