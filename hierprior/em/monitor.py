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
  same E-step method). With ``calibration_pool = k > 1`` both are computed on the samples and
  truths average-pooled by k x k: calibration in any deterministic feature space is implied by
  calibration of the full posterior, and a pooled image keeps the scales the data resolve
  while the pixel-scale noise that no observation constrains (and which pins TARP's ECP at
  1 in high dimension) averages out.
- ``residual_chi2_nu`` (the mean over observations), ``residual_chi2_nu_median``,
  ``residual_chi2_nu_p90``: the reduced chi2 of the bank's residuals per observation
  (averaged over its samples, the residuals in units of the noise: ``noise.standardize``), over
  *observed* entries only (``forward.observed``).
- ``noise_prior``, ``noise_posterior``: the white pixel noise of the prior samples and of the
  bank (:func:`hierprior.evaluation.noise_level`: the robust scale of each image minus its
  3 x 3 median filter, in units of its peak, averaged over images), image-shaped signals only.
- with an **oracle** (the same network trained with the same budget directly on the truths:
  the upper bound of what EM can reach; :meth:`Monitor.reference`): ``oracle_truth_chi2``
  (its PQMass distance to the truths), ``truth_chi2_null`` (the mean of that test's
  permutation null: the distance of two samples of one distribution), the evaluators'
  metrics of the oracle's samples (``oracle_<metric>``) and of the truths
  (``truths_<metric>``), ``noise_oracle``, ``noise_truths``, and the **fidelity** of the
  round's prior, ``fidelity = (d_0 - d_k) / (d_0 - d_oracle)`` with d the PQMass chi2 to the
  truths (1: as close as the oracle; 0: no closer than round 0), and
  ``fidelity_<metric> = (m_k - m_0) / (m_oracle - m_0)`` for the evaluator metrics listed in
  ``fidelity_metrics`` (:func:`fidelity_columns`).
- any evaluators (callables mapping prior samples to scalars, e.g.
  :class:`~hierprior.evaluation.DigitShare`), any posterior evaluators (callables that also
  see the population, the bank and the round's folder, e.g.
  :class:`~hierprior.evaluation.MassMapMetrics`), and image grids.

Devices: the monitor works wherever the prior and the population live. The residuals are
computed on the population's device (the bank's samples are moved there chunk by chunk); every
other metric (PQMass, TARP, MIRA, the posterior-mean error, the evaluators, the grids) is
computed on the CPU from explicitly moved copies, so the bank may be given on any device.
Evaluators receive CPU tensors; posterior evaluators also receive the population (on its own
device). ``precision`` (``"32-true"``, ``"tf32"``, ``"bf16-mixed"``,
:mod:`hierprior.precision`) is that of :class:`~hierprior.em.EStep` for the prior samples: on
CUDA, plain fp32, TF32, or the network under bf16 autocast; a no-op on the CPU.

