"""Tests of the hydra tree conf/: every experiment composes under its root, the EM pieces of
every group option build, tiny train-prior experiments train end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from hierprior.cli import sample_main
from hierprior.config import CONF_DIR, instantiate_checked
from hierprior.diffusion import load_prior
from hierprior.training import (
    build_callbacks,
    build_datamodule,
    build_denoiser,
    build_loggers,
    build_trainer,
    check_train_config,
    fit_prior,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    # load_mnist warns about the fallback even with source=bundled (a root is given)
    pytest.mark.filterwarnings("ignore:no MNIST under root"),
]

CONF = Path(CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _overrides_population(experiment: str) -> bool:
    """Whether an experiment's defaults override /population (read from the file)."""
    file = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    defaults = OmegaConf.to_container(file).get("defaults") or []
    keys = [
        " ".join(str(k).split()) for e in defaults for k in (e if isinstance(e, dict) else [e])
    ]
    return "override /population" in keys


def _data_choice(experiment: str) -> str | None:
    """The data option an experiment's defaults choose (read from the file)."""
    file = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    for entry in file.get("defaults", []):
        if isinstance(entry, str) or not hasattr(entry, "items"):
            continue
        for key, value in entry.items():
            if str(key).endswith("/data"):
                return str(value)
    return None


# experiments are split by root: those choosing a population run under em, the others under
# train_prior (read from the files, so another experiment cannot break collection)
EM_EXPERIMENTS = [e for e in EXPERIMENTS if _overrides_population(e)]
TRAIN_EXPERIMENTS = [e for e in EXPERIMENTS if e not in EM_EXPERIMENTS]

# shrink any train_prior run to one optimiser step with a 4-sample, 2-step sample grid
ONE_STEP = [
    "train.steps=1",
    "train.warmup_steps=0",
    "train.sample_every=0",
    "train.checkpoint_every=0",
    "train.loss_every=1",
    "sample.n=4",
    "sample.steps=2",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


# what a train_prior run reads
TRAIN_SECTIONS = (
    "run_dir",
    "data",
    "prior",
    "schedule",
    "trainer",
    "logger",
    "paths",
    "train",
    "sample",
)


def _resolve(cfg, sections=None) -> None:
    """Resolves every interpolation of the given top-level sections (default: all of them)."""
    for key in list(cfg) if sections is None else sections:
        node = cfg[key]
        if OmegaConf.is_config(node):
            OmegaConf.to_container(node, resolve=True, throw_on_missing=True)


def _compose(overrides: list[str], root: str = "train_prior", **kwargs):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=root, overrides=overrides, **kwargs)


def _compose_em(overrides: list[str], **kwargs):
    return _compose(overrides, root="em", **kwargs)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_there_are_experiments():
    assert {"mnist04_prior", "mnist04_prior_tiny"} <= set(TRAIN_EXPERIMENTS)
    assert {"galaxy_elliptical_prior", "galaxy_elliptical_prior_tiny"} <= set(TRAIN_EXPERIMENTS)
    assert {"mnist_shift", "mnist_shift_tiny"} <= set(EM_EXPERIMENTS)


def test_roots_are_separate():
    for stale in ("config.yaml",):  # the old single root with a `task:` key is gone
        assert not (CONF / stale).exists()
    train = _compose([])
    assert "em" not in train and "population" not in train and "sampler" not in train
    em = _compose_em([])
    assert {"em", "population", "sampler"} <= set(em)
    assert {"train", "sample", "data", "prior", "schedule", "trainer"} <= set(em)  # round 0
    assert "task" not in train and "task" not in em


@pytest.mark.parametrize("experiment", TRAIN_EXPERIMENTS)
def test_every_train_prior_experiment_composes(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"run_dir={tmp_path}"])
    _resolve(cfg)  # every interpolation resolves
    assert cfg.name == experiment  # the run folder is named after the experiment
    check_train_config(cfg)
    # the backbone is built for the data's image size (cheap: no data loaded)
    backbone = cfg.prior.backbone
    if "image_size" in backbone:
        assert backbone.image_size == cfg.data.resolution


EM_PIECES = {
    "estep": "EStep",
    "mstep": ("NetworkMStep", "GaussianMStep"),
    "monitor": "Monitor",
    "stop": "StopRule",
}


def _build_em(cfg) -> dict:
    """Builds the four EM pieces and the population of a composed em config."""
    built = {key: instantiate_checked(cfg.em[key], f"em.{key}") for key in EM_PIECES}
    for key, names in EM_PIECES.items():
        assert type(built[key]).__name__ in names, (key, type(built[key]))
    built["population"] = instantiate_checked(cfg.population, "population")
    return built


