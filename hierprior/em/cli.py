"""``hierprior-em``: the EM loop as a hydra app on ``conf/config.yaml``.

With no ``experiment=`` override it runs ``experiment=mnist_shift_tiny`` (the Quickstart's
main job: CPU, bundled data, minutes). The round-0 prior is ``em.initial_prior`` when set, else
it is trained with the config's ``data``/``prior``/``train`` sections into
``<run_dir>/initial_prior`` (resumed, or reused once finished). Then :func:`run_em` runs in
``run_dir``; rerunning the same command continues the run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["main", "run_from_config", "DEFAULT_EXPERIMENT"]

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mnist_shift_tiny"


def _initial_prior(cfg, run_dir: Path):
    from omegaconf import OmegaConf, open_dict

    from hierprior.diffusion import load_prior

    if cfg.em.initial_prior:
        return load_prior(cfg.em.initial_prior)
    prior_dir = run_dir / "initial_prior"
    done = prior_dir / "DONE"
    if not done.exists():
        from hierprior.training import fit_prior

        sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(sub):
            sub.task = "train_prior"
            sub.run_dir = str(prior_dir)
            sub.name = f"{cfg.name}_initial_prior"
        out = fit_prior(sub)
        done.write_text(str(out.prior))
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
    if "csv" in logger:
        return "csv", {}
    return None, {}


def run_from_config(cfg):
    """Runs EM as configured (a composed hydra config with task 'em'); returns the EMResult."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hierprior.em.loop import run_em

    if cfg.get("task") != "em":
        raise ValueError(
            f"hierprior-em runs experiments with task 'em'; this config has task "
            f"{cfg.get('task')!r} (use hierprior-train-prior for task 'train_prior')"
        )
    threads = cfg.get("train", {}).get("num_threads")
    if threads:  # torch CPU threads for the whole run (1 is steadiest on a shared 2-core box)
        torch.set_num_threads(int(threads))
    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    population = instantiate(cfg.population)  # fails early on missing data / bad digits
    prior = _initial_prior(cfg, run_dir)
    evaluators = [instantiate(e) for e in cfg.em.get("evaluators") or []]
    trainer = {"accelerator": cfg.trainer.accelerator, "devices": cfg.trainer.devices}
    if cfg.trainer.accelerator not in ("cpu",) and torch.cuda.is_available():
        prior = prior.cuda()
        population = population.to("cuda")
    logger, logger_options = _logger(cfg)
    mstep = OmegaConf.to_container(cfg.em.mstep, resolve=True)
    mstep.setdefault("precision", str(cfg.trainer.get("precision", "32-true")))
    identity = OmegaConf.to_container(cfg.population, resolve=True)
    result = run_em(
        prior,
        population,
        rounds=int(cfg.em.rounds),
        sampler=OmegaConf.to_container(cfg.sampler, resolve=True),
        run_dir=run_dir,
        seed=int(cfg.seed),
        num_samples=int(cfg.em.num_samples),
        estep_batch_size=int(cfg.em.estep_batch_size),
        mstep=mstep,
        monitor=OmegaConf.to_container(cfg.em.monitor, resolve=True),
        stop=OmegaConf.to_container(cfg.em.stop, resolve=True),
        evaluators=evaluators,
        logger=logger,
        logger_options=logger_options,
        trainer=trainer,
        value_range=tuple(cfg.data.value_range),
        config={"population": identity},
        progress=bool(cfg.get("progress", False)),
    )
    print(f"\nEM run in {result.run_dir}: {result.stop_reason}\n")
    print(result.table())
    return result


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    run_from_config(cfg)


def main() -> None:
    """Console script ``hierprior-em``."""
    import hydra

    from hierprior.cli import CONF_DIR

    if not any(a.lstrip("+~").split("=")[0] == "experiment" for a in sys.argv[1:]):
        sys.argv.append(f"experiment={DEFAULT_EXPERIMENT}")
    hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(_task)()