PQMass p-values (``*_pvalue``) are permutation p-values (``permutations > 0``, the default):
the chi2 p-value of the mean over tessellations is conservative (its null spread is far
smaller than chi2(K-1)'s), so it is not reported as a p-value; ``*_chi2`` is the statistic.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from hierprior.checks import check_float, check_int
from hierprior.diffusion import GaussianPrior, sample
from hierprior.diffusion.sampling import SAMPLERS
from hierprior.em.bank import SampleBank
from hierprior.em.estep import inference_prior
from hierprior.em.population import Population
from hierprior.io import atomic_write_text, device_of, is_image_shape, save_sample_grid
from hierprior.metrics import mira, pqmass, residual_chi2, tarp
from hierprior.precision import check_precision, precision_scope
from hierprior.seeds import derived_generator

__all__ = ["Monitor", "pqmass_metrics", "fidelity_columns"]

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
    null_mean: bool = False,
) -> dict[str, float]:
    """``{tag}_chi2`` and (with permutations) ``{tag}_pvalue`` of PQMass(x, y) (and with
    ``null_mean``, ``{tag}_chi2_null``: the mean of its permutation null).

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
        if null_mean:
            out[f"{tag}_chi2_null"] = float("nan") if r is None else float(r.null_chi2.mean())
    return out


def fidelity_columns(row: dict, first: dict, metrics: Sequence[str] = ()) -> dict:
    """``fidelity`` (from ``truth_chi2``) and ``fidelity_<m>`` for the evaluator metrics m.

    ``(v_0 - v_k) / (v_0 - v_oracle)`` for the PQMass distance (smaller is closer) and
    ``(m_k - m_0) / (m_oracle - m_0)`` for a metric; ``row`` is round k's metrics (with the
    ``oracle_*`` columns), ``first`` round 0's. NaN where round 0 equals the oracle.
    """

    def ratio(num: float, den: float) -> float:
        return num / den if den != 0 and math.isfinite(num) and math.isfinite(den) else math.nan

    out = {}
    if "truth_chi2" in row and "oracle_truth_chi2" in row and "truth_chi2" in first:
        d0, dk, do = first["truth_chi2"], row["truth_chi2"], row["oracle_truth_chi2"]
        out["fidelity"] = ratio(d0 - dk, d0 - do)
    for m in metrics:
        if m in row and f"oracle_{m}" in row and m in first:
            out[f"fidelity_{m}"] = ratio(row[m] - first[m], row[f"oracle_{m}"] - first[m])
    return out


def _callables(values: Sequence | None, name: str) -> list:
    """A list of the callables in values, or a one-line TypeError."""
    out = list(values or [])
    for ev in out:
        if not callable(ev):
            raise TypeError(f"monitor {name} must be callables, got {type(ev)}")
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
        calibration_pool: TARP and MIRA on k x k average-pooled images (1: the full images;
            image-shaped signals only).
        fidelity_metrics: evaluator metrics that get a ``fidelity_<metric>`` column when the
            run has an oracle (see :func:`fidelity_columns`).
        noise_background: the value subtracted before the peak of the noise level is taken
            (None: ``value_range[0]``, the empty sky; 0 for signed maps such as convergence).
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
        calibration_pool: int = 1,
        fidelity_metrics: Sequence[str] = (),
        noise_background: float | None = None,
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
        self.evaluators = _callables(evaluators, "evaluators")
        self.posterior_evaluators = _callables(posterior_evaluators, "posterior_evaluators")
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"monitor value_range must satisfy a < b, got {value_range}")
        self.value_range = (lo, hi)
        self.progress = bool(progress)
        self.precision = check_precision(precision, "monitor")
        self.calibration_pool = check_int(calibration_pool, "monitor calibration_pool", 1)
        self.fidelity_metrics = [str(m) for m in (fidelity_metrics or ())]
        self.noise_background = (
            lo
            if noise_background is None
            else check_float(noise_background, "monitor noise_background", -math.inf)
        )

    def with_evaluators(self, evaluators: Sequence[Callable[[Tensor], dict]]) -> Monitor:
        """A copy of this monitor with ``evaluators`` added after its own (this one is left
        as it is)."""
        out = copy.copy(self)
        out.evaluators = [*self.evaluators, *_callables(evaluators, "evaluators")]
        out.posterior_evaluators = list(self.posterior_evaluators)
        return out

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
        out = {**{k: getattr(self, k) for k in keys}, "precision": self.precision}
        if self.calibration_pool != 1:  # absent at 1: older run directories stay valid
            out["calibration_pool"] = self.calibration_pool
        return out

    def noise(self, images: Tensor) -> float:
        """The mean white pixel noise of images (n, C, H, W) in units of their peaks."""
        from hierprior.evaluation.structure import noise_level  # (evaluation imports em)

        b = self.noise_background
        x = images.detach().float().cpu().flatten(0, -4)[:, :1]
        return float(noise_level(x, (b, b + 1.0)).mean())

    def reference(self, population: Population, oracle, *, seed: int) -> dict:
        """What a round is compared with: the truths' evaluator metrics and noise
        (``truths_*``, ``noise_truths``) and, given an oracle prior (the same network trained
        on the truths), its samples' PQMass distance to the truths (``oracle_truth_chi2``,
        ``truth_chi2_null``), evaluator metrics (``oracle_*``) and noise (``noise_oracle``).
        Its samples come from the monitor's sampler and a stream of their own."""
        row: dict = {}
        truth = population.truth
        if truth is None:
            return row
        truth = truth.detach().cpu()
        image = is_image_shape(population.signal_shape)
        for ev in self.evaluators:
            row.update({f"truths_{k}": float(v) for k, v in ev(truth).items()})
        if image:
            row["noise_truths"] = self.noise(truth)
        if oracle is not None:
            x = self.prior_samples(oracle, seed=seed, round_index=-1)
            g = derived_generator(seed, -1, "monitor", "pqmass", "oracle")
            pq = pqmass_metrics(
                x, truth, "truth", num_refs=self.num_refs, re_tessellations=self.re_tessellations,
                permutations=max(self.permutations, 1), generator=g, null_mean=True,
            )  # fmt: skip
            row["oracle_truth_chi2"] = pq["truth_chi2"]
            row["truth_chi2_null"] = pq["truth_chi2_null"]
            for ev in self.evaluators:
                row.update({f"oracle_{k}": float(v) for k, v in ev(x).items()})
            if image:
                row["noise_oracle"] = self.noise(x)
        return row

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
        population's device, chunk by chunk, from the residuals in units of the noise
        (``noise.standardize``: whitened for Gaussian noise, divided by the noise unit
        ``scale`` for a :class:`~hierprior.physics.LearnedNoise`)."""
        per_obs = []
        with torch.no_grad():
            for start in range(0, len(population), chunk):
                sub = population[start : start + chunk]
                x = samples[start : start + chunk].to(sub.y)
                pred = sub.forward(x)
                observed = sub.forward.observed
                if observed is not None and sub.forward.num_obs is not None:
                    observed = observed.unsqueeze(1)  # (n, 1, *obs): broadcast over S
                z = sub.noise.standardize(sub.y.unsqueeze(1) - pred)
                chi2 = residual_chi2(z, torch.zeros_like(z), 1.0, 2, observed=observed)
                per_obs.append(chi2.mean(1).cpu())
        return torch.cat(per_obs).double()

    @staticmethod
    def residuals(population: Population, samples: Tensor, chunk: int = 256) -> dict:
        """Reduced chi2 of the bank per observation, over observed entries only."""
        chi2 = Monitor.residual_chi2_per_observation(population, samples, chunk)
        return {
            "residual_chi2_nu": float(chi2.mean()),  # the mean over observations
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
        truth = population.truth[:n].detach().float().cpu()
        if self.calibration_pool > 1 and is_image_shape(population.signal_shape):
            k = self.calibration_pool
            post = torch.nn.functional.avg_pool2d(post.flatten(0, 1), k).unflatten(
                0, post.shape[:2]
            )
            truth = torch.nn.functional.avg_pool2d(truth, k)
        g = derived_generator(seed, round_index, "monitor", "tarp")
        r = tarp(post, truth, generator=g, bootstrap=0)
        atomic_write_text(
            round_dir / "tarp.json",
            json.dumps({"alpha": r.alpha.tolist(), "ecp": r.ecp.tolist()}),
        )
        m = mira(post, truth, generator=derived_generator(seed, round_index, "monitor", "mira"))
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
        if is_image_shape(population.signal_shape):
            row["noise_prior"] = self.noise(prior_x)
            row["noise_posterior"] = self.noise(samples[:, 0])
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
