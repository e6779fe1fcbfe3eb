r"""Benchmark: the joint (source, lens) E-step against the known-lens E-step, per observation.

The blind-lens E-step (:class:`~hierprior.posterior.Joint`) draws the source *and* the lens of
each observation; the known-lens E-step is handed the true lens. This script times both on the
same observations and prior, at equal diffusion steps and with the same source method and
options, in one run (median of ``--repeats`` runs after a warm-up run), and reports the wall
time per observation and the ratio (target: joint <= 3x known).

The problem is that of ``experiment=blind_lens_tiny`` (``galaxy_shift_tiny`` with every lens
unknown): the 32 px U-Net prior of ``galaxy_shift_tiny`` (untrained weights: the cost does not
depend on them), 48 x 48 images at 0.08" with 2 x 2 rays per pixel and a 0.1" PSF, SIE + shear
lenses from ``conf/population/galaxy_shift_blind.yaml``, one posterior sample per observation.

Usage:
    python benchmarks/joint.py                                 # DAPS 64 steps, 20 observations
    python benchmarks/joint.py --source mmps --steps 32 --obs 50 --out joint.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hierprior.diffusion import EDMDenoiser
from hierprior.nn import UNet
from hierprior.physics import GaussianNoise
from hierprior.posterior import Joint, posterior_method

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(obs: int, seed: int):
    """(prior, blind forward model, noise, y): the blind_lens_tiny problem."""
    torch.manual_seed(seed)  # the untrained network's weights only
    backbone = UNet(
        in_channels=1,
        image_size=32,
        channels=[16, 32, 32],
        num_res_blocks=1,
        attention_resolutions=[],
    )
    prior = EDMDenoiser(backbone, (1, 32, 32), sigma_data=0.5).eval()
    cfg = OmegaConf.load(CONF / "population" / "galaxy_shift_blind.yaml")
    generator = instantiate(cfg.forward)
    forward = generator(obs, (1, 32, 32), torch.Generator().manual_seed(seed))
    truth = torch.rand(obs, 1, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    noise = GaussianNoise(0.01)
    y = forward.truth_forward()(truth) + 0.01 * torch.randn(obs, 1, 48, 48)
    return prior, forward, noise, y


def time_runs(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> str:
    torch.set_num_threads(args.threads)
    prior, forward, noise, y = build(args.obs, args.seed)
    source = {"method": args.source}
    if args.source in ("mmps", "daps", "pigdm", "cla"):
        source["iterations"] = args.iterations
    known = posterior_method({**source, "steps": args.steps})
    joint = Joint(
        args.steps,
        source=source,
        lens_steps=args.lens_steps,
        final_warmup=args.final_warmup,
        final_steps=args.final_steps,
        precondition_every=args.precondition_every,
        source_variance=0.03,
    )
    truth_lens = forward.truth_forward()

    def known_estep():
        with torch.no_grad():
            known.sample(prior, truth_lens, noise, y, 1, torch.Generator().manual_seed(0))

    def joint_estep():
        joint.sample_joint(prior, forward, noise, y, 1, torch.Generator().manual_seed(0))

    t_known = time_runs(known_estep, args.repeats) / args.obs
    t_joint = time_runs(joint_estep, args.repeats) / args.obs
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"load average {load:.1f} at the end; torch {torch.__version__}",
        f"problem: blind_lens_tiny ({args.obs} observations, 48 x 48, 2 x 2 rays, SIE + shear),"
        f" source method {source}, {args.steps} diffusion steps; joint: lens_steps "
        f"{args.lens_steps}, preconditioner every {args.precondition_every} lens steps, "
        f"final {args.final_warmup} + {args.final_steps} steps",
        "",
        "| E-step | s / observation | ratio |",
        "| --- | --- | --- |",
        f"| known lens ({args.source}) | {t_known:.3f} | 1.00 |",
        f"| joint (source + lens) | {t_joint:.3f} | {t_joint / t_known:.2f} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--obs", type=int, default=20, help="observations")
    parser.add_argument("--steps", type=int, default=64, help="diffusion steps")
    parser.add_argument("--source", default="daps", help="mmps | pigdm | cla | daps")
    parser.add_argument("--iterations", type=int, default=10, help="the source's CG iterations")
    parser.add_argument("--lens-steps", type=int, default=3)
    parser.add_argument("--precondition-every", type=int, default=12)
    parser.add_argument("--final-warmup", type=int, default=30)
    parser.add_argument("--final-steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    table = run(args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
