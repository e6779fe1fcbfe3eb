r"""Denoisers: the common interface of every prior, and EDM preconditioning for networks.

A denoiser estimates the posterior mean :math:`D(x_t, t) \approx E[x \mid x_t]` under the
forward process :math:`x_t = \alpha_t x + \sigma_t \varepsilon` of its :attr:`schedule`. From it
follow (Tweedie's formulas)

.. math::
    \nabla \log p_t(x_t) = \frac{\alpha_t D(x_t, t) - x_t}{\sigma_t^2}, \qquad
    \mathrm{Cov}[x \mid x_t] = \frac{\sigma_t^2}{\alpha_t} \frac{\partial D}{\partial x_t}.

Every prior in hierprior (analytic or neural) and every posterior wrapper is a
:class:`Denoiser`, so every sampler runs on any of them.

:class:`EDMDenoiser` wraps a raw network :math:`F` with the preconditioning of Karras et al.
(2022), written for the rescaled variable :math:`z = x_t / \alpha_t` with noise level
:math:`s = \sigma_t / \alpha_t`:

.. math::
    D = c_{skip}(s) z + c_{out}(s) F(c_{in}(s) z, c_{noise}(s)), \quad
    c_{skip} = \frac{\sigma_d^2}{s^2 + \sigma_d^2}, \;
    c_{out} = \frac{s \sigma_d}{\sqrt{s^2 + \sigma_d^2}}, \;
    c_{in} = \frac{1}{\sqrt{s^2 + \sigma_d^2}}, \; c_{noise} = \tfrac14 \log s,

and :func:`dsm_loss` is the denoising score-matching loss with EDM's weight
:math:`\lambda(s) = (s^2 + \sigma_d^2) / (s \sigma_d)^2`, which gives the network a unit-scale
regression target at every noise level.

References:
    Karras et al. (2022), Elucidating the Design Space of Diffusion Models, arXiv 2206.00364.
    Efron (2011), Tweedie's formula and selection bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hierprior.diffusion.schedule import Schedule, VPSchedule

__all__ = ["Denoiser", "EDMDenoiser", "dsm_loss", "sample_training_times", "expand_time"]


def expand_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Returns t as a tensor with shape (B,) for a batch x with shape (B, *)."""
    t = torch.as_tensor(t, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    t = t.to(x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshapes a (B,) tensor to (B, 1, ..., 1) to broadcast against x with shape (B, *)."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1)).to(x.dtype)


class Denoiser(nn.Module):
    """Interface of a diffusion prior: ``denoiser(x_t, t) -> E[x | x_t]``.

    Subclasses set :attr:`schedule` and :attr:`event_shape` and implement :meth:`forward`
    with x_t with shape (B, *event_shape) and t a scalar or with shape (B,).
    """

    schedule: Schedule
    event_shape: tuple[int, ...]

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def alpha_sigma(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) shaped (B, 1, ..., 1) to broadcast against x with shape (B, *)."""
        alpha, sigma = self.schedule.alpha_sigma(expand_time(t, x))
        return _bcast(alpha, x), _bcast(sigma, x)

    def score(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Score of the marginal p_t at x_t, with the shape of x_t."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (alpha * self(x_t, t) - x_t) / sigma**2

    def tweedie_cov(self, x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        """Product Cov[x | x_t] v = (sigma_t^2 / alpha_t) (dD/dx_t)^T v, by one VJP.

        Exact denoisers have a symmetric Jacobian; networks need not, and the transpose is
        what a VJP gives without forming the Jacobian. x_t and v have shape (B, *event_shape).
        """
        alpha, sigma = self.alpha_sigma(t, x_t)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            d = self(x, t)
            (jtv,) = torch.autograd.grad(d, x, grad_outputs=v)
        return sigma**2 / alpha * jtv

    def check_event(self, x: Tensor, name: str = "x") -> None:
        """Raises a ValueError when x does not have shape (B, *event_shape)."""
        k = len(self.event_shape)
        if x.ndim < k + 1 or tuple(x.shape[-k:]) != tuple(self.event_shape):
            raise ValueError(
                f"{name} must have shape (B, {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(x.shape)}"
            )


class EDMDenoiser(Denoiser):
    """A network with EDM preconditioning, for any schedule.

    Arguments:
        backbone: a module ``F(x, c_noise) -> x`` with x with shape (B, *event_shape) and
            c_noise with shape (B,).
        event_shape: shape of one sample, e.g. (1, 28, 28) or (D,).
        schedule: the noise schedule (default VP).
        sigma_data: standard deviation of the data (EDM's sigma_d).
    """

    def __init__(
        self,
        backbone: nn.Module,
        event_shape: tuple[int, ...] | list[int],
        schedule: Schedule | None = None,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        self.backbone = backbone
        self.event_shape = tuple(int(n) for n in event_shape)
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.sigma_data = float(sigma_data)

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        self.check_event(x_t, "x_t")
        alpha, sigma = self.alpha_sigma(t, x_t)
        s = sigma / alpha
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / torch.sqrt(s**2 + sd**2)
        c_in = 1 / torch.sqrt(s**2 + sd**2)
        c_noise = torch.log(s.flatten()) / 4
        z = x_t / alpha
        out = self.backbone((c_in * z).to(x_t.dtype), c_noise.to(x_t.dtype))
        return c_skip * z + c_out * out


def sample_training_times(
    schedule: Schedule,
    n: int,
    *,
    distribution: str = "lognormal",
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Diffusion times for training, with shape (n,).

    ``"lognormal"`` draws log s ~ N(p_mean, p_std^2) (EDM's noise distribution, in the
    noise-to-signal ratio s) and maps s back to t, clamped to the schedule's range;
    ``"uniform"`` draws t ~ U(t_min, 1).
    """
    if device is None and generator is not None:
        device = generator.device
    if distribution == "lognormal":
        log_s = p_mean + p_std * torch.randn(n, generator=generator, device=device)
        lo = schedule.ratio(torch.tensor(max(schedule.t_min, 1e-5), dtype=torch.float64))
        hi = schedule.ratio(torch.tensor(1.0, dtype=torch.float64))
        s = log_s.double().exp().clamp(float(lo), float(hi))
        return schedule.t_from_ratio(s).float().to(device)
    if distribution == "uniform":
        u = torch.rand(n, generator=generator, device=device)
        return schedule.t_min + (1 - schedule.t_min) * u
    raise ValueError(f"unknown training-time distribution {distribution!r}")


def dsm_loss(
    denoiser: Denoiser,
    x: Tensor,
    *,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_data: float | None = None,
    time_distribution: str = "lognormal",
    reduce: bool = True,
) -> Tensor:
    """Denoising score-matching loss with EDM weighting.

    ``E_t E_eps lambda(s_t) ||D(alpha_t x + sigma_t eps, t) - x||^2 / dim``, with x with shape
    (B, *event_shape). The per-sample loss (shape (B,)) is returned when ``reduce=False``.
    """
    if t is None:
        t = sample_training_times(
            denoiser.schedule,
            x.shape[0],
            distribution=time_distribution,
            generator=generator,
            device=x.device,
        )
    t = expand_time(t, x)
    sd = sigma_data if sigma_data is not None else getattr(denoiser, "sigma_data", 0.5)
    alpha, sigma = denoiser.alpha_sigma(t, x)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_t = alpha * x + sigma * eps
    s = sigma / alpha
    weight = (s**2 + sd**2) / (s * sd) ** 2
    err = (weight * (denoiser(x_t, t) - x) ** 2).flatten(1).mean(1)
    return err.mean() if reduce else err
