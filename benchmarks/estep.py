r"""Benchmark: the E-step (posterior sampling for a population), hierprior against azula.

One E-step draws :math:`x_i \sim p_\theta(x \mid y_i)` for N observations
:math:`y_i = m_i \odot x_i + n_i` (per-observation random masks :math:`m_i`, 25% of the pixels
observed, :math:`n_i \sim \mathcal{N}(0, 0.1^2 I)`) under a diffusion prior
:math:`D(x_t, t) = c_{skip} z + c_{out} F(c_{in} z, c_{noise})` (EDM preconditioning,
:math:`z = x_t / \alpha_t`) with a fixed U-Net F with random (seeded) weights. For every
diffusion method of :data:`hierprior.posterior.POSTERIOR_METHODS` (all but ``exact``, which
needs a Gaussian prior; and the unconditional prior sampler as a floor) it times
:func:`hierprior.posterior.sample_posterior` with ``num_samples=1`` for ``--steps`` steps after
one warm-up run, and reports

- observation-steps per second, :math:`N \cdot \mathrm{steps} / \mathrm{seconds}`;
- posterior samples per second, :math:`N / \mathrm{seconds}`;
- network forward evaluations and network VJPs (backward passes) per posterior sample: the
  backbone is wrapped in a counter that adds the batch rows of each call (and, through a
  gradient hook on its output, of each backward pass) and divides by N;
- the fraction of the run time spent inside the network (forward and backward), measured by
  timers around the backbone call and gradient hooks on its output (backward starts) and
  input (backward ends); on CUDA these need synchronisations, so they are taken in one extra
  run that is not timed.

When azula is installed, the same network (the same :class:`EDMDenoiser` instance) is wrapped
as an azula denoiser and azula's MMPS (``azula.guidance.MMPSDenoiser`` under its DDIM / DDPM
sampler), DPS (``azula.guidance.DPSSampler``) and plain sampler run on the same observations,
batch, steps and time grid, in the same process; each hierprior row gets the ratio of its
throughput to azula's (> 1: hierprior is faster). Convention mapping: both libraries write
:math:`x_t = \alpha_t x + \sigma_t \varepsilon`; azula's schedule is a callable
:math:`t \mapsto (\alpha_t, \sigma_t)`, so hierprior's ``schedule.alpha_sigma`` is used as is,
and azula's sampler walks hierprior's time grid (``Schedule.timesteps(steps, "edm")``, cast to
float32) instead of its own uniform one. azula's denoiser returns a posterior object with a
``.mean`` and works on flat vectors with shape (B, D) (its CG/GMRES take inner products over
the last axis), so the wrapper flattens and unflattens the images. ``--check`` verifies the
mapping: with the same initial noise and DDIM (eta = 0), hierprior and azula give the same
prior samples and the same MMPS (GMRES, k = 1) posterior samples up to float32 round-off.

**NFE to a target accuracy** (same run, unless ``--no-nfe``): throughput is per network
evaluation, so the E-step's cost at a given accuracy is set by how many evaluations a solver
needs. On the linear-Gaussian problem of DESIGN.md §4 (8-d Gaussian prior with the exact
denoiser, dense 4 x 8 A, sigma_y = 0.1, 20,000 samples; MMPS with k = 4 CG iterations, which
is exact guidance there) the script finds, for DDIM on the "edm" grid (hierprior's, and
azula's ``DDIMSampler`` + ``MMPSDenoiser`` on the same grid when azula is installed: the same
samples up to round-off) and for hierprior's multistep solvers on the "logsnr" grid, the
smallest NFE of a ladder (4, 6, 8, 12, ..., 256) at which W2 to the exact posterior is
<= ``--target`` (default 0.061), on ``--nfe-seeds`` instances (the largest W2 over them counts),
and reports the NFE ratio to DDIM: the E-step speed-up at equal accuracy, per-evaluation cost
being the same (``--sampler unipc`` times the throughput table with that solver).

The zero-initialised output layers of the U-Net (``conv_out``, each residual block's
``conv2``, each attention ``proj``) are filled with seeded Gaussian weights (std
:math:`1/\sqrt{\mathrm{fan\_in}}`), so the network and its Jacobian are not trivial; the rest
keeps PyTorch's default initialisation under a fixed seed.

Usage:
    python benchmarks/estep.py                      # CPU, small U-Net, 1 thread
    python benchmarks/estep.py --device cuda        # the ~9M U-Net at 32x32, B = 1024
    python benchmarks/estep.py --device cuda --bf16 --compile --out estep_h100.md
    python benchmarks/estep.py --device cuda --methods mmps --solvers cg --no-nfe \
        --repeats 1 --no-net-time --bf16          # what benchmarks/gpu_check.sh runs

``--bf16`` autocasts the network only (``--bf16-scope net``, the default: the boundary of the
EM E-step's ``precision: bf16-mixed``, :class:`hierprior.em.estep.NetworkAutocast`), for
hierprior and azula alike, with TF32 on; ``--bf16-scope all`` autocasts the whole run (both
libraries' solver arithmetic included).

References:
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712 (MMPS, azula).
    Chung et al. (2023), Diffusion Posterior Sampling for General Noisy Inverse Problems,
    arXiv 2209.14687 (DPS).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hierprior.diffusion import EDMDenoiser, GaussianPrior, sample
from hierprior.diffusion.sampling import SAMPLERS, check_sampler
from hierprior.diffusion.sampling import nfe as count_nfe
from hierprior.nn import UNet
from hierprior.physics import DenseLinear, GaussianNoise, Mask
from hierprior.posterior import (
    POSTERIOR_METHODS,
    DenoiserMethod,
    PosteriorSamplingError,
    exact_gaussian_posterior,
    gaussian_fit,
    gaussian_w2,
    sample_posterior,
)

try:
    import azula
except ImportError:  # azula is optional: without it only hierprior is timed
    azula = None

__all__ = [
    "SIZES",
    "CountingBackbone",
    "Problem",
    "Case",
    "Result",
    "build_problem",
    "make_azula_denoiser",
    "make_cases",
    "run_benchmark",
    "check_against_azula",
    "format_table",
    "gaussian_problem",
    "nfe_to_target",
    "format_nfe_table",
    "main",
]

#: U-Net configurations: "small" for CPUs, "gpu" the ~9M-parameter benchmark net at 32x32
SIZES = {
    "small": {
        "image_size": 16,
        "channels": (32, 64),
        "num_res_blocks": 1,
        "attention_resolutions": (8,),
    },
    "gpu": {
        "image_size": 32,
        "channels": (64, 128, 128),
        "num_res_blocks": 3,
        "attention_resolutions": (16,),
    },
}
#: fraction of the pixels each observation sees
OBSERVED_FRACTION = 0.25
#: observation noise standard deviation
NOISE_STD = 0.1
#: particles per observation of TDS
TDS_PARTICLES = 4


class CountingBackbone(nn.Module):
    """Wraps a backbone ``F(x, c_noise)`` and counts (and optionally times) its evaluations.

    Arguments:
        inner: the backbone, called as ``inner(x, c_noise)`` with x with shape (B, *).

    Attributes:
        forward_rows: batch rows of all forward calls since :meth:`reset`.
        vjp_rows: batch rows of all backward passes through the output since :meth:`reset`.
        seconds: time inside the network (forward and backward) while :attr:`timing` is on.
        timing: whether to time the network (synchronising CUDA around every call).
        clock: the clock of the timer (``time.perf_counter`` or ``time.process_time``).
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.timing = False
        self.clock = time.perf_counter
        self.reset()

    def reset(self) -> None:
        self.forward_rows = 0
        self.vjp_rows = 0
        self.seconds = 0.0
        self._backward_start = None

    def _now(self, like: Tensor) -> float:
        if like.is_cuda:
            torch.cuda.synchronize(like.device)
        return self.clock()

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        self.forward_rows += x.shape[0]
        start = self._now(x) if self.timing else 0.0
        out = self.inner(x, c_noise)
        if self.timing:
            self.seconds += self._now(out) - start
        if out.requires_grad:
            out.register_hook(self._on_output_grad)
            if self.timing and x.requires_grad:
                x.register_hook(self._on_input_grad)
        return out

    def _on_output_grad(self, grad: Tensor) -> None:
        self.vjp_rows += grad.shape[0]
        if self.timing:
            self._backward_start = self._now(grad)

    def _on_input_grad(self, grad: Tensor) -> None:
        if self._backward_start is not None:
            self.seconds += self._now(grad) - self._backward_start
            self._backward_start = None


