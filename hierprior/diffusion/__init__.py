"""Diffusion priors: schedules, denoisers (analytic and neural), losses and samplers."""

from hierprior.diffusion.analytic import GaussianMixturePrior, GaussianPrior
from hierprior.diffusion.checkpoint import load_prior, save_prior
from hierprior.diffusion.denoiser import Denoiser, EDMDenoiser, dsm_loss
from hierprior.diffusion.sampling import (
    SAMPLERS,
    check_sampler,
    ddim_sampler,
    ddpm_sampler,
    dpm2m_sampler,
    dpm3m_sampler,
    heun_sampler,
    nfe,
    sample,
    unipc_sampler,
)
from hierprior.diffusion.schedule import Schedule, VESchedule, VPSchedule, get_schedule
from hierprior.diffusion.solvers import multistep_sampler

__all__ = [
    "Denoiser",
    "EDMDenoiser",
    "GaussianMixturePrior",
    "GaussianPrior",
    "SAMPLERS",
    "Schedule",
    "VESchedule",
    "VPSchedule",
    "check_sampler",
    "ddim_sampler",
    "ddpm_sampler",
    "dpm2m_sampler",
    "dpm3m_sampler",
    "dsm_loss",
    "get_schedule",
    "heun_sampler",
    "load_prior",
    "multistep_sampler",
    "nfe",
    "sample",
    "save_prior",
    "unipc_sampler",
]