@pytest.mark.parametrize("experiment", EM_EXPERIMENTS)
def test_every_em_experiment_composes_and_builds(experiment, tmp_path):
    cfg = _compose_em(
        [
            f"experiment={experiment}",
            f"run_dir={tmp_path}",
            "population.num_obs=6",
        ]
        + (["data.source=bundled"] if _data_choice(experiment) == "mnist" else [])
    )
    _resolve(cfg)
    assert cfg.name == experiment
    assert cfg.run_dir == str(tmp_path)
    check_train_config(cfg)  # the round-0 prior is trained from data/prior/train
    built = _build_em(cfg)
    population = built["population"]
    assert len(population) == 6
    assert built["estep"].method.name == cfg.sampler.method
    # the round-0 prior is built for the population's signals
    build_denoiser(cfg, population.signal_shape)


EM_GROUPS = ("sampler", "em/estep", "em/mstep", "em/monitor", "em/stop", "population")
EM_GROUP_OPTIONS = [
    (group, option.stem) for group in EM_GROUPS for option in sorted((CONF / group).glob("*.yaml"))
]


def test_every_em_group_has_options():
    for group in EM_GROUPS:
        assert any(g == group for g, _ in EM_GROUP_OPTIONS), group
    assert ("em/mstep", "gaussian") in EM_GROUP_OPTIONS


@pytest.mark.parametrize(
    "group, option", EM_GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in EM_GROUP_OPTIONS]
)
def test_every_em_group_option_composes_and_builds(group, option, tmp_path):
    # on the root's defaults, not on an experiment's settings of the default pieces (e.g.
    # mnist_shift_tiny's em.mstep.steps, which the Gaussian M-step does not take)
    overrides = [
        "~experiment",
        "population=mnist_shift",
        f"{group}={option}",
        f"run_dir={tmp_path}",
        "population.num_obs=4",
        "data.source=bundled",
    ]
    cfg = _compose_em(overrides, return_hydra_config=True)
    assert cfg.hydra.runtime.choices[group] == option  # the option was composed, not ignored
    _resolve(cfg, [key for key in cfg if key != "hydra"])
    built = _build_em(cfg)
    assert built["estep"].method.name == cfg.sampler.method
    if group == "sampler":
        assert cfg.sampler.method == option
    if (group, option) == ("em/mstep", "gaussian"):
        from hierprior.em import GaussianMStep

        assert isinstance(built["mstep"], GaussianMStep)


def test_default_config_and_run_dir():
    cfg = _compose([])
    assert cfg.name == "default"
    assert cfg.run_dir == f"{cfg.paths.runs}/train_prior/default"  # not timestamped: resumable
    cfg = _compose(["experiment=mnist04_prior"])
    assert cfg.run_dir.endswith("runs/train_prior/mnist04_prior")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    em = _compose_em([])  # hierprior-em with no argument runs the tiny MNIST experiment
    assert em.name == "mnist_shift_tiny"
    assert em.run_dir == f"{em.paths.runs}/em/mnist_shift_tiny"


@pytest.mark.parametrize("root", ["train_prior", "em"])
def test_hydra_settings_resume_and_do_not_collide(root):
    cfg = _compose(["name=abc"], root=root, return_hydra_config=True)
    assert cfg.hydra.run.dir == cfg.run_dir
    assert cfg.run_dir.endswith(f"/{root}/abc")
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.job.name == root
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep["subdir"] == "${hydra.job.override_dirname}"  # one folder per job, by overrides


@pytest.mark.parametrize(
    "overrides",
    [["schedule=ve"], ["trainer=gpu"], ["logger=csv"], ["logger=wandb"], ["data=galaxies"]],
)
def test_group_options_compose(overrides):
    _resolve(_compose(overrides), TRAIN_SECTIONS)


