r"""Langevin inference of low-dimensional physical parameters under any noise model.

For N observations :math:`y_i = M_i(\eta_i) + n_i` with a parameter vector
:math:`\eta \in \mathbb{R}^d` (a forward model with ``input_shape = (d,)``), a prior
:math:`p(\eta)` and a noise model (Gaussian, or learned by SLIC), :func:`langevin` runs C
unadjusted Langevin chains per observation,

.. math::
    \eta \leftarrow \eta + \tau P \nabla_\eta \big[\log p(y \mid \eta) + \log p(\eta)\big]
        + \sqrt{2 \tau}\, L \xi, \qquad L L^\top = P, \quad \xi \sim \mathcal{N}(0, I),

with the likelihood score :math:`\nabla_\eta \log p(y \mid \eta) = -J_M^\top s(y - M(\eta))`
(:func:`~hierprior.physics.likelihood_score`, with s the noise model's score: :math:`s(r) =
-\Sigma^{-1} r` for Gaussian noise, the learned noise score for
:class:`~hierprior.physics.LearnedNoise`) and the prior score by autograd. :math:`P` is a
constant preconditioner (identity by default, the update of Legin et al. 2023), given or
*adapted during burn-in*: ``adapt = k`` replaces it k times during the first half of the
burn-in by the inverse Hessian of :math:`-\log p(\eta \mid y)` at each chain's state (central
finite differences of the gradient, symmetrised, eigenvalues made positive and capped so that
P never exceeds the initial preconditioner :math:`P_0`, e.g. the prior covariance), so that
every chain moves on the posterior's own scales (the parameters of an image model differ by
orders of magnitude). After the burn-in P is fixed, so each chain is a plain preconditioned
ULA chain.

The drift is *tamed*: in the whitened frame :math:`\eta = P^{1/2} w` the drift
:math:`\tau P^{1/2} \nabla \log \pi` is shortened to norm at most 1 (one preconditioned
unit per step). Far from the posterior, or while P is still too wide, this keeps the chains
from exploding where the posterior is stiff; near equilibrium the drift has norm about
:math:`\tau \sqrt{d}` and taming is inactive for :math:`\tau \sqrt d < 1`.

Unadjusted Langevin has an :math:`O(\tau)` bias: for a Gaussian posterior with :math:`P =`
its covariance, the chain's stationary covariance is :math:`P / (1 - \tau / 2)` (5% wider in
variance at :math:`\tau = 0.1`) and its autocorrelation time about :math:`2 / \tau` steps.
Everything is batched over the N observations and C chains (one likelihood evaluation of all
N·C rows per step); observations never couple.

References:
    Legin, Adam, Hezaveh & Perreault-Levasseur (2023), Beyond Gaussian Noise: A Generalized
    Approach to Likelihood Analysis with Non-Gaussian Noise, arXiv 2302.03046.
    Roberts & Tweedie (1996), Exponential convergence of Langevin distributions and their
    discrete approximations, Bernoulli 2(4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hierprior.checks import check_int, check_positive
from hierprior.physics import ForwardModel, NoiseModel, noise_score
from hierprior.posterior.base import PosteriorSamplingError, check_data

__all__ = ["langevin", "log_posterior_gradient"]


def _check(forward: ForwardModel, noise: NoiseModel, y: Tensor) -> None:
    if not isinstance(forward, ForwardModel):
        raise TypeError(f"forward must be a hierprior ForwardModel, got {type(forward).__name__}")
    if len(forward.input_shape) != 1:
        raise ValueError(
            f"forward must map a parameter vector (input_shape (d,)), got input_shape "
            f"{forward.input_shape}"
        )
    check_data(forward, noise, y)


def _log_prior_fn(prior) -> Callable[[Tensor], Tensor]:
    if isinstance(prior, torch.distributions.Distribution):
        return prior.log_prob
    if callable(prior):
        return prior
    raise TypeError(
        f"prior must be a torch.distributions.Distribution or a callable, got {type(prior)}"
    )


def log_posterior_gradient(
    forward: ForwardModel,
    noise: NoiseModel,
    y: Tensor,
    prior: torch.distributions.Distribution | Callable[[Tensor], Tensor],
    eta: Tensor,
) -> Tensor:
    r""":math:`\nabla_\eta [\log p(y \mid \eta) + \log p(\eta)]` for eta with shape (N, C, d).

    Arguments:
        forward: the model :math:`M`, input_shape (d,).
        noise: any :class:`~hierprior.physics.NoiseModel` (e.g.
            :class:`~hierprior.physics.GaussianNoise` or :class:`~hierprior.physics.LearnedNoise`).
        y: the observations, with shape (N, *forward.output_shape).
        prior: :math:`p(\eta)`: a ``torch.distributions.Distribution`` whose ``log_prob`` maps
            (N, C, d) to (N, C) (event shape (d,), e.g. ``Independent(Normal(loc, scale), 1)``
            or ``MultivariateNormal``), or a callable doing the same.
        eta: the parameters, with shape (N, C, d).

    Returns:
        The gradient with the shape of eta (detached).
    """
    log_prior = _log_prior_fn(prior)
    with torch.enable_grad():
        leaf = eta.detach().requires_grad_(True)
        y_pred = forward(leaf)
        cotangent = -noise_score(noise, (y.unsqueeze(1) - y_pred).detach())
        lp = log_prior(leaf)
        if tuple(lp.shape) != tuple(eta.shape[:2]):
            raise ValueError(
                f"the prior's log-density must have shape {tuple(eta.shape[:2])} for parameters "
                f"with shape {tuple(eta.shape)}, got {tuple(lp.shape)} (wrap a per-coordinate "
                "distribution in torch.distributions.Independent(..., 1))"
            )
        total = (y_pred * cotangent).sum() + lp.sum()
        (grad,) = torch.autograd.grad(total, leaf)
    return grad


def _as_preconditioner(p: Tensor | None, n: int, c: int, d: int, like: Tensor) -> Tensor:
    """The preconditioner as a full matrix per chain, (N, C, d, d)."""
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    if p is None:
        return eye.expand(n, c, d, d).clone()
    if not isinstance(p, Tensor):
        raise TypeError(f"preconditioner must be a tensor or None, got {type(p).__name__}")
    p = p.to(device=like.device, dtype=like.dtype)
    if not torch.isfinite(p).all():
        raise ValueError("preconditioner holds NaN or Inf")
    if tuple(p.shape) in ((d,), (n, d)):
        if not (p > 0).all():
            raise ValueError("a diagonal preconditioner must be > 0")
        p = torch.diag_embed(p)
    if tuple(p.shape) == (d, d):
        p = p.expand(n, d, d)
    if tuple(p.shape) != (n, d, d):
        raise ValueError(
            f"preconditioner must have shape ({d},), ({d}, {d}), ({n}, {d}) or ({n}, {d}, {d}), "
            f"got {tuple(p.shape)}"
        )
    _, info = torch.linalg.cholesky_ex(p)
    if (info != 0).any():
        raise ValueError("preconditioner must be symmetric positive definite")
    return p.unsqueeze(1).expand(n, c, d, d).clone()


def _sqrt(p: Tensor) -> Tensor:
    """The symmetric square root L of SPD matrices P (L L^T = P), shape (..., d, d)."""
    values, vectors = torch.linalg.eigh(p)
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.mT


def _hessian_preconditioner(
    grad: Callable[[Tensor], Tensor], eta: Tensor, p: Tensor, h: float, root0: Tensor
) -> Tensor:
    r"""Inverse of :math:`-\nabla^2 \log \pi` at eta (N, C, d) by central differences.

    Steps h sqrt(diag P) per coordinate; the Hessian H is symmetrised and, in the frame of the
    initial preconditioner :math:`P_0 = R_0^2`, the eigenvalues of :math:`R_0 H R_0` are
    replaced by their absolute values floored at 1, so that the result never exceeds
    :math:`P_0`. A chain whose Hessian is not finite keeps its P.
    """
    n, c, d = eta.shape
    steps = h * torch.diagonal(p, dim1=-2, dim2=-1).sqrt()  # (N, C, d)
    cols = []
    for j in range(d):
        e = torch.zeros_like(eta)
        e[..., j] = steps[..., j]
        cols.append((grad(eta - e) - grad(eta + e)) / (2 * steps[..., j : j + 1]))
    hess = torch.stack(cols, dim=-1)  # (N, C, d, d): column j = -d grad / d eta_j
    hess = 0.5 * (hess + hess.mT)
    finite = torch.isfinite(hess).flatten(-2).all(-1)  # (N, C)
    eye = torch.eye(d, dtype=hess.dtype, device=hess.device)
    hess = torch.where(finite[..., None, None], hess, eye)
    values, vectors = torch.linalg.eigh(root0 @ hess @ root0)
    values = values.abs().clamp_min(1.0)
    inverse = root0 @ (vectors / values.unsqueeze(-2)) @ vectors.mT @ root0
    return torch.where(finite[..., None, None], 0.5 * (inverse + inverse.mT), p)


def langevin(
    forward: ForwardModel,
    noise: NoiseModel,
    y: Tensor,
    prior: torch.distributions.Distribution | Callable[[Tensor], Tensor],
    init: Tensor,
    *,
    num_samples: int = 100,
    burn_in: int = 500,
    thin: int = 1,
    step_size: float = 0.1,
    preconditioner: Tensor | None = None,
    adapt: int = 0,
    fd_step: float = 0.1,
    generator: torch.Generator | int | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict]:
    r"""Samples :math:`p(\eta \mid y_i)` for every observation by (preconditioned) Langevin.

    Arguments:
        forward: the model :math:`M`: a :class:`~hierprior.physics.ForwardModel` with
            ``input_shape = (d,)`` (per-observation with num_obs = N, or shared).
        noise: any :class:`~hierprior.physics.NoiseModel`:
            :class:`~hierprior.physics.GaussianNoise` (the Gaussian likelihood),
            :class:`~hierprior.physics.LearnedNoise` (SLIC), ...
        y: the observations, with shape (N, *forward.output_shape), finite.
        prior: :math:`p(\eta)`, a ``torch.distributions.Distribution`` with event shape (d,)
            (``log_prob`` of (N, C, d) is (N, C)) or a callable doing the same; use priors with
            full support (reparametrise bounded parameters), ULA steps anywhere.
        init: the chains' starting points, with shape (N, C, d) (C chains per observation) or
            (N, d) (one chain).
        num_samples: samples kept per chain (>= 1).
        burn_in: steps discarded before the first kept sample (>= 0).
        thin: keep every ``thin``-th state after the burn-in (>= 1); the run takes
            ``burn_in + num_samples * thin`` steps.
        step_size: :math:`\tau > 0`, relative to the preconditioner.
        preconditioner: the constant matrix P: None (identity), or a tensor with shape (d,) or
            (N, d) (diagonal) or (d, d) or (N, d, d) (symmetric positive definite); with
            ``adapt`` it is the start, the upper bound of the adapted P (pass the prior
            covariance) and sets the first finite-difference steps.
        adapt: how many times P is replaced by the inverse Hessian of the negative
            log-posterior at each chain's state, at evenly spaced steps of the first half of the
            burn-in (0: never; needs ``burn_in >= 2 * adapt``).
        fd_step: the finite-difference step of the Hessian, relative to sqrt(diag P).
        generator: a ``torch.Generator`` on y's device or an int seed; the global RNG is never
            used.
        return_info: also return ``{"preconditioner": P (N, C, d, d), "final": (N, C, d)}``.

    Returns:
        Samples with shape (N, C · num_samples, d) (chain-major), in y's dtype.

    Raises:
        TypeError, ValueError: bad input, before any step (shapes, NaN in y or init, options).
        PosteriorSamplingError: some observations' chains left the finite numbers (lower
            ``step_size`` or adapt the preconditioner).
    """
    _check(forward, noise, y)
    n = y.shape[0]
    d = forward.input_shape[0]
    num_samples = check_int(num_samples, "num_samples", 1)
    burn_in = check_int(burn_in, "burn_in", 0)
    thin = check_int(thin, "thin", 1)
    adapt = check_int(adapt, "adapt", 0)
    tau = check_positive(step_size, "step_size")
    fd_step = check_positive(fd_step, "fd_step")
    if adapt and burn_in < 2 * adapt:
        raise ValueError(f"adapt = {adapt} needs burn_in >= {2 * adapt}, got {burn_in}")
    _log_prior_fn(prior)
    if not isinstance(init, Tensor) or not init.is_floating_point():
        raise TypeError(f"init must be a floating-point tensor, got {type(init).__name__}")
    if init.dim() == 2:
        init = init.unsqueeze(1)
    if init.dim() != 3 or init.shape[0] != n or init.shape[2] != d:
        raise ValueError(
            f"init must have shape ({n}, C, {d}) or ({n}, {d}), got {tuple(init.shape)}"
        )
    if not torch.isfinite(init).all():
        raise ValueError("init holds NaN or Inf")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator(device=y.device).manual_seed(generator)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or an int seed, got {generator!r}")
    c = init.shape[1]
    eta = init.to(device=y.device, dtype=y.dtype).clone()
    p = _as_preconditioner(preconditioner, n, c, d, eta)
    adapt_at = {k * (burn_in // (2 * adapt)) for k in range(adapt)} if adapt else set()

    def grad(e: Tensor) -> Tensor:
        return log_posterior_gradient(forward, noise, y, prior, e)

    root = root0 = _sqrt(p)
    kept = []
    total = burn_in + num_samples * thin
    for step in range(total):
        if step in adapt_at:
            p = _hessian_preconditioner(grad, eta, p, fd_step, root0)
            root = _sqrt(p)
        # whitened frame eta = R w: drift tau R g (tamed to norm <= 1), noise sqrt(2 tau) xi
        drift = tau * (root @ grad(eta).unsqueeze(-1)).squeeze(-1)
        drift = drift / drift.norm(dim=-1, keepdim=True).clamp_min(1.0)
        xi = torch.randn(eta.shape, generator=generator, device=eta.device, dtype=eta.dtype)
        move = drift + math.sqrt(2 * tau) * xi
        eta = eta + (root @ move.unsqueeze(-1)).squeeze(-1)
        if step >= burn_in and (step - burn_in + 1) % thin == 0:
            kept.append(eta)
    samples = torch.stack(kept, dim=2).reshape(n, c * num_samples, d)
    bad = ~torch.isfinite(samples.flatten(1)).all(1)
    if bool(bad.any()):
        raise PosteriorSamplingError(
            f"langevin: the chains of observations {bad.nonzero().flatten().tolist()} hold NaN "
            "or Inf (lower step_size or adapt the preconditioner)",
            samples,
            bad,
        )
    if return_info:
        return samples, {"preconditioner": p, "final": eta}
    return samples
