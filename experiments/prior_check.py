r"""How we check an MNIST prior: sample it, classify the samples, print a table.

For a prior :math:`p_\theta` trained on digits D (e.g. 0-4) we draw n samples with a fixed
generator and classify them with the cached :class:`~hierprior.evaluation.digits.DigitClassifier`
(trained at the prior's resolution on the bundled MNIST subset). We report

- the share of samples classified as one of D (the prior makes the right digits),
- the mean and median classifier confidence :math:`\max_k p(k \mid x)` (the digits are
  recognisable, not blobs that fall into some class by default),
- the share with confidence > 0.9, and the histogram over the ten classes (mode coverage),

and the same numbers on real test digits of D as the reference a perfect prior would reach.

    python experiments/prior_check.py runs/train_prior/mnist04_prior_tiny/prior.ckpt \
        --digits 0 1 2 3 4 --n 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hierprior.data import load_mnist
from hierprior.diffusion import load_prior, sample
from hierprior.evaluation.digits import load_digit_classifier


def summarise(clf, images: torch.Tensor, digits: list[int]) -> dict:
    """Classifier statistics of images with shape (N, 1, R, R)."""
    proba = clf.predict_proba(images)
    conf, label = proba.max(dim=-1)
    counts = torch.bincount(label, minlength=10)
    return {
        "share": float(torch.isin(label, torch.tensor(digits)).float().mean()),
        "conf_mean": float(conf.mean()),
        "conf_median": float(conf.median()),
        "confident": float((conf > 0.9).float().mean()),
        "counts": counts.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="prior checkpoint (prior.ckpt)")
    parser.add_argument("--digits", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--n", type=int, default=256, help="number of prior samples")
    parser.add_argument("--method", default="heun")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="optional PNG of the samples")
    args = parser.parse_args()

    prior = load_prior(args.ckpt)
    meta = torch.load(args.ckpt, map_location="cpu", weights_only=True).get("meta", {})
    data_cfg = (meta.get("config") or {}).get("data") or {}
    value_range = tuple(data_cfg.get("value_range", (-1.0, 1.0)))
    resize = data_cfg.get("resize", "interpolate")
    c, r, _ = prior.event_shape
    if c != 1:
        raise SystemExit(
            f"expected a one-channel digit prior, got event shape {prior.event_shape}"
        )

    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    x = sample(prior, args.n, method=args.method, steps=args.steps, generator=generator)
    t_sample = time.perf_counter() - t0
    if args.out is not None:
        from hierprior.training import save_sample_grid

        save_sample_grid(x, args.out, value_range)

    clf = load_digit_classifier(resolution=r, value_range=value_range, resize=resize)
    real, _ = load_mnist(
        digits=args.digits,
        resolution=r,
        source="bundled",
        split="test",
        value_range=value_range,
        resize=resize,
    )
    rows = {"prior samples": summarise(clf, x, args.digits)}
    rows["real test digits"] = summarise(clf, real, args.digits)

    print(f"checkpoint: {args.ckpt} (step {meta.get('step')}), {r}x{r} px")
    print(
        f"{args.n} samples, {args.method} {args.steps} steps, seed {args.seed}: "
        f"{t_sample:.1f} s; classifier test accuracy "
        f"{getattr(clf, 'test_accuracy', float('nan')):.3f}"
    )
    digits = "".join(map(str, args.digits))
    header = f"| images | share in {{{digits}}} | mean conf | median conf | conf > 0.9 |"
    print(header + " counts 0-9 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in rows.items():
        print(
            f"| {name} | {s['share']:.3f} | {s['conf_mean']:.3f} | {s['conf_median']:.3f} | "
            f"{s['confident']:.3f} | {' '.join(map(str, s['counts']))} |"
        )


if __name__ == "__main__":
    main()
