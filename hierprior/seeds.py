"""Seeds derived from keys: every random stream of a run has its own reproducible generator.

A run has one integer seed. Every random stream derives its own seed from that seed and keys
naming the stream, e.g. ``derive_seed(seed, round, "mstep", "noise")`` or
``derive_seed(seed, round, "estep", first_observation)``: streams never share state, a stream
does not change when another one draws more or less, and nothing reads or reseeds torch's
global RNG.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "derived_generator", "randn_like"]


def derive_seed(*keys: object) -> int:
    """A 63-bit seed derived deterministically from keys (ints and strings).

    Different key tuples give independent-looking seeds (SHA-256 of their ``repr``); the same
    keys always give the same seed, on every machine and Python version.
    """
    digest = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derived_generator(*keys: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*keys)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise with the shape, device and dtype of x, drawn from ``generator``
    (the global RNG only when it is None)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
