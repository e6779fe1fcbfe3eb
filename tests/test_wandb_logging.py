"""wandb logging of EM runs (offline, no network): one wandb run per EM run with its group,
job type, tags and full config, the M-step loss curve and the wall times per round; a resumed
run keeps one offline folder holding the whole history; the dashboard's definition; the
`progress` key and the silenced Lightning lines."""

from __future__ import annotations

import csv
import json
import logging
import struct
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from test_em_experiment import SHORT

from hierprior.config import CONF_DIR, ConfigError
from hierprior.em.cli import _set_progress, run_from_config
from hierprior.training.callbacks import progress_enabled, quiet_lightning

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:no MNIST under root"),
]

# the SHORT experiment without its metrics (the logging is what is tested here)
FAST = [o for o in SHORT if not o.startswith(("logger=", "em.rounds=", "em.stop."))] + [
    "logger=wandb",
    "logger.wandb.mode=offline",
    "em.monitor.permutations=0",
    "em.monitor.tarp_observations=0",
    "em.stop.min_rounds=2",
    "em.stop.num_refs=4",
    "em.stop.re_tessellations=3",
    "em.stop.level=0.5",
    "em.stop.permutations=20",
]


# ------------------------------------------------------------------ offline run files


def _records(path: Path) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb`` (a LevelDB-style log:
    a 7-byte file header, then 32 KiB blocks of chunks with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf, chunks = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            chunks.append(buf + chunk)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _offline_run(folder: Path) -> dict:
    """The run record, config and history rows of the one offline run in ``folder`` (waits
    for wandb's service, which writes the file after ``finish()`` returns, to end it)."""
    runs = sorted(folder.glob("offline-run-*"))
    assert len(runs) == 1, [p.name for p in runs]
    (log,) = runs[0].glob("run-*.wandb")
    deadline = time.monotonic() + 60
    while True:
        records = _records(log)
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        assert time.monotonic() < deadline, f"{log} has no exit record"
        time.sleep(0.2)
    out: dict = {"folder": runs[0], "config": {}, "history": []}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            out["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
    return out


def _compose(tmp_path: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "em",
            FAST + [f"run_dir={tmp_path / 'run'}", f"paths.priors={tmp_path / 'priors'}", *extra],
        )
    return cfg


def _rows(history: list[dict], key: str) -> list[dict]:
    return [row for row in history if key in row]


def _has(row: dict, key: str) -> bool:
    """Whether a history row logged key (an image is flattened into ``key/path``, ...)."""
    return any(k == key or k.startswith(f"{key}/") for k in row)


# ------------------------------------------------------------------ the EM run


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_em_run_logs_one_wandb_run_and_a_rerun_keeps_one_complete_history(
    tmp_path, offline, one_thread
):
    run_dir = tmp_path / "run"
    # a first job that ends after round 0 (as a killed one would), then a rerun with a round more
    run_from_config(_compose(tmp_path, "em.rounds=0"))
    first = _offline_run(run_dir / "wandb")
    state = json.loads((run_dir / "em_state.json").read_text())
    assert first["run"].run_id == state["wandb_id"]
    assert [json.loads(r["em/round"]) for r in _rows(first["history"], "em/round")] == [0]

    result = run_from_config(_compose(tmp_path, "em.rounds=1"))
    assert [m["round"] for m in result.metrics] == [0, 1]
    logged = _offline_run(run_dir / "wandb")  # still ONE offline folder, with the same id
    run = logged["run"]
    assert run.run_id == state["wandb_id"]
    assert run.run_group == "run" and run.job_type == "em" and run.display_name == "run"
    assert {"mnist_shift_tiny", "sampler=mmps"} <= set(run.tags)
    config = logged["config"]  # the full resolved config, not only the population
    assert {"em", "population", "sampler", "train", "prior", "data", "seed"} <= set(config)
    assert config["em"]["mstep"]["steps"] == 3 and config["sampler"]["method"] == "mmps"

    history = logged["history"]
    rounds = _rows(history, "em/round")
    assert [json.loads(r["em/round"]) for r in rounds] == [0, 1]  # round 0 replayed, then 1
    for row in rounds:
        assert "time/estep_s" in row and "time/monitor_s" in row
        assert _has(row, "images/prior_samples") and _has(row, "images/posterior_samples")
        assert "em/residual_chi2_nu" in row
    assert "time/mstep_s" in rounds[1] and "em/mstep_loss_last" in rounds[1]
    assert _has(rounds[0], "images/observations") and _has(rounds[0], "images/truth")
    # the M-step loss of every step: in the round's folder and in wandb, on mstep/step
    loss_csv = run_dir / "round_001" / "mstep" / "loss.csv"
    saved = list(csv.DictReader(open(loss_csv)))
    assert [int(r["step"]) for r in saved] == [1, 2, 3]
    assert (run_dir / "round_001" / "mstep" / "loss.png").exists()
    losses = _rows(history, "mstep/loss")
    assert [json.loads(r["mstep/step"]) for r in losses] == [1, 2, 3]
    assert [json.loads(r["mstep/loss"]) for r in losses] == pytest.approx(
        [float(r["loss"]) for r in saved], rel=1e-5
    )
    timing = json.loads((run_dir / "round_001" / "timing.json").read_text())
    assert set(timing) == {"mstep_s", "estep_s", "monitor_s"}
    assert all(v >= 0 for v in timing.values())

    # the round-0 prior's training: its own run, in the EM run's group, job_type prior
    (prior_dir,) = [
        p
        for p in (tmp_path / "priors").iterdir()
        if p.is_dir() and not p.name.startswith("oracle-")
    ]
    prior = _offline_run(prior_dir / "wandb")
    assert prior["run"].run_group == "run" and prior["run"].job_type == "prior"
    assert prior["run"].display_name == "run/prior" != run.display_name
    assert "train" in prior["config"] and "population" in prior["config"]

    # a rerun of the finished run: still one folder, the same complete history
    run_from_config(_compose(tmp_path, "em.rounds=1"))
    again = _offline_run(run_dir / "wandb")
    assert again["folder"] != logged["folder"]
    assert [json.loads(r["em/round"]) for r in _rows(again["history"], "em/round")] == [0, 1]
    assert len(_rows(again["history"], "mstep/loss")) == 3


def test_multirun_jobs_get_distinct_names_in_the_sweeps_group(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from hierprior.em.cli import wandb_identity

    cfg = _compose(tmp_path)
    assert wandb_identity(cfg, tmp_path / "run")["group"] == "run"
    sweep = tmp_path / "mnist_shift_tiny" / "multirun"
    fake = OmegaConf.create(
        {
            "mode": RunMode.MULTIRUN,
            "sweep": {"dir": str(sweep)},
            "runtime": {"choices": {"experiment": "mnist_shift_tiny", "sampler": "dps"}},
        }
    )
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: fake))
    a = wandb_identity(cfg, sweep / "sampler=dps")
    b = wandb_identity(cfg, sweep / "sampler=mmps")
    assert a["group"] == b["group"] == "mnist_shift_tiny"
    assert a["name"] == "mnist_shift_tiny:sampler=dps" != b["name"]
    assert "mnist_shift_tiny" in a["tags"]


# ------------------------------------------------------------------ dashboard


def test_dashboard_definition_builds_offline(tmp_path, capsys):
    pytest.importorskip("wandb_workspaces")
    from hierprior.dashboard import IMAGE_KEYS, em_workspace, main, workspace_definition

    definition = workspace_definition(em_workspace("me", "hierprior", group="mnist_shift_tiny"))
    text = json.dumps(definition)
    assert definition["entity"] == "me" and definition["project"] == "hierprior"
    assert definition["displayName"] == "EM mnist_shift_tiny"
    for key in ("em/round", "em/.*_pvalue", "em/share.*", "em/residual_chi2_nu.*"):
        assert key in text, key
    for key in IMAGE_KEYS + ["mstep/loss", "mstep/step", "time/estep_s", "time/mstep_s"]:
        assert key in text, key
    filters = json.dumps(definition["spec"]["section"]["runSets"][0]["filters"])
    assert '"name": "group"}, "op": "=", "value": "mnist_shift_tiny"' in filters
    assert '"name": "jobType"}, "op": "=", "value": "em"' in filters

    out = tmp_path / "ws.json"
    main(["--entity", "me", "--project", "p", "--group", "g", "--dry-run", "--out", str(out)])
    assert json.loads(out.read_text())["displayName"] == "EM g"
    assert "written to" in capsys.readouterr().out
    main(["--entity", "me", "--project", "p", "--dry-run"])
    assert json.loads(capsys.readouterr().out)["project"] == "p"


# ------------------------------------------------------------------ progress and log lines


def test_progress_key_is_accepted_and_auto_follows_the_terminal(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    for value, expected in (("true", True), ("false", False)):
        cfg = _compose(tmp_path, f"progress={value}")  # no `+`: the key exists
        assert cfg.progress is expected
        pieces = {k: instantiate(cfg.em[k]) for k in ("estep", "mstep", "monitor")}
        _set_progress(cfg, pieces)
        assert all(p.progress is expected for p in pieces.values())
    cfg = _compose(tmp_path, "progress=maybe")
    with pytest.raises(ConfigError, match="progress"):
        _set_progress(cfg, {})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert compose("train_prior", ["progress=true"]).progress is True

    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("sys.stderr", Tty())
    assert progress_enabled(None) is True and progress_enabled("auto") is True
    monkeypatch.setenv("CI", "true")
    assert progress_enabled(None) is False and progress_enabled(True) is True
    with open_dict(cfg):
        cfg.progress = None
    pieces = {"mstep": instantiate(cfg.em.mstep)}
    _set_progress(cfg, pieces)
    assert pieces["mstep"].progress is False


def test_lightning_tips_are_silenced_and_accelerator_lines_said_once(caplog):
    import pytorch_lightning as pl

    quiet_lightning()
    quiet_lightning()  # idempotent
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    text = caplog.text
    assert "Tip:" not in text and "litlogger" not in text
    assert text.count("GPU available") <= 1 and text.count("TPU available") <= 1