class NetAutocast(nn.Module):
    """Runs a backbone under bf16 autocast on CUDA and returns fp32 (the E-step's boundary)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        if x.device.type != "cuda":
            return self.inner(x, c_noise)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            out = self.inner(x, c_noise)
        return out.to(x.dtype)


def _fill_zero_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Fills all-zero weight tensors (zero-initialised output layers) with N(0, 1/fan_in)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not bool(p.any()):
                fan_in = math.prod(p.shape[1:])
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.copy_(noise / math.sqrt(fan_in))


@dataclass
class Problem:
    """A benchmark problem: the prior, the observations and their likelihood.

    Attributes:
        prior: the EDM denoiser whose backbone is a :class:`CountingBackbone`.
        counter: that counting backbone.
        forward: per-observation masks, a :class:`Mask` with num_obs = N.
        noise: the Gaussian noise model.
        y: the observations, with shape (N, 1, R, R).
        masks: the masks as floats, with shape (N, 1, R, R).
        parameters: the number of parameters of the U-Net.
    """

    prior: EDMDenoiser
    counter: CountingBackbone
    forward: Mask
    noise: GaussianNoise
    y: Tensor
    masks: Tensor
    parameters: int

    @property
    def num_obs(self) -> int:
        return self.y.shape[0]

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.prior.event_shape)


def build_problem(
    size: str, batch: int, device: torch.device | str = "cpu", seed: int = 0
) -> Problem:
    """Builds the U-Net prior and N = batch masked, noisy observations, all seeded.

    The network is built under a forked global RNG seeded with ``seed`` (PyTorch's default
    initialisers draw from the global RNG; its state is restored afterwards), the rest is drawn
    from a ``torch.Generator``. The ground truth is Gaussian noise with std 0.5; only its
    shape matters for timing.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    config = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet(in_channels=1, **config)
    g = torch.Generator().manual_seed(seed)
    _fill_zero_weights(unet, g)
    counter = CountingBackbone(unet)
    r = config["image_size"]
    prior = EDMDenoiser(counter, (1, r, r)).to(device)
    truth = 0.5 * torch.randn((batch, 1, r, r), generator=g)
    masks = torch.rand((batch, 1, r, r), generator=g) < OBSERVED_FRACTION
    forward = Mask(masks)
    noise = GaussianNoise(NOISE_STD)
    y = forward(truth) + noise.sample((batch, 1, r, r), generator=g)
    return Problem(
        prior=prior,
        counter=counter,
        forward=forward.to(device),
        noise=noise.to(device),
        y=y.to(device),
        masks=masks.to(device=device, dtype=torch.float32),
        parameters=sum(p.numel() for p in unet.parameters()),
    )


