r"""The EM loop over rounds: a plain Python orchestrator, usable from Python and from hydra.

Monte-Carlo EM on the marginal likelihood :math:`p(\{y_i\} \mid \theta)`::

    round 0:  prior_0 = the given (misspecified) prior
    round k:  E-step  bank_k  = {x_i^(s) ~ p_{theta_{k-1}}(x | y_i)}      (estep.py)
              M-step  prior_k = refit of prior_{k-1} on bank_k           (mstep.py)
              monitor PQMass(prior_{k-1} samples, bank_k)   drift / self-consistency
                      PQMass(prior_k samples, prior_{k-1} samples)       convergence
                      PQMass(prior_k samples, truth), posterior-mean error  (when truth exists)
                      residual chi2/nu of the bank; evaluators; image grids
    stop when the drift p-value exceeds a threshold for m consecutive rounds, or after
    ``rounds`` rounds.

When the prior is right, the aggregate posterior :math:`E_y[p(x|y)]` equals the prior, so the
drift check needs no ground truth. The p-value used is PQMass's permutation p-value when
``monitor.permutations > 0`` (calibrated), else its chi2 p-value (optimistic: the stop rule then
stops late rather than early).

Run directory (the whole state of a run; rerunning the same call continues it)::

    em_state.json           config, fingerprints of population and initial prior, wandb id
    population.pt           y, truth, fingerprint
    metrics.csv, metrics.png, table.md
    round_000/prior.ckpt, prior_samples.pt, metrics.json
    round_k/bank/shard_*.pt (E-step), mstep/checkpoints/last.ckpt (M-step), prior.ckpt,
            train_state.pt, prior_samples.pt, *.png, metrics.json  (metrics.json last: the
            round's commit marker)

Seeds derive from (run seed, round, observation batch) for the E-step and (run seed, round,
purpose) elsewhere, so any round is reproducible and a resumed round equals an uninterrupted
one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hierprior.diffusion import EDMDenoiser, GaussianPrior, load_prior, sample, save_prior
from hierprior.diffusion.checkpoint import atomic_save, prior_to_dict
from hierprior.em.bank import SampleBank
from hierprior.em.estep import derive_seed, run_estep
from hierprior.em.mstep import MSTEP_DEFAULTS, run_mstep
from hierprior.em.population import Population, tensor_fingerprint
from hierprior.metrics import pqmass

__all__ = ["run_em", "EMResult", "MONITOR_DEFAULTS", "STOP_DEFAULTS", "SAMPLER_DEFAULTS"]

log = logging.getLogger(__name__)

SAMPLER_DEFAULTS = {"method": "mmps", "steps": 64}
MONITOR_DEFAULTS = {
    "num_prior_samples": 1000,
    "method": "heun",
    "steps": 32,
    "num_refs": 100,
    "re_tessellations": 50,
    "permutations": 0,
    "grid_size": 36,
}
STOP_DEFAULTS = {"pvalue": 0.05, "patience": 2, "min_rounds": 1}


@dataclass
class EMResult:
    """Outcome of :func:`run_em`.

    Attributes:
        priors: the prior of every round, prior_0 (the initial one) first.
        metrics: one dict per round (round 0 first) of the logged metrics.
        run_dir: the run directory.
        stop_reason: why the loop ended.
    """

    priors: list
    metrics: list[dict]
    run_dir: Path
    stop_reason: str = ""
    banks: list[Path] = field(default_factory=list)

    def table(self, columns: Sequence[str] | None = None) -> str:
        """The per-round metrics as a markdown table."""
        return metrics_table(self.metrics, columns)


# --------------------------------------------------------------------------------- helpers


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=_json_default))


def metrics_table(metrics: list[dict], columns: Sequence[str] | None = None) -> str:
    """Markdown table of per-round metric dicts (numbers with 4 significant digits)."""
    if not metrics:
        return ""
    if columns is None:
        columns = []
        for row in metrics:
            columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in metrics:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"the run directory {run_dir} is not writable: {err}") from err


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} (run directory) vs {b!r} (this call)")
    return out


def _prior_fingerprint(prior) -> str:
    d = prior_to_dict(prior)
    tensors = []
    for key in ("mean", "cov", "weights", "means", "covs"):
        if key in d:
            tensors.append(d[key])
    for _, v in sorted(d.get("state_dict", {}).items()):
        tensors.append(v)
    return tensor_fingerprint(*tensors)


def _is_image(event_shape: tuple[int, ...]) -> bool:
    return len(event_shape) == 3 and event_shape[0] in (1, 3)


def save_grid(
    images: Tensor,
    path: Path,
    value_range: tuple[float, float] = (-1.0, 1.0),
    nrow: int | None = None,
) -> None:
    """Writes a PNG grid of images (B, C, H, W) atomically."""
    from torchvision.utils import make_grid, save_image

    images = images.detach().float().cpu()
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    grid = make_grid(images, nrow=nrow, normalize=True, value_range=value_range, pad_value=1.0)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    save_image(grid, tmp)
    os.replace(tmp, path)


def plot_metrics(metrics: list[dict], path: Path) -> None:
    """Writes a PNG figure of every numeric metric against the EM round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        k
        for k in metrics[-1]
        if k != "round" and isinstance(metrics[-1][k], (int, float)) and not k.endswith("_chi2")
    ]  # the log p-values carry the same information
    if not keys:
        return
    ncol = 3
    nrow = int(math.ceil(len(keys) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 2.8 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        rounds = [m["round"] for m in metrics if isinstance(m.get(key), (int, float))]
        values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
        ax.plot(rounds, values, "o-")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("EM round")
        if key.endswith("log_pvalue"):
            ax.set_yscale("symlog")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.subplots_adjust(hspace=0.6, wspace=0.3)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=72)
    plt.close(fig)
    os.replace(tmp, path)


def write_metrics_csv(metrics: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in metrics:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in metrics:
        writer.writerow({k: row.get(k, "") for k in columns})
    _write_text_atomic(path, buf.getvalue())


class _Logger:
    """wandb (one run per EM run, x-axis ``em/round``) or nothing; CSV/PNG are always written."""

    def __init__(self, kind: str | None, run_dir: Path, state: dict, options: dict):
        self.run = None
        if kind in (None, "none", "csv"):
            return
        if kind != "wandb":
            raise ValueError(f"unknown EM logger {kind!r}; expected 'wandb', 'csv' or None")
        import wandb

        run_id = state.setdefault("wandb_id", uuid.uuid4().hex[:8])
        if wandb.run is not None:  # e.g. the run of the round-0 prior's training
            wandb.finish()
        self.run = wandb.init(
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=options.get("mode", "offline"),
            project=options.get("project", "hierprior"),
            name=options.get("name"),
            config=_jsonable(state.get("config", {})),
        )
        self.run.define_metric("em/round")
        self.run.define_metric("*", step_metric="em/round")

    def log(self, metrics: dict, images: dict[str, Path]) -> None:
        if self.run is None:
            return
        import wandb

        data = {
            f"em/{k}" if k != "round" else "em/round": v
            for k, v in metrics.items()
            if isinstance(v, (int, float))
        }
        for name, path in images.items():
            data[f"images/{name}"] = wandb.Image(str(path))
        self.run.log(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


# ------------------------------------------------------------------------------- the loop


def _sample_prior(prior, monitor: dict, seed: int, round_index: int, progress: bool) -> Tensor:
    g = torch.Generator(_device_of(prior)).manual_seed(derive_seed(seed, round_index, "prior"))
    if isinstance(prior, GaussianPrior):
        return prior.sample(monitor["num_prior_samples"], g)
    with torch.no_grad():
        return sample(
            prior,
            monitor["num_prior_samples"],
            method=monitor["method"],
            steps=monitor["steps"],
            generator=g,
            progress=progress,
            batch_size=monitor.get("batch_size"),
        )


def _device_of(prior) -> torch.device:
    for t in list(prior.parameters()) + list(prior.buffers()):
        return t.device
    return torch.device("cpu")


def _pq(x: Tensor, y: Tensor, monitor: dict, seed: int, round_index: int, tag: str) -> dict:
    g = torch.Generator().manual_seed(derive_seed(seed, round_index, "pqmass", tag))
    refs = min(monitor["num_refs"], max(2, (len(x) + len(y)) // 4))
    try:
        r = pqmass(
            x.float().cpu(),
            y.float().cpu(),
            num_refs=refs,
            re_tessellations=monitor["re_tessellations"],
            generator=g,
            permutations=monitor["permutations"],
        )
    except ValueError as err:  # e.g. degenerate samples: a monitor never stops the run
        log.warning("PQMass %s in round %d could not be computed: %s", tag, round_index, err)
        nan = float("nan")
        return {f"{tag}_chi2": nan, f"{tag}_log_pvalue": nan, f"{tag}_pvalue": nan}
    out = {f"{tag}_chi2": float(r.chi2), f"{tag}_log_pvalue": float(r.log_pvalue)}
    p = r.perm_pvalue if r.perm_pvalue is not None else r.pvalue
    out[f"{tag}_pvalue"] = float(p)
    return out


def _evaluate(evaluators, samples: Tensor) -> dict:
    out = {}
    for ev in evaluators or []:
        out.update({k: float(v) for k, v in ev(samples).items()})
    return out


def _stop_reason(metrics: list[dict], stop: dict) -> str | None:
    """The stop rule on the metrics history (round 0 has no drift entry)."""
    p = [m.get("drift_pvalue") for m in metrics if "drift_pvalue" in m]
    m = stop["patience"]
    if len(p) >= max(m, stop["min_rounds"]) and all(v > stop["pvalue"] for v in p[-m:]):
        return f"converged: drift p-value above {stop['pvalue']} for {m} consecutive round(s)"
    return None


def run_em(
    prior,
    population: Population,
    rounds: int = 10,
    sampler: dict | None = None,
    run_dir: str | os.PathLike | None = None,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    num_samples: int = 2,
    estep_batch_size: int = 64,
    mstep: dict | None = None,
    monitor: dict | None = None,
    stop: dict | None = None,
    evaluators: Sequence[Callable[[Tensor], dict]] | None = None,
    logger: str | None = "csv",
    logger_options: dict | None = None,
    trainer: dict | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    config: dict | None = None,
    progress: bool = False,
) -> EMResult:
    """Learns a prior from a population of corrupted observations by Monte-Carlo EM.

    Arguments:
        prior: the initial prior: a :class:`~hierprior.diffusion.GaussianPrior` (its M-step is
            ``.fit``) or a neural :class:`~hierprior.diffusion.EDMDenoiser`.
        population: the observations (:class:`~hierprior.em.Population`).
        rounds: the maximum number of EM rounds (a rerun with more rounds continues).
        sampler: the E-step sampler, ``dict(method=..., steps=..., **options)`` as taken by
            :func:`hierprior.posterior.sample_posterior`, or ``dict(method="exact")`` for a
            Gaussian prior with a linear-Gaussian model. Default ``mmps`` with 64 steps.
        run_dir: the run directory (default: a new temporary folder).
        generator: its ``initial_seed()`` is the run seed when ``seed`` is None.
        seed: the run seed (default 0 when neither is given).
        num_samples: posterior samples per observation per round.
        estep_batch_size: observations per E-step batch (one shard each).
        mstep: M-step options (see ``hierprior.em.mstep.MSTEP_DEFAULTS``).
        monitor: monitor options (``MONITOR_DEFAULTS``).
        stop: stop rule (``STOP_DEFAULTS``: p-value threshold, patience m, min_rounds).
        evaluators: callables mapping prior samples to a dict of scalar metrics.
        logger: ``"wandb"`` (offline by default, files in the run dir), ``"csv"`` or None
            (metrics.csv and metrics.png are always written).
        trainer: keyword arguments for the Lightning Trainers (accelerator, devices,
            precision, ...).
        config: extra configuration that identifies the run (e.g. the hydra config); a run
            directory made with a different one is refused.

    Returns:
        :class:`EMResult` with the prior of every round and the per-round metrics.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if num_samples < 1 or estep_batch_size < 1:
        raise ValueError("num_samples and estep_batch_size must be >= 1")
    if not isinstance(population, Population):
        raise TypeError("population must be a hierprior.em.Population")
    sampler = {**SAMPLER_DEFAULTS, **(sampler or {})}
    monitor = {**MONITOR_DEFAULTS, **(monitor or {})}
    stop = {**STOP_DEFAULTS, **(stop or {})}
    mstep = {**MSTEP_DEFAULTS, **(mstep or {})}
    for name, given, defaults in (
        ("monitor", monitor, MONITOR_DEFAULTS),
        ("stop", stop, STOP_DEFAULTS),
    ):
        unknown = set(given) - set(defaults) - {"batch_size"}
        if unknown:
            raise ValueError(
                f"unknown {name} option(s) {sorted(unknown)}; accepted: {sorted(defaults)}"
            )
    if sampler["method"] == "exact":
        if not isinstance(prior, GaussianPrior) or not population.forward.linear:
            raise ValueError("sampler method 'exact' needs a GaussianPrior and a linear forward")
    else:
        from hierprior.posterior import POSTERIOR_METHODS

        if sampler["method"] not in POSTERIOR_METHODS:
            raise ValueError(
                f"unknown sampler method {sampler['method']!r}; expected one of "
                f"{sorted(POSTERIOR_METHODS)} or 'exact'"
            )
    if not isinstance(prior, (GaussianPrior, EDMDenoiser)):
        raise TypeError(f"run_em needs a GaussianPrior or an EDMDenoiser, got {type(prior)}")
    population.check_prior(prior)
    if seed is None:
        seed = generator.initial_seed() if generator is not None else 0
    seed = int(seed)

    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="em_"))
    _check_writable(run_dir)
    identity = _jsonable(
        {
            "sampler": sampler,
            "num_samples": num_samples,
            "estep_batch_size": estep_batch_size,
            "mstep": mstep,
            "monitor": monitor,
            "seed": seed,
            "extra": config or {},
            "population": population.fingerprint(),
            "initial_prior": _prior_fingerprint(prior),
            "prior_type": type(prior).__name__,
        }
    )
    state_path = run_dir / "em_state.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        diff = _config_diff(state["config"], identity)
        if diff:
            raise ValueError(
                f"the run directory {run_dir} holds a run made with a different configuration; "
                "use another run_dir. Differences:\n  " + "\n  ".join(diff)
            )
    else:
        state = {"config": identity}
    if not (run_dir / "population.pt").exists():
        population.save(run_dir / "population.pt")
    run_logger = _Logger(logger, run_dir, state, logger_options or {})
    _write_text_atomic(state_path, json.dumps(state, indent=1, default=_json_default))

    device = _device_of(prior)
    priors = [prior]
    metrics: list[dict] = []
    banks: list[Path] = []
    raw_state = None
    stop_reason = f"reached the maximum of {rounds} round(s)"
    try:
        for k in range(rounds + 1):
            rdir = run_dir / f"round_{k:03d}"
            rdir.mkdir(exist_ok=True)
            done_file = rdir / "metrics.json"
            if done_file.exists():  # a completed round: reload it
                row = json.loads(done_file.read_text())
                if k > 0:
                    priors.append(load_prior(rdir / "prior.ckpt", map_location=device))
                    ts = rdir / "train_state.pt"
                    raw_state = torch.load(ts, weights_only=True)["raw"] if ts.exists() else None
                    banks.append(rdir / "bank")
                metrics.append(row)
                reason = _stop_reason(metrics, stop)
                if reason:
                    stop_reason = reason
                    break
                continue

            images: dict[str, Path] = {}
            row: dict = {"round": k}
            if k == 0:
                save_prior(prior, rdir / "prior.ckpt", meta={"round": 0})
                if _is_image(population.signal_shape):
                    n = min(monitor["grid_size"], len(population))
                    if tuple(population.y.shape[1:]) == population.signal_shape:
                        save_grid(population.y[:n], run_dir / "observations.png", value_range)
                        images["observations"] = run_dir / "observations.png"
                    if population.truth is not None:
                        save_grid(population.truth[:n], run_dir / "truth.png", value_range)
                        images["truth"] = run_dir / "truth.png"
            else:
                prev = priors[-1]
                bank = SampleBank(
                    rdir / "bank", len(population), num_samples, population.signal_shape
                )
                run_estep(
                    prev,
                    population,
                    bank,
                    sampler=sampler,
                    num_samples=num_samples,
                    batch_size=estep_batch_size,
                    seed=seed,
                    round_index=k,
                    trainer=trainer,
                    progress=progress,
                )
                samples = bank.load()
                banks.append(bank.path)
                if (rdir / "prior.ckpt").exists():  # M-step finished before a kill
                    new = load_prior(rdir / "prior.ckpt", map_location=device)
                    ts = rdir / "train_state.pt"
                    raw_state = torch.load(ts, weights_only=True)["raw"] if ts.exists() else None
                else:
                    new, train_state = run_mstep(
                        prev,
                        samples.to(device),
                        rdir / "mstep",
                        options=mstep,
                        seed=derive_seed(seed, k, "mstep"),
                        raw_state=raw_state,
                        trainer=trainer,
                        progress=progress,
                    )
                    if train_state is not None:
                        atomic_save(train_state, rdir / "train_state.pt")
                        raw_state = train_state["raw"]
                    save_prior(new, rdir / "prior.ckpt", meta={"round": k})
                    new = load_prior(rdir / "prior.ckpt", map_location=device)
                priors.append(new)
                prev_samples = torch.load(
                    run_dir / f"round_{k - 1:03d}" / "prior_samples.pt", weights_only=True
                )
                # one posterior sample per observation: a draw of the aggregate posterior
                row.update(_pq(prev_samples, samples[:, 0], monitor, seed, k, "drift"))
                # residual chi2/nu of the bank: ||(y - A(x)) / sigma||^2 / M, per sample
                with torch.no_grad():
                    pred = population.forward(samples.to(population.y.dtype))
                    resid = (population.y[:, None] - pred) / population.noise.std(pred)
                    chi2 = resid.pow(2).flatten(2).mean(-1)
                row["residual_chi2_nu"] = float(chi2.mean())
                if population.truth is not None:
                    post_mean = samples.mean(1).to(population.truth.dtype)
                    rmse = (post_mean - population.truth).pow(2).flatten(1).mean(1).sqrt()
                    row["posterior_mean_rmse"] = float(rmse.mean())
                if _is_image(population.signal_shape):
                    n = min(monitor["grid_size"], len(population))
                    save_grid(samples[:n, 0], rdir / "posterior_samples.png", value_range)
                    images["posterior_samples"] = rdir / "posterior_samples.png"

            cur = priors[-1]
            cur_samples = _sample_prior(cur, monitor, seed, k, progress).cpu()
            atomic_save(cur_samples, rdir / "prior_samples.pt")
            if k > 0:
                prev_samples = torch.load(
                    run_dir / f"round_{k - 1:03d}" / "prior_samples.pt", weights_only=True
                )
                row.update(_pq(cur_samples, prev_samples, monitor, seed, k, "convergence"))
            if population.truth is not None:
                truth = population.truth.reshape(len(population), *population.signal_shape)
                row.update(_pq(cur_samples, truth.cpu(), monitor, seed, k, "truth"))
            row.update(_evaluate(evaluators, cur_samples))
            if _is_image(population.signal_shape):
                save_grid(
                    cur_samples[: monitor["grid_size"]], rdir / "prior_samples.png", value_range
                )
                images["prior_samples"] = rdir / "prior_samples.png"
            metrics.append(row)
            _write_text_atomic(done_file, json.dumps(row, indent=1))  # commits the round
            write_metrics_csv(metrics, run_dir / "metrics.csv")
            _write_text_atomic(run_dir / "table.md", metrics_table(metrics))
            plot_metrics(metrics, run_dir / "metrics.png")
            run_logger.log(row, images)
            log.info("EM round %d: %s", k, {k2: v for k2, v in row.items() if k2 != "round"})
            reason = _stop_reason(metrics, stop)
            if reason:
                stop_reason = reason
                break
    finally:
        run_logger.finish()
    return EMResult(
        priors=priors, metrics=metrics, run_dir=run_dir, stop_reason=stop_reason, banks=banks
    )
