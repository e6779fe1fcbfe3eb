"""``hierprior-em``: the EM loop from the composed ``conf/em.yaml`` config.

:func:`run_from_config` checks every value first (``em``, the four pieces, the sampler, the
population and the data path), in seconds and before any training; then it obtains the
round-0 prior (``em.initial_prior``, else trained with the config's ``data``/``prior``/``train``
sections into ``<run_dir>/initial_prior``, resumed or reused once finished) and runs
:func:`~hierprior.em.run_em` in ``run_dir``. Rerunning the same command continues the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hierprior.config import ConfigError, check_em_section, first_line, instantiate_checked

__all__ = ["check_em_section", "check_sampler_section", "run_from_config"]

log = logging.getLogger(__name__)


def check_sampler_section(cfg) -> None:
    """Raises a ConfigError naming ``sampler`` for a bad option of the E-step's method.

    The E-step builds the same method from ``em.estep.sampler`` (``${sampler}``); checked here
    first, a bad ``sampler.iterations`` or an unknown ``+sampler.bogus`` is reported under the
    key the user typed rather than under ``em.estep``.
    """
    from omegaconf import OmegaConf

    from hierprior.posterior import posterior_method

    node = cfg.get("sampler")
    if node is None:
        raise ConfigError("the config has no `sampler` section (choose one with sampler=<name>)")
    try:
        posterior_method(OmegaConf.to_container(node, resolve=True))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"sampler: {first_line(err)}") from err


def _initial_prior(cfg, run_dir: Path):
    from omegaconf import OmegaConf, open_dict

    from hierprior.diffusion import load_prior

    if cfg.em.initial_prior:
        try:
            return load_prior(cfg.em.initial_prior)
        except ValueError as err:
            raise ConfigError(f"em.initial_prior: {err}") from err
    prior_dir = run_dir / "initial_prior"
    if not (prior_dir / "DONE").exists():
        from hierprior.training import fit_prior

        sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(sub):
            sub.run_dir = str(prior_dir)
            sub.name = f"{cfg.name}_initial_prior"
        out = fit_prior(sub)
        (prior_dir / "DONE").write_text(str(out.prior))
    return load_prior(prior_dir / "prior.ckpt")


def _logger(cfg) -> tuple[str | None, dict]:
    logger = cfg.get("logger") or {}
    if "wandb" in logger:
        w = logger.wandb
        return "wandb", {
            "project": w.get("project", "hierprior"),
            "name": cfg.name,
            "mode": w.get("mode", "offline"),
        }
    return ("csv", {}) if "csv" in logger else (None, {})


def run_from_config(cfg):
    """Runs EM as configured by a composed ``conf/em.yaml``; returns the EMResult.

    Raises ConfigError (one line, naming the key) or FileNotFoundError before any training
    for a bad value, an unknown option, a missing data root or initial prior.
    """
    import torch
    from omegaconf import OmegaConf

    from hierprior.em import run_em
    from hierprior.training import build_denoiser, check_train_config

    check_em_section(cfg)
    check_sampler_section(cfg)
    estep = instantiate_checked(cfg.em.estep, "em.estep")
    mstep = instantiate_checked(cfg.em.mstep, "em.mstep")
    monitor = instantiate_checked(cfg.em.monitor, "em.monitor")
    stop = instantiate_checked(cfg.em.stop, "em.stop")
    if not cfg.em.initial_prior:
        if estep.method.name == "exact":
            raise ConfigError(
                "sampler=exact needs a Gaussian round-0 prior: set em.initial_prior to a "
                "Gaussian prior.ckpt (and em/mstep=gaussian)"
            )
        check_train_config(cfg)
    population = instantiate_checked(cfg.population, "population")
    if not cfg.em.initial_prior:  # the prior to be trained must fit the population's signals
        try:
            build_denoiser(cfg, population.signal_shape)
        except ValueError as err:
            raise ConfigError(f"prior: {err}") from err

    threads = cfg.train.get("num_threads")
    if threads:  # torch CPU threads for the whole run (1 is steadiest on a shared 2-core box)
        torch.set_num_threads(int(threads))
    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    prior = _initial_prior(cfg, run_dir)
    try:
        estep.check(prior, population)
        mstep.check(prior)
    except (TypeError, ValueError) as err:
        raise ConfigError(first_line(err)) from err
    if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
        prior, population = prior.cuda(), population.to("cuda")
    logger, logger_options = _logger(cfg)
    result = run_em(
        prior,
        population,
        estep=estep,
        mstep=mstep,
        monitor=monitor,
        stop=stop,
        run_dir=run_dir,
        seed=int(cfg.seed),
        rounds=int(cfg.em.rounds),
        logger=logger,
        logger_options=logger_options,
        config={"population": OmegaConf.to_container(cfg.population, resolve=True)},
    )
    print(f"\nEM run in {result.run_dir}: {result.stop_reason}\n")
    print(result.table())
    return result