def make_azula_denoiser(prior: EDMDenoiser):
    """Wraps a hierprior denoiser as an azula denoiser on flat vectors.

    azula's denoiser is called as ``denoiser(x_t, t)`` with x_t with shape (B, D) and t a
    scalar (or with shape (B,)) and returns an object with ``.mean`` (E[x | x_t], shape (B, D));
    its schedule is a callable ``t -> (alpha_t, sigma_t)``. Both libraries use
    x_t = alpha_t x + sigma_t eps, so hierprior's ``schedule.alpha_sigma`` is azula's schedule.
    """
    if azula is None:
        raise ImportError("azula is not installed")
    from azula.denoise import Denoiser as AzulaDenoiser
    from azula.denoise import DiracPosterior
    from azula.noise import Schedule as AzulaSchedule

    class Schedule(AzulaSchedule):
        def __init__(self, schedule):
            self.inner = schedule

        def __call__(self, t: Tensor) -> tuple[Tensor, Tensor]:
            return self.inner.alpha_sigma(t)

    class Wrapped(AzulaDenoiser):
        def __init__(self, prior: EDMDenoiser):
            super().__init__()
            self.prior = prior
            self.schedule = Schedule(prior.schedule)

        def forward(self, x_t: Tensor, t: Tensor, **kwargs) -> DiracPosterior:
            mean = self.prior(x_t.reshape(x_t.shape[0], *self.prior.event_shape), t)
            return DiracPosterior(mean=mean.reshape(x_t.shape))

    return Wrapped(prior)


def _azula_sampler(kind: str, denoiser, grid: Tensor, **kwargs):
    """An azula sampler ("ddim", "ddpm" or "dps") that walks the given time grid."""
    from azula.guidance import DPSSampler
    from azula.sample import DDIMSampler, DDPMSampler

    base = {"ddim": DDIMSampler, "ddpm": DDPMSampler, "dps": DPSSampler}[kind]
    cls = type(f"Grid{base.__name__}", (base,), {"timesteps": property(lambda self: grid)})
    return cls(denoiser, steps=len(grid) - 1, silent=True, **kwargs)


@dataclass
class Case:
    """One row of the benchmark: a method, its implementation and how to run it.

    Attributes:
        method: the method's name (a key of POSTERIOR_METHODS, or "prior").
        impl: "hierprior" or "azula".
        options: the method's options, as a short string for the table.
        run: runs the method once with a seed and returns samples with shape (N, ...).
        key: rows with the same key are compared (hierprior against azula).
    """

    method: str
    impl: str
    options: str
    run: Callable[[int], Tensor]
    key: str = ""


@dataclass
class Result:
    """Measurements of one case."""

    case: Case
    seconds: list[float] = field(default_factory=list)
    forward_rows: int = 0
    vjp_rows: int = 0
    net_fraction: float | None = None
    note: str = ""

    @property
    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None


