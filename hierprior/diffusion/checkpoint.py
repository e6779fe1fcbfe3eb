"""Prior checkpoints: one self-describing file per prior, loadable with ``weights_only=True``.

A checkpoint is a plain dictionary of strings, numbers, lists and tensors::

    {"format": "hierprior-prior", "version": 1, "kind": "edm" | "gaussian" | "gmm",
     "event_shape": [...], "schedule": {"target": "hierprior...VPSchedule", "kwargs": {...}},
     # kind "edm":
     "backbone": {"target": "hierprior.nn.UNet", "kwargs": {...}}, "sigma_data": 0.5,
     "state_dict": {...},            # EMA weights, the ones used for sampling
     # kind "gaussian": "mean", "cov"; kind "gmm": "weights", "means", "covs"
     "meta": {...}}                   # free-form (training step, run config, ...)

Only classes inside the ``hierprior`` package are rebuilt from a checkpoint's targets.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from hierprior.diffusion.analytic import GaussianMixturePrior, GaussianPrior
from hierprior.diffusion.denoiser import Denoiser, EDMDenoiser
from hierprior.diffusion.schedule import Schedule
from hierprior.io import atomic_save

__all__ = ["save_prior", "load_prior", "prior_to_dict", "prior_from_dict"]

FORMAT = "hierprior-prior"
VERSION = 1


def _target(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _build(spec: dict):
    target = spec["target"]
    if not target.startswith("hierprior."):
        raise ValueError(f"refusing to build {target!r} from a checkpoint: not a hierprior class")
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**spec.get("kwargs", {}))


def _backbone_kwargs(backbone: torch.nn.Module) -> dict:
    config = getattr(backbone, "config", None)
    if callable(config):
        config = config()
    if not isinstance(config, dict):
        raise TypeError(
            f"{type(backbone).__name__} has no `config` dict of constructor arguments; "
            "it cannot be saved as a hierprior prior"
        )
    return dict(config)


def prior_to_dict(prior: Denoiser, meta: dict | None = None) -> dict:
    """The checkpoint dictionary of a prior (see the module docstring)."""
    schedule: Schedule = prior.schedule
    out = {
        "format": FORMAT,
        "version": VERSION,
        "event_shape": list(prior.event_shape),
        "schedule": {"target": _target(schedule), "kwargs": schedule.config()},
        "meta": dict(meta or {}),
    }
    if isinstance(prior, GaussianPrior):
        out.update(kind="gaussian", mean=prior.mean.detach().cpu(), cov=prior.cov.detach().cpu())
    elif isinstance(prior, GaussianMixturePrior):
        out.update(
            kind="gmm",
            weights=prior.weights.detach().cpu(),
            means=prior.means.detach().cpu(),
            covs=prior.covs.detach().cpu(),
        )
    elif isinstance(prior, EDMDenoiser):
        backbone = {"target": _target(prior.backbone), "kwargs": _backbone_kwargs(prior.backbone)}
        out.update(
            kind="edm",
            backbone=backbone,
            sigma_data=prior.sigma_data,
            state_dict={k: v.detach().cpu() for k, v in prior.state_dict().items()},
        )
    else:
        raise TypeError(f"cannot save a prior of type {type(prior).__name__}")
    return out


def prior_from_dict(ckpt: dict) -> Denoiser:
    """Rebuilds a prior from :func:`prior_to_dict`'s dictionary."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError("not a hierprior prior checkpoint (missing format 'hierprior-prior')")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"unsupported hierprior checkpoint version {ckpt.get('version')!r}")
    schedule = _build(ckpt["schedule"])
    kind = ckpt.get("kind")
    if kind == "gaussian":
        return GaussianPrior(ckpt["mean"], ckpt["cov"], schedule=schedule)
    if kind == "gmm":
        return GaussianMixturePrior(ckpt["weights"], ckpt["means"], ckpt["covs"], schedule)
    if kind == "edm":
        # the throwaway initial weights of the rebuilt network must not draw from (and so
        # advance) the global RNG: loading a prior leaves it as it was
        with torch.random.fork_rng(devices=[]):
            backbone = _build(ckpt["backbone"])
            prior = EDMDenoiser(backbone, ckpt["event_shape"], schedule, ckpt["sigma_data"])
        prior.load_state_dict(ckpt["state_dict"])
        return prior.eval()
    raise ValueError(f"unknown prior kind {kind!r} in checkpoint")


def save_prior(prior: Denoiser, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Writes a prior checkpoint atomically; returns its path."""
    return atomic_save(prior_to_dict(prior, meta), path)


def _error_summary(err: BaseException, limit: int = 120) -> str:
    """``"<ExceptionType>: <first line of the message>"``, one line of at most ~limit chars.

    torch's weights-only unpickler prefixes the actual error with paragraphs of advice
    (including re-running with ``weights_only=False``, which is never right for a prior
    checkpoint); its "WeightsUnpickler error:" detail is kept instead.
    """
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > limit:
        first = first[: limit - 3].rstrip() + "..."
    name = type(err).__name__
    return f"{name}: {first}" if first else name


def load_prior(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Denoiser:
    """Loads a prior written by :func:`save_prior` (``torch.load(weights_only=True)``).

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a
    hierprior prior checkpoint: ``"<path> is not a loadable hierprior prior checkpoint
    (<ExceptionType>: <first line of the error>)"`` when torch cannot read it (junk bytes, a
    truncated file, pickled objects other than tensors and plain containers), ``"<path> is not
    a valid hierprior prior checkpoint (...)"`` when it reads but holds no prior. The messages
    are one line; the original exception is chained as ``__cause__``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prior checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(
            f"{path} is not a loadable hierprior prior checkpoint ({_error_summary(err)})"
        ) from err
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"{path} is not a valid hierprior prior checkpoint (it holds a "
            f"{type(ckpt).__name__}, not a dict)"
        )
    try:
        return prior_from_dict(ckpt)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path} is not a valid hierprior prior checkpoint ({_error_summary(err)})"
        ) from err
