r"""A learned noise model: the score of a diffusion model trained on noise realisations (SLIC).

Real images carry noise that is not white Gaussian (correlated noise, cosmic rays, detector
artefacts). With a Gaussian likelihood, posteriors are then over-confident or biased. SLIC
(score-based likelihood characterisation, Legin et al. 2023) learns the noise distribution
:math:`Q` from realisations instead: a diffusion model trained on noise samples :math:`n`
gives the score :math:`s(n) = \nabla_n \log Q(n)`, and since :math:`y = M(\eta) + n`,

.. math::
    \log p(y \mid \eta) = \log Q(y - M(\eta)), \qquad
    \nabla_\eta \log p(y \mid \eta) = -J_M(\eta)^\top s(y - M(\eta)),

one VJP through the forward model (:func:`~hierprior.physics.likelihood_score`).

**Which score.** The denoiser :math:`D(x_t, t) \approx E[u \mid x_t]` of the noise in units of
``scale`` (:math:`u = n / \mathrm{scale}`), with :math:`x_t = \alpha_t u + \sigma_t
\varepsilon`, gives by Tweedie's formula the score of the *smoothed* distribution
:math:`Q_s = Q * \mathcal{N}(0, s^2 I)`, :math:`s = \sigma_t / \alpha_t`:

.. math::
    \nabla_u \log Q_s(u) = \frac{D(\alpha_t u, t) - u}{s^2}, \qquad
    \nabla_n \log Q_{s}(n) = \frac{1}{\mathrm{scale}} \nabla_u \log Q_s(n / \mathrm{scale}).

:class:`LearnedNoise` evaluates it at one small time :math:`t_{min}` set by ``smoothing``
(:math:`s`, default 0.1, in units of ``scale``). The choice trades bias against variance:

- *bias*: the likelihood used is that of :math:`y = M(\eta) + n + \mathrm{scale}\, s\,
  \varepsilon`, i.e. extra white noise of variance :math:`(\mathrm{scale}\, s)^2`. For Gaussian
  noise :math:`\mathcal{N}(0, \Sigma)` it is :math:`\mathcal{N}(0, \Sigma + \mathrm{scale}^2
  s^2 I)`: posteriors are slightly wider (conservative), by a relative variance of about
  :math:`s^2 \mathrm{scale}^2 / \lambda` along a noise eigenvalue :math:`\lambda` (1% for
  :math:`s = 0.1` and white noise of std ``scale``). Sharp features of Q (outliers, bounds)
  are blurred on the scale :math:`s`;
- *variance*: the network's error :math:`\delta D` enters the score as :math:`\delta D / s^2`
  while the score itself shrinks only to :math:`O(1)`, so the error grows as :math:`s \to 0`,
  and below the smallest training noise level (``Schedule.t_min``) the network was never
  trained.

The best s depends on how well the network is trained: a small CPU-trained U-Net
(experiments/slic/README.md) gave calibrated 4-parameter posteriors at s = 0.3 and slightly
over-confident ones at s = 0.1; an MLP on 8-d Gaussian noise (tests/test_slic.py) has a 7%
score error at s = 0.15. The curvature of :math:`-\log Q_s` is bounded by
:math:`1/(\mathrm{scale}\, s)^2` (:meth:`LearnedNoise.curvature`), which sets safe step
sizes.

Sampling new realisations runs the diffusion model's sampler (:meth:`LearnedNoise.sample`);
:meth:`LearnedNoise.log_prob` integrates the score along the straight line from 0 to the
residual (Gauss-Legendre), which gives :math:`\log Q_s(r)` up to the constant
:math:`\log Q_s(0)` (the same for every residual; likelihood *ratios* are exact when the learned
field is a gradient).

:class:`LearnedNoise` is a :class:`~hierprior.physics.NoiseModel` (``gaussian`` False): every
posterior method that needs only a likelihood score or value takes it (dps, daps with Langevin,
tds with the dps twist, :func:`~hierprior.likelihood.langevin`). Its marginal scale
(:meth:`LearnedNoise.std`) is the noise unit ``scale``: the EM monitor's residual
:math:`\chi^2/\nu` is then in units of ``scale^2`` (1 when the realisations in units of
``scale`` have unit variance, as :func:`~hierprior.likelihood.noise_realisations` makes the
Gaussian part).

References:
    Legin, Adam, Hezaveh & Perreault-Levasseur (2023), Beyond Gaussian Noise: A Generalized
    Approach to Likelihood Analysis with Non-Gaussian Noise, arXiv 2302.03046.
    Efron (2011), Tweedie's formula and selection bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hierprior.checks import (
    check_int,
    check_optional_int,
    check_positive,
    check_shape,
    check_tensor,
)
from hierprior.diffusion.denoiser import Denoiser
from hierprior.diffusion.sampling import check_sampler, resolve_spacing, sample
from hierprior.io import device_dtype
from hierprior.physics.noise import NoiseModel

__all__ = ["LearnedNoise"]


class LearnedNoise(NoiseModel):
    r"""Noise :math:`n = \mathrm{scale} \cdot u`, :math:`u \sim Q`, Q learned by a diffusion model.

    Arguments:
        denoiser: a :class:`~hierprior.diffusion.Denoiser` of noise realisations in units of
            ``scale`` (e.g. trained by ``hierprior-train-prior`` on
            :func:`~hierprior.likelihood.noise_realisations`, or an analytic
            :class:`~hierprior.diffusion.GaussianPrior` for a known Gaussian). Its
            ``event_shape`` has as many values as ``obs_shape`` (the two may differ, e.g. an MLP
            over flattened images).
        scale: the noise unit, finite and > 0: a float (shared by all observations) or a tensor
            with shape (N,) (one per observation, e.g. exposure-dependent).
        smoothing: s > 0, the noise level (noise-to-signal ratio :math:`\sigma_t / \alpha_t`,
            in units of ``scale``) at which the score is evaluated; the time is
            :math:`t_{min} = t(s)` (see the module docstring for the bias of this choice).
        obs_shape: the event shape of an observation; default ``denoiser.event_shape``.
        sampler: the diffusion sampler of :meth:`sample` (``"heun"``, ``"ddpm"``, ...).
        steps: its time steps.
        spacing: its time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"``; None: the sampler's
            own (:func:`~hierprior.diffusion.sampling.default_spacing`).
        quadrature: Gauss-Legendre points of the line integral of :meth:`log_prob`.
        batch_size: the largest number of rows per denoiser call (memory), or None.

    Tensors have shape (N, [S,] *obs_shape) like :class:`~hierprior.physics.GaussianNoise`
    (with a shared ``scale``, any leading dims). The denoiser's weights are not trained here
    (everything runs without gradients through the network).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        scale: float | Tensor = 1.0,
        smoothing: float = 0.1,
        obs_shape: Sequence[int] | None = None,
        *,
        sampler: str = "heun",
        steps: int = 64,
        spacing: str | None = None,
        quadrature: int = 8,
        batch_size: int | None = None,
    ):
        super().__init__()
        if not isinstance(denoiser, Denoiser):
            raise TypeError(f"denoiser must be a hierprior Denoiser, got {type(denoiser)}")
        event = tuple(int(v) for v in denoiser.event_shape)
        if obs_shape is None:
            obs_shape = event
        obs_shape = check_shape(obs_shape, "obs_shape")
        if math.prod(obs_shape) != math.prod(event):
            raise ValueError(
                f"obs_shape {obs_shape} has {math.prod(obs_shape)} values but the denoiser's "
                f"event_shape {event} has {math.prod(event)}"
            )
        if isinstance(scale, Tensor):
            if not scale.dtype.is_floating_point:
                scale = scale.to(torch.get_default_dtype())
            if scale.dim() > 1:
                raise ValueError(
                    f"scale must be a float or a tensor with shape (N,), got {tuple(scale.shape)}"
                )
            scale = scale.detach()
        else:
            scale = torch.tensor(check_positive(scale, "scale"), dtype=torch.float64)
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("scale must be finite and > 0")
        self.smoothing = check_positive(smoothing, "smoothing")
        schedule = denoiser.schedule
        s_max = float(schedule.ratio(torch.tensor(1.0, dtype=torch.float64)))
        if self.smoothing > s_max:
            raise ValueError(
                f"smoothing {self.smoothing:g} exceeds the schedule's largest noise level "
                f"{s_max:g}"
            )
        check_sampler(sampler, steps)
        spacing = resolve_spacing(sampler, spacing)
        self.denoiser = denoiser
        self.obs_shape = obs_shape
        self.num_obs = scale.shape[0] if scale.dim() == 1 else None
        self.register_buffer("scale", scale)
        t = schedule.t_from_ratio(torch.tensor(self.smoothing, dtype=torch.float64))
        alpha, sigma = schedule.alpha_sigma(t)
        #: the diffusion time t_min at which the score is evaluated
        self.t = float(t)
        self._alpha = float(alpha)
        self._s = float(sigma / alpha)  # = smoothing up to the bisection's precision
        self.sampler, self.steps, self.spacing = sampler, steps, spacing
        self.quadrature = check_int(quadrature, "quadrature")
        self.batch_size = check_optional_int(batch_size, "batch_size")
        self.denoiser.requires_grad_(False)

    def extra_repr(self) -> str:
        return (
            f"obs_shape={self.obs_shape}, num_obs={self.num_obs}, smoothing={self.smoothing:g}, "
            f"t={self.t:.4g}"
        )

    # ----------------------------------------------------------------- shapes
    def _lead(self, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
        k = len(self.obs_shape)
        if len(shape) < k or tuple(shape[len(shape) - k :]) != self.obs_shape:
            raise ValueError(
                f"noise with obs_shape {self.obs_shape} got {name} with shape {tuple(shape)}"
            )
        lead = tuple(shape[: len(shape) - k])
        if self.num_obs is not None and (len(lead) not in (1, 2) or lead[0] != self.num_obs):
            raise ValueError(
                f"noise has {self.num_obs} observations: expected {name} with shape "
                f"(N, [S,] *{self.obs_shape}) with N = {self.num_obs}; got {tuple(shape)}"
            )
        return lead

    def _scale_like(self, t: Tensor) -> Tensor:
        """scale broadcast against t with shape (*lead, *obs_shape), in t's dtype."""
        s = self.scale.to(device=t.device, dtype=t.dtype)
        if self.num_obs is None:
            return s
        return s.reshape(self.num_obs, *([1] * (t.dim() - 1)))

    def std(self, like: Tensor) -> Tensor:
        """The noise unit ``scale`` broadcast to the shape (N, [S,] *obs_shape) of like, in its
        dtype: the marginal standard deviation when the realisations in units of ``scale``
        have unit variance (the residual chi2/nu of the EM monitor is in units of scale^2)."""
        check_tensor(like, "like")
        self._lead(tuple(like.shape), "like")
        return self._scale_like(like).expand(like.shape)

    # ----------------------------------------------------------------- score
    def curvature(self) -> Tensor:
        r""":math:`1/(\mathrm{scale}\, s)^2`, bounding the curvature of :math:`-\log Q_s`.

        Returns a 0-d tensor (shared scale) or one with shape (N,). It holds for the exact
        smoothed distribution: :math:`-\nabla^2 \log Q_s = (I - \mathrm{Cov}[u \mid z]/s^2)/s^2
        \preceq I/s^2`.
        """
        return 1.0 / (self.scale * self._s) ** 2

    @torch.no_grad()
    def score(self, n: Tensor) -> Tensor:
        r""":math:`\nabla_n \log Q_s(n)` for n with shape (*lead, *obs_shape) (lead = (N, [S])
        with a per-observation scale); same shape and dtype, detached."""
        check_tensor(n, "n", floating=True)
        lead = self._lead(tuple(n.shape), "n")
        device, dtype = device_dtype(self.denoiser)
        scale = self._scale_like(n)
        u = (n / scale).reshape(-1, *self.denoiser.event_shape).to(device=device, dtype=dtype)
        rows = u.shape[0]
        chunk = self.batch_size or max(rows, 1)
        out = []
        for part in u.split(chunk):
            d = self.denoiser(self._alpha * part, torch.full((), self.t, dtype=torch.float64))
            out.append((d - part) / self._s**2)
        su = torch.cat(out) if out else u
        su = su.to(device=n.device, dtype=n.dtype).reshape(*lead, *self.obs_shape)
        return su / scale

    # ----------------------------------------------------------------- NoiseModel
    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """New noise realisations with shape (N, [S,] *obs_shape), by the diffusion sampler.

        Arguments:
            shape: the shape of the realisation (any leading dims with a shared scale).
            generator: the source of all randomness, on the denoiser's device.
            device: the output device (default: the denoiser's).
            dtype: the output dtype (default: the denoiser's).
        """
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(int(v) for v in shape)
        lead = self._lead(shape, "shape")
        rows = math.prod(lead)
        u = sample(
            self.denoiser,
            rows,
            method=self.sampler,
            steps=self.steps,
            generator=generator,
            spacing=self.spacing,
            batch_size=self.batch_size,
        )
        dev, dt = device_dtype(self.denoiser)
        out = u.reshape(*lead, *self.obs_shape)
        out = out * self._scale_like(out)
        return out.to(device=device or dev, dtype=dtype or dt)

    @torch.no_grad()
    def log_prob(self, y: Tensor, y_pred: Tensor) -> Tensor:
        r""":math:`\log Q_s(y - y_\mathrm{pred}) - \log Q_s^{(u)}(0)` per observation (and sample).

        The line integral :math:`\int_0^1 s(\lambda r) \cdot r \, d\lambda` of the learned
        score by ``quadrature`` Gauss-Legendre points, minus :math:`M \log \mathrm{scale}`: the
        log-density up to one constant, :math:`\log Q_s(0)` of the denoiser's distribution.
        Differences between residuals (likelihood ratios) are exact when the learned score is a
        gradient field and accurate along the path.

        Arguments:
            y: the observations, with shape (N, *obs_shape) (or (N, S, *obs_shape)).
            y_pred: the predictions, with shape (N, *obs_shape) or (N, S, *obs_shape).

        Returns:
            A tensor with shape (N,) or (N, S).
        """
        r, k = self._residual(y, y_pred)
        nodes, weights = np.polynomial.legendre.leggauss(self.quadrature)
        dims = tuple(range(r.dim() - k, r.dim()))
        total = torch.zeros(r.shape[: r.dim() - k], dtype=r.dtype, device=r.device)
        for x, w in zip(nodes, weights):
            lam = 0.5 * (float(x) + 1.0)  # node on [0, 1], weight w / 2
            total = total + 0.5 * float(w) * (self.score(lam * r) * r).sum(dim=dims)
        log_scale = torch.log(self.scale.to(device=total.device, dtype=total.dtype))
        if self.num_obs is not None:
            log_scale = log_scale.reshape(-1, *([1] * (total.dim() - 1)))
        return total - math.prod(self.obs_shape) * log_scale

    def _select(self, index: Tensor) -> LearnedNoise:
        return LearnedNoise(
            self.denoiser,
            self.scale.index_select(0, index.to(self.scale.device)),
            self.smoothing,
            self.obs_shape,
            sampler=self.sampler,
            steps=self.steps,
            spacing=self.spacing,
            quadrature=self.quadrature,
            batch_size=self.batch_size,
        )