def make_cases(
    problem: Problem,
    methods: list[str],
    steps: int,
    sampler: str = "ddim",
    with_azula: bool = True,
    solvers: tuple[str, ...] = ("cg", "gmres"),
) -> list[Case]:
    """The benchmark cases for the requested methods, each followed by its azula counterpart.

    ``methods`` holds "prior" and/or keys of POSTERIOR_METHODS; "mmps" gives one case per
    solver of ``solvers`` (CG and GMRES, k = 1). azula has counterparts for "prior", "mmps"
    and "dps".
    """
    prior, n, event = problem.prior, problem.num_obs, problem.event_shape
    device = problem.y.device
    fwd, noise, y = problem.forward, problem.noise, problem.y

    def gen(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def posterior(method: str, **options) -> Callable[[int], Tensor]:
        if issubclass(POSTERIOR_METHODS[method], DenoiserMethod):
            options = {"sampler": sampler, **options}

        def run(seed: int) -> Tensor:
            return sample_posterior(
                prior,
                fwd,
                noise,
                y,
                method=method,
                steps=steps,
                num_samples=1,
                generator=gen(seed),
                **options,
            )

        return run

    def prior_run(seed: int) -> Tensor:
        return sample(prior, n, method=sampler, steps=steps, generator=gen(seed))

    cases = []
    mmps_variants = tuple((solver, f"mmps-{solver}") for solver in solvers)
    for method in methods:
        if method == "prior":
            cases.append(Case("prior", "hierprior", f"{sampler}, no guidance", prior_run, "prior"))
        elif method == "mmps":
            for solver, key in mmps_variants:
                run = posterior("mmps", solver=solver, iterations=1)
                cases.append(Case("mmps", "hierprior", f"{sampler}, {solver} k=1", run, key))
        elif method == "dps":
            cases.append(Case("dps", "hierprior", f"{sampler}, zeta=1", posterior("dps"), "dps"))
        elif method == "tds":
            p = TDS_PARTICLES
            run = posterior("tds", particles=p, batch_size=max(1, n // p))
            cases.append(Case("tds", "hierprior", f"{p} particles", run))
        else:
            opts = "ode_steps=1, exact" if method == "daps" else f"{sampler}, defaults"
            cases.append(Case(method, "hierprior", opts, posterior(method)))
    if not with_azula or azula is None:
        return cases

    az = make_azula_denoiser(prior)
    grid = prior.schedule.timesteps(steps, spacing="edm", device=device).float()
    masks = problem.masks.reshape(n, -1)
    y_flat = y.reshape(n, -1)
    sigma_1 = float(prior.schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))[1])

    def A(x: Tensor) -> Tensor:
        return x * masks

    cuda_devices = [torch.cuda.current_device()] if device.type == "cuda" else []

    def azula_run(kind: str, denoiser, **kwargs) -> Callable[[int], Tensor]:
        def run(seed: int) -> Tensor:
            # azula draws its DDPM noise from the global RNG: fork it, seed it, restore it.
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(seed)
                eps = torch.randn((n, *event), generator=gen(seed), device=device)
                x = (sigma_1 * eps).reshape(n, -1)
                return _azula_sampler(kind, denoiser, grid, **kwargs)(x)

        return run

    azula_kind = "ddpm" if sampler == "ddpm" else "ddim"
    added = []
    for method in methods:
        if method == "prior":
            added.append(
                Case("prior", "azula", f"{azula_kind}", azula_run(azula_kind, az), "prior")
            )
        elif method == "mmps":
            from azula.guidance import MMPSDenoiser
            from azula.linalg.covariance import IsotropicCovariance

            cov_y = IsotropicCovariance(NOISE_STD**2)
            for solver, key in mmps_variants:
                mmps = MMPSDenoiser(az, y_flat, A, cov_y, solver=solver, iterations=1)
                run = azula_run(azula_kind, mmps)
                added.append(Case("mmps", "azula", f"{azula_kind}, {solver} k=1", run, key))
        elif method == "dps":
            run = azula_run("dps", az, y=y_flat, A=A, zeta=1.0)
            added.append(Case("dps", "azula", "ddpm, zeta=1, batch norm", run, "dps"))
    # each azula row right after its hierprior counterpart (stable sort)
    return sorted(
        cases + added,
        key=lambda c: (methods.index(c.method), c.key, c.impl != "hierprior"),
    )


def _status(out: Tensor) -> str:
    bad = int((~torch.isfinite(out.reshape(out.shape[0], -1)).all(1)).sum())
    return f"NaN/Inf in {bad}/{out.shape[0]} obs" if bad else ""


def _run_once(
    case: Case, seed: int, sync: Callable[[], None], autocast, clock: Callable[[], float]
) -> tuple[float, str]:
    """Runs a case once; returns (seconds, note). Non-finite samples are noted, not raised."""
    with autocast():
        sync()
        start = clock()
        try:
            out = case.run(seed)
            note = ""
        except PosteriorSamplingError as err:
            out, note = None, f"NaN/Inf in {int(err.bad.sum())}/{err.bad.numel()} obs"
        sync()
        seconds = clock() - start
    if out is not None:
        note = _status(out)
    return seconds, note


def run_benchmark(
    problem: Problem,
    cases: list[Case],
    repeats: int = 2,
    seed: int = 0,
    bf16: bool = False,
    clock: str = "wall",
    log: Callable[[str], None] | None = print,
    net_time: bool = True,
) -> list[Result]:
    """Times every case: a warm-up run each (it counts network rows), then timed runs.

    The ``repeats`` timed runs go round-robin over the cases, so that a change of load on a
    shared machine hits every case alike. On the CPU the timed runs also time the network; on
    CUDA that takes synchronisations, so one extra untimed run per case measures it. A case
    that raises (e.g. out of memory) is noted and skipped; non-finite samples are noted.
    ``clock="cpu"`` times with the process CPU time (CPU device only), which other jobs on a
    shared machine do not inflate; with one thread it equals the wall time of an idle machine.
    ``net_time=False`` skips the extra CUDA run that measures the time in the network.
    """
    device = problem.y.device
    cuda = device.type == "cuda"
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and cuda:
        raise ValueError("clock='cpu' cannot time CUDA work; use clock='wall'")
    timer = time.process_time if clock == "cpu" else time.perf_counter
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def autocast():
        if bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    counter = problem.counter
    counter.clock = timer
    results = [Result(case) for case in cases]
    net_seconds = [0.0] * len(cases)

    def attempt(i: int, timing: bool) -> float | None:
        result = results[i]
        if result.note.startswith("failed"):
            return None
        counter.timing = timing
        counter.reset()
        try:
            seconds, result.note = _run_once(result.case, seed, sync, autocast, timer)
        except Exception as err:  # a failed case (OOM, bad option) must not stop the others
            result.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            if cuda:
                torch.cuda.empty_cache()
            return None
        finally:
            counter.timing = False
        net_seconds[i] = counter.seconds
        return seconds

    for i, result in enumerate(results):
        if attempt(i, timing=False) is not None:
            result.forward_rows, result.vjp_rows = counter.forward_rows, counter.vjp_rows
    for _ in range(repeats):
        for i, result in enumerate(results):
            seconds = attempt(i, timing=not cuda)
            if seconds is not None:
                result.seconds.append(seconds)
                if not cuda:
                    result.net_fraction = (result.net_fraction or 0.0) + net_seconds[i]
    for i, result in enumerate(results):
        if result.seconds and not cuda:
            result.net_fraction /= sum(result.seconds)
        elif result.seconds and net_time:
            seconds = attempt(i, timing=True)
            result.net_fraction = net_seconds[i] / seconds if seconds else None
        if log is not None:
            c = result.case
            best = f"{result.best:.3f} s" if result.best is not None else "-"
            log(f"  {c.impl:9s} {c.method:6s} {c.options:28s} {best} {result.note}")
    return results


def check_against_azula(problem: Problem, steps: int, seed: int = 0) -> dict[str, float]:
    """Max |hierprior - azula| over the samples of the prior and of MMPS (GMRES, k=1).

    Both run DDIM (eta = 0) from the same initial noise on the same time grid, so they must
    agree up to float32 round-off (azula computes the grid coefficients in float32, hierprior
    in float64). Returns the max abs differences and the max abs sample value (for scale).
    """
    from azula.guidance import MMPSDenoiser
    from azula.linalg.covariance import IsotropicCovariance

    prior, n, event = problem.prior, problem.num_obs, problem.event_shape
    device = problem.y.device
    g = torch.Generator(device=device).manual_seed(seed)
    sigma_1 = float(prior.schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))[1])
    x_init = sigma_1 * torch.randn((n, *event), generator=g, device=device)
    grid = prior.schedule.timesteps(steps, spacing="edm", device=device).float()
    az = make_azula_denoiser(prior)
    masks = problem.masks.reshape(n, -1)

    ours_prior = sample(prior, n, method="ddim", steps=steps, x_init=x_init)
    theirs_prior = _azula_sampler("ddim", az, grid)(x_init.reshape(n, -1)).reshape(x_init.shape)
    ours_mmps = sample_posterior(
        prior,
        problem.forward,
        problem.noise,
        problem.y,
        method="mmps",
        steps=steps,
        num_samples=1,
        sampler="ddim",
        solver="gmres",
        iterations=1,
        x_init=x_init.unsqueeze(1),
    )[:, 0]
    mmps = MMPSDenoiser(
        az,
        problem.y.reshape(n, -1),
        lambda x: x * masks,
        IsotropicCovariance(NOISE_STD**2),
        solver="gmres",
        iterations=1,
    )
    theirs_mmps = _azula_sampler("ddim", mmps, grid)(x_init.reshape(n, -1)).reshape(x_init.shape)
    return {
        "prior_max_abs_diff": float((ours_prior - theirs_prior).abs().max()),
        "mmps_max_abs_diff": float((ours_mmps - theirs_mmps).abs().max()),
        "max_abs_sample": float(torch.maximum(ours_prior.abs().max(), ours_mmps.abs().max())),
    }


