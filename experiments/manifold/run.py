"""DiEM's low-dimensional manifold experiment (Rozet et al. 2024, §5.1) with hierprior's API.

Points x on a random smooth 1-D manifold in R^5 (:class:`hierprior.populations.SmoothManifold`)
are seen only through y_i = A_i x_i + n_i, A_i two random unit rows
(``RandomProjection(2, normalize=True)``), n_i ~ N(0, 0.01^2 I). From a Gaussian fit of the
observations (closed-form Gaussian EM), a diffusion prior (an MLP with EDM preconditioning on
the paper's VE schedule) is learned by ``run_em`` with a given E-step (MMPS, ΠGDM or DPS), and
each round is measured by the debiased Sinkhorn divergence (epsilon = 1e-3) of the prior's
samples and of the bank (the aggregate posterior, DiEM's quantity) to held-out truth points
(:class:`hierprior.evaluation.SinkhornEvaluator`, a posterior evaluator of the monitor).

    python experiments/manifold/run.py --sampler mmps                # reduced size (cpu.yaml)
    python experiments/manifold/run.py --sampler pigdm
    python experiments/manifold/run.py --sampler mmps --config experiments/manifold/paper.yaml
    python experiments/manifold/run.py --oracle        # the network trained on the truths
    python experiments/manifold/run.py --sampler mmps --rounds 20    # continues a 10-round run
    python experiments/manifold/run.py --report                      # tables and figures

Every run of one configuration shares ``<root>/initial/`` (the Gaussian fit and the round-0
network, built once); each sampler runs in ``<root>/<sampler>/em`` (a hierprior run directory:
rerunning the command continues it). ``--report`` writes ``<root>/<sampler>/table.md``,
``divergence.png`` and ``scatter_<sampler>.png`` (2-D projections of prior samples per round
against the truth) into ``--figures``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hierprior.diffusion import EDMDenoiser, GaussianPrior, VESchedule, load_prior, save_prior
from hierprior.em import EStep, Monitor, NetworkMStep, StopRule, run_em
from hierprior.em.report import metrics_table
from hierprior.evaluation import SinkhornEvaluator
from hierprior.io import atomic_save, atomic_write_text
from hierprior.nn import MLP
from hierprior.physics import GaussianNoise
from hierprior.populations import RandomProjection, SmoothManifold, simulate_population
from hierprior.posterior import exact_gaussian_posterior
from hierprior.seeds import derived_generator

HERE = Path(__file__).resolve().parent
#: the stop rule's min_rounds: beyond any run's rounds (it is measured, never fires)
NEVER_STOP = 1_000_000
log = logging.getLogger("manifold")

#: the per-round columns of the tables
COLUMNS = (
    "round",
    "sinkhorn_prior",
    "sinkhorn_posterior",
    "sinkhorn_floor",
    "sinkhorn_posterior_cost",
    "sinkhorn_posterior_outside",
    "truth_chi2",
    "residual_chi2_nu",
    "tarp_atc",
    "mira_z",
)


def load_config(path: str | os.PathLike) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def build_population(cfg: dict):
    """The manifold, the population (truths kept for evaluation) and held-out truth points."""
    p = cfg["population"]
    manifold = SmoothManifold(
        features=p["features"], manifold_dim=1, alpha=p["alpha"], seed=p["manifold_seed"]
    )
    population = simulate_population(
        manifold,
        RandomProjection(p["measurements"], normalize=True),
        GaussianNoise(p["noise"]),
        num_obs=p["num_obs"],
        seed=cfg["seed"],
    )
    reference = manifold(cfg["sinkhorn"]["reference"], derived_generator(cfg["seed"], "reference"))
    return manifold, population, reference


def gaussian_fit(population, iterations: int) -> tuple[GaussianPrior, list[dict]]:
    """Closed-form Gaussian EM from N(0, I): mu' = mean m_i, Sigma' = mean (C_i + (m_i - mu')
    (m_i - mu')^T), with the exact posterior moments (m_i, C_i) of every observation."""
    d = population.signal_shape[0]
    prior = GaussianPrior(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    history = []
    for k in range(iterations):
        m, c = exact_gaussian_posterior(prior, population.forward, population.noise, population.y)
        mean = m.mean(0)
        cov = (c + (m - mean)[:, :, None] * (m - mean)[:, None, :]).mean(0)
        cov = 0.5 * (cov + cov.T)
        history.append(
            {
                "iteration": k + 1,
                "mean_change": float((mean - prior.mean).norm()),
                "cov_change": float((cov - prior.cov).norm()),
            }
        )
        prior = GaussianPrior(mean, cov)
    return prior, history


def initial_prior(cfg: dict, gauss: GaussianPrior, root: Path) -> EDMDenoiser:
    """The round-0 network: an MLP EDM denoiser trained on samples of the Gaussian fit (with
    the M-step's trainer), built once per configuration into ``root/initial``."""
    folder = root / "initial"
    identity = {k: cfg[k] for k in ("seed", "population", "gaussian_fit", "network", "initial")}
    done = folder / "prior.ckpt"
    if done.exists():
        stored = json.loads((folder / "config.json").read_text())
        if stored != identity:
            raise ValueError(f"{folder} was built with another configuration: use another root")
        return load_prior(done)
    net_cfg, init = cfg["network"], cfg["initial"]
    with torch.random.fork_rng(devices=[]):  # the weights' init, without leaking global RNG
        torch.manual_seed(cfg["seed"])
        backbone = MLP(cfg["population"]["features"], net_cfg["hidden"], net_cfg["emb_dim"])
    schedule = VESchedule(net_cfg["sigma_min"], net_cfg["sigma_max"])
    shape = (cfg["population"]["features"],)
    prior = EDMDenoiser(backbone, shape, schedule, net_cfg["sigma_data"])
    x = gauss.sample(init["samples"], derived_generator(cfg["seed"], "initial")).float()
    train = NetworkMStep(
        steps=init["steps"],
        batch_size=init["batch_size"],
        lr=init["lr"],
        ema_decay=init["ema_decay"],
        checkpoint_every=max(1, init["steps"] // 4),
        trainer=trainer_options(cfg, precision=True),
    )
    prior, _ = train(prior.to(cfg["device"]), x[:, None].to(cfg["device"]), folder / "train",
                     seed=cfg["seed"], round_index=0)  # fmt: skip
    save_prior(prior, done, meta={"gaussian_fit": True})
    atomic_write_text(folder / "config.json", json.dumps(identity, indent=1))
    return load_prior(done)


def trainer_options(cfg: dict, precision: bool = False) -> dict:
    options = {"accelerator": "gpu" if cfg["device"] == "cuda" else "cpu", "devices": 1}
    if precision:
        options["precision"] = "32-true"
    return options


def run(cfg: dict, sampler: str, root: Path) -> dict:
    """Runs (or continues) EM with one E-step method; returns the run's summary."""
    torch.set_num_threads(cfg["threads"])
    start, load_start = time.perf_counter(), os.getloadavg()
    _, population, reference = build_population(cfg)
    folder = root / "initial"
    folder.mkdir(parents=True, exist_ok=True)
    gauss, history = gaussian_fit(population, cfg["gaussian_fit"]["iterations"])
    atomic_write_text(folder / "gaussian_fit.json", json.dumps(history, indent=1))
    prior = initial_prior(cfg, gauss, root)
    setup_s = time.perf_counter() - start
    em, s = cfg["em"], cfg["sinkhorn"]
    evaluator = SinkhornEvaluator(
        reference,
        epsilon=s["epsilon"],
        num_points=s["num_points"],
        transport_cost=True,
        support=tuple(s["support"]),
        tol=s["tol"],
    )
    mon = cfg["monitor"]
    result = run_em(
        prior.to(cfg["device"]),
        population.to(cfg["device"]),
        estep=EStep(
            cfg["samplers"][sampler],
            num_samples=em["num_samples"],
            batch_size=em["estep_batch_size"],
            trainer=trainer_options(cfg),
        ),
        mstep=NetworkMStep(**cfg["mstep"], trainer=trainer_options(cfg, precision=True)),
        monitor=Monitor(
            num_prior_samples=mon["num_prior_samples"],
            method=mon["method"],
            steps=mon["steps"],
            tarp_observations=mon["tarp_observations"],
            tarp_samples=mon["tarp_samples"],
            permutations=mon["permutations"],
            posterior_evaluators=[evaluator],
        ),
        # DiEM runs a fixed number of rounds: the rule is measured (stop_pvalue), never fires;
        # its options do not depend on ``rounds``, so a rerun with more rounds continues the run
        stop=StopRule(min_rounds=NEVER_STOP, num_refs=50, re_tessellations=10, permutations=499),
        run_dir=root / sampler / "em",
        seed=cfg["seed"],
        rounds=em["rounds"],
        config={"experiment": "manifold", "sinkhorn": s, "gaussian_fit": cfg["gaussian_fit"]},
    )
    summary = {
        "sampler": sampler,
        "options": cfg["samplers"][sampler],
        "wall_s": round(time.perf_counter() - start, 1),
        "setup_s": round(setup_s, 1),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "threads": cfg["threads"],
        "gaussian_fit": {"mean": gauss.mean.tolist(), "cov": gauss.cov.tolist()},
    }
    atomic_write_text(root / sampler / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(root / sampler / "table.md", result.table(COLUMNS))
    return summary


def oracle(cfg: dict, root: Path) -> dict:
    """The yardstick of what the network and budget can hold: the round-0 network trained
    directly on the population's truths (``rounds`` x the M-step's steps, same optimiser), its
    samples (the monitor's sampler) measured like the EM priors; also the exact Gaussian fit
    (the EM's starting point) measured the same way. Written to ``root/oracle/summary.json``."""
    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    _, population, reference = build_population(cfg)
    gauss, _ = gaussian_fit(population, cfg["gaussian_fit"]["iterations"])
    prior = initial_prior(cfg, gauss, root)
    s, mon = cfg["sinkhorn"], cfg["monitor"]
    steps = cfg["em"]["rounds"] * cfg["mstep"]["steps"]
    train = NetworkMStep(
        **{**cfg["mstep"], "steps": steps}, trainer=trainer_options(cfg, precision=True)
    )
    truths = population.truth[:, None].to(cfg["device"])
    fitted, _ = train(prior.to(cfg["device"]), truths, root / "oracle" / "train",
                      seed=cfg["seed"], round_index=1)  # fmt: skip
    monitor = Monitor(num_prior_samples=mon["num_prior_samples"], method=mon["method"],
                      steps=mon["steps"])  # fmt: skip
    evaluator = SinkhornEvaluator(
        reference,
        epsilon=s["epsilon"],
        num_points=s["num_points"],
        posterior=False,
        transport_cost=True,
        support=tuple(s["support"]),
        tol=s["tol"],
    )
    out = {"train_steps": steps}
    for name, model in (("oracle", fitted), ("gaussian_fit", gauss)):
        x = monitor.prior_samples(model, seed=cfg["seed"], round_index=0).float()
        out[name] = evaluator(prior_samples=x)
        atomic_save(x, root / "oracle" / f"{name}_samples.pt")
    out["wall_s"] = round(time.perf_counter() - start, 1)
    atomic_write_text(root / "oracle" / "summary.json", json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------ report


def read_metrics(run_dir: Path) -> list[dict]:
    rounds = sorted(run_dir.glob("round_*/metrics.json"))
    return [json.loads(p.read_text()) for p in rounds]


def plot_divergence(runs: dict[str, list[dict]], path: Path, marks: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    floor = None
    for i, (name, rows) in enumerate(sorted(runs.items())):
        k = [r["round"] for r in rows]
        color = f"C{i}"
        ax.plot(k, [r["sinkhorn_prior"] for r in rows], "o-", color=color, label=f"{name}: prior")
        ax.plot(k, [r["sinkhorn_posterior"] for r in rows], "s--", color=color,
                label=f"{name}: aggregate posterior (bank)")  # fmt: skip
        floor = rows[0].get("sinkhorn_floor", floor)
    if floor is not None:
        ax.axhline(floor, color="k", lw=0.8, ls=":", label="truth vs truth (floor)")
    for i, (name, value) in enumerate((marks or {}).items()):
        ax.axhline(value, color=f"C{len(runs) + i}", lw=0.8, ls="-.", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("EM round k")
    ax.set_ylabel(r"Sinkhorn divergence $S_\varepsilon$ to the truth ($\varepsilon=10^{-3}$)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_scatter(run_dir: Path, reference: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(run_dir.glob("round_*/prior_samples.pt"))
    last = len(files) - 1
    picks = sorted({k for k in (0, 1, 2, 4, last // 2, last) if 0 <= k <= last})
    cols = [(f"round {k}", torch.load(files[k], weights_only=True)) for k in picks]
    cols.append(("truth (held out)", reference[: len(cols[0][1])]))
    pairs = ((0, 1), (1, 2), (2, 3), (3, 4))
    fig, axes = plt.subplots(len(pairs), len(cols), figsize=(1.8 * len(cols), 1.8 * len(pairs)),
                             sharex=True, sharey=True, squeeze=False)  # fmt: skip
    for j, (name, x) in enumerate(cols):
        for i, (a, b) in enumerate(pairs):
            ax = axes[i][j]
            color = "k" if j == len(cols) - 1 else "C0"
            ax.scatter(x[:, a], x[:, b], s=0.5, alpha=0.4, color=color)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"$x_{b}$ vs $x_{a}$", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(cfg: dict, root: Path, figures: Path) -> None:
    figures.mkdir(parents=True, exist_ok=True)
    _, _, reference = build_population(cfg)
    runs = {}
    for run_dir in sorted(root.glob("*/em")):
        name = run_dir.parent.name
        rows = read_metrics(run_dir)
        if not rows:
            continue
        runs[name] = rows
        title = f"{name}: prior samples per EM round (2-D projections) and the truth"
        plot_scatter(run_dir, reference, figures / f"scatter_{name}.png", title)
        table = metrics_table(rows, COLUMNS)
        atomic_write_text(root / name / "table.md", table)
        print(f"## {name}\n{table}")
        timing = [json.loads(t.read_text()) for t in sorted(run_dir.glob("round_*/timing.json"))]
        phases = ("mstep_s", "estep_s", "monitor_s")
        total = {key: round(sum(t.get(key, 0.0) for t in timing), 1) for key in phases}
        print("time per phase (s):", total)
    marks = {}
    summary = root / "oracle" / "summary.json"
    if summary.exists():
        o = json.loads(summary.read_text())
        marks["Gaussian fit (exact samples)"] = o["gaussian_fit"]["sinkhorn_prior"]
        marks["network trained on the truths"] = o["oracle"]["sinkhorn_prior"]
        print("oracle:", o)
    if runs:
        plot_divergence(runs, figures / "divergence.png", marks)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "cpu.yaml"))
    parser.add_argument("--sampler", default="mmps", help="a key of the config's samplers")
    parser.add_argument("--root", default=None, help="default runs/manifold/<config name>")
    parser.add_argument("--report", action="store_true", help="tables and figures only")
    parser.add_argument(
        "--oracle", action="store_true", help="the network trained on the truths (yardstick)"
    )
    parser.add_argument("--figures", default=str(HERE), help="where --report writes figures")
    parser.add_argument(
        "--rounds", type=int, default=None, help="overrides em.rounds (more rounds continue a run)"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds must be >= 1, got {args.rounds}")
        cfg["em"]["rounds"] = args.rounds
    if args.sampler not in cfg["samplers"]:
        parser.error(f"unknown sampler {args.sampler!r}; the config has {list(cfg['samplers'])}")
    root = Path(args.root or Path("runs/manifold") / Path(args.config).stem)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.report:
        report(cfg, root, Path(args.figures))
        return
    if args.oracle:
        print(json.dumps(oracle(cfg, root), indent=1))
        return
    summary = run(cfg, args.sampler, root)
    print(json.dumps({k: v for k, v in summary.items() if k != "gaussian_fit"}, indent=1))
    print((root / args.sampler / "table.md").read_text())


if __name__ == "__main__":
    main()
