"""Reporting of an EM run: the only place that writes its tables, figures and wandb logs.

Every round appends one row of metrics. :class:`Report` rewrites ``metrics.csv``, ``table.md``,
``metrics.png`` (every numeric metric against the round) and ``calibration.png`` (the TARP
coverage curve of each round) atomically in the run directory, and logs the row and the
round's images to wandb (offline by default, one wandb run per EM run, x-axis ``em/round``;
a resumed offline run keeps one wandb folder: see :class:`Report`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import uuid
from collections.abc import Sequence
from pathlib import Path

from hierprior.io import atomic_write_bytes, atomic_write_text, figure_bytes

__all__ = [
    "Report",
    "metrics_table",
    "plot_metrics",
    "read_loss_csv",
    "round_images",
    "write_metrics_csv",
]

LOGGERS = ("wandb", "csv", "none", None)


def _columns(metrics: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in metrics:
        columns += [k for k in row if k not in columns]
    return columns


def metrics_table(metrics: list[dict], columns: Sequence[str] | None = None) -> str:
    """Markdown table of per-round metric dicts (numbers with 4 significant digits)."""
    if not metrics:
        return ""
    columns = list(columns) if columns is not None else _columns(metrics)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in metrics:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_metrics_csv(metrics: list[dict], path: Path) -> Path:
    """One row per round, one column per metric (empty where a round lacks it)."""
    columns = _columns(metrics)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in metrics:
        writer.writerow({k: row.get(k, "") for k in columns})
    return atomic_write_text(path, buf.getvalue())


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_metrics(metrics: list[dict], path: Path) -> Path | None:
    """A PNG of every numeric metric against the EM round (p-values on a log axis)."""
    keys = [
        k for k in _columns(metrics) if k != "round" and any(_numeric(m.get(k)) for m in metrics)
    ]
    if not keys:
        return None
    ncol = 3
    nrow = int(math.ceil(len(keys) / ncol))

    def draw(fig):
        axes = fig.subplots(nrow, ncol, squeeze=False)
        for ax, key in zip(axes.flat, keys):
            pts = [(m["round"], m[key]) for m in metrics if _numeric(m.get(key))]
            ax.plot([r for r, _ in pts], [v for _, v in pts], "o-")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("EM round")
            if key.endswith("pvalue") and all(v > 0 for _, v in pts):
                ax.set_yscale("log")
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.subplots_adjust(hspace=0.7, wspace=0.35)

    return atomic_write_bytes(path, figure_bytes(draw, (4 * ncol, 2.8 * nrow), dpi=72))


def plot_calibration(run_dir: Path, rounds: Sequence[int], path: Path) -> Path | None:
    """TARP expected coverage against credibility level, one line per round with tarp.json."""
    curves = []
    for k in rounds:
        f = run_dir / f"round_{k:03d}" / "tarp.json"
        if f.exists():
            curves.append((k, json.loads(f.read_text())))
    if not curves:
        return None

    def draw(fig):
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        for k, c in curves:
            ax.plot(c["alpha"], c["ecp"], label=f"round {k}")
        ax.set_xlabel("credibility level")
        ax.set_ylabel("expected coverage (TARP)")
        ax.legend(fontsize=8)

    return atomic_write_bytes(path, figure_bytes(draw, (4.5, 4.5), dpi=72))


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def read_loss_csv(path: Path) -> list[tuple[int, float]]:
    """The (step, loss) training rows of a ``loss.csv`` (``step,split,loss``); [] when absent."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [
            (int(r["step"]), float(r["loss"]))
            for r in csv.DictReader(f)
            if r.get("split", "train") == "train"
        ]


def round_images(run_dir: Path, k: int) -> dict[str, Path]:
    """The image grids the loop wrote for round k (and, for round 0, the population's)."""
    run_dir = Path(run_dir)
    rdir = run_dir / f"round_{k:03d}"
    found = {p.stem: p for p in sorted(rdir.glob("*.png"))}
    if k == 0:
        for name in ("observations", "truth"):
            if (run_dir / f"{name}.png").exists():
                found[name] = run_dir / f"{name}.png"
    return found


