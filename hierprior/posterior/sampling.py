r"""Posterior sampling for a population of observations: one entry point, six methods.

:func:`sample_posterior` draws S samples of :math:`p(x_i \mid y_i)` for each of N
observations :math:`y_i = A_i(x_i) + n_i` under a diffusion prior, and returns them with shape
(N, S, *event_shape). The methods (:data:`POSTERIOR_METHODS`):

========  ==========================================================  =====================
method    likelihood approximation                                    runs as
========  ==========================================================  =====================
mmps      N(y | A x̂, Σ_y + A Σ_t Aᵀ), Σ_t by VJPs, CG/GMRES            denoiser wrapper
dps       −ζ ∇‖y − A(x̂)‖ per observation                              denoiser wrapper
cla       N(y | A x_t/α_t, Σ_y + (σ_t/α_t)² A Aᵀ), no network VJP     denoiser wrapper
pigdm     N(y | A x̂, Σ_y + r_t² A Aᵀ)                                 denoiser wrapper
daps      decoupled annealing: ODE prior step + exact/Langevin step   own loop
tds       twisted SMC (ΠGDM twist), asymptotically exact              own loop (SMC)
========  ==========================================================  =====================

Denoiser wrappers are run by the unconditional samplers of :mod:`hierprior.diffusion`
(``sampler="ddpm" | "ddim" | "heun"``). Nothing couples observations: a chunk of
observations (``batch_size``) or a single one gives the same per-observation computations;
with the same initial noise (``x_init``) and a deterministic sampler (``"ddim"`` with
``eta=0``, ``"heun"``) a wrapper method returns the same samples for observation i alone as
in any batch.

Validation happens before any sampling (clear TypeError / ValueError). After sampling, if some
observations' samples are not finite, a :class:`PosteriorSamplingError` lists them and carries
``.samples`` and ``.bad``; NaN samples are never returned as valid.

References:
    Rozet et al. (2024), arXiv 2405.13712 (MMPS); Chung et al. (2023), arXiv 2209.14687 (DPS);
    Adam et al. (2022), arXiv 2211.03812 (CLA); Song et al. (2023), ICLR (ΠGDM);
    Zhang et al. (2024), arXiv 2407.01521 (DAPS); Wu et al. (2023), arXiv 2306.17775 (TDS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hierprior.diffusion.denoiser import Denoiser
from hierprior.diffusion.sampling import SAMPLERS
from hierprior.io import device_dtype
from hierprior.physics import ForwardModel, GaussianNoise
from hierprior.posterior.base import (
    Observation,
    PosteriorSamplingError,
    check_choice,
    check_float,
    check_int,
    check_problem,
    default_iterations,
)
from hierprior.posterior.cla import CLADenoiser
from hierprior.posterior.daps import LIKELIHOOD_STEPS, daps_sample
from hierprior.posterior.dps import DPSDenoiser
from hierprior.posterior.linalg import SOLVERS
from hierprior.posterior.mmps import MMPSDenoiser
from hierprior.posterior.pigdm import PiGDMDenoiser
from hierprior.posterior.smc import tds_sample

__all__ = ["sample_posterior", "POSTERIOR_METHODS", "PosteriorMethod", "COMMON_OPTIONS"]

#: options every method takes, with their defaults
COMMON_OPTIONS = {
    "spacing": "edm",
    "batch_size": None,
    "x_init": None,
    "progress": False,
    "return_info": False,
}
#: extra options of the methods run by an unconditional sampler
_WRAPPER_OPTIONS = {"sampler": "ddpm", "eta": 0.0}


@dataclass(frozen=True)
class PosteriorMethod:
    """A posterior sampling method: its options (with defaults) and how it runs.

    Attributes:
        name: the method's name in :func:`sample_posterior`.
        options: the method's own options and defaults (common ones in COMMON_OPTIONS).
        denoiser: the posterior denoiser class (wrapper methods), else None.
        summary: one line on what it is.
    """

    name: str
    options: dict = field(default_factory=dict)
    denoiser: type | None = None
    summary: str = ""

    def accepted(self) -> dict:
        extra = _WRAPPER_OPTIONS if self.denoiser is not None else {}
        return {**COMMON_OPTIONS, **extra, **self.options}


POSTERIOR_METHODS: dict[str, PosteriorMethod] = {
    m.name: m
    for m in (
        PosteriorMethod(
            "mmps",
            {"solver": "cg", "iterations": 4},
            MMPSDenoiser,
            "moment matching (Rozet 2024), exact for linear-Gaussian once iterations >= rank",
        ),
        PosteriorMethod("dps", {"zeta": 1.0}, DPSDenoiser, "DPS (Chung 2023), per-row norm"),
        PosteriorMethod(
            "cla", {"iterations": None}, CLADenoiser, "convolved likelihood (Adam 2022)"
        ),
        PosteriorMethod(
            "pigdm",
            {"iterations": None, "data_variance": 1.0},
            PiGDMDenoiser,
            "pseudoinverse guidance (Song 2023)",
        ),
        PosteriorMethod(
            "daps",
            {
                "ode_steps": 1,
                "likelihood_step": None,
                "langevin_steps": 50,
                "lr": 0.1,
                "iterations": None,
            },
            None,
            "decoupled annealing (Zhang 2024)",
        ),
        PosteriorMethod(
            "tds",
            {
                "particles": None,
                "ess_threshold": 0.5,
                "twist": None,
                "iterations": None,
                "data_variance": 1.0,
            },
            None,
            "twisted SMC (Wu 2023), the asymptotically exact reference",
        ),
    )
}


def _resolve(
    method: PosteriorMethod, options: dict, forward: ForwardModel, num_samples: int
) -> dict:
    """Merges options with defaults and validates their values (before sampling)."""
    accepted = method.accepted()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"method {method.name!r} does not take option(s) {unknown}; "
            f"accepted options: {sorted(accepted)}"
        )
    opts = {**accepted, **options}
    check_choice(opts["spacing"], "spacing", ("edm", "uniform"))
    if opts["batch_size"] is not None:
        check_int(opts["batch_size"], "batch_size")
    if method.denoiser is not None:
        check_choice(opts["sampler"], "sampler", tuple(SAMPLERS))
        eta = check_float(opts["eta"], "eta", 0.0, maximum=1.0)
        if opts["sampler"] != "ddim" and eta != 0.0:
            raise ValueError(f"eta is an option of sampler='ddim', not {opts['sampler']!r}")
    name = method.name
    if "iterations" in opts:
        if name == "mmps":
            check_int(opts["iterations"], "iterations")
        else:
            opts["iterations"] = default_iterations(opts["iterations"], forward)
    if name == "mmps":
        check_choice(opts["solver"], "solver", SOLVERS)
    elif name == "dps":
        check_float(opts["zeta"], "zeta", 0.0)
    elif name in ("pigdm", "tds"):
        check_float(opts["data_variance"], "data_variance", 0.0, strict=True)
    if name == "daps":
        check_int(opts["ode_steps"], "ode_steps")
        check_int(opts["langevin_steps"], "langevin_steps")
        check_float(opts["lr"], "lr", 0.0, strict=True)
        step = opts["likelihood_step"]
        step = ("exact" if forward.linear else "langevin") if step is None else step
        check_choice(step, "likelihood_step", LIKELIHOOD_STEPS)
        if step == "exact" and not forward.linear:
            raise ValueError(
                "likelihood_step='exact' needs a linear forward model; use 'langevin'"
            )
        opts["likelihood_step"] = step
    if name == "tds":
        p = num_samples if opts["particles"] is None else check_int(opts["particles"], "particles")
        if p < num_samples and num_samples % p != 0:
            raise ValueError(
                f"with particles = {p} < num_samples = {num_samples}, num_samples must be a "
                "multiple of particles (num_samples / particles independent SMC runs)"
            )
        opts["particles"] = p
        check_float(opts["ess_threshold"], "ess_threshold", 0.0, maximum=1.0)
        twist = opts["twist"]
        twist = ("pigdm" if forward.linear else "dps") if twist is None else twist
        check_choice(twist, "twist", ("pigdm", "dps"))
        if twist == "pigdm" and not forward.linear:
            raise ValueError("twist='pigdm' needs a linear forward model; use twist='dps'")
        opts["twist"] = twist
    return opts


def _rows(method: PosteriorMethod, opts: dict, num_samples: int) -> int:
    """Rows per observation of the initial noise: S, or G·P for TDS."""
    if method.name == "tds":
        p = opts["particles"]
        return max(1, num_samples // p) * p
    return num_samples


def _run_chunk(
    method: PosteriorMethod,
    opts: dict,
    prior: Denoiser,
    observation: Observation,
    x_init: Tensor,
    timesteps: Tensor,
    num_samples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, dict]:
    n = x_init.shape[0]
    event = tuple(prior.event_shape)
    if method.denoiser is not None:
        own = {k: opts[k] for k in method.options}
        denoiser = method.denoiser(prior, observation, num_samples, **own)
        fn: Callable = SAMPLERS[opts["sampler"]]
        kwargs = {"eta": opts["eta"]} if opts["sampler"] == "ddim" else {}
        with torch.no_grad():
            out = fn(
                denoiser,
                x_init.reshape(n * num_samples, *event),
                timesteps,
                generator=generator,
                progress=opts["progress"],
                **kwargs,
            )
        return out.reshape(n, num_samples, *event), {"fallbacks": denoiser.fallbacks}
    if method.name == "daps":
        keys = ("ode_steps", "likelihood_step", "langevin_steps", "lr", "iterations", "progress")
        return daps_sample(
            prior, observation, x_init, timesteps, generator, **{k: opts[k] for k in keys}
        )
    keys = ("particles", "ess_threshold", "twist", "iterations", "data_variance", "progress")
    return tds_sample(
        prior,
        observation,
        x_init,
        timesteps,
        num_samples,
        generator=generator,
        **{k: opts[k] for k in keys},
    )


def sample_posterior(
    prior: Denoiser,
    forward: ForwardModel,
    noise: GaussianNoise,
    y: Tensor,
    method: str = "mmps",
    steps: int = 256,
    num_samples: int = 64,
    generator: torch.Generator | None = None,
    **options,
) -> Tensor | tuple[Tensor, dict]:
    r"""Draws posterior samples :math:`x_i^{(s)} \sim p(x \mid y_i)` for every observation.

    Arguments:
        prior: the diffusion prior (any :class:`~hierprior.diffusion.denoiser.Denoiser`).
        forward: the forward model; ``forward.input_shape == prior.event_shape``,
            per-observation (num_obs = N) or shared.
        noise: the Gaussian noise model (per-observation or shared).
        y: the observations, with shape (N, *forward.output_shape).
        method: one of :data:`POSTERIOR_METHODS` (``"mmps"``, ``"dps"``, ``"cla"``,
            ``"pigdm"``, ``"daps"``, ``"tds"``).
        steps: time steps of the sampler (>= 1); DAPS: annealing steps; TDS: SMC steps.
        num_samples: S, samples per observation (>= 1).
        generator: the source of all randomness (on the prior's device); the global RNG is
            never used.
        options: common — ``spacing`` ("edm" | "uniform" time grid), ``batch_size``
            (observations per chunk, bounds memory), ``x_init`` (noise at t = 1, with shape
            (N, S, *event); TDS: (N, G·P, *event)), ``progress``, ``return_info``;
            wrappers (mmps, dps, cla, pigdm) — ``sampler`` ("ddpm" | "ddim" | "heun"),
            ``eta`` (DDIM); per method — mmps: ``solver`` ("cg" | "gmres"), ``iterations``
            (4); dps: ``zeta`` (1.0); cla: ``iterations`` (min(M, 32)); pigdm:
            ``iterations``, ``data_variance`` (1.0); daps: ``ode_steps`` (1),
            ``likelihood_step`` ("exact" for linear A, else "langevin"),
            ``langevin_steps`` (50), ``lr`` (0.1), ``iterations``; tds: ``particles``
            (default S), ``ess_threshold`` (0.5), ``twist`` ("pigdm" for linear A, else
            "dps"), ``iterations``, ``data_variance``.

    Returns:
        Samples with shape (N, S, *prior.event_shape) (with ``return_info=True``, also a dict
        of diagnostics per chunk: CG fallbacks, TDS effective sample sizes).

    Raises:
        TypeError, ValueError: invalid input (before sampling).
        PosteriorSamplingError: some observations' samples are not finite.
    """
    if method not in POSTERIOR_METHODS:
        raise ValueError(
            f"unknown posterior method {method!r}; known methods: {sorted(POSTERIOR_METHODS)}"
        )
    check_int(steps, "steps")
    check_int(num_samples, "num_samples")
    spec = POSTERIOR_METHODS[method]
    y = check_problem(prior, forward, noise, y)
    opts = _resolve(spec, options, forward, num_samples)
    device, dtype = device_dtype(prior)
    if generator is not None and torch.device(generator.device).type != device.type:
        raise ValueError(f"generator is on {generator.device} but the prior is on {device}")
    y = y.to(device)
    n = y.shape[0]
    event = tuple(prior.event_shape)
    rows = _rows(spec, opts, num_samples)
    timesteps = prior.schedule.timesteps(steps, spacing=opts["spacing"], device=device)
    x_init = opts["x_init"]
    if x_init is None:
        _, sigma = prior.schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))
        eps = torch.randn((n, rows, *event), generator=generator, device=device, dtype=dtype)
        x_init = float(sigma) * eps
    else:
        if not isinstance(x_init, Tensor) or tuple(x_init.shape) != (n, rows, *event):
            raise ValueError(
                f"x_init must have shape {(n, rows, *event)}, "
                f"got {tuple(getattr(x_init, 'shape', ()))}"
            )
        if not torch.isfinite(x_init).all():
            raise ValueError("x_init holds NaN or Inf")
        x_init = x_init.to(device=device, dtype=dtype)
    chunk = opts["batch_size"] or n
    outputs, infos = [], []
    for start in range(0, n, chunk):
        idx = slice(start, min(start + chunk, n))
        whole = start == 0 and chunk >= n
        observation = Observation(
            forward if whole else forward[idx], noise if whole else noise[idx], y[idx]
        )
        out, info = _run_chunk(
            spec, opts, prior, observation, x_init[idx], timesteps, num_samples, generator
        )
        outputs.append(out)
        infos.append(info)
    samples = torch.cat(outputs)
    bad = ~torch.isfinite(samples.flatten(1)).all(1)
    if bool(bad.any()):
        raise PosteriorSamplingError(
            f"{method}: the samples of observations {bad.nonzero().flatten().tolist()} hold "
            "NaN or Inf (the others are in .samples; .bad marks the failed ones)",
            samples,
            bad,
        )
    if opts["return_info"]:
        return samples, {"chunks": infos}
    return samples
