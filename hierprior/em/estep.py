r"""E-step: posterior samples of every observation under the current prior, with Lightning.

For each observation i, draw :math:`x_i^{(1..S)} \sim p_\theta(x \mid y_i)` with a posterior
sampler of :mod:`hierprior.posterior` (or, for a Gaussian prior with a linear forward model,
exactly: ``method="exact"``). The observations are split into fixed batches of consecutive
indices; ``Trainer.predict`` runs the batches that the :class:`~hierprior.em.bank.SampleBank`
does not hold yet, and :class:`BankWriter` stores each batch as one atomic shard, so a killed
E-step resumes at the first missing batch. Each batch draws from its own generator, seeded from
(run seed, round, first observation of the batch): a resumed round equals an uninterrupted one.

Several devices work: Lightning's distributed sampler gives each rank its own batches, and
shards are named by observation indices, never by rank.
"""

from __future__ import annotations

import hashlib
import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader

from hierprior.em.bank import SampleBank
from hierprior.em.population import Population

__all__ = ["PosteriorSamplingModule", "BankWriter", "run_estep", "derive_seed", "estep_batches"]

log = logging.getLogger(__name__)


def derive_seed(*keys) -> int:
    """A 63-bit seed derived deterministically from any keys (ints, strings)."""
    digest = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def estep_batches(num_obs: int, batch_size: int) -> list[Tensor]:
    """The fixed partition of observations 0..N-1 into batches of consecutive indices."""
    return list(torch.arange(num_obs).split(batch_size))


def exact_posterior_samples(
    prior, population: Population, num_samples: int, generator: torch.Generator
) -> Tensor:
    """Exact samples of a Gaussian prior's posterior under a linear-Gaussian model, (N, S, D)."""
    from hierprior.posterior import exact_gaussian_posterior

    mean, cov = exact_gaussian_posterior(prior, population.forward, population.noise, population.y)
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(
        (mean.shape[0], num_samples, mean.shape[1]),
        generator=generator,
        device=mean.device,
        dtype=mean.dtype,
    )
    return mean[:, None, :] + torch.einsum("nij,nsj->nsi", chol, z)


class PosteriorSamplingModule(pl.LightningModule):
    """Wraps a prior and a posterior sampler for ``Trainer.predict`` over observation batches.

    Arguments:
        prior: the current prior (a Denoiser).
        population: the observations.
        sampler: keyword arguments of :func:`hierprior.posterior.sample_posterior` (``method``,
            ``steps`` and the method's options), or ``{"method": "exact"}``.
        num_samples: posterior samples per observation S.
        seed: the run seed; round_index: the EM round (both enter each batch's seed).
    """

    def __init__(
        self,
        prior,
        population: Population,
        sampler: dict,
        num_samples: int,
        seed: int,
        round_index: int,
    ):
        super().__init__()
        self.prior = prior
        self.population = population
        self.sampler = dict(sampler)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.round_index = int(round_index)

    def predict_step(self, batch: Tensor, batch_idx: int = 0) -> dict:
        indices = batch.flatten().cpu()
        sub = self.population[indices].to(self.device)
        generator = torch.Generator(self.device)
        generator.manual_seed(derive_seed(self.seed, self.round_index, int(indices[0])))
        options = dict(self.sampler)
        method = options.pop("method")
        if method == "exact":
            samples = exact_posterior_samples(self.prior, sub, self.num_samples, generator)
        else:
            from hierprior.posterior import sample_posterior

            with torch.inference_mode(False), torch.enable_grad():
                samples = sample_posterior(
                    self.prior,
                    sub.forward,
                    sub.noise,
                    sub.y,
                    method=method,
                    num_samples=self.num_samples,
                    generator=generator,
                    **options,
                )
        return {"indices": indices, "samples": samples.detach()}


class BankWriter(BasePredictionWriter):
    """Writes each predicted batch into the sample bank as one atomic shard."""

    def __init__(self, bank: SampleBank):
        super().__init__(write_interval="batch")
        self.bank = bank

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        self.bank.write(prediction["indices"], prediction["samples"])


def run_estep(
    prior,
    population: Population,
    bank: SampleBank,
    *,
    sampler: dict,
    num_samples: int,
    batch_size: int,
    seed: int,
    round_index: int,
    trainer: dict | None = None,
    progress: bool = False,
) -> SampleBank:
    """Fills the bank with posterior samples of every observation it does not hold yet."""
    bank.refresh()
    todo = [b for b in estep_batches(len(population), batch_size) if not bank.done[b].all()]
    if not todo:
        return bank
    log.info(
        "E-step round %d: %d batch(es) of up to %d observations",
        round_index,
        len(todo),
        batch_size,
    )
    module = PosteriorSamplingModule(prior, population, sampler, num_samples, seed, round_index)
    loader = DataLoader(todo, batch_size=None, shuffle=False)
    runner = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=[BankWriter(bank)],
        inference_mode=False,
        **(trainer or {}),
    )
    runner.predict(module, dataloaders=loader, return_predictions=False)
    bank.refresh()
    if not bank.is_complete():
        missing = bank.missing().tolist()
        raise RuntimeError(
            f"E-step round {round_index} left observations without samples: {missing[:10]}"
        )
    return bank
