r"""Monitor: what an EM round is measured by (it decides nothing; :mod:`hierprior.em.stop` does).

For round k, with prior :math:`\theta_k` and its bank :math:`x_i^{(s)} \sim
p_{\theta_k}(x \mid y_i)` (the E-step of round k), the monitor logs:

- ``drift_*``: PQMass(prior samples of :math:`\theta_k`, one bank sample per observation).
  When the prior is right, the aggregate posterior :math:`E_y[p(x \mid y)]` equals the prior,
  so this checks self-consistency without ground truth; but the two arms come from different
  samplers (unconditional vs posterior, each with its own discretisation and approximation),
  so its null is false even for the right prior: a diagnostic, never a stop decision.
- ``convergence_*``: PQMass(prior samples of :math:`\theta_k`, of :math:`\theta_{k-1}`).
- with truth: ``truth_*`` = PQMass(prior samples, truths), ``posterior_mean_rmse`` and the
  E-step's calibration by TARP (``tarp_atc``, ``tarp_ks``; the ECP curve in ``tarp.json``)
  and its accuracy by MIRA (``mira_score``, ``mira_expected`` (its value for a correct
  posterior), ``mira_z`` = (score - expected)/std: below about -3 over-confident or biased,
  above about +3 under-confident) on the first ``tarp_observations`` observations with
  ``tarp_samples`` posterior samples each (the bank's when it holds enough, else drawn by the
  same E-step method).
- ``residual_chi2_nu_{mean,median,p90}``: the reduced chi2 of the bank's residuals per
  observation (averaged over its samples), over *observed* entries only (``forward.observed``).
- any evaluators (callables mapping prior samples to scalars, e.g.
  :class:`~hierprior.evaluation.DigitShare`), any posterior evaluators (callables that also
  see the population, the bank and the round's folder, e.g.
  :class:`~hierprior.evaluation.MassMapMetrics`), and image grids.

Devices: the monitor works wherever the prior and the population live. The residuals are
computed on the population's device (the bank's samples are moved there chunk by chunk); every
other metric (PQMass, TARP, MIRA, the posterior-mean error, the evaluators, the grids) is
computed on the CPU from explicitly moved copies, so the bank may be given on any device.
Evaluators receive CPU tensors; posterior evaluators also receive the population (on its own
device). ``precision`` (``"32-true"``, ``"tf32"``, ``"bf16-mixed"``) is that of
:class:`~hierprior.em.EStep` for the prior samples: on CUDA, TF32 and/or the network under
bf16 autocast; a no-op on the CPU.

PQMass p-values (``*_pvalue``) are permutation p-values (``permutations > 0``, the default):
the chi2 p-value of the mean over tessellations is conservative (its null spread is far
smaller than chi2(K-1)'s), so it is not reported as a p-value; ``*_chi2`` is the statistic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from hierprior.checks import check_int
from hierprior.diffusion import GaussianPrior, sample
from hierprior.diffusion.sampling import SAMPLERS
from hierprior.em.bank import SampleBank
from hierprior.em.estep import check_precision, inference_prior, precision_scope
from hierprior.em.population import Population
from hierprior.io import atomic_write_text, device_of, is_image_shape, save_sample_grid
from hierprior.metrics import mira, pqmass, residual_chi2, tarp
from hierprior.seeds import derived_generator

__all__ = ["Monitor", "pqmass_metrics"]

log = logging.getLogger(__name__)


def pqmass_metrics(
    x: Tensor,
    y: Tensor,
    tag: str,
    *,
    num_refs: int,
    re_tessellations: int,
    permutations: int,
    generator: torch.Generator,
    paired: bool = False,
    groups: Tensor | None = None,
) -> dict[str, float]:
    """``{tag}_chi2`` and (with permutations) ``{tag}_pvalue`` of PQMass(x, y).

    The number of references is capped at a quarter of the pooled samples. Degenerate samples
    (PQMass cannot be computed) give NaN with a warning: a monitor never stops a run.
    """
    x, y = x.detach().float().cpu().flatten(1), y.detach().float().cpu().flatten(1)
    refs = min(num_refs, max(2, (len(x) + len(y)) // 4))
    try:
        r = pqmass(
            x,
            y,
            num_refs=refs,
            re_tessellations=re_tessellations,
            permutations=permutations,
            generator=generator,
            paired=paired,
            groups=groups,
        )
    except ValueError as err:
        log.warning("PQMass %s could not be computed: %s", tag, err)
        r = None
    out = {f"{tag}_chi2": float("nan") if r is None else float(r.chi2)}
    if permutations > 0:
        out[f"{tag}_pvalue"] = float("nan") if r is None else float(r.perm_pvalue)
    return out


class Monitor:
    """Per-round measurements of an EM run (see the module docstring).

    Arguments:
        num_prior_samples: prior samples drawn per round for the PQMass checks.
        method, steps, batch_size: the unconditional sampler of those samples
            (:func:`hierprior.diffusion.sample`; a Gaussian prior is sampled exactly).
        num_refs, re_tessellations, permutations: PQMass settings (permutations > 0 gives
            calibrated p-values; 0 reports the chi2 statistic only).
        tarp_observations: observations whose posterior calibration is measured (0: none).
        tarp_samples: posterior samples per such observation (>= 2).
        grid_size: images per PNG grid.
        evaluators: callables mapping prior samples (n, *event) to a dict of scalars.
        posterior_evaluators: callables ``ev(population=, samples=, prior_samples=,
            round_dir=, round_index=)`` returning a dict of scalars (they may write figures
            into round_dir); ``samples`` is the bank (N, S, *event).
        value_range: the data range mapped to black..white in grids.
        progress: progress bars of the samplers.
        precision: of the prior sampler: ``"32-true"`` (default), ``"tf32"`` or
            ``"bf16-mixed"`` (CUDA only; a no-op on the CPU).
    """

    def __init__(
        self,
        num_prior_samples: int = 1000,
        method: str = "heun",
        steps: int = 32,
        batch_size: int | None = None,
        num_refs: int = 100,
        re_tessellations: int = 50,
        permutations: int = 200,
        tarp_observations: int = 100,
        tarp_samples: int = 16,
        grid_size: int = 36,
        evaluators: Sequence[Callable[[Tensor], dict]] = (),
        value_range: Sequence[float] = (-1.0, 1.0),
        progress: bool = False,
        posterior_evaluators: Sequence[Callable[..., dict]] = (),
        precision: str = "32-true",
    ):
        self.num_prior_samples = check_int(num_prior_samples, "monitor num_prior_samples", 4)
        if method not in SAMPLERS:
            raise ValueError(
                f"unknown monitor method {method!r}; expected one of {sorted(SAMPLERS)}"
            )
        self.method = method
        self.steps = check_int(steps, "monitor steps", 1)
        self.batch_size = (
            None if batch_size is None else check_int(batch_size, "monitor batch_size", 1)
        )
        self.num_refs = check_int(num_refs, "monitor num_refs", 2)
        self.re_tessellations = check_int(re_tessellations, "monitor re_tessellations", 1)
        self.permutations = check_int(permutations, "monitor permutations", 0)
        self.tarp_observations = check_int(tarp_observations, "monitor tarp_observations", 0)
        self.tarp_samples = check_int(tarp_samples, "monitor tarp_samples", 2)
        self.grid_size = check_int(grid_size, "monitor grid_size", 1)
        self.evaluators = list(evaluators or [])
        for ev in self.evaluators:
            if not callable(ev):
                raise TypeError(f"monitor evaluators must be callables, got {type(ev)}")
        self.posterior_evaluators = list(posterior_evaluators or [])
        for ev in self.posterior_evaluators:
            if not callable(ev):
                raise TypeError(f"monitor posterior_evaluators must be callables, got {type(ev)}")
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"monitor value_range must satisfy a < b, got {value_range}")
        self.value_range = (lo, hi)
        self.progress = bool(progress)
        self.precision = check_precision(precision, "monitor")

    def options(self) -> dict:
        keys = (
            "num_prior_samples",
            "method",
            "steps",
            "num_refs",
            "re_tessellations",
            "permutations",
            "tarp_observations",
            "tarp_samples",
        )
        out = {k: getattr(self, k) for k in keys}
        if self.precision != "32-true":  # absent at fp32: older run directories stay valid
            out["precision"] = self.precision
        return out

    # ------------------------------------------------------------------------ pieces
    def prior_samples(self, prior, *, seed: int, round_index: int) -> Tensor:
        """``num_prior_samples`` samples of the prior (on the CPU), from the round's stream."""
        device = device_of(prior)
        g = derived_generator(seed, round_index, "monitor", "prior", device=device)
        if isinstance(prior, GaussianPrior):
            return prior.sample(self.num_prior_samples, g).cpu()
        with torch.no_grad(), precision_scope(self.precision, device):
            x = sample(
                inference_prior(prior, self.precision),
                self.num_prior_samples,
                method=self.method,
                steps=self.steps,
                generator=g,
                progress=self.progress,
                batch_size=self.batch_size,
            )
        return x.cpu()

    def pq(self, x: Tensor, y: Tensor, tag: str, *, seed: int, round_index: int) -> dict:
        g = derived_generator(seed, round_index, "monitor", "pqmass", tag)
        return pqmass_metrics(
            x,
            y,
            tag,
            num_refs=self.num_refs,
            re_tessellations=self.re_tessellations,
            permutations=self.permutations,
            generator=g,
        )

    @staticmethod
    def residual_chi2_per_observation(
        population: Population, samples: Tensor, chunk: int = 256
    ) -> Tensor:
        """Reduced chi2 per observation (N,), float64 on the CPU, of samples (N, S, *event)
        (on any device) averaged over S, over observed entries only. It is computed on the
        population's device, chunk by chunk."""
        per_obs = []
        with torch.no_grad():
            for start in range(0, len(population), chunk):
                sub = population[start : start + chunk]
                x = samples[start : start + chunk].to(sub.y)
                pred = sub.forward(x)
                observed = sub.forward.observed
                if observed is not None and sub.forward.num_obs is not None:
                    observed = observed.unsqueeze(1)  # (n, 1, *obs): broadcast over S
                chi2 = residual_chi2(
                    sub.y.unsqueeze(1), pred, sub.noise.std(pred), 2, observed=observed
                )
                per_obs.append(chi2.mean(1).cpu())
        return torch.cat(per_obs).double()

    @staticmethod
    def residuals(population: Population, samples: Tensor, chunk: int = 256) -> dict:
        """Reduced chi2 of the bank per observation, over observed entries only."""
        chi2 = Monitor.residual_chi2_per_observation(population, samples, chunk)
        return {
            "residual_chi2_nu": float(chi2.mean()),  # = the mean: the name issues check
            "residual_chi2_nu_mean": float(chi2.mean()),
            "residual_chi2_nu_median": float(chi2.median()),
            "residual_chi2_nu_p90": float(torch.quantile(chi2, 0.9)),
        }

    def calibration(
        self,
        prior,
        population: Population,
        samples: Tensor,
        estep,
        round_dir: Path,
        *,
        seed: int,
        round_index: int,
    ) -> dict:
        """TARP and MIRA of posterior samples against the truth on the first observations."""
        n = min(self.tarp_observations, len(population))
        if n < 2 or population.truth is None:
            return {}
        if samples.shape[1] >= self.tarp_samples:
            post = samples[:n, : self.tarp_samples]
        else:  # the bank holds too few samples per observation: draw more, resumably
            bank = SampleBank(
                round_dir / "tarp_bank", n, self.tarp_samples, population.signal_shape
            )
            estep(prior, population[:n], bank, seed=seed, round_index=round_index, purpose="tarp")
            post = bank.load(device="cpu")
        post = post.detach().float().cpu()  # TARP and MIRA run on the CPU
        g = derived_generator(seed, round_index, "monitor", "tarp")
        r = tarp(post, population.truth[:n].float().cpu(), generator=g, bootstrap=0)
        atomic_write_text(
            round_dir / "tarp.json",
            json.dumps({"alpha": r.alpha.tolist(), "ecp": r.ecp.tolist()}),
        )
        m = mira(
            post,
            population.truth[:n].float().cpu(),
            generator=derived_generator(seed, round_index, "monitor", "mira"),
        )
        return {
            "tarp_atc": float(r.atc),
            "tarp_ks": float(r.ks_stat),
            "mira_score": float(m.score),
            "mira_expected": float(m.expected),
            "mira_z": float(m.z),
        }

    # ------------------------------------------------------------------------ a round
    def __call__(
        self,
        round_index: int,
        prior,
        population: Population,
        samples: Tensor,
        estep,
        round_dir: Path,
        *,
        seed: int,
        previous_prior_samples: Tensor | None,
    ) -> tuple[dict, dict[str, Path], Tensor]:
        """Measures round k: returns (metrics, images written, the prior samples drawn).

        ``samples`` is the round's bank, with shape (N, S, *event_shape), on any device: the
        residuals are computed on the population's device, everything else on the CPU.
        """
        k = round_index
        samples = samples.detach().cpu()  # the metrics' copy (no copy when it is on the CPU)
        row: dict = {}
        images: dict[str, Path] = {}
        prior_x = self.prior_samples(prior, seed=seed, round_index=k)
        row.update(self.pq(prior_x, samples[:, 0], "drift", seed=seed, round_index=k))
        if previous_prior_samples is not None:
            row.update(
                self.pq(prior_x, previous_prior_samples, "convergence", seed=seed, round_index=k)
            )
        truth = population.truth
        if truth is not None:
            truth = truth.detach().cpu()
            row.update(self.pq(prior_x, truth, "truth", seed=seed, round_index=k))
            err = samples.mean(1).to(truth) - truth
            row["posterior_mean_rmse"] = float(err.pow(2).flatten(1).mean(1).sqrt().mean())
        if not getattr(population.forward, "blind", False):  # blind: with the lens samples,
            row.update(self.residuals(population, samples))  # by LensParameterMetrics
        if truth is not None and self.tarp_observations > 0:
            row.update(
                self.calibration(
                    prior, population, samples, estep, round_dir, seed=seed, round_index=k
                )
            )
        for ev in self.evaluators:
            row.update({name: float(v) for name, v in ev(prior_x).items()})
        for ev in self.posterior_evaluators:
            out = ev(
                population=population,
                samples=samples,
                prior_samples=prior_x,
                round_dir=round_dir,
                round_index=k,
            )
            row.update({name: float(v) for name, v in out.items()})
        if is_image_shape(population.signal_shape):
            n = self.grid_size
            for name, x in (("posterior_samples", samples[:n, 0]), ("prior_samples", prior_x[:n])):
                images[name] = save_sample_grid(x, round_dir / f"{name}.png", self.value_range)
        return row, images, prior_x

    def population_grids(self, population: Population, run_dir: Path) -> dict[str, Path]:
        """Grids of the observations (when image-shaped, e.g. lensed images) and truths."""
        images: dict[str, Path] = {}
        if not is_image_shape(population.signal_shape):
            return images
        n = min(self.grid_size, len(population))
        if is_image_shape(tuple(population.y.shape[1:])):
            images["observations"] = save_sample_grid(
                population.y[:n], run_dir / "observations.png", self.value_range
            )
        if population.truth is not None:
            images["truth"] = save_sample_grid(
                population.truth[:n], run_dir / "truth.png", self.value_range
            )
        return images