#: the NFE ladder searched for the target W2
NFE_LADDER = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
#: (solver, grid) rows of the NFE table: DDIM (the peers' sampler) first, then hierprior's
NFE_SOLVERS = (
    ("ddim", "edm"),
    ("dpm2m", "logsnr"),
    ("dpm3m", "logsnr"),
    ("unipc", "logsnr"),
)


def gaussian_problem(seed: int):
    """DESIGN.md §4: N(mu, B B^T/8 + 0.1 I) in D = 8, one dense 4x8 A (N(0, 1/8)), sigma_y 0.1.

    The recipe of ``experiments/samplers/run_study.py`` (float64); returns (prior, forward,
    noise, y, exact posterior mean (1, 8), covariance (1, 8, 8)).
    """
    f64 = torch.float64
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(8, 8, generator=g, dtype=f64)
    prior = GaussianPrior(
        torch.randn(8, generator=g, dtype=f64), b @ b.T / 8 + 0.1 * torch.eye(8, dtype=f64)
    )
    forward = DenseLinear(torch.randn(1, 4, 8, generator=g, dtype=f64) / math.sqrt(8))
    noise = GaussianNoise(0.1)
    x = prior.sample(1, generator=g)
    y = forward(x) + noise.sample((1, 4), generator=g, dtype=f64)
    mean, cov = exact_gaussian_posterior(prior, forward, noise, y)
    return prior, forward, noise, y, mean, cov


