r"""Command-line entry points (console scripts declared in pyproject.toml).

- ``hierprior-train-prior [overrides]``: a hydra app on ``conf/train_prior.yaml``; trains a
  diffusion prior by denoising score matching (:func:`hierprior.training.fit_prior`) and writes
  ``prior.ckpt``, ``config.yaml``, ``loss.csv``, ``loss.png`` and ``samples.png`` into
  ``run_dir`` (default ``runs/train_prior/<name>``). Rerunning the same command resumes.
  Example: ``hierprior-train-prior experiment=mnist04_prior_tiny``.
- ``hierprior-sample ckpt=PATH [n=64] [method=heun] [steps=64] [seed=0] [out=samples.png]``:
  draws n samples :math:`x \sim p_\theta` of a prior checkpoint with a sampler of
  :mod:`hierprior.diffusion.sampling` and writes a PNG grid (``.png``) or the tensor with shape
  (n, *event_shape) (``.pt``). ``--key value`` works as well as ``key=value``.
- ``hierprior-em [overrides]``: a hydra app on ``conf/em.yaml``, the EM loop of
  :mod:`hierprior.em.cli` (no argument: ``experiment=mnist_shift_tiny``).
- ``hierprior-lens [overrides]``: a hydra app on ``conf/lens.yaml``, the joint posterior of
  source, lens mass and lens light of a bundled real lens, and its report
  (:mod:`hierprior.lensfit.cli`; no argument: ``experiment=slacs_j1430_tiny``).

A sweep (``-m``) runs each job in ``<run_dir>/multirun/<its overrides>/`` (e.g.
``runs/em/mnist_shift_tiny/multirun/population.forward.missing_fraction=0.4``), so rerunning
the sweep resumes every job (:func:`job_run_dir`).

Hydra flags and overrides go in any order; an unknown group option (``sampler=nope``) and a
bad value (``em.rounds=-1``) end the command in one line on stderr, before any training.

References:
    Karras et al. (2022), EDM, arXiv 2206.00364 (sampler and preconditioning).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["em", "job_run_dir", "lens", "sample", "sample_main", "train_prior"]


def job_run_dir(cfg) -> None:
    """In a multirun (``-m``), each job writes into its own folder, hydra's output directory
    ``<run_dir>/multirun/<its overrides>`` (``hydra.sweep.dir`` / ``hydra.sweep.subdir`` in
    conf/hydra/default.yaml, e.g. ``runs/em/mnist_shift_tiny/multirun/sampler=dps``), so a
    rerun of the sweep resumes every job in its folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir


def _train_prior_task(cfg) -> None:
    from hierprior.training import fit_prior

    job_run_dir(cfg)
    out = fit_prior(cfg)  # a bad value is a one-line ConfigError before any data is loaded
    print(f"prior written to {out.prior} (step {out.step})")


def train_prior() -> None:
    """Console script ``hierprior-train-prior``: a hydra app on conf/train_prior.yaml."""
    from hierprior.config import run_app

    run_app("hierprior-train-prior", "train_prior", _train_prior_task)


def _em_task(cfg) -> None:
    from hierprior.config import check_em_section

    job_run_dir(cfg)
    check_em_section(cfg)  # before hierprior.em imports torch and Lightning (seconds)
    from hierprior.em.cli import run_from_config

    run_from_config(cfg)


def em() -> None:
    """Console script ``hierprior-em``: a hydra app on conf/em.yaml (see hierprior.em.cli)."""
    from hierprior.config import run_app

    run_app("hierprior-em", "em", _em_task)


def _lens_task(cfg) -> None:
    from hierprior.lensfit.cli import check_lens_section

    job_run_dir(cfg)
    check_lens_section(cfg)  # one line naming the key, before any training or sampling
    from hierprior.lensfit.cli import run_from_config

    run_from_config(cfg)


def lens() -> None:
    """Console script ``hierprior-lens``: a hydra app on conf/lens.yaml (see
    hierprior.lensfit.cli)."""
    from hierprior.config import run_app

    run_app("hierprior-lens", "lens", _lens_task)


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """Turns ``key=value`` tokens into ``--key value`` for argparse."""
    out = []
    for token in argv:
        if not token.startswith("-") and "=" in token:
            key, value = token.split("=", 1)
            out.extend([f"--{key}", value])
        else:
            out.append(token)
    return out


def _sample_parser() -> argparse.ArgumentParser:
    from hierprior.diffusion.sampling import SAMPLERS

    parser = argparse.ArgumentParser(
        prog="hierprior-sample",
        description="Draw samples from a hierprior prior checkpoint (key=value or --key value).",
    )
    parser.add_argument("--ckpt", required=True, help="prior checkpoint (prior.ckpt)")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument(
        "--method", default="heun", help=f"sampler, one of {sorted(SAMPLERS)} (default heun)"
    )
    parser.add_argument("--steps", type=int, default=64, help="sampler steps (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    parser.add_argument(
        "--out", default="samples.png", help="output file: .png (grid) or .pt (tensor)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="samples per sampler batch (memory)"
    )
    parser.add_argument(
        "--spacing",
        default=None,
        help="time grid: edm, uniform or logsnr (default: the sampler's own, logsnr for the "
        "multistep solvers dpm2m, dpm3m, unipc and edm for the others)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=0.0,
        help="stochasticity in [0, 1] (ddim, dpm2m, dpm3m, unipc)",
    )
    return parser


def sample_main(argv: Sequence[str] | None = None) -> Path:
    """Runs ``hierprior-sample`` on argv (default sys.argv[1:]); returns the output path.

    Bad arguments (unknown sampler, steps < 1, n < 1, an unknown output suffix) stop before
    the checkpoint is read; a missing or foreign checkpoint stops with load_prior's message.
    All errors exit with status 2 and a one-line message.
    """
    import torch

    from hierprior.checks import check_int, check_optional_int
    from hierprior.diffusion.checkpoint import load_prior
    from hierprior.diffusion.sampling import check_sampler, resolve_spacing
    from hierprior.diffusion.sampling import sample as draw
    from hierprior.io import atomic_save, save_sample_grid

    parser = _sample_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    try:  # the sampler, its steps (a multistep solver's minimum), eta's range and owner
        check_sampler(args.method, args.steps, args.eta)
        check_int(args.n, "n")
        check_optional_int(args.batch_size, "batch_size")
        spacing = resolve_spacing(args.method, args.spacing)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    out = Path(args.out)
    if out.suffix not in (".png", ".pt"):
        parser.error(f"out must end in .png or .pt, got {str(out)!r}")
    try:
        device = torch.device(args.device)
        prior = load_prior(args.ckpt, map_location=device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        parser.error(str(err))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        x = draw(
            prior.to(device),
            args.n,
            method=args.method,
            steps=args.steps,
            generator=generator,
            spacing=spacing,
            eta=args.eta,
            batch_size=args.batch_size,
            progress=True,
        )
    except ValueError as err:
        parser.error(str(err))
    if out.suffix == ".pt":
        atomic_save(x.cpu(), out)
    else:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        config = ckpt.get("meta", {}).get("config") or {}
        value_range = (config.get("data") or {}).get("value_range", (-1.0, 1.0))
        save_sample_grid(x, out, value_range)
    print(f"{args.n} samples with shape {tuple(x.shape[1:])} written to {out}")
    return out


def sample() -> None:
    """Console script ``hierprior-sample``."""
    sample_main()
