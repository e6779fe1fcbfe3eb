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

A posterior *method* is a :class:`PosteriorMethod`: an object holding the method's options,
every one checked in its constructor (no prior needed), with :meth:`PosteriorMethod.check`
for what needs the prior and forward model, :meth:`PosteriorMethod.sample` to draw the
samples and :meth:`PosteriorMethod.options` (a plain dict) to record them. Each method's
class registers itself in :data:`POSTERIOR_METHODS` with :func:`register_method`.
:class:`DenoiserMethod` is the shared base of the methods that build a
:class:`PosteriorDenoiser` and run an unconditional sampler (mmps, dps, cla, pigdm).

Tensors inside the methods have shape (N, S, *event) (signals) or (N, S, *obs) (observation
space); times have shape (N, S).

Noise models are asked, never type-tested (:class:`~hierprior.physics.NoiseModel`): the
likelihood gradient uses the noise score, :math:`-s(y - A x)`
(:meth:`Observation.likelihood_cotangent`; :math:`\Sigma_y^{-1} (y - A x)` for Gaussian
noise), so a non-Gaussian model such as :class:`~hierprior.physics.LearnedNoise` (SLIC, a
learned score :math:`s(n) = \nabla \log Q(n)`) serves the methods whose maths only needs a
likelihood score or value (dps, daps with ``likelihood_step="langevin"``, tds with
``twist="dps"``); the others need ``noise.gaussian`` (its ``cov_action`` /
``inv_cov_action``) and refuse any other noise in :meth:`PosteriorMethod.check_noise`, before
sampling.

