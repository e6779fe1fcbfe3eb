r"""``hierprior-lens``: the joint posterior of source, lens mass and lens light of one real lens.

:func:`run_from_config` runs a composed ``conf/lens.yaml``:

1. **checks** every value first, in seconds and before any training or sampling
   (:func:`check_lens_section`, the sampler, the prior's training config): an unknown lens, a
   bad cut-out or PSF size, a mask circle that is not ``[x, y, r]``, an unknown noise model, a
   lens or light prior that does not build; each is one line naming the key;
2. **data**: the bundled lens (:func:`hierprior.data.load_slacs`: image, noise map, PSF,
   blank sky), cut out to ``lens.size`` pixels, the PSF cropped to ``lens.psf_size``, the
   circles of ``lens.mask`` ignored; all in units of ``lens.flux_scale`` (data units per
   source-prior unit; null: the 99.5th minus the 50th percentile of the data 0.8–2.5″ from the
   centre, so the arcs peak near 1 as the prior's sources do);
3. **noise**: ``correlated`` (default), the stationary correlated Gaussian learned from the
   lens's own blank sky (:func:`hierprior.data.correlated_noise_from_sky`, masked pixels
   marginalised), or ``white``, the noise map;
4. **source prior**: ``source_prior`` (a prior.ckpt), else the galaxy prior of the ``data``,
   ``prior``, ``schedule``, ``train`` and ``trainer`` sections, trained once per configuration
   into ``${paths.priors}/<key>/`` and shared by every run with that configuration
   (hierprior-em's round-0 prior cache, :func:`hierprior.em.cli.initial_prior_key`), linked as
   ``<run_dir>/source_prior``;
5. **joint sampling** (:class:`~hierprior.posterior.Joint`, ``sampler``) of S =
   ``lens.num_samples`` (source, lens) pairs, the lens being the SIE + shear of ``lens.mass``
   and, with ``lens.light``, the lens light's non-linear parameters
   (:class:`~hierprior.physics.lensing.BlindLensingWithLight`; amplitudes solved by weighted
   least squares at every step), the chains started at the prior's median lens;
6. **lens posterior**: at each of the S sources, ``lens.chains`` MALA chains on
   :math:`p(\eta \mid x_s, y)` (:func:`~hierprior.posterior.joint.lens_posterior`, started at
   the chain's lens): pooled, samples of :math:`p(\eta \mid y) = \int p(\eta \mid x, y)\,
   p(x \mid y)\, dx` (with S sources of the source posterior);
7. **report** (:mod:`hierprior.lensfit.report`) in ``run_dir``.

A second live job on the same ``run_dir`` is refused in one line (its lock).

References:
    Barco et al. (2025), Blind Strong Gravitational Lensing Inversion, arXiv 2511.04792.
    Bolton et al. (2008), The Sloan Lens ACS Survey. V, ApJ 682, 964.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hierprior.config import ConfigError, first_line, instantiate_checked

__all__ = [
    "LensProblem",
    "build_problem",
    "check_lens_section",
    "initial_lens",
    "run_from_config",
]

log = logging.getLogger(__name__)

#: the noise models of ``lens.noise``
NOISE_MODELS = ("correlated", "white")


def check_lens_section(cfg) -> None:
    """Raises a one-line ConfigError naming the key for a bad value of the ``lens`` section
    (nothing is loaded or trained)."""
    from hierprior.checks import check_choice, check_float, check_int, check_optional_int
    from hierprior.data import SLACS_LENSES

    node = cfg.get("lens")
    if node is None:
        raise ConfigError("the config has no `lens` section (choose experiment=slacs_j1430_tiny)")
    try:
        check_choice(node.get("name"), "lens.name", SLACS_LENSES)
        size = check_optional_int(node.get("size"), "lens.size", 3)
        if size is not None and (size % 2 == 0 or size > 121):
            raise ValueError(f"lens.size must be odd and at most 121 (the bundle); got {size}")
        psf = check_optional_int(node.get("psf_size"), "lens.psf_size", 1)
        if psf is not None and psf % 2 == 0:
            raise ValueError(f"lens.psf_size must be odd; got {psf}")
        check_choice(node.get("noise"), "lens.noise", NOISE_MODELS)
        check_int(node.get("max_lag"), "lens.max_lag", 1)
        if node.get("flux_scale") is not None:
            check_float(node.get("flux_scale"), "lens.flux_scale", 0.0, strict=True)
        check_float(node.get("source_fov"), "lens.source_fov", 0.0, strict=True)
        check_int(node.get("supersample"), "lens.supersample", 1)
        check_int(node.get("num_samples"), "lens.num_samples", 1)
        check_int(node.get("chains"), "lens.chains", 1)
        check_int(node.get("lens_samples"), "lens.lens_samples", 1)
        check_int(node.get("lens_warmup"), "lens.lens_warmup", 0)
        for i, circle in enumerate(node.get("mask") or []):
            values = list(circle) if not isinstance(circle, str) else []
            if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"lens.mask[{i}] must be [x, y, r] in arcsec; got {circle}")
            if values[2] <= 0:
                raise ValueError(f"lens.mask[{i}]: the radius must be > 0; got {values[2]}")
    except (TypeError, ValueError) as err:
        raise ConfigError(first_line(err)) from err
    _lens_priors(cfg)  # the priors build (one line naming lens.mass / lens.light)
    init = node.get("init")
    if init is not None and not hasattr(init, "items"):
        raise ConfigError(f"lens.init must be a mapping name -> value; got {init!r}")


def _lens_priors(cfg):
    """(mass LensPrior, light profile or None, light prior mapping or None, light supersample)."""
    from omegaconf import OmegaConf

    from hierprior.physics.lensing import LensLightPrior, LensPrior, LightProfile

    mass = instantiate_checked(cfg.lens.mass, "lens.mass")
    if not isinstance(mass, LensPrior):
        raise ConfigError(f"lens.mass must build a LensPrior; got {type(mass).__name__}")
    light = cfg.lens.get("light")
    if not light:
        return mass, None, None, 1
    profile = instantiate_checked(light.profile, "lens.light.profile")
    if not isinstance(profile, LightProfile):
        raise ConfigError(
            f"lens.light.profile must build a LightProfile; got {type(profile).__name__}"
        )
    priors = instantiate_checked(light.prior, "lens.light.prior")
    priors = OmegaConf.to_container(priors) if OmegaConf.is_config(priors) else dict(priors)
    names = list(profile.parameter_names)
    unknown = sorted(set(priors) - set(names))
    missing = [n for n in names if n not in priors]
    if unknown or missing:
        raise ConfigError(
            f"lens.light.prior needs one entry per parameter of the profile {names}; "
            + (f"unknown: {unknown}" if unknown else f"missing: {missing}")
        )
    try:
        LensLightPrior(mass, names, priors)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"lens.light.prior: {first_line(err)}") from err
    return mass, profile, priors, int(light.get("supersample", 1))


class LensProblem:
    """What the sampler needs, built from the config: ``data`` (the
    :class:`~hierprior.data.ImagingData`, data units), ``forward``, ``noise`` and ``y``
    (1, 1, H, W) (in units of ``scale``), ``scale`` (data units per source unit), and
    ``noise_data`` (the learned noise in data units, for the statistics)."""

    def __init__(self, data, forward, noise, y, scale, noise_data):
        self.data, self.forward, self.noise, self.y = data, forward, noise, y
        self.scale, self.noise_data = scale, noise_data


def _mask(data, circles):
    import torch

    x, y = data.grid()
    mask = torch.zeros(data.shape, dtype=torch.bool)
    for cx, cy, r in circles:
        mask |= (x - cx) ** 2 + (y - cy) ** 2 < r**2
    return mask


def build_problem(cfg, source_size: int) -> LensProblem:
    """The data, forward model and noise of ``cfg.lens`` (see the module docstring)."""
    import torch

    from hierprior.data import correlated_noise_from_sky, load_slacs
    from hierprior.physics import CorrelatedNoise, GaussianNoise
    from hierprior.physics.lensing import BlindLensing, BlindLensingWithLight, LensLight

    node = cfg.lens
    data = load_slacs(node.name, size=node.get("size"), psf_size=node.get("psf_size"))
    circles = [list(c) for c in node.get("mask") or []]
    if circles:
        data = data.with_mask(_mask(data, circles))
    n, p = data.shape[0], data.pixel_scale
    scale = node.get("flux_scale")
    if scale is None:
        x, yy = data.grid()
        r = (x**2 + yy**2).sqrt()
        sel = (r >= 0.8) & (r <= 2.5) & data.observed
        values = data.image[sel]
        scale = float(values.quantile(0.995) - values.quantile(0.5))
    scale = float(scale)
    psf = data.psf
    mass, profile, light_prior, light_ss = _lens_priors(cfg)
    common = (n, p, source_size, float(node.source_fov), int(node.supersample), psf)
    if profile is None:
        forward = BlindLensing(mass, *common)
    else:
        light = LensLight(profile, n, p, light_ss, psf)
        forward = BlindLensingWithLight(mass, light, light_prior, *common)
    if node.noise == "correlated":
        noise_data = correlated_noise_from_sky(data, max_lag=int(node.max_lag))
        noise = CorrelatedNoise(
            noise_data.spectrum[0] / scale**2, noise_data.scale[0], noise_data.observed[0]
        )
    else:
        big = float(data.noise_map.max()) * 1e4  # unobserved pixels: no weight
        sigma = torch.where(data.observed, data.noise_map, torch.full_like(data.noise_map, big))
        noise_data = GaussianNoise(sigma[None], per_observation=False)
        noise = GaussianNoise((sigma / scale)[None], per_observation=False)
    y = (data.image / scale).to(torch.float32)[None, None]
    return LensProblem(data, forward, noise, y, scale, noise_data)


def _source_prior(cfg, run_dir: Path):
    """``source_prior``, or the galaxy prior trained once per configuration (hierprior-em's
    cache of round-0 priors), linked as ``<run_dir>/source_prior``."""
    from hierprior.diffusion import load_prior
    from hierprior.em.cli import trained_prior

    if cfg.get("source_prior"):
        try:
            return load_prior(cfg.source_prior)
        except ValueError as err:
            raise ConfigError(f"source_prior: {err}") from err
    return trained_prior(cfg, run_dir, "source_prior", "source prior")


def _check_event(event: tuple) -> int:
    """n of a source prior on (1, n, n) images (a ConfigError otherwise)."""
    if len(event) != 3 or event[0] != 1 or event[1] != event[2]:
        raise ConfigError(f"the source prior must model (1, n, n) images; got {event}")
    return int(event[1])


def initial_lens(forward, init=None):
    """The chains' starting lens (d,), float32: the prior's median, with the values of ``init``
    (mapping name -> value) put in; a parameter exactly at 0 is moved to 1e-3 (the SIE's and the
    Sérsic's derivatives are singular at e = 0 and at a pixel centre, the origin of an odd
    cut-out). A name that is not a lens parameter is a ConfigError."""
    import torch

    eta = forward.prior.median(dtype=torch.float64)
    names = list(forward.names)
    for key, value in dict(init or {}).items():
        if key not in names:
            raise ConfigError(
                f"lens.init: unknown lens parameter {key!r}; expected one of {names}"
            )
        eta[names.index(key)] = float(value)
    eta = torch.where(eta == 0, torch.full_like(eta, 1e-3), eta)
    try:
        forward.prior.check(eta[None], "lens.init")
    except ValueError as err:
        raise ConfigError(first_line(err)) from err
    return eta.to(torch.float32)


def run_from_config(cfg) -> Path:
    """Runs ``hierprior-lens`` as configured by a composed ``conf/lens.yaml``; returns the
    report directory (``run_dir``)."""
    import torch
    from omegaconf import OmegaConf

    from hierprior.em.cli import check_sampler_section
    from hierprior.lensfit.report import write_report
    from hierprior.posterior import posterior_method
    from hierprior.posterior.joint import lens_posterior
    from hierprior.runs import hold_run_dir
    from hierprior.training import build_denoiser, check_train_config
    from hierprior.training.callbacks import quiet_lightning

    check_lens_section(cfg)
    check_sampler_section(cfg)
    if cfg.sampler.method != "joint":
        raise ConfigError(f"sampler must be joint (source and lens); got {cfg.sampler.method}")
    joint = posterior_method(OmegaConf.to_container(cfg.sampler, resolve=True))
    if cfg.get("source_prior"):
        prior = _source_prior(cfg, Path(str(cfg.run_dir)))
        source_size = _check_event(tuple(prior.event_shape))
    else:
        check_train_config(cfg)
        source_size = int(cfg.data.resolution)
        try:
            build_denoiser(cfg, (1, source_size, source_size))
        except ValueError as err:
            raise ConfigError(f"prior: {err}") from err
    # the data, the model and the starting lens: every error here comes before any training
    try:
        problem = build_problem(cfg, source_size)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"lens: {first_line(err)}") from err
    forward, noise, y = problem.forward, problem.noise, problem.y
    eta0 = initial_lens(forward, cfg.lens.get("init"))[None]
    try:
        joint.check_noise(noise, {})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sampler: {first_line(err)}") from err
    threads = cfg.train.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    quiet_lightning()
    run_dir = Path(str(cfg.run_dir))
    with hold_run_dir(run_dir):
        start = time.time()
        prior = _source_prior(cfg, run_dir)
        t_prior = time.time() - start
        if _check_event(tuple(prior.event_shape)) != source_size:
            raise ConfigError(
                f"the source prior is {prior.event_shape[1]} px, data.resolution {source_size}"
            )
        try:
            joint.check(prior, forward)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"sampler: {first_line(err)}") from err
        node = cfg.lens
        s = int(node.num_samples)
        gen = torch.Generator().manual_seed(int(cfg.seed))
        start = time.time()
        x, eta, info = joint.sample_joint(
            prior, forward, noise, y, s, gen, eta_init=eta0, return_info=True
        )
        t_joint = time.time() - start
        log.info("joint sampling: %.1f s", t_joint)
        start = time.time()
        ys = y.expand(s, *y.shape[1:]).contiguous()
        lens_samples, lens_info = lens_posterior(
            forward,
            noise,
            ys,
            x[0],
            num_chains=int(node.chains),
            num_samples=int(node.lens_samples),
            warmup=int(node.lens_warmup),
            anneal=0.0,
            eta_init=eta[0].unsqueeze(1).expand(s, int(node.chains), -1).contiguous(),
            generator=gen,
            return_info=True,
        )
        t_lens = time.time() - start
        with torch.no_grad():
            lensed = forward.image(eta, x)  # (1, S, 1, H, W)
            light = info.get("light")
            if light is None:
                light = torch.zeros_like(lensed)
        timings = {"prior_s": t_prior, "joint_s": t_joint, "lens_posterior_s": t_lens}
        write_report(
            run_dir,
            problem,
            names=list(forward.names),
            sources=x[0],
            eta=eta[0],
            lens_samples=lens_samples.reshape(-1, lens_samples.shape[-1]),
            lensed=lensed[0],
            light=light[0],
            acceptance={
                "joint": info["acceptance"][0].tolist(),
                "lens_posterior": lens_info["acceptance"].flatten().tolist(),
            },
            timings=timings,
            config=OmegaConf.to_container(cfg, resolve=True),
            has_light=getattr(forward, "light", None) is not None,
            max_lag=int(node.max_lag),
        )
    print(f"hierprior-lens: report in {run_dir}")
    return run_dir
