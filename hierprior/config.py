r"""The hydra config tree and the command-line apps built on it.

The configs live in ``conf/`` at the top of the repository and ship inside the installed
package as ``hierprior/conf`` (``pip install .`` maps one onto the other), so the console
scripts find them either way: :data:`CONF_DIR`. There is one root config per command:
``conf/train_prior.yaml`` (``hierprior-train-prior``) and ``conf/em.yaml`` (``hierprior-em``),
both built on ``conf/base.yaml``.

:func:`run_app` runs a command: it checks group choices in the arguments first (an unknown
``sampler=nope`` fails in one line naming the choices, before hydra starts), then runs the
command's task under ``hydra.main``; a :class:`ConfigError` (a bad value, caught before any
training) or a missing file ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hierprior.checks import check_int

__all__ = [
    "CONF_DIR",
    "RENAMED_KEYS",
    "ConfigError",
    "check_em_section",
    "check_overrides",
    "check_renamed",
    "first_line",
    "group_choices",
    "instantiate_checked",
    "run_app",
]


def _find_conf_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):  # installed wheel, then checkout
        if (candidate / "em.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"hierprior's configs are missing: neither {here / 'conf'} nor {here.parent / 'conf'} "
        "holds em.yaml; reinstall the package"
    )


#: absolute path of the config tree (hydra needs an absolute one: a relative one would be
#: looked up as a Python package)
CONF_DIR = str(_find_conf_dir())


class ConfigError(ValueError):
    """A configuration value that cannot work, found before any training (one-line message)."""


#: config keys that were renamed: the round-0 prior's ``train`` section uses the M-step's names
#: (one trainer vocabulary); an old name is refused in one line naming the new one
RENAMED_KEYS = {
    "train.warmup": "train.warmup_steps",
    "train.grad_clip": "train.gradient_clip_val",
    "train.ckpt_every": "train.checkpoint_every",
}


def check_renamed(cfg) -> None:
    """Raises a ConfigError naming the new key when the config holds a renamed one
    (:data:`RENAMED_KEYS`, e.g. from a user's own experiment file)."""
    for old, new in RENAMED_KEYS.items():
        section, key = old.split(".")
        node = cfg.get(section)
        if node is not None and key in node:
            raise ConfigError(f"{old} was renamed {new}; rename it in your config")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its repr when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def group_choices(group: str) -> list[str]:
    """The options of a config group (e.g. ``"sampler"`` or ``"em/stop"``), sorted."""
    folder = Path(CONF_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _is_group(key: str) -> bool:
    return (Path(CONF_DIR) / key).is_dir()


def check_overrides(argv: Sequence[str]) -> None:
    """Raises a ConfigError for a ``group=option`` argument whose option does not exist.

    Hydra flags (``--cfg job``, ``-m``, ...) and value overrides (``em.rounds=3``) pass; sweeps
    (``sampler=mmps,dps``) are checked option by option.
    """
    for token in argv:
        if token.startswith("-") or "=" not in token:
            continue
        key, value = token.split("=", 1)
        key = key.lstrip("+~")
        if key in RENAMED_KEYS:
            raise ConfigError(f"{key} was renamed {RENAMED_KEYS[key]}")
        if not _is_group(key) or value in ("", "null"):
            continue
        choices = group_choices(key)
        for option in value.split(","):
            if option not in choices:
                raise ConfigError(f"unknown {key} {option!r}; choices: {', '.join(choices)}")


def instantiate_checked(node, key: str):
    """Instantiates a ``_target_`` config node; its constructor's error becomes a ConfigError.

    The message names the config key, e.g. ``em.mstep: mstep steps must be an integer >= 1,
    got 0``, in one line (hydra's wrapping and traceback dropped).
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, FileNotFoundError):
            raise cause from None
        raise ConfigError(f"{key}: {first_line(cause)}") from cause
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}: {first_line(err)}") from err


def check_em_section(cfg) -> None:
    """Raises a ConfigError naming the key for a bad value of the ``em`` section.

    A missing ``em.initial_prior`` file is a FileNotFoundError, a config without a population
    (a train-prior experiment) a ConfigError. It lives here, not in :mod:`hierprior.em`, so
    that ``hierprior-em`` runs it before torch and Lightning are imported (a second, not ten).
    """
    em = cfg.get("em")
    if em is None:
        raise ConfigError("the config has no `em` section")
    allowed = {"rounds", "initial_prior", "oracle", "estep", "mstep", "monitor", "stop"}
    unknown = sorted(set(em) - allowed)
    if unknown:
        raise ConfigError(f"unknown em key(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        check_int(em.get("rounds"), "em.rounds", 0)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(em.get("oracle", False), bool):
        raise ConfigError(f"em.oracle must be true or false, got {em.get('oracle')!r}")
    path = em.get("initial_prior")
    if path is not None and not Path(str(path)).is_file():
        raise FileNotFoundError(f"em.initial_prior: no prior checkpoint at {path}")
    if cfg.get("population") is None:
        raise ConfigError(
            "the config has no population: run an EM experiment (e.g. "
            "experiment=mnist_shift_tiny) or choose one with population=<name>"
        )


def run_app(prog: str, config_name: str, task: Callable) -> None:
    """Runs ``task(cfg)`` as a hydra app on ``conf/<config_name>.yaml`` (see the module doc)."""
    import hydra
    from omegaconf import DictConfig

    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(2)

    def main(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except (ConfigError, FileNotFoundError) as err:
            print(f"{prog}: {err}", file=sys.stderr)
            sys.exit(2)

    hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(main)()
