r"""Twisted diffusion sampler (TDS): sequential Monte Carlo, the asymptotically exact reference.

The unconditional sampler defines a Markov chain :math:`x_{t_0} \to x_{t_1} \to \dots \to
x_{t_{n-1}}` with Gaussian DDPM transitions :math:`p(x_r \mid x_t) = \mathcal{N}(\mu(x_t),
\tau^2 I)`, :math:`\mu = \frac{\alpha_{t|r}\sigma_r^2}{\sigma_t^2} x_t + \frac{\alpha_r
\sigma_{t|r}^2}{\sigma_t^2} \hat x(x_t)`, and outputs :math:`x_0 = \hat x(x_{t_{n-1}})`. TDS
targets this chain conditioned on y, :math:`\propto p(x_{t_0:t_{n-1}})\, p(y \mid x_0)`, with
P particles per observation and *twisting functions* :math:`\tilde p_t(y \mid x_t)`:

- twist (``twist="pigdm"``, linear A): :math:`\tilde p_t = \mathcal{N}(y \mid A \hat x,
  \Sigma_y + r_t^2 A A^\top)` (ΠGDM, :mod:`hierprior.posterior.pigdm`); its normaliser does
  not depend on :math:`x_t` and cancels. ``twist="dps"`` (any differentiable A):
  :math:`\mathcal{N}(y \mid A(\hat x), \Sigma_y)` (the original TDS twist). At the last time
  both equal the exact likelihood :math:`p(y \mid \hat x(x_{t_{n-1}}))`;
- proposal: the DDPM transition with the posterior denoiser
  :math:`\hat x + (\sigma_t^2/\alpha_t) \nabla \log \tilde p_t`, i.e. mean
  :math:`\mu_y = \mu + (\alpha_r \sigma_{t|r}^2 / \alpha_t) \nabla \log \tilde p_t`;
- weights: :math:`w_0 = \tilde p_{t_0}(y \mid x_{t_0})` and
  :math:`w \leftarrow w\, \frac{p(x_r \mid x_t)\, \tilde p_r(y \mid x_r)}
  {q(x_r \mid x_t, y)\, \tilde p_t(y \mid x_t)}`;
- systematic resampling, per observation, whenever the effective sample size
  :math:`(\sum w)^2 / \sum w^2` falls below ``ess_threshold`` · P.

With a non-Gaussian :class:`~hierprior.physics.LearnedNoise` (SLIC) only ``twist="dps"``
applies: the twist is :math:`Q(y - A(\hat x))`, its gradient :math:`-J^\top s(y - A(\hat x))`
(through the denoiser) and its value the line integral of the learned score
(:meth:`~hierprior.physics.LearnedNoise.log_prob`; its unknown constant cancels in the
weights). The target is then the prior chain times the smoothed likelihood :math:`Q_s`.

For any twist, the weighted particles are consistent (P → ∞) for the posterior of the
discretised prior chain; the twist only sets the efficiency. All weights, ESS tests and
resampling are per observation (and per independent run).

**What the S samples are.** With P = ``particles`` (default S): if P ≥ S, each observation
runs one SMC of P particles and returns S draws by systematic resampling of its final
weighted cloud; if P < S (S must be a multiple of P), it runs S / P independent SMCs of P
particles and returns each final cloud resampled to P. Samples within one run are
(asymptotically) exact marginally but correlated (resampling duplicates particles); runs are
independent. Statistics over the S samples are consistent; their Monte-Carlo error is that of
the effective sample size, not S. Increase P for accuracy, the number of runs for independence.

:class:`TDS` is the posterior method (options checked at construction); :func:`tds_sample` is
its loop.

References:
    Wu, Trippe, Naesseth, Blei & Cunningham (2023), Practical and Asymptotically Exact
    Conditional Sampling in Diffusion Models, arXiv 2306.17775.
    Doucet & Johansen (2009), A tutorial on particle filtering and smoothing (systematic
    resampling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierprior.checks import check_choice, check_float, check_optional_int
from hierprior.diffusion.denoiser import Denoiser
from hierprior.io import progress_bar
from hierprior.physics import ForwardModel, NoiseModel
from hierprior.posterior.base import (
    Observation,
    PosteriorMethod,
    default_iterations,
    register_method,
)
from hierprior.posterior.pigdm import PiGDMDenoiser

__all__ = ["TDS", "TWISTS", "systematic_resample", "effective_sample_size", "tds_sample"]

#: the twisting functions of TDS
TWISTS = ("pigdm", "dps")


def systematic_resample(
    log_w: Tensor, num: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Systematic resampling of each row of weights.

    Arguments:
        log_w: unnormalised log-weights, with shape (*batch, P).
        num: number of draws per row.
        generator: source of the one uniform per row.

    Returns:
        Indices into the last axis, with shape (*batch, num), and the uniforms used, with
        shape batch (always drawn, so the random stream does not depend on the weights).
    """
    w = torch.softmax(log_w.double(), dim=-1)
    u = torch.rand(log_w.shape[:-1], generator=generator, device=log_w.device, dtype=torch.float64)
    positions = (u[..., None] + torch.arange(num, device=log_w.device, dtype=torch.float64)) / num
    cdf = w.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), positions.contiguous(), right=True)
    return idx.clamp_max(log_w.shape[-1] - 1), u


