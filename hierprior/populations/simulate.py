r"""Simulation of a population :math:`y_i = A_i(x_i) + n_i`, i = 1..N, from its parts.

:func:`simulate_population` draws the truths :math:`x_i` from a truth generator, the
per-observation forward models :math:`A_i` (when a generator of them is given), and the noise
:math:`n_i`, each from its own stream derived from (seed, part), so that changing one part
(say the mask fraction) leaves the others' draws unchanged. The truths are kept in the
:class:`~hierprior.em.Population` for evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hierprior.checks import check_int
from hierprior.em.population import Population
from hierprior.physics import ForwardModel, NoiseModel
from hierprior.seeds import derived_generator

__all__ = ["simulate_population"]


def simulate_population(
    truth: Callable[[int, torch.Generator], Tensor] | Tensor,
    forward: ForwardModel | Callable[[int, tuple[int, ...], torch.Generator], ForwardModel],
    noise: NoiseModel,
    num_obs: int | None = None,
    seed: int = 0,
) -> Population:
    """Simulates N corrupted observations of a population.

    Arguments:
        truth: a truth generator ``truth(n, generator) -> (n, *signal_shape)`` (e.g.
            :class:`~hierprior.populations.MNISTDigits`), or the truths themselves, a tensor
            with shape (N, *signal_shape).
        forward: a forward model (shared, or per observation with num_obs = N), or a generator
            of per-observation ones ``forward(n, signal_shape, generator) -> ForwardModel``
            (e.g. :class:`~hierprior.populations.RandomMask`).
        noise: the noise model (shared or per observation).
        num_obs: the number of observations N (required with a truth generator).
        seed: the population's seed; truths, forward models and noise draw from the streams
            (seed, "truth"), (seed, "forward") and (seed, "noise").

    Returns:
        The :class:`~hierprior.em.Population` with y, forward, noise and truth.
    """
    check_int(seed, "seed", None)
    if isinstance(truth, Tensor):
        if num_obs is not None and num_obs != len(truth):
            raise ValueError(f"num_obs={num_obs} but the truth tensor holds {len(truth)} signals")
        x = truth
    else:
        check_int(num_obs, "num_obs")
        if not callable(truth):
            raise TypeError(f"truth must be a tensor or a truth generator, got {type(truth)}")
        x = truth(num_obs, derived_generator(seed, "truth"))
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError("the truths must be a tensor with shape (N, *signal_shape)")
    n = len(x)
    if not isinstance(forward, ForwardModel):
        if not callable(forward):
            raise TypeError(
                f"forward must be a ForwardModel or a generator of them, got {forward}"
            )
        forward = forward(n, tuple(x.shape[1:]), derived_generator(seed, "forward"))
    if not isinstance(noise, NoiseModel):
        raise TypeError(f"noise must be a hierprior NoiseModel, got {type(noise).__name__}")
    if tuple(forward.input_shape) != tuple(x.shape[1:]):
        raise ValueError(
            f"the truths have shape {tuple(x.shape[1:])} but the forward model takes signals "
            f"with shape {tuple(forward.input_shape)}"
        )
    with torch.no_grad():
        # a forward model with unknown parameters (BlindLensing) simulates with its truth
        clean = forward.truth_forward()(x) if getattr(forward, "blind", False) else forward(x)
    y = clean + noise.sample(
        tuple(clean.shape), generator=derived_generator(seed, "noise"), dtype=clean.dtype
    ).to(clean.device)
    return Population(y=y, forward=forward, noise=noise, truth=x, meta={"seed": seed})
