r"""Benchmark: denoising score-matching (DSM) training throughput, hierprior against azula.

The M-step of EM fine-tunes the prior by DSM on the bank's samples. This script times one
optimiser step (forward, loss, backward, AdamW; hierprior also updates its EMA) on the same
U-Net as ``benchmarks/estep.py`` (``--size gpu``: the ~9M net at 32x32; ``small`` for CPUs),
batch B, random data, and reports training images per second, in three implementations:

- ``hierprior M-step``: :class:`hierprior.em.NetworkMStep`, the EM M-step itself (Lightning
  ``Trainer.fit`` of :class:`~hierprior.training.PriorModule`, EMA, gradient clipping, the
  endless batch stream). Lightning's set-up is excluded by timing two fits of different
  lengths and dividing the difference of their times by the difference of their steps.
- ``hierprior loop``: the same loss (:func:`hierprior.diffusion.dsm_loss`, lognormal times),
  AdamW and EMA update in a plain PyTorch loop (the library's kernel without Lightning).
- ``azula``: ``azula.denoise.KarrasDenoiser`` (EDM preconditioning) around the same backbone
  with azula's ``VPSchedule`` and its ``loss`` (uniform times), AdamW, in a plain loop.

Precisions: ``--bf16`` (bf16 autocast of forward and loss, TF32 on; the M-step row uses
Lightning's ``precision="bf16-mixed"``), ``--compile`` (``torch.compile`` of the backbone in
the plain loops; the M-step row is not compiled). Every row reports the ratio to azula.

Usage:
    python benchmarks/training.py                                   # CPU, small U-Net
    python benchmarks/training.py --device cuda --batch 1024 --bf16 --compile --out t.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estep import SIZES, _device_name, _fill_zero_weights  # noqa: E402

from hierprior.diffusion import EDMDenoiser, dsm_loss  # noqa: E402
from hierprior.nn import UNet  # noqa: E402

try:
    import azula
except ImportError:  # azula is optional: without it only hierprior is timed
    azula = None

__all__ = ["build_backbone", "time_loop", "time_mstep", "main"]


def build_backbone(size: str, seed: int = 0) -> nn.Module:
    """The benchmark U-Net with seeded weights (zero-initialised output layers filled)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet(in_channels=1, **SIZES[size])
    _fill_zero_weights(unet, torch.Generator().manual_seed(seed))
    return unet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step of ``step()`` after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def hierprior_step(backbone, shape, batch, device, bf16: bool):
    denoiser = EDMDenoiser(backbone, shape).to(device)
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)
    x = 0.5 * torch.randn((batch, *shape), device=device)
    g = torch.Generator(device).manual_seed(0)

    def step():
        with torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = dsm_loss(denoiser, x, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(denoiser.parameters()), 1e-3)

    return step


def azula_step(backbone, shape, batch, device, bf16: bool):
    from azula.denoise import KarrasDenoiser
    from azula.noise import VPSchedule

    denoiser = KarrasDenoiser(backbone, VPSchedule()).to(device)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)
    x = 0.5 * torch.randn((batch, *shape), device=device)

    def step():
        t = torch.rand(batch, device=device)
        with torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = denoiser.loss(x, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_mstep(backbone, shape, batch, device, bf16: bool, steps: tuple[int, int]) -> float:
    """Seconds per optimiser step of NetworkMStep, from two fits of different lengths."""
    from hierprior.em import NetworkMStep

    prior = EDMDenoiser(backbone, shape).to(device)
    samples = 0.5 * torch.randn((max(batch, 2 * batch), 1, *shape), device=device)
    trainer = {"accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": 1}
    trainer["precision"] = "bf16-mixed" if bf16 else "32-true"
    seconds = []
    for n in steps:
        mstep = NetworkMStep(
            steps=n, batch_size=batch, checkpoint_every=10**6, warmup_steps=0, trainer=trainer
        )
        with tempfile.TemporaryDirectory() as tmp:
            _sync(device)
            start = time.perf_counter()
            mstep(prior, samples, tmp, seed=0, round_index=1)
            _sync(device)
            seconds.append(time.perf_counter() - start)
    return max(seconds[1] - seconds[0], 1e-9) / (steps[1] - steps[0])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--batch", type=int, default=None, help="default 32 small, 1024 gpu")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast + TF32 (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--no-mstep", action="store_true", help="skip the Lightning M-step row")
    parser.add_argument("--no-azula", action="store_true", help="time hierprior only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--target", type=float, default=3.0, help="target ratio to azula")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if (args.bf16 or args.compile) and device.type != "cuda":
        parser.error("--bf16 and --compile are CUDA-only options")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    size = args.size or ("gpu" if device.type == "cuda" else "small")
    batch = args.batch or (1024 if size == "gpu" else 32)
    r = SIZES[size]["image_size"]
    shape = (1, r, r)
    if args.bf16:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with_azula = not args.no_azula and azula is not None

    def net():
        backbone = build_backbone(size).to(device)
        return torch.compile(backbone) if args.compile else backbone

    rows: list[tuple[str, str, float | None, str]] = []

    def run(name: str, options: str, fn) -> None:
        try:
            rows.append((name, options, fn(), ""))
        except Exception as err:  # a failed row (OOM, compile) must not stop the others
            rows.append((name, options, None, f"failed: {type(err).__name__}: {err}"[:100]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {rows[-1][0]:18s} {rows[-1][1]:28s} {rows[-1][2]} {rows[-1][3]}", flush=True)

    dtype = "bf16 autocast, TF32" if args.bf16 else "fp32"
    print(f"DSM training benchmark: B={batch}, {r}x{r}, {device}, {dtype}")
    if with_azula:
        run(
            "azula",
            "KarrasDenoiser.loss, AdamW",
            lambda: time_loop(
                azula_step(net(), shape, batch, device, args.bf16), args.warmup, args.steps, device
            ),
        )
    run(
        "hierprior loop",
        "dsm_loss, AdamW, EMA",
        lambda: time_loop(
            hierprior_step(net(), shape, batch, device, args.bf16), args.warmup, args.steps, device
        ),
    )
    if not args.no_mstep:
        n = (args.warmup, args.warmup + args.steps)
        run(
            "hierprior M-step",
            "NetworkMStep (Lightning), no compile",
            lambda: time_mstep(
                build_backbone(size).to(device), shape, batch, device, args.bf16, n
            ),
        )
    reference = next((s for name, _, s, _ in rows if name == "azula" and s), None)
    params = sum(p.numel() for p in build_backbone(size).parameters())
    meta = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "azula": azula.__version__ if with_azula else "not run",
        "U-Net": f"{size} ({params / 1e6:.2f}M params, {r}x{r})",
        "B": batch,
        "dtype": dtype,
        "compile": args.compile,
        "time": f"{args.steps} steps after {args.warmup} warm-up steps, wall clock",
    }
    lines = [
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| implementation | what | images/s | ms/step | hierprior / azula | target | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, options, seconds, note in rows:
        rate = f"{batch / seconds:,.0f}" if seconds else "-"
        ms = f"{1e3 * seconds:.1f}" if seconds else "-"
        ratio, target = "-", "-"
        if name == "azula" and seconds:
            ratio = "(ref)"
        elif seconds and reference:
            ratio = f"{reference / seconds:.2f}"
            target = f">= {args.target:g}" + (" met" if reference / seconds >= args.target else "")
        lines.append(f"| {name} | {options} | {rate} | {ms} | {ratio} | {target} | {note} |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