References:
    Efron (2011), Tweedie's formula and selection bias.
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712.
"""

from __future__ import annotations

import inspect
import json
import math

import torch
from torch import Tensor

from hierprior.checks import (
    check_choice,
    check_float,
    check_int,
    check_optional_int,
    check_tensor,
)
from hierprior.diffusion.denoiser import Denoiser, expand_time
from hierprior.diffusion.sampling import ETA_SAMPLERS, SAMPLERS, check_sampler, resolve_spacing
from hierprior.io import device_dtype
from hierprior.physics import ForwardModel, NoiseModel

__all__ = [
    "PosteriorSamplingError",
    "Observation",
    "PosteriorDenoiser",
    "PosteriorMethod",
    "DenoiserMethod",
    "POSTERIOR_METHODS",
    "register_method",
    "check_model",
    "check_data",
    "check_observations",
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


def check_model(prior: Denoiser, forward: ForwardModel) -> None:
    """Checks the types of prior and forward, and forward.input_shape == prior.event_shape."""
    if not isinstance(prior, Denoiser):
        raise TypeError(f"prior must be a hierprior Denoiser, got {type(prior).__name__}")
    if not isinstance(forward, ForwardModel):
        raise TypeError(f"forward must be a hierprior ForwardModel, got {type(forward).__name__}")
    event = tuple(prior.event_shape)
    if tuple(forward.input_shape) != event:
        raise ValueError(
            f"forward.input_shape {tuple(forward.input_shape)} != prior.event_shape {event}"
        )


def check_data(forward: ForwardModel, noise: NoiseModel, y: Tensor) -> None:
    """Checks observations y against their forward and noise models, before any sampling.

    Raises a TypeError or ValueError naming the problem: a noise that is not a
    :class:`~hierprior.physics.NoiseModel`, y's shape versus ``forward.output_shape``,
    observation counts that disagree, NaN/Inf in y, or what ``noise.check(y)`` refuses (an
    obs_shape that is not the forward model's output, non-positive noise levels).
    """
    if not isinstance(noise, NoiseModel):
        raise TypeError(f"noise must be a hierprior NoiseModel, got {type(noise).__name__}")
    check_tensor(y, "y", floating=True)
    out = tuple(forward.output_shape)
    if y.ndim != len(out) + 1 or tuple(y.shape[1:]) != out:
        raise ValueError(
            f"y must have shape (N, {', '.join(map(str, out))}) (forward.output_shape {out}), "
            f"got {tuple(y.shape)}"
        )
    n = y.shape[0]
    if n < 1:
        raise ValueError("y holds no observations (N = 0)")
    for name, count in (("forward", forward.num_obs), ("noise", noise.num_obs)):
        if count is not None and count != n:
            raise ValueError(f"y has N = {n} observations but {name}.num_obs = {count}")
    bad = ~torch.isfinite(y.flatten(1)).all(1)
    if bool(bad.any()):
        raise ValueError(f"y holds NaN or Inf in observations {bad.nonzero().flatten().tolist()}")
    noise.check(y)


def check_observations(
    prior: Denoiser, forward: ForwardModel, noise: NoiseModel, y: Tensor
) -> Tensor:
    """:func:`check_data`; returns y in the prior's dtype."""
    check_data(forward, noise, y)
    _, dtype = device_dtype(prior)
    return y.to(dtype)


def default_iterations(iterations: int | None, forward: ForwardModel, cap: int = 32) -> int:
    """Solver iterations: the given value, else min(M, cap) with M the values per observation.

    A given value is returned as is (the method's constructor checked it).
    """
    if iterations is None:
        return min(math.prod(forward.output_shape), cap)
    return iterations


# ----------------------------------------------------------------------------- observations


class Observation:
    r"""The likelihood :math:`p(y_i \mid A_i(x))` of N observations: their forward model, noise
    model and values.

    Arguments:
        forward: the forward model (per-observation with num_obs = N, or shared).
        noise: the noise model (per-observation or shared). A Gaussian one
            (``noise.gaussian``) gives :meth:`cov` and :meth:`inv_cov`; any one gives
            :meth:`likelihood_cotangent`, :meth:`log_likelihood` and :meth:`curvature`.
        y: the observations, with shape (N, *obs_shape).

    Methods take signals with shape (N, S, *event) and observation-space tensors with shape
    (N, S, *obs); ``y`` broadcasts over S.
    """

    def __init__(self, forward: ForwardModel, noise: NoiseModel, y: Tensor):
        self.forward = forward
        self.noise = noise
        self.y = y
        self.linear = bool(forward.linear)
        #: whether the noise is Gaussian, so that cov / inv_cov exist
        self.gaussian = bool(noise.gaussian)

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
        r""":math:`\Sigma_y u` for u with shape (N, S, *obs) (Gaussian noise)."""
        return self.noise.cov_action(u)

    def inv_cov(self, u: Tensor) -> Tensor:
        r""":math:`\Sigma_y^{-1} u` for u with shape (N, S, *obs) (Gaussian noise)."""
        return self.noise.inv_cov_action(u)

    def likelihood_cotangent(self, residual: Tensor) -> Tensor:
        r"""u with :math:`\nabla_x \log p(y \mid x) = J_A(x)^\top u`, for r = y - A(x):
        :math:`-s(r)`, minus the noise score (:math:`\Sigma_y^{-1} r` for Gaussian noise).
        r and u have shape (N, S, *obs)."""
        return -self.noise.score(residual)

    def log_likelihood(self, residual: Tensor) -> Tensor:
        r""":math:`\log p(y \mid x)` up to a constant per observation, with shape (N, S): the
        noise model's ``log_prob`` of the residual (a learned model: a line integral of its
        score)."""
        return self.noise.log_prob(residual, torch.zeros_like(residual))

    def curvature(self) -> Tensor:
        r"""A bound on the curvature of :math:`-\log p(y \mid \cdot)` in observation space, (N,):
        the noise model's ``curvature()`` (Gaussian: :math:`1 / \min_j \sigma_{y,j}^2`)."""
        bound = self.noise.curvature().to(device=self.y.device, dtype=self.y.dtype)
        return bound.expand(self.num_obs)

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


# ----------------------------------------------------------------------------- methods


class PosteriorMethod:
    r"""Base class of the posterior methods: options checked at construction, then sampling.

    Arguments:
        steps: time steps of the sampler (>= 1); DAPS: annealing steps; TDS: SMC steps.
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"`` (``Schedule.timesteps``),
            or None: the method's own (``"edm"``; a :class:`DenoiserMethod`: its sampler's,
            :func:`~hierprior.diffusion.sampling.default_spacing`). Stored resolved.
        batch_size: observations per chunk (bounds memory), or None for all at once.

    A subclass sets the class attribute ``name``, takes ``steps``, ``spacing``,
    ``batch_size`` and its own options as *named* constructor arguments (no ``**kwargs``:
    the accepted options are read from the signature), checks every one of them in its
    constructor and stores each under its own name; it implements :meth:`_sample_chunk` and,
    where options depend on the forward model, :meth:`_defaults`. :func:`register_method`
    adds it to :data:`POSTERIOR_METHODS`.
    """

    #: the method's name in :data:`POSTERIOR_METHODS` and in configs
    name: str = ""

    def __init__(
        self, steps: int = 256, *, spacing: str | None = None, batch_size: int | None = None
    ):
        self.steps = check_int(steps, "steps")
        self.spacing = resolve_spacing(getattr(self, "sampler", None), spacing)
        self.batch_size = check_optional_int(batch_size, "batch_size")

    # ------------------------------------------------------------------ options
    @classmethod
    def accepted_options(cls) -> tuple[str, ...]:
        """The constructor's arguments, in signature order (read with :mod:`inspect`)."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        variadic = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if variadic:
            raise TypeError(
                f"{cls.__name__}.__init__ must name its options explicitly, not *{variadic}"
            )
        return tuple(p.name for p in params)

    def options(self) -> dict:
        """``{"method": name, "steps": ..., **every other constructor argument}``, JSON-able.

        Defaults that depend on the forward model stay None here (see :meth:`resolve`).
        ``posterior_method(m.options()) == m``.
        """
        return {"method": self.name, **{k: getattr(self, k) for k in self.accepted_options()}}

    def resolve(self, forward: ForwardModel, num_samples: int = 1) -> dict:
        """:meth:`options` with the defaults that depend on the problem filled in."""
        return {**self.options(), **self._defaults(forward, num_samples)}

    def _defaults(self, forward: ForwardModel, num_samples: int) -> dict:
        """Values of the options left None whose default depends on forward / num_samples."""
        return {}

    def __repr__(self) -> str:
        opts = self.options()
        del opts["method"]
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PosteriorMethod):
            return NotImplemented
        return type(self) is type(other) and self.options() == other.options()

    def __hash__(self) -> int:
        # options are plain JSON values (a nested mapping for a joint method's source)
        return hash((type(self), json.dumps(self.options(), sort_keys=True)))

    # ------------------------------------------------------------------ sampling
    def check(self, prior: Denoiser, forward: ForwardModel) -> None:
        """Raises a TypeError / ValueError if this method cannot run with prior and forward.

        The base checks the types and ``forward.input_shape == prior.event_shape``;
        subclasses add what their options need (e.g. a linear forward model) and call
        ``super().check``. A forward model with unknown parameters (``forward.blind``, e.g.
        :class:`~hierprior.physics.lensing.BlindLensing`) is refused: only the joint
        (source, lens) method samples it.
        """
        check_model(prior, forward)
        if getattr(forward, "blind", False):
            raise ValueError(
                f"{self.name} needs a known forward model, but the {type(forward).__name__} of "
                "these observations has unknown parameters (lenses nobody has modelled): use "
                "the joint method (sampler=joint)"
            )

    def check_noise(self, noise: NoiseModel, opts: dict) -> None:
        """Raises a TypeError / ValueError if this method cannot use this noise model.

        ``opts`` is :meth:`resolve`. The base accepts only Gaussian noise (``noise.gaussian``):
        its likelihood approximation is Gaussian. Methods that only need a likelihood score
        (dps) or value override it to accept any noise model (e.g. a
        :class:`~hierprior.physics.LearnedNoise`).
        """
        if not noise.gaussian:
            raise TypeError(
                f"{self.name} assumes Gaussian noise and cannot use a {type(noise).__name__}; "
                "use dps, daps (likelihood_step='langevin') or tds (twist='dps')"
            )

    def sample(
        self,
        prior: Denoiser,
        forward: ForwardModel,
        noise: NoiseModel,
        y: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        *,
        x_init: Tensor | None = None,
        progress: bool = False,
        return_info: bool = False,
    ) -> Tensor | tuple[Tensor, dict]:
        r"""Draws posterior samples :math:`x_i^{(s)} \sim p(x \mid y_i)` for every observation.

        Arguments:
            prior: the diffusion prior (any :class:`~hierprior.diffusion.denoiser.Denoiser`).
            forward: the forward model; ``forward.input_shape == prior.event_shape``,
                per-observation (num_obs = N) or shared.
            noise: the noise model (per-observation or shared): Gaussian
                (``noise.gaussian``) for every method, any other (e.g. a
                :class:`~hierprior.physics.LearnedNoise`) for dps, daps with Langevin and tds
                with the dps twist (see :meth:`check_noise`).
            y: the observations, with shape (N, *forward.output_shape).
            num_samples: S, samples per observation (>= 1).
            generator: the source of all randomness (on the prior's device); the global RNG
                is never used when it is given.
            x_init: the state at t = 1 (noise of std sigma_1), with shape (N, S, *event);
                TDS: (N, G·P, *event). Default: drawn from ``generator``.
            progress: show a progress bar per chunk.
            return_info: also return ``{"chunks": [info of each chunk]}`` (CG→GMRES
                fallbacks, TDS final ESS and resampling counts).

        Returns:
            Samples with shape (N, S, *prior.event_shape) (and the info dict).

        Raises:
            TypeError, ValueError: invalid input (before sampling), see :meth:`check` and
                :func:`check_data`.
            PosteriorSamplingError: some observations' samples are not finite.
        """
        check_int(num_samples, "num_samples")
        self.check(prior, forward)
        y = check_observations(prior, forward, noise, y)
        opts = self.resolve(forward, num_samples)
        self.check_noise(noise, opts)
        device, dtype = device_dtype(prior)
        if generator is not None and torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but the prior is on {device}")
        y = y.to(device)
        n = y.shape[0]
        shape = (n, self._rows(opts, num_samples), *prior.event_shape)
        state = self._initial(prior, shape, x_init, generator, device, dtype)
        timesteps = prior.schedule.timesteps(self.steps, spacing=self.spacing, device=device)
        chunk = self.batch_size or n
        outputs, infos = [], []
        for start in range(0, n, chunk):
            idx = slice(start, min(start + chunk, n))
            whole = start == 0 and chunk >= n
            observation = Observation(
                forward if whole else forward[idx], noise if whole else noise[idx], y[idx]
            )
            out, info = self._sample_chunk(
                prior, observation, state[idx], timesteps, num_samples, generator, opts, progress
            )
            outputs.append(out)
            infos.append(info)
        samples = torch.cat(outputs)
        bad = ~torch.isfinite(samples.flatten(1)).all(1)
        if bool(bad.any()):
            raise PosteriorSamplingError(
                f"{self.name}: the samples of observations {bad.nonzero().flatten().tolist()} "
                "hold NaN or Inf (the others are in .samples; .bad marks the failed ones)",
                samples,
                bad,
            )
        if return_info:
            return samples, {"chunks": infos}
        return samples

    # ------------------------------------------------------------------ hooks
    def _rows(self, opts: dict, num_samples: int) -> int:
        """Rows per observation of the initial state: S (TDS: G·P)."""
        return num_samples

    def _initial(
        self,
        prior: Denoiser,
        shape: tuple[int, ...],
        x_init: Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        """The state at t = 1 with the given shape: sigma_1 * eps, or the checked x_init."""
        if x_init is None:
            _, sigma = prior.schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))
            eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            return float(sigma) * eps
        if not isinstance(x_init, Tensor) or tuple(x_init.shape) != shape:
            raise ValueError(
                f"x_init must have shape {shape}, got {tuple(getattr(x_init, 'shape', ()))}"
            )
        if not torch.isfinite(x_init).all():
            raise ValueError("x_init holds NaN or Inf")
        return x_init.to(device=device, dtype=dtype)

    def _sample_chunk(
        self,
        prior: Denoiser,
        observation: Observation,
        state: Tensor,
        timesteps: Tensor,
        num_samples: int,
        generator: torch.Generator | None,
        opts: dict,
        progress: bool,
    ) -> tuple[Tensor, dict]:  # pragma: no cover
        """Samples (n, S, *event) of a chunk of n observations, and the chunk's info dict.

        ``state`` is the chunk's rows of the initial state, ``opts`` is :meth:`resolve`.
        """
        raise NotImplementedError


#: every posterior method by name (filled by :func:`register_method`)
POSTERIOR_METHODS: dict[str, type[PosteriorMethod]] = {}


def register_method(cls: type[PosteriorMethod]) -> type[PosteriorMethod]:
    """Class decorator: adds a :class:`PosteriorMethod` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, PosteriorMethod)):
        raise TypeError(f"register_method takes a PosteriorMethod subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must set a class attribute name (a non-empty str)")
    old = POSTERIOR_METHODS.get(name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"posterior method {name!r} is already registered ({old.__qualname__})")
    cls.accepted_options()  # a signature the options can be read from
    POSTERIOR_METHODS[name] = cls
    return cls


