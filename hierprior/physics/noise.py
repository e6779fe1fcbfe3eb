r"""Observation noise models :math:`y_i = A_i(x_i) + n_i`.

:class:`GaussianNoise` is the diagonal Gaussian :math:`n_i \sim \mathcal{N}(0, \Sigma_i)`,
:math:`\Sigma_i = \operatorname{diag}(\sigma_i^2)`, with the log-likelihood of observation i

.. math::
    \log p(y_i \mid \hat y_i) = -\frac12 \sum_j \left[
        \frac{(y_{ij} - \hat y_{ij})^2}{\sigma_{ij}^2} + \log(2\pi\sigma_{ij}^2) \right],

summed over the M values j of the observation. :math:`\sigma` is one scalar for all
observations, one scalar per observation, or a per-pixel map per observation (or shared).
Shapes follow the forward models: tensors have shape (N, *obs_shape) or (N, S, *obs_shape),
where row i belongs to observation i and the S axis holds samples (the noise of observation i
applies to every sample). Subsets of observations are taken with ``noise[idx]``, like
``model[idx]`` for :class:`~hierprior.physics.forward.ForwardModel`.

References:
    Chung et al. (2023), Diffusion Posterior Sampling for General Noisy Inverse Problems,
    arXiv 2209.14687.
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from hierprior.physics.forward import ObservationCount, observation_index

__all__ = ["NoiseModel", "GaussianNoise"]


class NoiseModel(ObservationCount, nn.Module, abc.ABC):
    """Base class of observation noise models for N observations (or shared).

    Attributes:
        num_obs: the number of observations N it has parameters for, or None when shared.
    """

    num_obs: int | None = None

    def __getitem__(self, idx: object) -> NoiseModel:
        """The noise model of a subset of observations; a shared model returns itself."""
        if self.num_obs is None:
            return self
        return self._select(observation_index(idx, self.num_obs))

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
    def _select(self, index: Tensor) -> NoiseModel:
        """The noise model of observations ``index`` (a 1-D LongTensor)."""


class GaussianNoise(NoiseModel):
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
        if not isinstance(like, Tensor):
            raise TypeError(f"expected a tensor; got {type(like).__name__}")
        return self._broadcast(tuple(like.shape)).to(like.dtype)

    def variance_like(self, y: Tensor) -> Tensor:
        """sigma^2 broadcast to the shape of y, with shape (N, [S,] *obs_shape)."""
        return self.std(y) ** 2

    def cov_action(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma_y v` for v with shape (N, [S,] *obs_shape)."""
        return v * self.variance_like(v)

    def inv_cov_action(self, v: Tensor) -> Tensor:
        r""":math:`\Sigma_y^{-1} v` for v with shape (N, [S,] *obs_shape)."""
        return v / self.variance_like(v)

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

    def log_prob(self, y: Tensor, y_pred: Tensor) -> Tensor:
        """Gaussian log-likelihood of each observation, summed over its values.

        Arguments:
            y: the observations, with shape (N, *obs_shape) (or (N, S, *obs_shape)).
            y_pred: the predictions A(x), with shape (N, *obs_shape) or (N, S, *obs_shape).

        Returns:
            log p(y | y_pred), with shape (N,) or (N, S). When sigma has no obs_shape, the
            event dims are those of y after its first (N) axis.
        """
        for name, t in (("y", y), ("y_pred", y_pred)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
            if t.dim() < 1:
                raise ValueError(f"{name} must have a leading observation axis; got a scalar")
        k = len(self.obs_shape) if self.obs_shape is not None else y.dim() - 1
        ly, lp = y.dim() - k, y_pred.dim() - k
        if (
            ly not in (1, 2)
            or lp not in (1, 2)
            or y.shape[ly:] != y_pred.shape[lp:]
            or y.shape[0] != y_pred.shape[0]
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
            r = y - y_pred
        except RuntimeError as err:
            raise ValueError(f"y and y_pred do not broadcast: {err}") from None
        std = self.std(r)
        lp_values = -0.5 * (r / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return lp_values.sum(dim=tuple(range(r.dim() - k, r.dim()))) if k > 0 else lp_values

    def _select(self, index: Tensor) -> GaussianNoise:
        sub = GaussianNoise(self.sigma.index_select(0, index.to(self.sigma.device)), True)
        sub._dtype_from_sigma = self._dtype_from_sigma
        return sub