def _azula_gaussian_mmps(prior, forward, y, steps: int, x_init: Tensor) -> Tensor:
    """azula's DDIMSampler + MMPSDenoiser (CG, k = 4) on hierprior's "edm" grid, float64."""
    from azula.guidance import MMPSDenoiser
    from azula.linalg.covariance import IsotropicCovariance

    a = forward.A[0]
    mmps = MMPSDenoiser(
        make_azula_denoiser(prior),
        y[0],
        lambda x: x @ a.T,
        IsotropicCovariance(torch.tensor(0.01, dtype=torch.float64)),
        solver="cg",
        iterations=4,
    )
    grid = prior.schedule.timesteps(steps, spacing="edm")
    with torch.no_grad():
        return _azula_sampler("ddim", mmps, grid)(x_init)


def nfe_to_target(
    target: float = 0.061,
    seeds: tuple[int, ...] = (84, 0, 1),
    num_samples: int = 20_000,
    solvers: tuple[tuple[str, str], ...] = NFE_SOLVERS,
    with_azula: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """The smallest NFE of :data:`NFE_LADDER` at which each solver reaches W2 <= target.

    MMPS (CG, k = 4) through ``sample_posterior`` on :func:`gaussian_problem` for each seed
    (the worst W2 over the seeds counts), the initial noise drawn from one seeded generator
    per seed (the same for every solver). With azula, its DDIM + MMPS runs from the same noise
    as a row of its own. Returns one dict per row: solver, grid, implementation, nfe (None if
    the ladder does not reach the target), w2 (worst over seeds at that NFE), w2_below (at the
    previous rung), seconds (the runs at that NFE, all seeds).
    """
    problems = [gaussian_problem(seed) for seed in seeds]
    inits = {}
    for seed, (prior, *_rest) in zip(seeds, problems):
        g = torch.Generator().manual_seed(seed + 1)
        sigma_1 = float(prior.schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))[1])
        inits[seed] = sigma_1 * torch.randn(1, num_samples, 8, generator=g, dtype=torch.float64)

    def hierprior_run(sampler: str, grid: str, steps: int, k: int) -> Tensor:
        prior, forward, noise, y, _, _ = problems[k]
        return sample_posterior(
            prior, forward, noise, y, "mmps", steps, num_samples, torch.Generator(),
            iterations=4, sampler=sampler, spacing=grid, x_init=inits[seeds[k]],
        )  # fmt: skip

    def azula_run(sampler: str, grid: str, steps: int, k: int) -> Tensor:
        prior, forward, _, y, _, _ = problems[k]
        return _azula_gaussian_mmps(prior, forward, y, steps, inits[seeds[k]][0])[None]

    rows = [(s, g, "hierprior", hierprior_run) for s, g in solvers]
    if with_azula and azula is not None:
        rows.insert(1, ("ddim", "edm", "azula", azula_run))
    results = []
    for sampler, grid, impl, fn in rows:
        found, below = None, None
        for nfe in NFE_LADDER:
            steps = (nfe + 1) // 2 if sampler == "heun" else nfe
            try:
                check_sampler(sampler, steps)
            except ValueError:  # too few steps for a multistep solver's order
                continue
            start = time.perf_counter()
            w2 = []
            for k in range(len(seeds)):
                xs = fn(sampler, grid, steps, k)
                _, _, _, _, mean, cov = problems[k]
                w2.append(float(gaussian_w2(*gaussian_fit(xs), mean, cov).mean()))
            seconds = time.perf_counter() - start
            if max(w2) <= target:
                found = {"nfe": count_nfe(sampler, steps), "w2": max(w2), "seconds": seconds}
                break
            below = max(w2)
        row = {"solver": sampler, "grid": grid, "impl": impl, "w2_below": below}
        row.update(found or {"nfe": None, "w2": None, "seconds": None})
        results.append(row)
        if log is not None:
            log(f"  {impl:9s} {sampler:6s} {grid:6s} NFE to W2 <= {target}: {row['nfe']}")
    return results


