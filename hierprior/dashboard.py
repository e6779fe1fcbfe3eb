"""``hierprior-dashboard``: a saved wandb workspace with the panels of EM runs.

::

    hierprior-dashboard --entity E --project P [--group G] [--name N]   # saves it (network)
    hierprior-dashboard --entity E --project P --group G --dry-run       # prints the definition
    hierprior-dashboard ... --dry-run --out workspace.json               # writes it

The workspace (built with the ``wandb-workspaces`` package: ``pip install
'hierprior[dashboard]'``) shows, against ``em/round`` (the x-axis every EM run logs its rounds
on): the evaluators' shares (``em/share_*``), the PQMass p-values and statistics
(``em/*_pvalue``, ``em/*_chi2``), the residuals (``em/residual_chi2_nu*``), the posterior
calibration (``em/tarp_*``, ``em/mira_*``), the wall times of the E-step, M-step and monitor
(``time/*``); the M-step loss curve against ``mstep/step`` (the optimiser steps of every
round, one after the other); and the image grids (``images/*``). ``--group`` keeps the runs
of one EM run or sweep (wandb ``group``: the run directory's name, or the sweep's); the EM
loops only (``job_type: em``) unless ``--with-priors``.

``--dry-run`` builds the definition without network access and prints it as JSON (or writes
it to ``--out``); without it, the workspace is saved to the wandb server (``wandb login``
first) and its URL printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["EM_PANELS", "IMAGE_KEYS", "em_workspace", "main", "workspace_definition"]

#: (title, metric regex or list of keys, log y-axis) of the line plots against em/round
EM_PANELS: tuple[tuple[str, str | list[str], bool], ...] = (
    ("share of the evaluators' classes", "em/share.*", False),
    ("PQMass p-values", "em/.*_pvalue", True),
    ("PQMass chi2", "em/.*_chi2", False),
    ("residuals: reduced chi2", "em/residual_chi2_nu.*", False),
    ("posterior calibration (TARP, MIRA)", "em/(tarp|mira)_.*", False),
    ("posterior mean RMSE", ["em/posterior_mean_rmse"], False),
    ("stop rule", ["em/stop_pvalue"], True),
    ("M-step loss (last 10% of its steps)", ["em/mstep_loss_last"], True),
)
TIME_KEYS = ["time/mstep_s", "time/estep_s", "time/monitor_s"]
#: the image grids the EM loop logs (``images/<name>``)
IMAGE_KEYS = [
    "images/prior_samples",
    "images/posterior_samples",
    "images/calibration",
    "images/observations",
    "images/truth",
]


def _modules():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as err:
        raise SystemExit(
            "hierprior-dashboard: needs the wandb-workspaces package: "
            f"pip install 'hierprior[dashboard]' ({err})"
        ) from None
    return ws, wr, expr


def _line(wr, title: str, y: str | list[str], log_y: bool, x: str = "em/round"):
    if isinstance(y, str):
        return wr.LinePlot(title=title, x=x, metric_regex=y, log_y=log_y or None)
    return wr.LinePlot(title=title, x=x, y=list(y), log_y=log_y or None)


def em_workspace(
    entity: str,
    project: str,
    group: str | None = None,
    name: str | None = None,
    with_priors: bool = False,
):
    """The ``wandb_workspaces.workspaces.Workspace`` of EM runs (built offline; ``.save()``
    uploads it)."""
    ws, wr, expr = _modules()
    if not entity or not project:
        raise ValueError("the dashboard needs an entity and a project")
    filters = []
    if group:
        filters.append(expr.Metric("Group") == group)
    if not with_priors:
        filters.append(expr.Metric("JobType") == "em")
    sections = [
        ws.Section(
            name="EM rounds",
            is_open=True,
            panels=[_line(wr, *panel) for panel in EM_PANELS],
        ),
        ws.Section(
            name="Wall times",
            is_open=True,
            panels=[_line(wr, "E-step, M-step and monitor wall time (s)", TIME_KEYS, False)],
        ),
        ws.Section(
            name="M-step loss",
            is_open=True,
            panels=[
                _line(wr, "M-step loss per optimiser step", ["mstep/loss"], True, "mstep/step")
            ],
        ),
        ws.Section(
            name="Images",
            is_open=True,
            panels=[
                wr.MediaBrowser(title=key.split("/", 1)[1], media_keys=[key], num_columns=1)
                for key in IMAGE_KEYS
            ],
        ),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name or (f"EM {group}" if group else "EM runs"),
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis="em/round"),
        runset_settings=ws.RunsetSettings(filters=filters, groupby=[expr.Metric("Group")]),
    )


def workspace_definition(workspace) -> dict:
    """The workspace's definition as the wandb server receives it (plain JSON types)."""
    return workspace._to_model().model_dump(mode="json", by_alias=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierprior-dashboard",
        description="Create a wandb workspace with the panels of hierprior EM runs.",
    )
    parser.add_argument("--entity", required=True, help="wandb entity (user or team)")
    parser.add_argument("--project", required=True, help="wandb project (logger.wandb.project)")
    parser.add_argument("--group", help="only this EM run or sweep (its wandb group)")
    parser.add_argument("--name", help="the workspace's name (default: 'EM <group>')")
    parser.add_argument(
        "--with-priors", action="store_true", help="also show the round-0 priors' runs"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build the definition offline and print it (or write it to --out); save nothing",
    )
    parser.add_argument("--out", help="with --dry-run: write the definition (JSON) here")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``hierprior-dashboard`` (see the module doc)."""
    args = _parser().parse_args(argv)
    try:
        workspace = em_workspace(
            args.entity, args.project, args.group, args.name, args.with_priors
        )
        definition = workspace_definition(workspace)
    except ValueError as err:
        print(f"hierprior-dashboard: {str(err).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.dry_run:
        text = json.dumps(definition, indent=1)
        if args.out:
            Path(args.out).write_text(text)
            print(f"workspace definition written to {args.out}")
        else:
            print(text)
        return
    if args.out:
        print("hierprior-dashboard: --out needs --dry-run", file=sys.stderr)
        raise SystemExit(2)
    try:
        workspace.save()
    except Exception as err:  # network, login or permission errors of the wandb API
        print(
            f"hierprior-dashboard: could not save the workspace to {args.entity}/"
            f"{args.project}: {type(err).__name__}: {str(err).splitlines()[0][:200]} "
            "(wandb login? --dry-run builds it offline)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    print(f"workspace saved: {workspace.url}")


if __name__ == "__main__":  # pragma: no cover
    main()