def effective_sample_size(log_w: Tensor) -> Tensor:
    """(sum w)^2 / sum w^2 of each row of log-weights with shape (*batch, P) -> batch."""
    w = torch.softmax(log_w.double(), dim=-1)
    return 1.0 / (w**2).sum(-1)


def _gather(x: Tensor, idx: Tensor, groups: int) -> Tensor:
    """Picks particles: x (N, G*P, *e), idx (N, G, K) of indices within each group."""
    n = x.shape[0]
    p = x.shape[1] // groups
    xg = x.reshape(n, groups, p, *x.shape[2:])
    index = idx.reshape(*idx.shape, *([1] * (x.ndim - 2))).expand(*idx.shape, *x.shape[2:])
    out = torch.gather(xg, 2, index)
    return out.reshape(n, groups * idx.shape[-1], *x.shape[2:])


@torch.no_grad()
def tds_sample(
    prior: Denoiser,
    observation: Observation,
    x_init: Tensor,
    timesteps: Tensor,
    num_samples: int,
    particles: int,
    generator: torch.Generator | None = None,
    ess_threshold: float = 0.5,
    twist: str = "pigdm",
    iterations: int = 32,
    data_variance: float = 1.0,
    progress: bool = False,
) -> tuple[Tensor, dict]:
    """Runs TDS for N observations at once.

    Arguments:
        prior: the prior's denoiser.
        observation: the likelihood of the N observations.
        x_init: initial particles at timesteps[0], with shape (N, G·P, *event) where
            G = max(1, num_samples // particles) runs of P particles each.
        timesteps: decreasing time grid (steps + 1,), as from ``Schedule.timesteps``.
        num_samples: S, samples returned per observation.
        particles: P, particles per SMC run.
        generator: source of all randomness.
        ess_threshold: resample a run when ESS < ess_threshold · P (0: never, 1: always).
        twist: ``"pigdm"`` (linear A) or ``"dps"``.
        iterations: CG iterations of the ΠGDM twist.
        data_variance: v of the ΠGDM twist.

    Returns:
        Samples with shape (N, S, *event), and diagnostics: ``"ess"`` (final ESS per run,
        shape (N, G), before the final resampling) and ``"resamplings"`` (count per run).
    """
    groups = max(1, num_samples // particles)
    per_group = num_samples // groups
    n = x_init.shape[0]
    event = x_init.shape[2:]
    helper = PiGDMDenoiser(
        prior, observation, groups * particles, iterations=iterations, data_variance=data_variance
    )
    y_like = observation.y.unsqueeze(1).expand(n, groups * particles, *observation.y.shape[1:])
    steps = len(timesteps) - 1

    def twist_terms(x: Tensor, t: Tensor, last: bool) -> tuple[Tensor, Tensor, Tensor]:
        tt = t.to(x.dtype).expand(n, groups * particles)
        if not observation.gaussian:  # non-Gaussian noise: the dps twist Q(y - A(x_hat))
            with torch.enable_grad():
                leaf, d = helper.denoise(x, tt, graph=True)
                y_hat = observation.predict(d)
                residual = (observation.expand_y(y_hat) - y_hat).detach()
                score = helper.vjp(leaf, y_hat, observation.likelihood_cotangent(residual))
            return d.detach(), score, observation.log_likelihood(residual)
        r2 = None if (last or twist == "dps") else helper.r2(tt, y_like)
        with torch.enable_grad():
            d, score, quad = helper.guidance(x, tt, r2)
        return d, score, -0.5 * quad

    def grouped(v: Tensor) -> Tensor:
        return v.reshape(n, groups, particles)

    x = x_init
    d, score, log_twist = twist_terms(x, timesteps[0], steps == 1)
    log_w = grouped(log_twist).double()
    resamplings = torch.zeros(n, groups, dtype=torch.long, device=x.device)
    for i in progress_bar(range(steps - 1), progress, "tds"):
        t, r = timesteps[i], timesteps[i + 1]
        # resample the runs whose ESS is low (uniforms drawn for every run regardless)
        need = effective_sample_size(log_w) < ess_threshold * particles
        idx, _ = systematic_resample(log_w, particles, generator)
        keep = torch.arange(particles, device=x.device).expand_as(idx)
        idx = torch.where(need[..., None], idx, keep)
        x, d, score = (_gather(v, idx, groups) for v in (x, d, score))
        log_twist = _gather(log_twist[..., None], idx, groups)[..., 0]
        log_w = torch.where(need[..., None], torch.zeros_like(log_w), log_w)
        resamplings += need.long()
        # guided DDPM proposal
        a_t, s_t = prior.schedule.coefficients(t)
        a_r, s_r = prior.schedule.coefficients(r)
        a_tr = a_t / a_r
        var_tr = max(s_t**2 - a_tr**2 * s_r**2, 0.0)
        tau2 = var_tr * s_r**2 / s_t**2
        mean = (a_tr * s_r**2 / s_t**2) * x + (a_r * var_tr / s_t**2) * d
        mean_y = mean + (a_r * var_tr / a_t) * score
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean_y + tau2**0.5 * eps
        d, score, new_twist = twist_terms(x, r, i + 1 == steps - 1)
        log_q = -0.5 * (eps**2).flatten(2).sum(-1)
        log_p = -0.5 * ((x - mean) ** 2).flatten(2).sum(-1) / tau2
        log_w = log_w + grouped(new_twist - log_twist + log_p - log_q).double()
        log_twist = new_twist
    ess = effective_sample_size(log_w)
    idx, _ = systematic_resample(log_w, per_group, generator)
    samples = _gather(d, idx, groups).reshape(n, groups, per_group, *event)
    # a run with NaN weights (e.g. a NaN likelihood) yields NaN samples, never prior draws
    failed = torch.isnan(log_w).any(-1) | ~torch.isfinite(ess)
    failed = failed.reshape(n, groups, *([1] * (1 + len(event))))
    samples = torch.where(failed, float("nan"), samples).reshape(n, groups * per_group, *event)
    return samples, {"ess": ess, "resamplings": resamplings}


@register_method
class TDS(PosteriorMethod):
    """Twisted diffusion sampler, sequential Monte Carlo (its own loop, :func:`tds_sample`).

    Arguments:
        steps: SMC steps (>= 1).
        particles: P, particles per SMC run; None: S (resolved when sampling). With P < S,
            S must be a multiple of P (S / P independent runs; checked when sampling).
        ess_threshold: resample a run when ESS < ess_threshold · P (0: never, 1: always).
        twist: ``"pigdm"`` (linear A and Gaussian noise only), ``"dps"`` (any differentiable
            A; Gaussian or learned noise), or None: "pigdm" for a linear forward model, else
            "dps" (resolved when sampling).
        iterations: CG iterations of the ΠGDM twist; None: min(M, 32).
        data_variance: v of the ΠGDM twist (> 0).
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"`` (None: ``"edm"``).
        batch_size: observations per chunk, or None.
    """

    name = "tds"

    def __init__(
        self,
        steps: int = 256,
        *,
        particles: int | None = None,
        ess_threshold: float = 0.5,
        twist: str | None = None,
        iterations: int | None = None,
        data_variance: float = 1.0,
        spacing: str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(steps, spacing=spacing, batch_size=batch_size)
        self.particles = check_optional_int(particles, "particles")
        self.ess_threshold = check_float(ess_threshold, "ess_threshold", 0.0, maximum=1.0)
        if twist is not None:
            check_choice(twist, "twist", TWISTS)
        self.twist = twist
        self.iterations = check_optional_int(iterations, "iterations")
        self.data_variance = check_float(data_variance, "data_variance", 0.0, strict=True)

    def check(self, prior: Denoiser, forward: ForwardModel) -> None:
        super().check(prior, forward)
        if self.twist == "pigdm" and not forward.linear:
            raise ValueError("twist='pigdm' needs a linear forward model; use twist='dps'")

    def check_noise(self, noise: NoiseModel, opts: dict) -> None:
        if not noise.gaussian and opts["twist"] != "dps":
            raise ValueError(
                f"tds with a non-Gaussian {type(noise).__name__} needs twist='dps' (the pigdm "
                "twist assumes Gaussian noise)"
            )

    def _defaults(self, forward: ForwardModel, num_samples: int) -> dict:
        p = num_samples if self.particles is None else self.particles
        if p < num_samples and num_samples % p != 0:
            raise ValueError(
                f"with particles = {p} < num_samples = {num_samples}, num_samples must be a "
                "multiple of particles (num_samples / particles independent SMC runs)"
            )
        twist = self.twist
        if twist is None:
            twist = "pigdm" if forward.linear else "dps"
        return {
            "particles": p,
            "twist": twist,
            "iterations": default_iterations(self.iterations, forward),
        }

    def _rows(self, opts: dict, num_samples: int) -> int:
        p = opts["particles"]
        return max(1, num_samples // p) * p

    def _sample_chunk(
        self, prior, observation, state, timesteps, num_samples, generator, opts, progress
    ):
        return tds_sample(
            prior,
            observation,
            state,
            timesteps,
            num_samples,
            opts["particles"],
            generator=generator,
            ess_threshold=self.ess_threshold,
            twist=opts["twist"],
            iterations=opts["iterations"],
            data_variance=self.data_variance,
            progress=progress,
        )