def format_nfe_table(results: list[dict], target: float, seeds, num_samples: int) -> str:
    """The NFE table as markdown, with the NFE ratio of each row to hierprior's DDIM."""
    ref = next(
        (r["nfe"] for r in results if r["solver"] == "ddim" and r["impl"] == "hierprior"), None
    )
    lines = [
        f"NFE to W2 <= {target} (worst of seeds {list(seeds)}), MMPS CG k=4, D=8 dense 4x8 A, "
        f"sigma_y 0.1, {num_samples:,} samples",
        "",
        "| solver | implementation | grid | NFE to target | W2 there (worst seed) | W2 one rung "
        "below | DDIM NFE / NFE | time at target (s, all seeds) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        nfe = r["nfe"]
        ratio = f"{ref / nfe:.1f}x" if ref and nfe else "-"
        w2 = f"{r['w2']:.3f}" if r["w2"] is not None else f"> {target} at {NFE_LADDER[-1]}"
        below = f"{r['w2_below']:.3f}" if r["w2_below"] is not None else "-"
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        lines.append(
            f"| {r['solver']} | {r['impl']} | {r['grid']} | {nfe or '-'} | {w2} | {below} | "
            f"{ratio} | {secs} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    """Three significant figures, no exponent for the usual range."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(results: list[Result], problem: Problem, steps: int, meta: dict) -> str:
    """The measured table as markdown, with a header line on the setup."""
    n = problem.num_obs
    azula_speed = {
        r.case.key: n / r.best
        for r in results
        if r.case.impl == "azula" and r.best is not None and r.case.key
    }
    lines = [
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| method | implementation | options | obs-steps/s | posterior samples/s | "
        "net evals / sample | net VJPs / sample | time in net | hierprior / azula | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        c = r.case
        if r.best is None:
            speed = "-"
            rate = "-"
        else:
            speed, rate = _fmt(n * steps / r.best), _fmt(n / r.best)
        ratio = "-"
        if c.impl == "hierprior" and c.key in azula_speed and r.best is not None:
            ratio = f"{(n / r.best) / azula_speed[c.key]:.2f}"
        elif c.impl == "azula" and r.best is not None:
            ratio = "(ref)"
        frac = f"{100 * r.net_fraction:.0f}%" if r.net_fraction is not None else "-"
        lines.append(
            f"| {c.method} | {c.impl} | {c.options} | {speed} | {rate} | "
            f"{r.forward_rows / n:g} | {r.vjp_rows / n:g} | {frac} | {ratio} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> str:
    # "exact" samples a GaussianPrior's closed-form posterior: not an option for a U-Net prior
    known = ["prior", *(m for m in POSTERIOR_METHODS if m != "exact")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="U-Net: small (default on CPU) or gpu (~9M, 32x32; default on CUDA)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="observations N (default 32 small, 1024 gpu)"
    )
    parser.add_argument("--steps", type=int, default=None, help="default 16 CPU, 64 CUDA")
    parser.add_argument(
        "--methods", default=",".join(known), help=f"comma-separated subset of {known}"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (CPU only; steadier on a shared machine)",
    )
    parser.add_argument(
        "--sampler",
        choices=sorted(SAMPLERS),
        default="ddim",
        help="hierprior's sampler (azula rows: ddpm for ddpm, else ddim)",
    )
    parser.add_argument(
        "--target", type=float, default=0.061, help="W2 of the NFE-to-target table"
    )
    parser.add_argument(
        "--nfe-seeds", default="84,0,1", help="instances of the Gaussian problem (comma-sep.)"
    )
    parser.add_argument(
        "--nfe-samples", type=int, default=20_000, help="samples of the NFE-to-target table"
    )
    parser.add_argument("--no-nfe", action="store_true", help="skip the NFE-to-target table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-azula", action="store_true", help="time hierprior only")
    parser.add_argument(
        "--check",
        action="store_true",
        help="first check hierprior == azula (prior and MMPS, DDIM)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument(
        "--bf16-scope",
        choices=["net", "all"],
        default="net",
        help="autocast the network only (as the EM E-step does; default) or the whole run",
    )
    parser.add_argument(
        "--solvers", default="cg,gmres", help="MMPS solvers (comma-separated: cg, gmres)"
    )
    parser.add_argument(
        "--no-net-time",
        action="store_true",
        help="skip the extra CUDA run that measures the time spent in the network",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the backbone (CUDA only)"
    )
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    solvers = tuple(v.strip() for v in args.solvers.split(",") if v.strip())
    if not solvers or set(solvers) - {"cg", "gmres"}:
        parser.error(f"--solvers must be a subset of cg,gmres, got {args.solvers!r}")
    unknown = sorted(set(methods) - set(known))
    if unknown or not methods:
        parser.error(f"unknown methods {unknown}; choose from {known}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if (args.bf16 or args.compile) and device.type != "cuda":
        parser.error("--bf16 and --compile are CUDA-only options")
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu cannot time CUDA work")
    if not (args.target > 0 and math.isfinite(args.target)):
        parser.error(f"--target must be a positive W2, got {args.target}")
    try:
        nfe_seeds = [int(v) for v in args.nfe_seeds.split(",") if v.strip()]
    except ValueError:
        nfe_seeds = []
    if not nfe_seeds:
        parser.error(f"--nfe-seeds must be comma-separated integers, got {args.nfe_seeds!r}")
    if args.nfe_samples < 2:
        parser.error(f"--nfe-samples must be >= 2, got {args.nfe_samples}")
    for name in ("batch", "steps", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    size = args.size or ("gpu" if device.type == "cuda" else "small")
    batch = args.batch or (1024 if size == "gpu" else 32)
    steps = args.steps or (64 if device.type == "cuda" else 16)
    torch.set_num_threads(args.threads)
    # torch.func.jvp's first call warns about torch.jit.script inside torch itself
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

    problem = build_problem(size, batch, device, args.seed)
    if args.bf16:  # TF32 for what stays fp32, as the EM E-step's bf16-mixed precision
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.bf16 and args.bf16_scope == "net":
        problem.counter.inner = NetAutocast(problem.counter.inner)
    if args.compile:
        problem.counter.inner = torch.compile(problem.counter.inner)
    with_azula = not args.no_azula and azula is not None
    if args.check:
        if azula is None:
            parser.error("--check needs azula")
        print("check (DDIM, same initial noise and grid):", check_against_azula(problem, steps))
    cases = make_cases(problem, methods, steps, args.sampler, with_azula, solvers)
    r = SIZES[size]["image_size"]
    print(f"E-step benchmark: {len(cases)} cases, N={batch}, {steps} steps, {r}x{r}, {device}")
    results = run_benchmark(
        problem,
        cases,
        args.repeats,
        args.seed,
        args.bf16 and args.bf16_scope == "all",
        args.clock,
        net_time=not args.no_net_time,
    )
    meta = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "azula": azula.__version__ if with_azula else "not run",
        "U-Net": f"{size} ({problem.parameters / 1e6:.2f}M params, {r}x{r})",
        "N": batch,
        "steps": steps,
        "time grid": "edm",
        "dtype": f"bf16 autocast ({args.bf16_scope}), TF32" if args.bf16 else "fp32",
        "compile": args.compile,
        "time": f"best of {args.repeats} after a warm-up, {args.clock} clock",
    }
    table = format_table(results, problem, steps, meta)
    print()
    print(table)
    if not args.no_nfe:
        seeds = tuple(int(v) for v in args.nfe_seeds.split(",") if v.strip())
        print(f"NFE to W2 <= {args.target} on the Gaussian problem (seeds {list(seeds)}):")
        nfe_rows = nfe_to_target(args.target, seeds, args.nfe_samples, with_azula=with_azula)
        nfe_table = format_nfe_table(nfe_rows, args.target, seeds, args.nfe_samples)
        print()
        print(nfe_table)
        table = table + "\n" + nfe_table
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main()