def test_wandb_logger_is_offline_in_the_run_dir_and_follows_wandb_mode(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = _compose(["logger=wandb", f"run_dir={tmp_path}"])
    assert cfg.logger.wandb.mode == "offline" and cfg.logger.wandb.save_dir == str(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # what the tests use: never any network
    (logger,) = build_loggers(_compose(["logger=wandb", f"run_dir={tmp_path}"]))
    assert isinstance(logger, WandbLogger)
    assert logger._wandb_init["mode"] == "disabled"
    assert build_loggers(_compose(["logger=none"])) == []


def test_unknown_group_option_is_a_clear_error():
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="schedule"):
        _compose(["schedule=cosine"])


def test_check_overrides_names_the_choices_and_lets_the_rest_pass():
    from hierprior.config import ConfigError, check_overrides, group_choices

    with pytest.raises(ConfigError, match="unknown sampler 'nope'; choices: cla, daps, dps"):
        check_overrides(["--cfg", "job", "sampler=nope"])
    with pytest.raises(ConfigError, match="em/stop 'nope'"):
        check_overrides(["em/stop=nope"])
    with pytest.raises(ConfigError, match="sampler 'nope'"):
        check_overrides(["-m", "sampler=dps,nope"])  # a sweep is checked option by option
    check_overrides(
        [
            "--cfg",
            "job",
            "em.rounds=3",
            "sampler=dps,mmps",
            "+sampler.bogus=1",  # a value, not a group: left to the sampler's own check
            "population=null",
            "experiment=mnist_shift_tiny",
            "-m",
        ]
    )
    assert group_choices("sampler") == sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("sample.method=euler", "unknown sampler"),
        ("sample.steps=0", "sample.steps"),
        ("train.steps=0", "train.steps"),
        ("train.ema_decay=1.0", "ema_decay"),
        ("train.time_distribution=beta", "time_distribution"),
    ],
)
def test_bad_values_fail_before_training(override, message, tmp_path):
    cfg = _compose(["experiment=mnist04_prior_tiny", f"run_dir={tmp_path}", override])
    with pytest.raises(ValueError, match=message):
        fit_prior(cfg)
    assert not (tmp_path / "prior.ckpt").exists()


def test_one_trainer_vocabulary_and_old_names_are_refused(tmp_path):
    from hierprior.config import ConfigError, check_overrides
    from hierprior.em import NetworkMStep
    from hierprior.training.module import TRAINER_VOCABULARY

    cfg = _compose_em(["experiment=mnist_shift_tiny"])
    assert set(TRAINER_VOCABULARY) <= set(cfg.train) and set(TRAINER_VOCABULARY) <= set(
        cfg.em.mstep
    )
    mstep = instantiate_checked(cfg.em.mstep, "em.mstep")
    assert mstep.betas == (0.9, 0.999) and mstep.options()["betas"] == (0.9, 0.999)
    assert NetworkMStep(betas=[0.5, 0.9]).betas == (0.5, 0.9)
    with pytest.raises(ValueError, match=r"mstep betas\[1\] must be a number in \[0, 1\)"):
        NetworkMStep(betas=(0.9, 1.0))
    # an old name in a user's config file is refused in one line naming the new one, not
    # ignored (it used to be read; now nothing would read it)
    for old, new in (
        ("warmup", "warmup_steps"),
        ("grad_clip", "gradient_clip_val"),
        ("ckpt_every", "checkpoint_every"),
    ):
        bad = _compose(["experiment=mnist04_prior_tiny", f"run_dir={tmp_path}", f"+train.{old}=1"])
        with pytest.raises(ConfigError, match=f"^train.{old} was renamed train.{new}") as err:
            fit_prior(bad)
        assert "\n" not in str(err.value)
        with pytest.raises(ConfigError, match=f"^train.{old} was renamed train.{new}"):
            check_overrides([f"train.{old}=1"])
    assert not (tmp_path / "prior.ckpt").exists()


def test_missing_dataset_root_is_a_clear_error(tmp_path):
    cfg = _compose(
        [
            "experiment=mnist04_prior_tiny",
            f"run_dir={tmp_path / 'run'}",
            "data.source=torchvision",
            f"data.root={tmp_path / 'nowhere'}",
        ]
    )
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fit_prior(cfg)


def test_backbone_data_mismatch_is_a_clear_error():
    cfg = _compose(["experiment=mnist04_prior_tiny", "prior.backbone.image_size=32"])
    with pytest.raises(ValueError, match="expects samples with shape"):
        build_denoiser(cfg, (1, 16, 16))


def test_trainer_and_callbacks_follow_the_config(tmp_path):
    cfg = _compose(["experiment=mnist04_prior_tiny", "train.gradient_clip_val=0.5", *ONE_STEP])
    trainer = build_trainer(cfg, build_callbacks(cfg, tmp_path), [], tmp_path)
    assert trainer.gradient_clip_val == 0.5
    assert trainer.max_steps == 1
    assert trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")


TINY = [e for e in TRAIN_EXPERIMENTS if e.endswith("_tiny")]


@pytest.mark.parametrize("experiment", TINY)
def test_tiny_experiments_train_one_step(experiment, tmp_path):
    overrides = [f"experiment={experiment}", f"run_dir={tmp_path}", *ONE_STEP]
    if experiment.startswith("galaxy"):
        overrides.append("data.n=128")  # rendering galaxies dominates otherwise
    cfg = _compose(overrides)
    out = fit_prior(cfg)
    assert out.step == 1
    for path in (out.prior, out.config, out.loss_csv, out.loss_png, out.samples, out.last_ckpt):
        assert path.is_file(), path
    prior = load_prior(out.prior)
    assert prior.event_shape == build_datamodule(cfg).event_shape
    saved = OmegaConf.load(out.config)
    assert saved.name == experiment and saved.train.steps == 1
    meta = torch.load(out.prior, weights_only=True)["meta"]
    assert meta["step"] == 1 and meta["config"]["name"] == experiment