class DenoiserMethod(PosteriorMethod):
    r"""Base of the methods run as a posterior denoiser inside an unconditional sampler.

    Arguments:
        steps: time steps of the sampler (>= 1).
        sampler: ``"ddpm"`` (ancestral), ``"ddim"``, ``"heun"`` (probability-flow ODE), or the
            multistep solvers ``"dpm2m"``, ``"dpm3m"``, ``"unipc"`` (one evaluation per step;
            need steps >= 3, 4, 4), from :mod:`hierprior.diffusion.sampling`.
        eta: stochasticity in [0, 1] of ``"ddim"`` and the multistep solvers (0 is
            deterministic; :data:`~hierprior.diffusion.sampling.ETA_SAMPLERS`).
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"``; None: the
            sampler's own (``"logsnr"`` for the multistep solvers, ``"edm"`` for the others).
        batch_size: observations per chunk, or None for all at once.

    A subclass sets ``denoiser`` (a :class:`PosteriorDenoiser` class); its options that are
    arguments of that class's constructor are passed to it by name.
    """

    #: the posterior denoiser class this method runs
    denoiser: type[PosteriorDenoiser] = PosteriorDenoiser

    def __init__(
        self,
        steps: int = 256,
        *,
        sampler: str = "ddpm",
        eta: float = 0.0,
        spacing: str | None = None,
        batch_size: int | None = None,
    ):
        self.sampler = check_choice(sampler, "sampler", tuple(SAMPLERS))
        super().__init__(steps, spacing=spacing, batch_size=batch_size)
        self.eta = check_float(eta, "eta", 0.0, maximum=1.0)
        check_sampler(self.sampler, self.steps, self.eta)  # eta's sampler, order vs steps

    def build_denoiser(
        self, prior: Denoiser, observation: Observation, num_samples: int
    ) -> PosteriorDenoiser:
        """The posterior denoiser of these options for N observations and S samples each."""
        opts = self.resolve(observation.forward, num_samples)
        params = inspect.signature(self.denoiser).parameters
        own = {k: opts[k] for k in params if k not in ("prior", "observation", "num_samples")}
        return self.denoiser(prior, observation, num_samples, **own)

    def _sample_chunk(
        self, prior, observation, state, timesteps, num_samples, generator, opts, progress
    ):
        n = state.shape[0]
        event = tuple(prior.event_shape)
        denoiser = self.build_denoiser(prior, observation, num_samples)
        kwargs = {"eta": self.eta} if self.sampler in ETA_SAMPLERS else {}
        with torch.no_grad():
            out = SAMPLERS[self.sampler](
                denoiser,
                state.reshape(n * num_samples, *event),
                timesteps,
                generator=generator,
                progress=progress,
                **kwargs,
            )
        return out.reshape(n, num_samples, *event), {"fallbacks": denoiser.fallbacks}
