r"""Calibration study of the E-step: every posterior method scored by TARP and MIRA.

Two parts:

- **gaussian**: the linear-Gaussian problems of the sampler study (``experiments/samplers``:
  y = A x + n, dense random A with entries N(0, 1/D), sigma_y = 0.1, a random Gaussian prior),
  with N observations whose truths are drawn from the prior, so the exact posterior is known
  and exact samples give the null rows. Every method of ``hierprior.posterior`` draws S
  samples per observation with its default time grid.
- **mnist**: the observations of the MNIST shift demo (``hierprior-em`` with no arguments:
  digits 5-9 through random masks hiding 60% of the pixels, sigma 0.25), posterior samples of
  the first N observations under the round-0 prior (digits 0-4: misspecified) and the last
  round's prior of an EM run directory (``--run``). Here nothing is exact: the score mixes the
  sampler's error and the prior's.

Scores (both compare S posterior samples per observation with its one truth):

- TARP (``hierprior.metrics.tarp``): ``atc`` (signed area between the expected-coverage curve
  and the diagonal; > 0 under-confident, < 0 over-confident or biased) with its bootstrap
  standard deviation over observations (100 replicates), and ``ks`` (max |ECP - alpha|);
- MIRA (``hierprior.metrics.mira``, 100 random regions per observation): the score, its value
  for a correct posterior and z = (score - expected)/std (below -3 over-confident or biased,
  above +3 under-confident).

Usage::

    python experiments/calibration/run.py --parts gaussian           # ~3 min, 1 thread
    python experiments/calibration/run.py --parts mnist --run runs/em/mnist_shift_tiny

Tables are printed and written into ``experiments/calibration/README.md`` between the
``<!-- generated: PART -->`` and ``<!-- end: PART -->`` markers. Everything is seeded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "samplers"))

from run_study import gaussian_problem, markdown_table, method_list, write_generated  # noqa: E402

from hierprior.metrics import mira, tarp  # noqa: E402
from hierprior.posterior import sample_posterior  # noqa: E402

HEADER = ["problem", "prior", "method", "TARP atc (± bootstrap sd)", "TARP ks", "MIRA score",
          "MIRA expected", "MIRA z", "seconds"]  # fmt: skip


def scores(samples, truth, seed: int) -> list[str]:
    """TARP atc ± its bootstrap sd, ks, and MIRA score, expected and z, as table cells."""
    t = tarp(samples, truth, generator=seed, bootstrap=100)
    boot = t.ecp_bootstrap - t.alpha  # (B, A): replicates of ECP - alpha
    atc_sd = float(torch.trapezoid(boot, t.alpha, dim=-1).std())
    m = mira(samples, truth, generator=seed)
    return [f"{t.atc:+.3f} (± {atc_sd:.3f})", f"{t.ks_stat:.3f}", f"{m.score:.4f}",
            f"{m.expected:.4f}", f"{m.z:+.1f}"]  # fmt: skip


def gaussian_part(args, rows: list[list[str]]) -> None:
    n, s, steps, sigma_y = args.observations, args.samples, 64, 0.1
    for d, m in ((8, 4), (16, 4)):
        prior, forward, noise, x, y = gaussian_problem(d, m, n, sigma_y, seed=3)
        methods = [("exact", "exact", {})] + method_list(m, sigma_y, particles=s)
        for label, method, opts in methods:
            g = torch.Generator().manual_seed(1)
            t0 = time.perf_counter()
            xs = sample_posterior(prior, forward, noise, y, method, steps, s, g, **opts)
            seconds = time.perf_counter() - t0
            rows.append([f"D={d}, M={m}", "true", label, *scores(xs, x, seed=0),
                         f"{seconds:.1f}"])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)


def mnist_population():
    """The population of ``hierprior-em``'s default experiment, from its config."""
    from hydra import compose, initialize_config_dir

    from hierprior.config import CONF_DIR, instantiate_checked

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("em", overrides=["experiment=mnist_shift_tiny"])
    return instantiate_checked(cfg.population, "population")


def mnist_part(args, rows: list[list[str]]) -> None:
    from hierprior.diffusion import load_prior

    if args.run is None:
        raise SystemExit("--parts mnist needs --run: an EM run directory of mnist_shift_tiny")
    run = Path(args.run)
    rounds = sorted(run.glob("round_*/prior.ckpt"))
    if not rounds:
        raise SystemExit(f"no round_*/prior.ckpt under {run}")
    population = mnist_population()[: args.mnist_observations]
    truth = population.truth.float()
    s, steps = args.mnist_samples, 32
    m = int(population.forward.observed.flatten(1).sum(1).float().mean())
    methods = [
        ("mmps k=1 (cg), ddpm (the demo's)", "mmps", {"iterations": 1}),
        ("mmps k=4 (gmres), ddpm", "mmps", {"iterations": 4, "solver": "gmres"}),
        ("dps zeta=1", "dps", {"zeta": 1.0}),
        ("pigdm", "pigdm", {}),
        ("daps (ode 1)", "daps", {}),
        (f"tds P={s}", "tds", {"particles": s}),
    ]
    for name, ckpt in (("round 0 (digits 0-4)", rounds[0]), (f"last ({rounds[-1].parent.name})",
                                                              rounds[-1])):  # fmt: skip
        prior = load_prior(ckpt)
        for label, method, opts in methods:
            g = torch.Generator().manual_seed(1)
            t0 = time.perf_counter()
            xs = sample_posterior(
                prior, population.forward, population.noise, population.y, method, steps, s, g,
                batch_size=16, **opts,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            rows.append([f"MNIST 5-9, ~{m} observed px", name, label,
                         *scores(xs.float(), truth, seed=0), f"{seconds:.0f}"])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="gaussian", help="comma-separated: gaussian,mnist")
    parser.add_argument("--run", default=None, help="EM run directory (mnist part)")
    parser.add_argument("--observations", type=int, default=300)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--mnist-observations", type=int, default=64)
    parser.add_argument("--mnist-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "README.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = {"gaussian": gaussian_part, "mnist": mnist_part}
    out = Path(args.out)
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        rows: list[list[str]] = []
        t0 = time.perf_counter()
        print(f"\n## {part}\n" + " | ".join(HEADER), flush=True)
        parts[part](args, rows)
        command = f"python experiments/calibration/run.py --parts {part}"
        if part == "mnist":
            command += " --run RUN"
        block = (
            f"<!-- `{command}`: {time.perf_counter() - t0:.0f} s, {args.threads} thread(s) -->"
            "\n\n" + markdown_table(f"TARP and MIRA per posterior method: {part}", HEADER, rows)
        )
        print("\n" + block, flush=True)
        write_generated(out, part, block)


if __name__ == "__main__":
    main()