class Report:
    """Writes an EM run's per-round outputs and logs them.

    Arguments:
        run_dir: the run directory.
        logger: ``"wandb"`` (one wandb run per EM run in ``run_dir/wandb``), ``"csv"`` or
            None (the CSV, table and figures are always written).
        options: wandb options: ``project``, ``entity``, ``name``, ``group``, ``job_type``
            (default ``"em"``), ``tags``, ``mode`` (offline by default) and ``config`` (what
            the wandb run stores as its config; default: the run's identity, ``config``).
        state: the run directory's state (the wandb run id is kept there, so a resumed EM run
            logs into the same wandb run).
        config: the run's identity (``em_state.json``'s config).

    One wandb run per EM run: its id is kept in ``em_state.json`` and passed with
    ``resume="allow"``. Offline, wandb writes a new ``offline-run-*`` folder per process, and
    the server keeps only one of several folders with one id; so a resumed offline run deletes
    the earlier folders of its id and logs again, from the run directory, every round already
    complete (:meth:`replay`): ``<run_dir>/wandb`` then holds one folder with the whole history.

    Logged per round, against ``em/round``: ``em/<metric>`` (the row of ``metrics.json``),
    ``time/{mstep,estep,monitor}_s`` (``round_kkk/timing.json``), ``em/mstep_loss_last`` and
    ``images/<grid>``; per M-step optimiser step, against ``mstep/step`` (counted over the
    rounds): ``mstep/loss`` (from ``round_kkk/mstep/loss.csv``) and ``mstep/round``.
    """

    def __init__(
        self,
        run_dir: Path,
        logger: str | None = "csv",
        options: dict | None = None,
        state: dict | None = None,
        config: dict | None = None,
    ):
        if logger not in LOGGERS:
            raise ValueError(f"unknown EM logger {logger!r}; expected 'wandb', 'csv' or None")
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.options = dict(options or {})
        self.state = state if state is not None else {}
        self.config = config or {}
        self.run = None
        self.replaying = False
        self._mstep_offset = 0

    def start(self) -> None:
        """Opens the wandb run (resumed when the run directory has one)."""
        if self.logger != "wandb":
            return
        import shutil

        import wandb

        run_id = self.state.setdefault("wandb_id", uuid.uuid4().hex[:8])
        if wandb.run is not None:  # e.g. the run of the round-0 prior's training
            wandb.finish()
        mode = self.options.get("mode") or "offline"
        folder = self.run_dir / "wandb"
        earlier = sorted(folder.glob(f"offline-run-*-{run_id}")) if mode == "offline" else []
        tags = [str(t)[:64] for t in self.options.get("tags") or () if str(t)]
        self.run = wandb.init(
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            mode=mode,
            project=self.options.get("project") or "hierprior",
            entity=self.options.get("entity") or None,
            name=self.options.get("name"),
            group=self.options.get("group"),
            job_type=self.options.get("job_type") or "em",
            tags=list(dict.fromkeys(tags)) or None,
            config=_jsonable(self.options.get("config") or self.config),
        )
        own = Path(str(self.run.dir)).parent.name if self.run.dir else None
        earlier = [p for p in earlier if p.name != own]
        for path in earlier:  # replaced by this folder, which replays their history
            shutil.rmtree(path, ignore_errors=True)
        self.replaying = bool(earlier)
        self.run.define_metric("em/round")
        for prefix in ("em", "time", "images"):
            self.run.define_metric(f"{prefix}/*", step_metric="em/round")
        self.run.define_metric("mstep/step")
        self.run.define_metric("mstep/*", step_metric="mstep/step")

    def round(self, metrics: list[dict], images: dict[str, Path], log_row: bool = True) -> None:
        """Rewrites the run's tables and figures with every round so far; logs the last one."""
        write_metrics_csv(metrics, self.run_dir / "metrics.csv")
        atomic_write_text(self.run_dir / "table.md", metrics_table(metrics))
        plot_metrics(metrics, self.run_dir / "metrics.png")
        rounds = [int(m["round"]) for m in metrics]
        calibration = plot_calibration(self.run_dir, rounds, self.run_dir / "calibration.png")
        if self.run is None or not log_row:
            return
        images = dict(images)
        if calibration is not None:
            images["calibration"] = calibration
        self._log(metrics[-1], images)

    def replay(self, row: dict) -> None:
        """Logs a round completed by an earlier process again (a resumed offline run: its
        earlier folders were replaced); nothing otherwise."""
        if self.run is not None and self.replaying:
            self._log(row, round_images(self.run_dir, int(row["round"])))

    def _log(self, row: dict, images: dict[str, Path]) -> None:
        import wandb

        k = int(row["round"])
        rdir = self.run_dir / f"round_{k:03d}"
        losses = read_loss_csv(rdir / "mstep" / "loss.csv")
        for step, loss in losses:
            self.run.log(
                {"mstep/step": self._mstep_offset + step, "mstep/loss": loss, "mstep/round": k}
            )
        if losses:
            self._mstep_offset += max(s for s, _ in losses)
        data = {f"em/{key}": v for key, v in row.items() if _numeric(v) and key != "round"}
        data["em/round"] = k
        if losses:
            tail = [v for _, v in losses[-max(1, len(losses) // 10) :]]
            data["em/mstep_loss_last"] = sum(tail) / len(tail)
        timing = rdir / "timing.json"
        if timing.exists():
            for key, v in json.loads(timing.read_text()).items():
                if _numeric(v):
                    data[f"time/{key}"] = v
        for name, path in images.items():
            if Path(path).exists():
                data[f"images/{name}"] = wandb.Image(str(path))
        self.run.log(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
