r"""Likelihoods beyond Gaussian noise: SLIC and Langevin inference of physical parameters.

SLIC (score-based likelihood characterisation, Legin et al. 2023) learns the distribution Q of
the noise from realisations with a diffusion model, trained like any prior
(``hierprior-train-prior experiment=slic_noise``, on :func:`noise_realisations`), and uses
its score in the likelihood :math:`p(y \mid \eta) = Q(y - M(\eta))`:

- :class:`~hierprior.physics.LearnedNoise` (re-exported here) is the noise model: it plugs in
  where :class:`~hierprior.physics.GaussianNoise` does (the dps, daps-Langevin and tds
  posterior samplers, :func:`langevin`), gives the likelihood score through the forward
  model's VJP and samples new noise realisations;
- :func:`langevin` samples low-dimensional parameters :math:`\eta` under either likelihood;
- :mod:`hierprior.likelihood.simulate` makes non-Gaussian image noise (correlated Gaussian
  noise plus cosmic rays), and :func:`correlated_learned_noise` is correlated Gaussian noise
  as a SLIC noise model with an exact (analytic) denoiser: the learned-noise option of the EM
  populations (``population/noise=learned_correlated``).

References:
    Legin, Adam, Hezaveh & Perreault-Levasseur (2023), Beyond Gaussian Noise: A Generalized
    Approach to Likelihood Analysis with Non-Gaussian Noise, arXiv 2302.03046.
"""

from hierprior.likelihood.langevin import langevin, log_posterior_gradient
from hierprior.likelihood.simulate import (
    correlated_learned_noise,
    correlated_noise,
    correlated_noise_covariance,
    cosmic_rays,
    noise_realisations,
)
from hierprior.physics.learned_noise import LearnedNoise
from hierprior.physics.noise import likelihood_score, noise_score

__all__ = [
    "LearnedNoise",
    "correlated_learned_noise",
    "correlated_noise",
    "correlated_noise_covariance",
    "cosmic_rays",
    "langevin",
    "likelihood_score",
    "log_posterior_gradient",
    "noise_score",
    "noise_realisations",
]
