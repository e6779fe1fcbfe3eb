r"""Shared machinery of the posterior samplers: the observation model, the denoiser wrapper.

A population holds N observations :math:`y_i = A_i(x_i) + n_i`,
:math:`n_i \sim \mathcal{N}(0, \Sigma_{y,i})`, and a diffusion prior :math:`p(x)` with the
forward process :math:`x_t = \alpha_t x + \sigma_t \varepsilon`. By Tweedie's formula applied
to the posterior :math:`p(x \mid y)`,

.. math::
    E[x \mid x_t, y] = E[x \mid x_t] + \frac{\sigma_t^2}{\alpha_t}
        \nabla_{x_t} \log p_t(y \mid x_t),

so a posterior method that approximates the likelihood score
:math:`\nabla_{x_t} \log p_t(y \mid x_t)` (or the posterior mean directly) is a *denoiser*
of the posterior, and every unconditional sampler of :mod:`hierprior.diffusion` runs it
unchanged (azula's design). :class:`PosteriorDenoiser` is that wrapper. It sees a batch of
N·S rows, observation-major (row ``i * S + s`` is sample s of observation i), reshapes it to
(N, S, *event) and applies observation i's forward model and noise to row i, broadcast over
the S axis. Every norm, inner product and solve is per (observation, sample) row, so the
observations never couple.

Tensors inside the methods have shape (N, S, *event) (signals) or (N, S, *obs) (observation
space); times have shape (N, S).

References:
    Efron (2011), Tweedie's formula and selection bias.
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.diffusion.denoiser import Denoiser, expand_time
from hierprior.io import device_dtype
from hierprior.physics import ForwardModel, GaussianNoise

__all__ = [
    "PosteriorSamplingError",
    "Observation",
    "PosteriorDenoiser",
    "check_problem",
    "check_int",
    "check_float",
    "check_choice",
    "default_iterations",
]


class PosteriorSamplingError(RuntimeError):
    """Some observations' posterior samples hold NaN or Inf.

    Attributes:
        samples: all the samples, with shape (N, S, *event_shape) (bad rows included).
        bad: which observations have non-finite samples, a bool tensor with shape (N,).
    """

    def __init__(self, message: str, samples: Tensor, bad: Tensor):
        super().__init__(message)
        self.samples = samples
        self.bad = bad


# ----------------------------------------------------------------------------- checks


def check_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(
    value: object, name: str, minimum: float = 0.0, strict: bool = False, maximum=None
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    low_bad = value <= minimum if strict else value < minimum
    if not math.isfinite(value) or low_bad or (maximum is not None and value > maximum):
        rng = f"{'>' if strict else '>='} {minimum}" + (
            f" and <= {maximum}" if maximum is not None else ""
        )
        raise ValueError(f"{name} must be finite and {rng}, got {value!r}")
    return value


def check_choice(value: object, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def check_problem(prior: Denoiser, forward: ForwardModel, noise: GaussianNoise, y: Tensor):
    """Validates a posterior problem before any sampling; returns y in the prior's dtype.

    Raises a TypeError or ValueError naming the problem: wrong types, y's shape versus the
    forward model's output shape, observation counts that disagree, forward.input_shape
    versus prior.event_shape, NaN/Inf in y, non-finite or non-positive noise levels.
    """
    if not isinstance(prior, Denoiser):
        raise TypeError(f"prior must be a hierprior Denoiser, got {type(prior).__name__}")
    if not isinstance(forward, ForwardModel):
        raise TypeError(f"forward must be a hierprior ForwardModel, got {type(forward).__name__}")
    if not isinstance(noise, GaussianNoise):
        raise TypeError(
            f"noise must be a hierprior GaussianNoise, got {type(noise).__name__} "
            "(the samplers use Gaussian likelihoods)"
        )
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor, got {type(y).__name__}")
    event = tuple(prior.event_shape)
    if tuple(forward.input_shape) != event:
        raise ValueError(
            f"forward.input_shape {tuple(forward.input_shape)} != prior.event_shape {event}"
        )
    out = tuple(forward.output_shape)
    if y.ndim != len(out) + 1 or tuple(y.shape[1:]) != out:
        raise ValueError(
            f"y must have shape (N, {', '.join(map(str, out))}) (forward.output_shape {out}), "
            f"got {tuple(y.shape)}"
        )
    n = y.shape[0]
    if n < 1:
        raise ValueError("y holds no observations (N = 0)")
    if forward.num_obs is not None and forward.num_obs != n:
        raise ValueError(f"y has N = {n} observations but forward.num_obs = {forward.num_obs}")
    if noise.num_obs is not None and noise.num_obs != n:
        raise ValueError(f"y has N = {n} observations but noise.num_obs = {noise.num_obs}")
    if not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
    bad = ~torch.isfinite(y.flatten(1)).all(1)
    if bool(bad.any()):
        raise ValueError(f"y holds NaN or Inf in observations {bad.nonzero().flatten().tolist()}")
    std = noise.std(y)
    bad = ~(torch.isfinite(std) & (std > 0)).flatten(1).all(1)
    if bool(bad.any()):
        raise ValueError(
            "noise levels must be finite and > 0; observations "
            f"{bad.nonzero().flatten().tolist()} violate this"
        )
    _, dtype = device_dtype(prior)
    return y.to(dtype)


def default_iterations(iterations: int | None, forward: ForwardModel, cap: int = 32) -> int:
    """Solver iterations: the given value, else min(M, cap) with M the values per observation."""
    if iterations is None:
        return min(math.prod(forward.output_shape), cap)
    return check_int(iterations, "iterations")


# ----------------------------------------------------------------------------- observations


class Observation:
    r"""The likelihood :math:`\mathcal{N}(y_i \mid A_i(x), \Sigma_{y,i})` of N observations.

    Arguments:
        forward: the forward model (per-observation with num_obs = N, or shared).
        noise: the Gaussian noise model (per-observation or shared).
        y: the observations, with shape (N, *obs_shape).

    Methods take signals with shape (N, S, *event) and observation-space tensors with shape
    (N, S, *obs); ``y`` broadcasts over S.
    """

    def __init__(self, forward: ForwardModel, noise: GaussianNoise, y: Tensor):
        self.forward = forward
        self.noise = noise
        self.y = y
        self.linear = bool(forward.linear)

    @property
    def num_obs(self) -> int:
        return self.y.shape[0]

    def expand_y(self, like: Tensor) -> Tensor:
        """y with shape (N, S, *obs), broadcast like an observation-space tensor."""
        return self.y.unsqueeze(1).expand(like.shape)

    def predict(self, x: Tensor) -> Tensor:
        """A(x) for x with shape (N, S, *event) -> (N, S, *obs)."""
        return self.forward(x)

    def cov(self, u: Tensor) -> Tensor:
        r""":math:`\Sigma_y u` for u with shape (N, S, *obs)."""
        return self.noise.cov_action(u)

    def inv_cov(self, u: Tensor) -> Tensor:
        r""":math:`\Sigma_y^{-1} u` for u with shape (N, S, *obs)."""
        return self.noise.inv_cov_action(u)

    def linearize(self, x: Tensor):
        r"""The maps :math:`v \mapsto J v` and :math:`u \mapsto J^\top u` of A at x.

        For a linear model J = A at any x; otherwise the Jacobian at x (JVP / VJP).
        """
        if self.linear:
            return self.forward, self.forward.adjoint
        x = x.detach()

        def jvp(v: Tensor) -> Tensor:
            return self.forward.jvp(x, v)[1]

        def vjp(u: Tensor) -> Tensor:
            return self.forward.vjp(x, u)[1]

        return jvp, vjp


# ----------------------------------------------------------------------------- wrapper


class PosteriorDenoiser(Denoiser):
    r"""Base class of posterior denoisers :math:`(x_t, t) \mapsto E[x \mid x_t, y]`.

    Arguments:
        prior: the prior's denoiser :math:`E[x \mid x_t]`.
        observation: the likelihood of the N observations.
        num_samples: S, the number of samples (rows) per observation in each batch.

    ``forward(x_t, t)`` takes x_t with shape (N·S, *event_shape), observation-major, and t a
    scalar or with shape (N·S,). Subclasses implement :meth:`posterior_mean` on
    (N, S, *event_shape) tensors.
    """

    def __init__(self, prior: Denoiser, observation: Observation, num_samples: int):
        super().__init__()
        self.prior = prior
        self.schedule = prior.schedule
        self.event_shape = tuple(prior.event_shape)
        self.observation = observation
        self.num_samples = int(num_samples)
        #: rows on which a CG solve broke down and fell back to GMRES (a running count)
        self.fallbacks = 0
        self._analytic_cov = type(prior).tweedie_cov is not Denoiser.tweedie_cov

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        self.check_event(x_t, "x_t")
        n, s = self.observation.num_obs, self.num_samples
        if x_t.shape[0] != n * s:
            raise ValueError(
                f"x_t must have N*S = {n}*{s} = {n * s} rows (observation-major), "
                f"got {x_t.shape[0]}"
            )
        t = expand_time(t, x_t).reshape(n, s)
        x = x_t.reshape(n, s, *self.event_shape)
        with torch.enable_grad():
            out = self.posterior_mean(x, t)
        return out.detach().reshape(x_t.shape)

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover
        """E[x | x_t, y] for x with shape (N, S, *event) and t with shape (N, S)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t and sigma_t with shape (N, S, 1, ..., 1), broadcasting against like."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        shape = t.shape + (1,) * (like.ndim - t.ndim)
        return alpha.reshape(shape).to(like.dtype), sigma.reshape(shape).to(like.dtype)

    def denoise(self, x: Tensor, t: Tensor, graph: bool = False) -> tuple[Tensor, Tensor]:
        """The prior's E[x | x_t] for x with shape (N, S, *event).

        Returns (x_leaf, x_hat): with ``graph=True`` x_leaf requires grad and x_hat carries
        the graph (for VJPs through the denoiser); otherwise both are detached.
        """
        n, s = x.shape[:2]
        leaf = x.detach().requires_grad_(graph)
        with torch.set_grad_enabled(graph):
            d = self.prior(leaf.reshape(n * s, *self.event_shape), t.reshape(-1))
        return leaf, d.reshape(x.shape)

    def prior_cov(self, leaf: Tensor, d: Tensor, t: Tensor, v: Tensor) -> Tensor:
        r"""Cov[x | x_t] v under the prior, for v with shape (N, S, *event).

        Exact priors (those overriding ``tweedie_cov``) use their closed form; otherwise
        :math:`(\sigma_t^2/\alpha_t) J^\top v` by a VJP through the retained graph of d.
        """
        n, s = leaf.shape[:2]
        if self._analytic_cov:
            flat = (n * s, *self.event_shape)
            x_t = leaf.detach().reshape(flat)
            return self.prior.tweedie_cov(x_t, t.reshape(-1), v.reshape(flat)).reshape(v.shape)
        alpha, sigma = self.coefficients(t, v)
        (jtv,) = torch.autograd.grad(d, leaf, grad_outputs=v, retain_graph=True)
        return sigma**2 / alpha * jtv

    def vjp(self, leaf: Tensor, out: Tensor, u: Tensor) -> Tensor:
        """(d out / d leaf)^T u through the retained graph, with the shape of leaf."""
        (g,) = torch.autograd.grad(out, leaf, grad_outputs=u, retain_graph=True)
        return g
