"""Diffusion priors: schedules, denoisers (analytic and neural), losses and samplers."""

from hierprior.diffusion.analytic import GaussianMixturePrior, GaussianPrior
from hierprior.diffusion.checkpoint import load_prior, save_prior
from hierprior.diffusion.denoiser import Denoiser, EDMDenoiser, dsm_loss
from hierprior.diffusion.sampling import (
    SAMPLERS,
    ddim_sampler,
    ddpm_sampler,
    heun_sampler,
    sample,
)
from hierprior.diffusion.schedule import Schedule, VESchedule, VPSchedule, get_schedule

__all__ = [
    "Denoiser",
    "EDMDenoiser",
    "GaussianMixturePrior",
    "GaussianPrior",
    "SAMPLERS",
    "Schedule",
    "VESchedule",
    "VPSchedule",
    "ddim_sampler",
    "ddpm_sampler",
    "dsm_loss",
    "get_schedule",
    "heun_sampler",
    "load_prior",
    "sample",
    "save_prior",
]
