r"""How well a blind-lens E-step recovers the lenses: calibration of the lens-parameter samples.

For N observations with true lens parameters :math:`\eta_i` and S posterior samples
:math:`\eta_i^{(s)}` each (a joint source + lens E-step, :mod:`hierprior.posterior.joint`),
:func:`lens_parameter_metrics` reports per parameter p, from the randomised rank of the truth
among the samples, :math:`u_i = (\#\{s: \eta^{(s)}_{i,p} < \eta_{i,p}\} + U (1 + \#\text{ties}))
/ (S + 1)`, :math:`U \sim \mathcal U(0, 1)`, which is uniform on (0, 1) exactly when the truth
is distributed as one more posterior draw (simulation-based calibration, Talts et al. 2018),
for any S and any posterior shape:

- ``median_abs_z``: the median of :math:`|z_i|`, :math:`z_i = \Phi^{-1}(u_i)` (standard normal
  under calibration: 0.674; larger: over-confident or biased; smaller: too wide);
- ``coverage68``: the fraction of truths inside their central 68% posterior interval,
  :math:`u_i \in (0.16, 0.84)` (0.68 under calibration);
- ``rank_ks_pvalue``: the KS p-value of the :math:`u_i` against the uniform;
- ``bias``: the mean of :math:`\bar\eta_{i,p} - \eta_{i,p}` (sample mean minus truth).

Rank-based rather than Gaussian (truth minus mean over standard deviation): lens posteriors
can be skewed or heavy-tailed (a few chains in a secondary mode inflate the standard
deviation), and the ranks need no shape.

:class:`LensParameterMetrics` is the EM monitor's posterior evaluator of a blind-lens
population: it reads the lens samples stored in the round's bank beside the sources, and also
gives the residual :math:`\chi^2/\nu` of every sample through its own lens (the monitor's
``residual_chi2_nu*`` columns, which need the lens).

References:
    Talts, Betancourt, Simpson, Vehtari & Gelman (2018), Validating Bayesian Inference
    Algorithms with Simulation-Based Calibration, arXiv 1804.06788.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LensParameterMetrics", "lens_parameter_metrics", "blind_residual_chi2"]

log = logging.getLogger(__name__)

#: Φ^{-1}(0.84): the half-width of a 68% interval of a standard normal
Z68 = 0.9944578832097535


def lens_parameter_metrics(
    samples: Tensor,
    truth: Tensor,
    names: Sequence[str],
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Calibration of lens-parameter samples (N, S, d) against the truths (N, d).

    Returns ``lens_<name>_{median_abs_z, coverage68, rank_ks_pvalue, bias}`` per parameter
    whose truths vary (fixed parameters are skipped); ``generator`` draws the rank jitter.
    """
    from scipy import stats

    if samples.dim() != 3 or truth.dim() != 2 or samples.shape[::2] != truth.shape:
        raise ValueError(
            f"samples must be (N, S, d) and truth (N, d); got {tuple(samples.shape)} and "
            f"{tuple(truth.shape)}"
        )
    if len(names) != truth.shape[1]:
        raise ValueError(f"{len(names)} names for {truth.shape[1]} parameters")
    samples, truth = samples.double().cpu(), truth.double().cpu()
    n, s, d = samples.shape
    out: dict[str, float] = {}
    u = torch.rand((n, d), generator=generator, dtype=torch.float64)
    for j, name in enumerate(names):
        if float(truth[:, j].std()) == 0.0 and float(samples[:, :, j].std()) == 0.0:
            continue  # a fixed parameter
        key = f"lens_{name}"
        below = (samples[:, :, j] < truth[:, j : j + 1]).sum(1).double()
        ties = (samples[:, :, j] == truth[:, j : j + 1]).sum(1).double()
        ranks = (below + u[:, j] * (ties + 1)) / (s + 1)
        z = torch.as_tensor(stats.norm.ppf(ranks.numpy()), dtype=torch.float64)
        out[f"{key}_median_abs_z"] = float(z.abs().median())
        out[f"{key}_coverage68"] = float((z.abs() < Z68).double().mean())
        out[f"{key}_rank_ks_pvalue"] = float(stats.kstest(ranks.numpy(), "uniform").pvalue)
        out[f"{key}_bias"] = float((samples[:, :, j].mean(1) - truth[:, j]).mean())
    return out


def blind_residual_chi2(population, samples: Tensor, params: Tensor, chunk: int = 64) -> Tensor:
    """Reduced χ² per observation (N,) (averaged over its S samples) of sources (N, S, *event)
    through their own lenses (N, S, d), over every pixel (float64, on the CPU)."""
    forward, noise, y = population.forward, population.noise, population.y
    out = []
    with torch.no_grad():
        for start in range(0, len(population), chunk):
            idx = torch.arange(start, min(start + chunk, len(population)))
            f = forward[idx]
            yi = y[idx.to(y.device)]
            x = samples[idx].to(yi)
            eta = params[idx].to(yi)
            pred = f.image(eta, x)
            sigma = noise[idx].std(pred) if noise.num_obs is not None else noise.std(pred)
            r = (yi.unsqueeze(1) - pred) / sigma
            out.append(r.double().pow(2).flatten(2).mean(-1).mean(1).cpu())
    return torch.cat(out)


class LensParameterMetrics:
    """EM posterior evaluator of a blind-lens population (see the module docstring).

    Arguments:
        bank: the folder, inside the round's folder, of the bank whose lens samples it reads.

    Called by the monitor as ``ev(population=, samples=, prior_samples=, round_dir=,
    round_index=)``; returns the lens metrics (when the population holds the true lenses) and
    ``residual_chi2_nu``, ``residual_chi2_nu_{mean,median,p90}``. A population whose forward
    model is not blind gives {}.
    """

    def __init__(self, bank: str = "bank"):
        self.bank = str(bank)

    def __call__(
        self, *, population, samples: Tensor, prior_samples, round_dir, round_index: int
    ) -> dict[str, float]:
        from hierprior.em.bank import SampleBank
        from hierprior.seeds import derived_generator

        forward = population.forward
        if not getattr(forward, "blind", False):
            return {}
        bank = SampleBank(
            Path(round_dir) / self.bank, len(population), samples.shape[1], samples.shape[2:]
        )
        params = bank.load_params()
        if params is None:
            log.warning("the bank at %s holds no lens parameters", bank.path)
            return {}
        chi2 = blind_residual_chi2(population, samples, params)
        out = {
            "residual_chi2_nu": float(chi2.mean()),
            "residual_chi2_nu_mean": float(chi2.mean()),
            "residual_chi2_nu_median": float(chi2.median()),
            "residual_chi2_nu_p90": float(torch.quantile(chi2, 0.9)),
        }
        if getattr(forward, "truth", None) is not None:
            g = derived_generator(round_index, "lens_parameter_metrics")
            out.update(lens_parameter_metrics(params, forward.truth, forward.names, g))
        return out
