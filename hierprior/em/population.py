r"""A population of corrupted observations :math:`y_i = A_i(x_i) + n_i`, i = 1..N.

:class:`Population` keeps the observations y with shape (N, *obs_shape), their forward models
(one :class:`~hierprior.physics.ForwardModel` with per-observation parameters, or shared), their
noise model, and optionally the true signals (N, *signal_shape) — for evaluation only: the E- and
M-steps never read them.

A population is checked when it is built (finite observations, shapes consistent with the
forward and noise models) and against a prior before EM starts (:meth:`Population.check_prior`).
Its :meth:`fingerprint` identifies the data, so that a run directory can refuse to mix runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hierprior.io import atomic_save
from hierprior.physics import ForwardModel, observation_index
from hierprior.physics.noise import NoiseModel

__all__ = ["Population", "tensor_fingerprint"]


def tensor_fingerprint(*tensors: Tensor | None) -> str:
    """A short SHA-256 hex digest of tensors' shapes, dtypes and values (None allowed)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Population:
    """Observations y_i = A_i(x_i) + n_i of a population.

    Arguments:
        y: observations, with shape (N, *forward.output_shape).
        forward: forward model, per observation (num_obs = N) or shared.
        noise: noise model, per observation (num_obs = N) or shared.
        truth: optional true signals, with shape (N, *forward.input_shape); evaluation only.
        meta: free-form description (e.g. the config that built it).
    """

    y: Tensor
    forward: ForwardModel
    noise: NoiseModel
    truth: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.y, Tensor) or self.y.ndim < 2:
            raise ValueError("y must be a tensor with shape (N, *obs_shape)")
        if not isinstance(self.forward, ForwardModel):
            raise TypeError(f"forward must be a hierprior ForwardModel, got {type(self.forward)}")
        if not isinstance(self.noise, NoiseModel):
            raise TypeError(f"noise must be a hierprior NoiseModel, got {type(self.noise)}")
        n = self.y.shape[0]
        bad = ~torch.isfinite(self.y.reshape(n, -1)).all(1)
        if bad.any():
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"observations hold NaN/Inf for {len(idx)} observation(s): {idx[:10]}"
                + (" ..." if len(idx) > 10 else "")
            )
        if tuple(self.y.shape[1:]) != tuple(self.forward.output_shape):
            raise ValueError(
                f"y has observation shape {tuple(self.y.shape[1:])} but the forward model "
                f"outputs {tuple(self.forward.output_shape)}"
            )
        for name, model in (("forward model", self.forward), ("noise model", self.noise)):
            if model.num_obs is not None and model.num_obs != n:
                raise ValueError(f"the {name} is for {model.num_obs} observations, y has {n}")
        self.noise.check(self.y)  # e.g. a learned noise model of another observation shape
        if self.truth is not None:
            if tuple(self.truth.shape) != (n, *self.forward.input_shape):
                raise ValueError(
                    f"truth must have shape {(n, *self.forward.input_shape)}, "
                    f"got {tuple(self.truth.shape)}"
                )

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def signal_shape(self) -> tuple[int, ...]:
        return tuple(self.forward.input_shape)

    def __getitem__(self, idx) -> Population:
        """The sub-population of the selected observations (int, slice, list or tensor)."""
        index = observation_index(idx, len(self))
        return Population(
            y=self.y[index.to(self.y.device)],
            forward=self.forward[index],
            noise=self.noise[index],
            truth=None if self.truth is None else self.truth[index.to(self.truth.device)],
            meta=self.meta,
        )

    def to(self, device: torch.device | str) -> Population:
        return Population(
            y=self.y.to(device),
            forward=self.forward.to(device),
            noise=self.noise.to(device),
            truth=None if self.truth is None else self.truth.to(device),
            meta=self.meta,
        )

    def check_prior(self, prior) -> None:
        """Raises a ValueError when the forward model does not accept the prior's samples."""
        event = tuple(prior.event_shape)
        if event != self.signal_shape:
            raise ValueError(
                f"the prior's samples have shape {event} but the population's forward model "
                f"takes signals with shape {self.signal_shape}"
            )
        probe = torch.zeros((1, *event), dtype=self.y.dtype, device=self.y.device)
        model = self.forward[0]
        if getattr(model, "blind", False):  # unknown parameters: a reference lens's shapes
            model = model.reference()
        try:
            out = model(probe)
        except Exception as err:
            raise ValueError(f"the forward model fails on a prior-shaped input: {err}") from err
        if tuple(out.shape[1:]) != tuple(self.y.shape[1:]):
            raise ValueError(
                f"the forward model maps prior samples to {tuple(out.shape[1:])}, "
                f"but observations have shape {tuple(self.y.shape[1:])}"
            )

    def fingerprint(self) -> str:
        """Digest of the observations and of every tensor of the forward and noise models:
        their buffers (noise levels, masks, lens parameters) and their parameters (the
        weights of a neural noise model, e.g. a :class:`~hierprior.physics.LearnedNoise`'s
        denoiser), each in name order. Models without parameters digest as before."""
        tensors = [self.y]
        for module in (self.forward, self.noise):
            tensors += [b for _, b in sorted(module.named_buffers(), key=lambda kv: kv[0])]
            tensors += [p for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0])]
        return tensor_fingerprint(*tensors)

    def save(self, path: str | Path) -> Path:
        """Writes y, truth, the fingerprint and meta (a plain dict) atomically."""
        return atomic_save(
            {
                "y": self.y.cpu(),
                "truth": None if self.truth is None else self.truth.cpu(),
                "fingerprint": self.fingerprint(),
                "meta": self.meta,
            },
            path,
        )