def _toy_overrides(run_dir: Path, steps: int) -> list[str]:
    return [
        "data=toy",
        "data.n=256",
        "prior=mlp",
        "prior.backbone.hidden=[32,32]",
        f"run_dir={run_dir}",
        *ONE_STEP,
        f"train.steps={steps}",
        "train.batch_size=64",
        "train.loss_every=2",
        "train.checkpoint_every=2",
    ]


def test_rerun_resumes_from_the_run_dir(tmp_path):
    first = fit_prior(_compose(_toy_overrides(tmp_path, 4)))
    assert first.step == 4
    weights = torch.load(first.prior, weights_only=True)["state_dict"]
    # the same command again: nothing left to train, the prior is untouched
    again = fit_prior(_compose(_toy_overrides(tmp_path, 4)))
    assert again.step == 4
    assert all(
        torch.equal(v, weights[k])
        for k, v in torch.load(again.prior, weights_only=True)["state_dict"].items()
    )
    # more steps continue from step 4, and the loss history is kept
    more = fit_prior(_compose(_toy_overrides(tmp_path, 6)))
    assert more.step == 6
    steps = [int(line.split(",")[0]) for line in more.loss_csv.read_text().splitlines()[1:]]
    assert steps == [2, 4, 6]
    assert torch.load(more.prior, weights_only=True)["meta"]["ema_updates"] == 6


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    # data order, training noise, optimiser and EMA all resume: bit-identical on CPU
    straight = fit_prior(_compose(_toy_overrides(tmp_path / "a", 6)))
    fit_prior(_compose(_toy_overrides(tmp_path / "b", 4)))
    resumed = fit_prior(_compose(_toy_overrides(tmp_path / "b", 6)))
    a = torch.load(straight.prior, weights_only=True)["state_dict"]
    b = torch.load(resumed.prior, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_split_logs_val_loss(tmp_path):
    overrides = [*_toy_overrides(tmp_path, 4), "data.val_fraction=0.25", "train.val_every=2"]
    out = fit_prior(_compose(overrides))
    rows = [line.split(",") for line in out.loss_csv.read_text().splitlines()[1:]]
    assert [(int(s), split) for s, split, _ in rows if split == "val"] == [(2, "val"), (4, "val")]
    assert all(float(v) > 0 for _, _, v in rows)


def test_sample_cli_on_a_trained_checkpoint(tmp_path):
    out = fit_prior(_compose(_toy_overrides(tmp_path, 2)))
    png = sample_main([f"ckpt={out.prior}", "n=16", "steps=4", f"out={tmp_path / 's.png'}"])
    assert png.is_file() and png.stat().st_size > 0


def test_console_script_trains(tmp_path):
    # the real entry point (hydra.main with the repo's conf/), in a subprocess
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    code = "import sys; from hierprior.cli import train_prior; sys.argv[0] = 'x'; train_prior()"
    args = [sys.executable, "-c", code, *_toy_overrides(tmp_path, 2)]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("prior.ckpt", "config.yaml", "loss.csv", "loss.png", "samples.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


TINY_EM = [e for e in EM_EXPERIMENTS if e.endswith("_tiny")]


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain nested dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_tiny_em_experiments_share_one_preset_and_repeat_none_of_it():
    preset = OmegaConf.to_container(OmegaConf.load(CONF / "preset" / "tiny_em.yaml"))
    shared = dict(_leaves(preset))
    assert TINY_EM and {"em.mstep.lr", "em.monitor.num_refs", "train.lr"} <= set(shared)
    for experiment in TINY_EM:
        file = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml"))
        assert {"/preset": "tiny_em"} in file["defaults"], experiment
        own = dict(_leaves({k: v for k, v in file.items() if k != "defaults"}))
        repeated = sorted(k for k, v in own.items() if k in shared and shared[k] == v)
        assert not repeated, (experiment, repeated)  # a value equal to the preset's: drop it
        cfg = _compose_em([f"experiment={experiment}"])
        for key, value in shared.items():  # the preset reaches the composed config
            if key not in own:
                assert OmegaConf.select(cfg, key) == value, (experiment, key)


def test_mass_map_population_grid_follows_the_data_resolution():
    cfg = _compose_em(["experiment=mass_map_tiny", "data.resolution=32"])
    assert cfg.population.kappa_size == 32 == cfg.prior.backbone.image_size
    assert _compose_em(["experiment=mass_map"]).population.kappa_size == 64
