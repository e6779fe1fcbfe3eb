r"""Benchmark: the strong-lensing forward model, hierprior ``Lensing`` against caustics.

One call maps B source images (64 x 64 over 4") to B lensed images (64 x 64 at 0.08"), each
through its own SIE + external shear (random parameters per observation) and a Gaussian PSF
(FWHM 0.2", an 11 x 11 kernel), in float32. On the same inputs, in one run, it times (median
of ``--repeats`` calls after a warm-up call):

- *forward*: hierprior ``Lensing(SIE + Shear, psf=kernel)(x)`` with the ray-traced sampling
  grid reused between calls (the lens is fixed while a posterior is sampled, and ``Lensing``
  caches the grid), hierprior with the cache cleared before every call (ray tracing included,
  as caustics does), and caustics 1.7.1: ``torch.func.vmap`` over the batch of a
  ``LensSource`` simulator (``SinglePlane`` of ``SIE(angle_system="e1_e2")`` and
  ``ExternalShear``, a dynamic ``Pixelated`` source, the same PSF kernel) called with the
  per-observation parameter vectors;
- *forward + VJP* with respect to the source: hierprior ``Lensing.vjp(x, u)`` (the forward
  map and its exact adjoint) and caustics ``torch.func.vjp`` of the vmapped simulator.

and reports the time per call in ms, hierprior's speed-up over caustics (caustics' time over
hierprior's, same operation and device) and the largest absolute difference between the two
libraries' images (forward rows) and source gradients (VJP rows).

Alignment of the two (the differences measured in ``tests/test_lensing_references.py``): both
get the same PSF kernel (hierprior's ``gaussian_psf``, unit sum); the sources are sums of
three Gaussian blobs within 1" of the centre, so they vanish at the source field's edge (where
caustics extrapolates and hierprior falls to zero) and every ray lands well inside the 4"
field; caustics blurs light from a PSF half-width band outside the image into its border while
hierprior zero-pads, so the images are compared on the interior (pixels at least 5 from the
border; the full-image figure is given too) and the VJP cotangent u is zero on that band.
``--dtype float64`` builds caustics' static parameters as float64 tensors and rebuilds its
image grid in float64 (caustics makes both in float32 first).

Usage:
    python benchmarks/lensing.py                        # CPU (and CUDA when present), 1 thread
    python benchmarks/lensing.py --device cuda --repeats 50 --out lensing_h200.md
    python benchmarks/lensing.py --profile              # where hierprior's time goes

References:
    Stone et al. (2024), Caustics: A Python Package for Accelerated Strong Gravitational
    Lensing Simulations, JOSS 9(103), 7081.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hierprior.physics.lensing import SIE, Lensing, Shear, gaussian_psf

try:
    import caustics
except ImportError:  # caustics is optional: without it only hierprior is timed
    caustics = None

__all__ = [
    "Problem",
    "build_problem",
    "hierprior_model",
    "caustics_model",
    "time_call",
    "run_benchmark",
    "format_table",
    "profile_hierprior",
    "main",
]

BATCH = 64
IMAGE_SIZE, PIXEL_SCALE = 64, 0.08
SOURCE_SIZE, SOURCE_FOV = 64, 4.0
PSF_FWHM = 0.2
Z_LENS, Z_SOURCE = 0.5, 1.0


@dataclass
class Problem:
    """The inputs shared by both libraries.

    Attributes:
        lens: per-observation lens parameters (B,) each: theta_E, e1, e2, center_x,
            center_y, gamma1, gamma2.
        psf: the PSF kernel, (h, w), unit sum.
        x: the sources, (B, 1, n_s, n_s).
        u: the cotangents, (B, 1, n, n), zero within the PSF half-width of the border.
        interior: the boolean (n, n) mask of the pixels compared.
    """

    lens: dict[str, Tensor]
    psf: Tensor
    x: Tensor
    u: Tensor
    interior: Tensor


def build_problem(batch: int, dtype: torch.dtype, device: torch.device, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    lens = {
        "theta_E": 1.0 + 0.3 * rand(batch),
        "e1": 0.3 * (rand(batch) - 0.5),
        "e2": 0.3 * (rand(batch) - 0.5),
        "center_x": 0.1 * (rand(batch) - 0.5),
        "center_y": 0.1 * (rand(batch) - 0.5),
        "gamma1": 0.06 * (rand(batch) - 0.5),
        "gamma2": 0.06 * (rand(batch) - 0.5),
    }
    c = (torch.arange(SOURCE_SIZE, dtype=torch.float64) + 0.5) * SOURCE_FOV / SOURCE_SIZE
    c = c - SOURCE_FOV / 2
    sx, sy = c[None, None, :], c[None, :, None]
    x = torch.zeros(batch, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.float64)
    for _ in range(3):  # three Gaussian blobs per source, within 1" of the centre
        x0, y0 = (rand(batch, 1, 1) - 0.5), (rand(batch, 1, 1) - 0.5)
        sigma, amp = 0.1 + 0.2 * rand(batch, 1, 1), 0.3 + 0.7 * rand(batch, 1, 1)
        x = x + amp * torch.exp(-((sx - x0) ** 2 + (sy - y0) ** 2) / (2 * sigma**2))
    psf = gaussian_psf(torch.tensor([PSF_FWHM], dtype=torch.float64), PIXEL_SCALE)[0]
    half = psf.shape[-1] // 2
    interior = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    interior[half:-half, half:-half] = True
    u = torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g, dtype=torch.float64)
    u = u * interior
    return Problem(
        lens={k: v.to(device, dtype) for k, v in lens.items()},
        psf=psf.to(device, dtype),
        x=x.unsqueeze(1).to(device, dtype),
        u=u.to(device, dtype),
        interior=interior.to(device),
    )


def hierprior_model(problem: Problem) -> Lensing:
    p = problem.lens
    mass = SIE(p["theta_E"], p["e1"], p["e2"], p["center_x"], p["center_y"])
    mass = mass + Shear(p["gamma1"], p["gamma2"])
    return Lensing(mass, IMAGE_SIZE, PIXEL_SCALE, SOURCE_SIZE, SOURCE_FOV, psf=problem.psf)


def caustics_model(problem: Problem) -> Callable[[Tensor], Tensor]:
    """x (B, n_s, n_s) -> images (B, n, n): the vmapped caustics simulator."""
    dtype, device = problem.x.dtype, problem.x.device

    def t(v: float) -> Tensor:  # Python floats would become float32 tensors
        return torch.tensor(v, dtype=dtype, device=device)

    cosmo = caustics.FlatLambdaCDM(name="cosmo")
    sie = caustics.SIE(cosmology=cosmo, name="sie", angle_system="e1_e2")
    shear = caustics.ExternalShear(cosmology=cosmo, name="shear", x0=t(0.0), y0=t(0.0))
    lens = caustics.SinglePlane(
        cosmology=cosmo, lenses=[sie, shear], name="lens", z_l=t(Z_LENS), z_s=t(Z_SOURCE)
    )
    source = caustics.Pixelated(
        name="src",
        x0=t(0.0),
        y0=t(0.0),
        pixelscale=t(SOURCE_FOV / SOURCE_SIZE),
        shape=(SOURCE_SIZE, SOURCE_SIZE),
    )
    sim = caustics.LensSource(
        lens=lens, source=source, pixelscale=PIXEL_SCALE, pixels_x=IMAGE_SIZE, psf=problem.psf
    )
    sim.to(device=device, dtype=dtype)  # both: .to(dtype=...) alone fails on e1/e2
    sim.psf.value = problem.psf  # the kernel exactly (caustics stores arrays as float32 first)
    if dtype == torch.float64:  # caustics builds its grid in float32
        gx, gy = caustics.utils.meshgrid(PIXEL_SCALE, *sim._n_pix, dtype=dtype, device=device)
        sim._grid = (gx[..., None], gy[..., None])
    order = ("center_x", "center_y", "theta_E", "e1", "e2", "gamma1", "gamma2")
    assert [p.name for p in sim.dynamic_params] == [
        "x0",
        "y0",
        "Rein",
        "e1",
        "e2",
        "gamma_1",
        "gamma_2",
        "image",
    ], sim.param_order()
    params = torch.stack([problem.lens[k] for k in order], dim=1)  # (B, 7)

    def one(image: Tensor, p: Tensor) -> Tensor:
        return sim(params=[*p.unbind(-1), image])

    batched = torch.func.vmap(one)
    return lambda x: batched(x, params)


def time_call(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_benchmark(
    device: torch.device, batch: int, dtype: torch.dtype, repeats: int, seed: int = 0
) -> list[dict]:
    """The rows of one device: operation, implementation, ms, speed-up, differences."""
    problem = build_problem(batch, dtype, device, seed)
    model = hierprior_model(problem).to(device)
    x, u, inner = problem.x, problem.u, problem.interior

    def cold() -> Tensor:
        model._grid_cache.clear()  # ray tracing included, as in caustics
        return model(x)

    rows = [
        {
            "op": "forward",
            "impl": "hierprior",
            "note": "ray-traced grid reused",
            "fn": lambda: model(x),
        },
        {"op": "forward", "impl": "hierprior", "note": "ray tracing every call", "fn": cold},
        {
            "op": "forward + VJP",
            "impl": "hierprior",
            "note": "exact adjoint",
            "fn": lambda: model.vjp(x, u),
        },
    ]
    if caustics is not None:
        sim = caustics_model(problem)

        def c_forward() -> Tensor:
            return sim(x[:, 0])

        def c_vjp() -> tuple[Tensor, Tensor]:
            y, pullback = torch.func.vjp(sim, x[:, 0])
            return y, pullback(u[:, 0])[0]

        ours, theirs = model(x)[:, 0], c_forward()
        diff = (ours - theirs).abs()
        image_diff = (float(diff[:, inner].max()), float(diff.max()), float(ours.abs().max()))
        grad_ours, grad_theirs = model.vjp(x, u)[1][:, 0], c_vjp()[1]
        grad_diff = (float((grad_ours - grad_theirs).abs().max()), float(grad_ours.abs().max()))
        rows.insert(2, {"op": "forward", "impl": "caustics", "note": "vmap", "fn": c_forward})
        rows.append(
            {
                "op": "forward + VJP",
                "impl": "caustics",
                "note": "torch.func.vjp of vmap",
                "fn": c_vjp,
            }
        )
    for row in rows:
        row["seconds"] = time_call(row.pop("fn"), repeats, device)
        row["device"] = _device_name(device)
    if caustics is not None:
        ref = {r["op"]: r["seconds"] for r in rows if r["impl"] == "caustics"}
        for row in rows:
            if row["impl"] == "hierprior":
                row["speedup"] = ref[row["op"]] / row["seconds"]
            if row["op"] == "forward":
                a, full, peak = image_diff
                row["diff"] = f"{a:.1e} of peak {peak:.2f} (full image {full:.1e})"
            else:
                row["diff"] = f"{grad_diff[0]:.1e} of max {grad_diff[1]:.2f}"
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| device | operation | implementation | note | ms per call | hierprior speed-up "
        "| max abs diff |",
        "| --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        speed = (
            f"{r['speedup']:.1f}x"
            if "speedup" in r
            else ("(ref)" if r["impl"] == "caustics" else "-")
        )
        lines.append(
            f"| {r['device']} | {r['op']} | {r['impl']} | {r['note']} | {1e3 * r['seconds']:.2f} "
            f"| {speed} | {r.get('diff', '-')} |"
        )
    return "\n".join(lines)


def profile_hierprior(device: torch.device, batch: int, dtype: torch.dtype) -> str:
    """torch.profiler's table (self time) of hierprior's cold forward and its VJP."""
    problem = build_problem(batch, dtype, device, 0)
    model = hierprior_model(problem).to(device)
    model.vjp(problem.x, problem.u)  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out = []
    for name, fn in (
        ("forward (ray tracing included)", lambda: (model._grid_cache.clear(), model(problem.x))),
        ("forward + VJP (grid reused)", lambda: model.vjp(problem.x, problem.u)),
    ):
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                fn()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=12)
        out.append(f"### {name} (5 calls)\n\n```\n{table}\n```")
    return "\n\n".join(out)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} thr)"
    except OSError:
        pass
    return (platform.processor() or "cpu") + f" ({torch.get_num_threads()} thr)"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto (default): the CPU, and CUDA when present",
    )
    parser.add_argument("--batch", type=int, default=BATCH, help="observations B")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also profile hierprior")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    devices = [torch.device(args.device)] if args.device != "auto" else [torch.device("cpu")]
    if args.device == "auto" and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    torch.set_num_threads(args.threads)
    # torch.func's first call warns about torch.jit.script inside torch itself
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    dtype = getattr(torch, args.dtype)

    rows = []
    for device in devices:
        rows += run_benchmark(device, args.batch, dtype, args.repeats, args.seed)
    header = (
        f'B = {args.batch}, {IMAGE_SIZE}x{IMAGE_SIZE} image at {PIXEL_SCALE}", '
        f'{SOURCE_SIZE}x{SOURCE_SIZE} source over {SOURCE_FOV}", SIE + shear, Gaussian PSF '
        f'FWHM {PSF_FWHM}", {args.dtype}, median of {args.repeats}; torch {torch.__version__}'
        + (f", caustics {caustics.__version__}" if caustics is not None else ", no caustics")
    )
    text = header + "\n\n" + format_table(rows)
    if args.profile:
        text += "\n\n" + "\n\n".join(profile_hierprior(d, args.batch, dtype) for d in devices)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
