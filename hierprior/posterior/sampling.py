r"""Posterior sampling for a population of observations: methods by name, one entry point.

:func:`sample_posterior` draws S samples of :math:`p(x_i \mid y_i)` for each of N
observations :math:`y_i = A_i(x_i) + n_i` under a diffusion prior, and returns them with shape
(N, S, *event_shape). Each method is a :class:`~hierprior.posterior.base.PosteriorMethod`
registered in :data:`POSTERIOR_METHODS` (the package imports every method module);
:func:`posterior_method` builds one from its name, from a config mapping
``{"method": name, **options}``, or returns an instance as is:

========  ==========================================================  =====================
method    likelihood approximation                                    runs as
========  ==========================================================  =====================
mmps      N(y | A x̂, Σ_y + A Σ_t Aᵀ), Σ_t by VJPs, CG/GMRES            denoiser wrapper
dps       −ζ ∇‖y − A(x̂)‖ per observation                              denoiser wrapper
cla       N(y | A x_t/α_t, Σ_y + (σ_t/α_t)² A Aᵀ), no network VJP     denoiser wrapper
pigdm     N(y | A x̂, Σ_y + r_t² A Aᵀ)                                 denoiser wrapper
daps      decoupled annealing: ODE prior step + exact/Langevin step   own loop
tds       twisted SMC (ΠGDM twist), asymptotically exact              own loop (SMC)
exact     closed form (GaussianPrior, linear A): mean + chol(cov) z   no diffusion
joint     (x, η) for unknown lenses: MALA on η + a source method      the source's loop
========  ==========================================================  =====================

Denoiser wrappers are run by the unconditional samplers of :mod:`hierprior.diffusion`
(``sampler="ddpm" | "ddim" | "heun" | "dpm2m" | "dpm3m" | "unipc"``). Nothing couples
observations: a chunk of observations (``batch_size``) or a single one gives the same
per-observation computations; with the same initial noise (``x_init``) and a deterministic
sampler (``"ddim"``, ``"dpm2m"``, ``"dpm3m"``, ``"unipc"`` with ``eta=0``, ``"heun"``) a
wrapper method returns the same samples for observation i alone as in any batch.

Every option is checked when the method is built (no prior needed); what needs the prior or
the forward model (``method.check``) and the problem itself are checked before any sampling
(clear TypeError / ValueError). After sampling, if some observations' samples are not finite,
a :class:`~hierprior.posterior.base.PosteriorSamplingError` lists them and carries
``.samples`` and ``.bad``; NaN samples are never returned as valid.

References:
    Rozet et al. (2024), arXiv 2405.13712 (MMPS); Chung et al. (2023), arXiv 2209.14687 (DPS);
    Adam et al. (2022), arXiv 2211.03812 (CLA); Song et al. (2023), ICLR (ΠGDM);
    Zhang et al. (2024), arXiv 2407.01521 (DAPS); Wu et al. (2023), arXiv 2306.17775 (TDS).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hierprior.diffusion.denoiser import Denoiser
from hierprior.physics import ForwardModel, NoiseModel
from hierprior.posterior.base import POSTERIOR_METHODS, PosteriorMethod

__all__ = ["posterior_method", "sample_posterior", "CALL_OPTIONS"]

#: options of :func:`sample_posterior` that go to ``PosteriorMethod.sample``, not the method
CALL_OPTIONS = ("x_init", "progress", "return_info")


def _build(name: object, options: dict, also_accepted: tuple[str, ...] = ()) -> PosteriorMethod:
    cls = POSTERIOR_METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"unknown posterior method {name!r}; known methods: {sorted(POSTERIOR_METHODS)}"
        )
    accepted = cls.accepted_options()
    unknown = sorted((k for k in options if k not in accepted), key=str)
    if unknown:
        raise TypeError(
            f"method {name!r} does not take option(s) {unknown}; "
            f"accepted options: {sorted([*accepted, *also_accepted])}"
        )
    return cls(**options)


def posterior_method(method: str | PosteriorMethod | Mapping, **options) -> PosteriorMethod:
    """A posterior method from its name, a config mapping, or an instance.

    Arguments:
        method: a name of :data:`POSTERIOR_METHODS`; or a mapping ``{"method": name,
            **options}`` (e.g. a ``conf/sampler/*.yaml`` file as a dict); or a
            :class:`PosteriorMethod`, returned as is.
        options: constructor options (``steps``, ``spacing``, ``batch_size`` and the
            method's own); with a mapping they override its entries.

    Raises:
        ValueError: unknown method name (the message lists the known ones), a mapping without
            ``"method"``, a bad option value (the option is named).
        TypeError: an option the method does not take (the message names the method, the
            bad options and the accepted ones), a bad option type, options given with an
            instance.
    """
    if isinstance(method, PosteriorMethod):
        if options:
            raise TypeError(
                f"posterior_method got a {type(method).__name__} instance and options "
                f"{sorted(options)}; build a new one, e.g. posterior_method"
                "({**method.options(), ...})"
            )
        return method
    if isinstance(method, Mapping):
        spec = dict(method)
        if "method" not in spec:
            raise ValueError(
                "a posterior method mapping needs a 'method' key (e.g. {'method': 'mmps', "
                f"'steps': 64}}), got keys {sorted(map(str, spec))}"
            )
        name = spec.pop("method")
        return _build(name, {**spec, **options})
    if isinstance(method, str):
        return _build(method, options)
    raise TypeError(
        "method must be a name, a mapping {'method': name, ...} or a PosteriorMethod, "
        f"got {type(method).__name__}"
    )


def sample_posterior(
    prior: Denoiser,
    forward: ForwardModel,
    noise: NoiseModel,
    y: Tensor,
    method: str = "mmps",
    steps: int = 256,
    num_samples: int = 64,
    generator: torch.Generator | None = None,
    **options,
) -> Tensor | tuple[Tensor, dict]:
    r"""Draws posterior samples :math:`x_i^{(s)} \sim p(x \mid y_i)` for every observation.

    ``posterior_method(method, steps=steps, **method_options).sample(prior, forward, noise,
    y, num_samples, generator, **call_options)``, where the call options are ``x_init``,
    ``progress`` and ``return_info`` and the rest are the method's constructor options.

    Arguments:
        prior: the diffusion prior (any :class:`~hierprior.diffusion.denoiser.Denoiser`).
        forward: the forward model; ``forward.input_shape == prior.event_shape``,
            per-observation (num_obs = N) or shared.
        noise: the noise model (per-observation or shared): Gaussian for every method, any
            :class:`~hierprior.physics.NoiseModel` for dps, daps (Langevin) and tds (dps twist).
        y: the observations, with shape (N, *forward.output_shape).
        method: one of :data:`POSTERIOR_METHODS` (``"mmps"``, ``"dps"``, ``"cla"``,
            ``"pigdm"``, ``"daps"``, ``"tds"``, ``"exact"``).
        steps: time steps of the sampler (>= 1); DAPS: annealing steps; TDS: SMC steps;
            ignored by ``"exact"``.
        num_samples: S, samples per observation (>= 1).
        generator: the source of all randomness (on the prior's device); the global RNG is
            never used when it is given.
        options: common — ``spacing`` ("edm" | "uniform" | "logsnr" time grid), ``batch_size``
            (observations per chunk, bounds memory), ``x_init`` (noise at t = 1, with shape (N, S,
            *event); TDS: (N, G·P, *event)), ``progress``, ``return_info``; wrappers (mmps, dps,
            cla, pigdm) — ``sampler`` ("ddpm" | "ddim" | "heun" | "dpm2m" | "dpm3m" | "unipc"),
            ``eta`` (ddim and the multistep solvers); per method — mmps: ``solver`` ("cg" |
            "gmres"), ``iterations`` (4); dps: ``zeta`` (1.0); cla: ``iterations`` (min(M, 32));
            pigdm: ``iterations``, ``data_variance`` (1.0); daps: ``ode_steps`` (1),
            ``likelihood_step`` ("exact" for linear A, else "langevin"), ``langevin_steps`` (50),
            ``lr`` (0.1), ``iterations``; tds: ``particles`` (default S), ``ess_threshold`` (0.5),
            ``twist`` ("pigdm" for linear A, else "dps"), ``iterations``, ``data_variance``. See
            the method classes.

    Returns:
        Samples with shape (N, S, *prior.event_shape) (with ``return_info=True``, also a dict
        of diagnostics per chunk: CG fallbacks, TDS effective sample sizes).

    Raises:
        TypeError, ValueError: invalid input (before sampling).
        PosteriorSamplingError: some observations' samples are not finite.
    """
    call = {k: options.pop(k) for k in CALL_OPTIONS if k in options}
    spec = _build(method, {"steps": steps, **options}, also_accepted=CALL_OPTIONS)
    return spec.sample(prior, forward, noise, y, num_samples, generator, **call)
