r"""Observation noise models :math:`y_i = A_i(x_i) + n_i`: one interface, asked, never type-tested.

:class:`NoiseModel` is what every caller (posterior methods, Langevin, the EM monitor, the
population) asks of a noise model. Every model has

- ``sample(shape, generator, device, dtype)``: a realisation with shape (N, [S,] *obs_shape);
- ``log_prob(y, y_pred)``: :math:`\log p(n = y - y_\mathrm{pred})` per observation (and
  sample), with shape (N,) or (N, S) (a learned model: up to one constant);
- ``score(n)``: :math:`\nabla_n \log p(n)`, with the shape of n;
- ``curvature()``: a bound on the curvature of :math:`-\log p(n)` (the largest eigenvalue of
  :math:`-\nabla^2 \log p`), a 0-d tensor or one with shape (N,): it sets safe Langevin steps;
- ``std(like)``: a marginal scale broadcast to the shape of ``like`` (for a Gaussian model the
  marginal standard deviation :math:`\sqrt{\Sigma_{jj}}`; for another the model says what it
  is, e.g. :class:`~hierprior.physics.LearnedNoise`'s noise unit ``scale``);
- ``standardize(n)``: n in units of the noise, so that :math:`\|{\rm standardize}(n)\|^2/M
  \approx 1` for a typical realisation (a Gaussian model whitens; another divides by ``std``):
  the residual :math:`\chi^2/\nu` of the EM monitor;
- ``check(y)``: a one-line ValueError when observations with the shape of y cannot use it;
- ``num_obs`` (N, or None when shared), ``obs_shape`` (None when it fits any), ``noise[idx]``
  (the model of a subset of observations, as ``forward[idx]``).

A model with ``gaussian = True`` is :math:`n_i \sim \mathcal{N}(0, \Sigma_i)`, and also has
``cov_action(v)`` (:math:`\Sigma v`), ``inv_cov_action(v)`` (:math:`\Sigma^{-1} v`),
``whiten(n)`` (:math:`\Sigma^{-1/2} n` for a square root with :math:`\Sigma^{-1/2\top}
\Sigma^{-1/2} = \Sigma^{-1}`) and ``covariance_matrix(like)`` (the dense :math:`\Sigma_i`,
(N, M, M), for closed-form posteriors): what MMPS, CLA, ΠGDM, DAPS's exact step, TDS's ΠGDM
twist and the exact posterior use. :class:`GaussianNoiseModel` is their base: a new Gaussian
model (e.g. stationary correlated noise with its covariance applied by FFT) implements
``cov_action``, ``inv_cov_action``, ``whiten``, ``half_log_det``, ``std``, ``curvature``,
``sample`` and ``_select``, and gets ``score``, ``log_prob``, ``standardize`` and a dense
``covariance_matrix`` from it. Methods that need a Gaussian likelihood check ``noise.gaussian``.

:class:`GaussianNoise` is the diagonal Gaussian :math:`\Sigma_i = \operatorname{diag}
(\sigma_i^2)`, with the log-likelihood of observation i

.. math::
    \log p(y_i \mid \hat y_i) = -\frac12 \sum_j \left[
        \frac{(y_{ij} - \hat y_{ij})^2}{\sigma_{ij}^2} + \log(2\pi\sigma_{ij}^2) \right],

summed over the M values j of the observation. :math:`\sigma` is one scalar for all
observations, one scalar per observation, or a per-pixel map per observation (or shared).
Shapes follow the forward models: tensors have shape (N, *obs_shape) or (N, S, *obs_shape),
where row i belongs to observation i and the S axis holds samples (the noise of observation i
applies to every sample).

:func:`noise_score` and :func:`likelihood_score` give :math:`\nabla_n \log p(n)` and
:math:`\nabla_x \log p(y \mid x) = -J_A(x)^\top s(y - A(x))` for any model.

References:
    Chung et al. (2023), Diffusion Posterior Sampling for General Noisy Inverse Problems,
    arXiv 2209.14687.
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712.
    Legin et al. (2023), Beyond Gaussian Noise, arXiv 2302.03046 (the score of learned noise).
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from hierprior.checks import check_tensor
from hierprior.physics.forward import ForwardModel, ObservationCount, observation_index

__all__ = [
    "NoiseModel",
    "GaussianNoiseModel",
    "GaussianNoise",
    "noise_score",
    "likelihood_score",
]


class NoiseModel(ObservationCount, nn.Module, abc.ABC):
    """Base class of observation noise models for N observations (or shared).

    Attributes:
        num_obs: the number of observations N it has parameters for, or None when shared.
        obs_shape: the shape of one observation, or None when it fits any.
        gaussian: whether the noise is Gaussian, :math:`\\mathcal{N}(0, \\Sigma_i)`: then
            ``cov_action``, ``inv_cov_action``, ``whiten`` and ``covariance_matrix`` exist.
        diagonal: whether the noise is Gaussian with a diagonal covariance, whose variances are
            ``std(like) ** 2`` (methods that work per pixel, e.g. the joint lens sampler, need it).
    """

    num_obs: int | None = None
    obs_shape: tuple[int, ...] | None = None
    gaussian: bool = False
    diagonal: bool = False

    def __getitem__(self, idx: object) -> NoiseModel:
        """The noise model of a subset of observations; a shared model returns itself."""
        if self.num_obs is None:
            return self
        return self._select(observation_index(idx, self.num_obs))

    # ------------------------------------------------------------------ every model
    @abc.abstractmethod
    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """A noise realisation with shape (N, [S,] *obs_shape)."""

    @abc.abstractmethod
    def log_prob(self, y: Tensor, y_pred: Tensor) -> Tensor:
        """log p(y | y_pred) per observation (and sample), with shape (N,) or (N, S)."""

    @abc.abstractmethod
    def score(self, n: Tensor) -> Tensor:
        """The score grad_n log p(n) for n with shape (N, [S,] *obs_shape); same shape."""

    @abc.abstractmethod
    def curvature(self) -> Tensor:
        """A bound on the largest eigenvalue of -grad^2 log p(n): a 0-d tensor (shared) or
        one with shape (N,)."""

    @abc.abstractmethod
    def std(self, like: Tensor) -> Tensor:
        """A marginal scale broadcast to the shape (N, [S,] *obs_shape) of like, in its
        dtype (see the module docstring for what each model returns)."""

    def standardize(self, n: Tensor) -> Tensor:
        """n in units of the noise, with the shape of n: ``n / std(n)`` (a Gaussian model
        whitens instead)."""
        return n / self.std(n)

    def check(self, y: Tensor) -> None:
        """Raises a one-line ValueError when observations y (N, *obs) cannot use this model
        (a different obs_shape, or N != num_obs)."""
        check_tensor(y, "y")
        if self.obs_shape is not None and tuple(y.shape[1:]) != tuple(self.obs_shape):
            raise ValueError(
                f"the noise model has obs_shape {tuple(self.obs_shape)} but the observations "
                f"have shape {tuple(y.shape[1:])}"
            )
        if self.num_obs is not None and y.shape[0] != self.num_obs:
            raise ValueError(
                f"y has N = {y.shape[0]} observations but noise.num_obs = {self.num_obs}"
            )

    @abc.abstractmethod
    def _select(self, index: Tensor) -> NoiseModel:
        """The noise model of observations ``index`` (a 1-D LongTensor)."""

    # ------------------------------------------------------------------ Gaussian models
    def _not_gaussian(self, what: str):
        raise TypeError(
            f"{type(self).__name__} is not a Gaussian noise model: {what} needs one "
            "(noise.gaussian is False)"
        )

    def cov_action(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma v` for v with shape (N, [S,] *obs_shape) (Gaussian models only)."""
        return self._not_gaussian("cov_action")

    def inv_cov_action(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma^{-1} v` for v with shape (N, [S,] *obs_shape) (Gaussian models only)."""
        return self._not_gaussian("inv_cov_action")

    def whiten(self, n: Tensor) -> Tensor:
        r""":math:`\Sigma^{-1/2} n` for n with shape (N, [S,] *obs_shape) (Gaussian models
        only)."""
        return self._not_gaussian("whiten")

    def covariance_matrix(self, like: Tensor) -> Tensor:
        r"""The dense :math:`\Sigma_i`, with shape (N, M, M) in float64, for observations with
        the shape (N, *obs) of like (Gaussian models only)."""
        return self._not_gaussian("covariance_matrix")

    # ------------------------------------------------------------------ shapes
    def _residual(self, y: Tensor, y_pred: Tensor) -> tuple[Tensor, int]:
        """r = y - y_pred with shape (N, [S,] *obs), and its number of event dims.

        y and y_pred have shapes (N, [S,] *obs) with the same N and obs; one of them may lack
        the S axis. Without an obs_shape the event dims are those of y after its first axis.
        """
        for name, t in (("y", y), ("y_pred", y_pred)):
            check_tensor(t, name)
            if t.dim() < 1:
                raise ValueError(f"{name} must have a leading observation axis; got a scalar")
        k = len(self.obs_shape) if self.obs_shape is not None else y.dim() - 1
        ly, lp = y.dim() - k, y_pred.dim() - k
        if (
            ly not in (1, 2)
            or lp not in (1, 2)
            or y.shape[ly:] != y_pred.shape[lp:]
            or y.shape[0] != y_pred.shape[0]
            or (self.obs_shape is not None and tuple(y.shape[ly:]) != tuple(self.obs_shape))
        ):
            raise ValueError(
                f"y and y_pred must have shapes (N, [S,] *obs_shape) with the same N and "
                f"obs_shape; got {tuple(y.shape)} and {tuple(y_pred.shape)}"
            )
        if ly < lp:
            y = y.unsqueeze(1)
        elif lp < ly:
            y_pred = y_pred.unsqueeze(1)
        try:
            return y - y_pred, k
        except RuntimeError as err:
            raise ValueError(f"y and y_pred do not broadcast: {err}") from None


class GaussianNoiseModel(NoiseModel):
    r"""Base of Gaussian noise models :math:`n_i \sim \mathcal{N}(0, \Sigma_i)` (``gaussian``).

    A subclass implements ``cov_action``, ``inv_cov_action``, ``whiten``, :meth:`half_log_det`,
    ``std`` (the marginal standard deviations), ``curvature`` (:math:`1 / \lambda_{min}
    (\Sigma_i)`), ``sample`` and ``_select``; the score :math:`-\Sigma^{-1} n`, the
    log-density, the standardisation (whitening) and a dense covariance matrix (by applying
    ``cov_action`` to the unit vectors; override it where a closed form is cheaper) follow.
    """

    gaussian = True

    @abc.abstractmethod
    def half_log_det(self, like: Tensor, event_dims: int) -> Tensor:
        r""":math:`\tfrac12 \log\det \Sigma_i` for each row of like (shape (N, [S,] *obs)
        with ``event_dims`` event dims), with shape like.shape[:-event_dims]."""

    def score(self, n: Tensor) -> Tensor:
        r""":math:`\nabla_n \log p(n) = -\Sigma^{-1} n`."""
        return -self.inv_cov_action(n)

    def standardize(self, n: Tensor) -> Tensor:
        """The whitened n (:meth:`whiten`)."""
        return self.whiten(n)

    def log_prob(self, y: Tensor, y_pred: Tensor) -> Tensor:
        r"""Gaussian log-likelihood of each observation, summed over its values.

        :math:`-\tfrac12 r^\top \Sigma^{-1} r - \tfrac12 \log\det(2\pi\Sigma)` with
        r = y - y_pred.

        Arguments:
            y: the observations, with shape (N, *obs_shape) (or (N, S, *obs_shape)).
            y_pred: the predictions A(x), with shape (N, *obs_shape) or (N, S, *obs_shape).

        Returns:
            log p(y | y_pred), with shape (N,) or (N, S). When the model has no obs_shape, the
            event dims are those of y after its first (N) axis.
        """
        r, k = self._residual(y, y_pred)
        dims = tuple(range(r.dim() - k, r.dim()))
        quad = (r * self.inv_cov_action(r)).sum(dim=dims) if k > 0 else r * self.inv_cov_action(r)
        m = math.prod(r.shape[r.dim() - k :])
        return -0.5 * quad - self.half_log_det(r, k) - 0.5 * m * math.log(2 * math.pi)

    def covariance_matrix(self, like: Tensor) -> Tensor:
        r"""The dense :math:`\Sigma_i`, with shape (N, M, M) in float64 (``cov_action`` applied
        to the M unit vectors of observations with the shape (N, *obs) of like)."""
        n, obs = like.shape[0], tuple(like.shape[1:])
        m = math.prod(obs)
        eye = torch.eye(m, dtype=torch.float64, device=like.device).reshape(1, m, *obs)
        cols = self.cov_action(eye.expand(n, m, *obs))  # (N, M, *obs): row j = Sigma e_j
        return cols.reshape(n, m, m).mT


class GaussianNoise(GaussianNoiseModel):
    r"""Diagonal Gaussian noise :math:`n_i \sim \mathcal{N}(0, \operatorname{diag}(\sigma_i^2))`.

    Arguments:
        sigma: the standard deviation, finite and > 0:

            - a float (or 0-d tensor): one sigma shared by all observations;
            - a tensor with shape (N,): one sigma per observation;
            - a tensor with shape (N, *obs_shape), e.g. (N, M) or (N, C, H, W): one sigma per
              value of each observation;
            - with ``per_observation=False``, a tensor with shape obs_shape: one shared map.
        per_observation: whether a tensor sigma (with >= 1 dims) has a leading observation axis.

    A float sigma is kept in float64 and cast to the dtype of the data on use.
    """

    diagonal = True

    def __init__(self, sigma: float | Tensor, per_observation: bool = True):
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, Tensor)):
            raise TypeError(f"sigma must be a float or a tensor; got {type(sigma).__name__}")
        self._dtype_from_sigma = isinstance(sigma, Tensor) and sigma.dtype.is_floating_point
        if isinstance(sigma, Tensor):
            if sigma.dtype.is_complex or sigma.dtype == torch.bool:
                raise TypeError(f"sigma must be real; got {sigma.dtype}")
            if not sigma.dtype.is_floating_point:
                sigma = sigma.to(torch.get_default_dtype())
        else:
            sigma = torch.tensor(float(sigma), dtype=torch.float64)
        if not torch.isfinite(sigma).all():
            raise ValueError("sigma must be finite; got NaN or infinite values")
        if not (sigma > 0).all():
            raise ValueError(f"sigma must be > 0; got a minimum of {sigma.min().item():g}")
        if sigma.dim() == 0:
            self.num_obs, self.obs_shape = None, None
        elif per_observation:
            self.num_obs = sigma.shape[0]
            self.obs_shape = tuple(sigma.shape[1:]) if sigma.dim() > 1 else None
        else:
            self.num_obs, self.obs_shape = None, tuple(sigma.shape)
        self.register_buffer("sigma", sigma)

    def extra_repr(self) -> str:
        return f"sigma_shape={tuple(self.sigma.shape)}, num_obs={self.num_obs}"

    def _broadcast(self, shape: tuple[int, ...]) -> Tensor:
        """sigma expanded to shape (N, [S,] *obs_shape) (an expanded view)."""
        s = self.sigma
        if self.obs_shape is not None:
            k = len(self.obs_shape)
            if len(shape) < k or tuple(shape[len(shape) - k :]) != self.obs_shape:
                raise ValueError(
                    f"noise with obs_shape {self.obs_shape} got a tensor with shape {shape}"
                )
        if self.num_obs is None:
            return s.expand(shape)
        if len(shape) < 1 or shape[0] != self.num_obs:
            raise ValueError(
                f"noise has {self.num_obs} observations: expected shape (N, [S,] *obs_shape) "
                f"with N = {self.num_obs}; got {shape}"
            )
        if self.obs_shape is None:
            return s.reshape(self.num_obs, *([1] * (len(shape) - 1))).expand(shape)
        extra = len(shape) - len(self.obs_shape)
        if extra not in (1, 2):
            raise ValueError(
                f"expected shape (N, *{self.obs_shape}) or (N, S, *{self.obs_shape}); got {shape}"
            )
        return (s.unsqueeze(1) if extra == 2 else s).expand(shape)

    def std(self, like: Tensor) -> Tensor:
        """sigma broadcast to the shape (N, [S,] *obs_shape) of like, in its dtype.

        Row i holds observation i's sigma, broadcast over the S axis. May be an expanded view.
        """
        check_tensor(like, "like")
        return self._broadcast(tuple(like.shape)).to(like.dtype)

    def check(self, y: Tensor) -> None:
        check_tensor(y, "y")
        std = self.std(y)  # sigma broadcasts to y's shape, or a ValueError naming both
        bad = ~(torch.isfinite(std) & (std > 0)).flatten(1).all(1)  # sigma changed since
        if bool(bad.any()):
            raise ValueError(
                "noise levels must be finite and > 0; observations "
                f"{bad.nonzero().flatten().tolist()} violate this"
            )

    def variance_like(self, y: Tensor) -> Tensor:
        """sigma^2 broadcast to the shape of y, with shape (N, [S,] *obs_shape)."""
        return self.std(y) ** 2

    def cov_action(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma_y v` for v with shape (N, [S,] *obs_shape)."""
        return v * self.variance_like(v)

    def inv_cov_action(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma_y^{-1} v` for v with shape (N, [S,] *obs_shape)."""
        return v / self.variance_like(v)

    def whiten(self, n: Tensor) -> Tensor:
        r""":math:`n / \sigma`."""
        return n / self.std(n)

    def half_log_det(self, like: Tensor, event_dims: int) -> Tensor:
        logs = torch.log(self.std(like))
        if event_dims == 0:
            return logs
        return logs.sum(dim=tuple(range(like.dim() - event_dims, like.dim())))

    def curvature(self) -> Tensor:
        r""":math:`1 / \min_j \sigma_{ij}^2`: 0-d when shared, (N,) per observation."""
        s = self.sigma
        if self.num_obs is None:
            return 1.0 / s.min() ** 2
        return 1.0 / s.reshape(self.num_obs, -1).amin(1) ** 2

    def covariance_matrix(self, like: Tensor) -> Tensor:
        return torch.diag_embed(self.std(like.double()).reshape(like.shape[0], -1) ** 2)

    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draws noise with shape (N, [S,] *obs_shape) from the generator (never the global RNG).

        Arguments:
            shape: the shape of the realisation.
            generator: the random generator; its device is used when device is None.
            device: the output device (default: the generator's, else sigma's).
            dtype: the output dtype (default: sigma's for a tensor sigma, else the default
                dtype).
        """
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(int(s) for s in shape)
        if generator is not None:
            d, gd = torch.device(device) if device is not None else None, generator.device
            if d is not None and (d.type != gd.type or d.index not in (None, gd.index)):
                raise ValueError(
                    f"device {device} differs from the generator's device {generator.device}"
                )
            device = generator.device
        elif device is None:
            device = self.sigma.device
        if dtype is None:
            dtype = self.sigma.dtype if self._dtype_from_sigma else torch.get_default_dtype()
        std = self._broadcast(shape).to(device=device, dtype=dtype)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype) * std

    def _select(self, index: Tensor) -> GaussianNoise:
        sub = GaussianNoise(self.sigma.index_select(0, index.to(self.sigma.device)), True)
        sub._dtype_from_sigma = self._dtype_from_sigma
        return sub


def noise_score(noise: NoiseModel, n: Tensor) -> Tensor:
    r"""The score :math:`\nabla_n \log p(n)` of a noise model at n (shape (N, [S,] *obs_shape)):
    ``noise.score(n)`` (:math:`-\Sigma^{-1} n` for a Gaussian model)."""
    if not isinstance(noise, NoiseModel):
        raise TypeError(f"noise must be a hierprior NoiseModel, got {type(noise).__name__}")
    return noise.score(n)


def likelihood_score(forward: ForwardModel, noise: NoiseModel, y: Tensor, x: Tensor) -> Tensor:
    r""":math:`\nabla_x \log p(y \mid x) = -J_A(x)^\top s(y - A(x))`, by one VJP through A.

    Arguments:
        forward: the forward model A.
        noise: any :class:`NoiseModel` (its :meth:`~NoiseModel.score` is s).
        y: the observations, with shape (N, *forward.output_shape).
        x: the signals (or parameters), with shape (N, [S,] *forward.input_shape).

    Returns:
        The likelihood score with the shape of x (detached).
    """
    if not isinstance(forward, ForwardModel):
        raise TypeError(f"forward must be a ForwardModel, got {type(forward).__name__}")
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        y_pred = forward(leaf)
        target = y if y_pred.dim() == y.dim() else y.unsqueeze(1)
        cotangent = -noise_score(noise, (target - y_pred).detach())
        (grad,) = torch.autograd.grad(y_pred, leaf, grad_outputs=cotangent)
    return grad
