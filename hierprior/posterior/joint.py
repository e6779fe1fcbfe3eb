r"""Joint posterior of a source and its lens: lensed observations whose lens nobody has modelled.

For an observation :math:`y = A(\eta)\, x + n`, :math:`n \sim \mathcal N(0, \Sigma_y)`, with
an unknown source x (diffusion prior :math:`p(x)`) and unknown lens parameters :math:`\eta`
(prior :math:`p(\eta)`, a :class:`~hierprior.physics.lensing.LensPrior`; the forward model is a
:class:`~hierprior.physics.lensing.BlindLensing`), :class:`Joint` draws S joint samples
:math:`(x^{(s)}, \eta^{(s)}) \sim p(x, \eta \mid y)` per observation by a continuous-time Gibbs
sampler along the reverse diffusion (GibbsDDRM, Murata et al. 2023; Barco et al. 2025). Each
of the S chains of an observation carries its own :math:`(x_t, \eta)`; at every denoiser
evaluation of the reverse diffusion, at time t:

1. **lens step** — m Metropolis-adjusted Langevin (MALA) steps on :math:`\eta` targeting

   .. math:: \pi_t(\eta) \propto p(\eta)\, \mathcal N\bigl(y \mid A(\eta)\, \hat x_t,\;
       \Sigma_y + w_t I\bigr), \qquad \hat x_t = E[x \mid x_t], \quad
       w_t = \rho\, \frac{v\, s_t^2}{v + s_t^2}, \quad s_t = \sigma_t / \alpha_t,

   an approximation of :math:`p(\eta \mid x_t, y) \propto p(\eta) \int p(y \mid x, \eta)\,
   p(x \mid x_t)\, dx`: the source's remaining uncertainty :math:`\mathrm{Var}[x \mid x_t]`
   is that of a prior with per-pixel variance v (ΠGDM's :math:`r_t^2`; ``source_variance``),
   carried to the image with unit gain (lensing conserves surface brightness; ``widening``
   :math:`\rho` scales it), so early steps see a smooth, wide target and the lens moves
   freely while the source is still noise. :math:`\hat x_t` is the *prior's* denoised estimate
   (the posterior's would already fit y at the current lens and pin the chain to it);
2. **source step** — one step of any linear-lens posterior method (``mmps``, ``pigdm``,
   ``cla``, ``daps``) at the current :math:`\eta` of each chain.

After the last diffusion step, :math:`w = 0` and :math:`\hat x` is the source sample itself:
``final_warmup`` MALA steps adapt, then ``final_steps`` with the step size and
preconditioner frozen target :math:`p(\eta \mid x, y)` exactly (an exact MH kernel), which
gives the chain's :math:`\eta`. Its marginal is as good as the source's: the scheme is exact
in the limit of many diffusion steps and a lens chain at equilibrium at every t, and as
:math:`t \to 0` it targets :math:`p(\eta \mid x, y)` exactly.

**The lens chains** run in the prior's unconstrained space z (:meth:`~hierprior.physics.
lensing.LensPrior.from_unconstrained`, with its log-Jacobian in the target), one chain per
(observation, sample), batched, never coupled: each has its own step size, adapted towards
the acceptance rate 0.574 (Roberts & Rosenthal 1998) by a Robbins–Monro rule on
:math:`\log\varepsilon`, and its own preconditioner :math:`P = G^{-1}`,
:math:`G = J^\top (\Sigma_y + w_t)^{-1} J + I` (the Gauss–Newton curvature of the current
target, J the image's Jacobian in z by forward differences, I the prior's curvature scale),
refreshed every ``precondition_every`` lens steps. A MALA proposal is
:math:`z' = z + \tfrac{\varepsilon^2}{2} P \nabla\log\pi(z) + \varepsilon L \xi`,
:math:`L L^\top = P`, accepted with the Metropolis–Hastings ratio (unadjusted Langevin's
:math:`O(\tau)` bias would show in calibration). A proposal whose density is not finite is
rejected; a current state whose density is not finite, or non-finite lens parameters, stop
the run with one line naming the observation.

**Where the chains start, and when the lens moves.** At high signal to noise the two blocks
are strongly coupled and a (source, lens) pair formed together is a local mode the Gibbs
sampler does not leave: chains drawn from the lens prior (``init="prior"``) end far from the
main mode, and even chains started at the true lens are dragged off it by lens steps taken
while :math:`\hat x_t` is still the prior's blur (``experiments/blind_lensing/README.md``).
``init="search"`` starts every chain of an observation at :func:`lens_search`'s source-free
estimate (the minimum of the back-projection misfit), and ``lens_below`` holds the lens until
:math:`\sigma_t/\alpha_t` falls below it, when the source has formed.

:func:`lens_posterior` runs the same chains at a fixed, known source (the exact conditional
:math:`p(\eta \mid x, y)`, many samples per chain): the known-source check against emcee.

Costs per denoiser evaluation (N·S chains): the source method's, plus ``lens_steps`` + 1
renders with their backward pass, plus d + 1 renders every ``precondition_every`` lens
steps.

References:
    Murata, Saito, Lai, Takida, Uesaka, Mitsufuji & Ermon (2023), GibbsDDRM: A Partially
    Collapsed Gibbs Sampler for Solving Blind Inverse Problems with Denoising Diffusion
    Restoration, ICML 2023, arXiv 2304.12658.
    Barco, Legin, Stone, Hezaveh & Perreault-Levasseur (2025), Blind Strong Gravitational
    Lensing Inversion: Joint Inference of Source and Lens Mass with Score-Based Models,
    arXiv 2511.04792.
    Roberts & Tweedie (1996), Exponential convergence of Langevin distributions and their
    discrete approximations, Bernoulli 2(4) (MALA).
    Warren & Dye (2003), Semilinear Gravitational Lens Inversion, ApJ 590, 673 (sources
    from the image by the lens's adjoint; the source-free lens search).
    Girolami & Calderhead (2011), Riemann manifold Langevin and Hamiltonian Monte Carlo
    methods, JRSS B 73 (preconditioning by the Fisher metric).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from hierprior.checks import check_choice, check_float, check_int
from hierprior.diffusion.denoiser import Denoiser, expand_time
from hierprior.io import device_dtype
from hierprior.physics import ForwardModel, GaussianNoise, NoiseModel
from hierprior.physics.lensing.blind import BlindLensing
from hierprior.posterior.base import (
    Observation,
    PosteriorMethod,
    PosteriorSamplingError,
    check_model,
    check_observations,
    register_method,
)

__all__ = [
    "Joint",
    "LensChains",
    "LensLikelihood",
    "lens_posterior",
    "lens_search",
    "JOINT_SOURCES",
]

#: the linear-lens posterior methods that can make the source step
JOINT_SOURCES = ("mmps", "pigdm", "cla", "daps")

#: the acceptance rate the step sizes are adapted to (optimal for MALA)
TARGET_ACCEPT = 0.574


# ----------------------------------------------------------------------------- likelihood


class LensLikelihood:
    r""":math:`\log \mathcal N(y \mid A(\eta)\, \hat x + L(\eta), \Sigma_y + w I)` up to a
    constant that does not depend on :math:`\eta`, for N observations and S lenses each.

    Arguments:
        forward: the :class:`~hierprior.physics.lensing.BlindLensing` (or a
            :class:`~hierprior.physics.lensing.BlindLensingWithLight`: then the model adds the
            lens light :math:`L(\eta)`, its amplitudes solved by weighted least squares against
            :math:`y - A(\eta)\hat x` at every evaluation, the profile likelihood).
        noise: the Gaussian noise model: diagonal (``noise.diagonal``: per-pixel variances) or
            any Gaussian model with ``whiten`` (e.g. :class:`~hierprior.physics.
            CorrelatedNoise`), whose quadratic form is :math:`\|\mathrm{whiten}(r)\|^2 =
            r^\top \Sigma_y^{-1} r`. For such a model the widened covariance
            :math:`\Sigma_y + w I` is taken as :math:`(1 + w / \bar v)\, \Sigma_y` (
            :math:`\bar v` the mean per-pixel variance): exact at w = 0 (t = 0, the final
            phase), an approximation of the same size along the diffusion.
        y: the observations (N, *obs).
    """

    def __init__(self, forward: BlindLensing, noise: GaussianNoise, y: Tensor):
        self.forward = forward
        self.y = y
        self.noise = noise
        self.diagonal = bool(getattr(noise, "diagonal", False))
        self.light = getattr(forward, "light", None)
        if self.diagonal:
            self.var = noise.std(y) ** 2
        else:
            self.var = None
            self.mean_var = float((noise.std(y) ** 2).double().mean())

    def model(self, eta: Tensor, x_hat: Tensor) -> Tensor:
        """A(eta) x_hat (+ the lens light at eta, amplitudes solved), (N, S, *obs), for eta
        (N, S, d) and x_hat (N, S, *event)."""
        image = self.forward.image(eta, x_hat)
        if self.light is None:
            return image
        return image + self.forward.light_image(eta, self.y.unsqueeze(1) - image, self.noise)

    def residual(self, eta: Tensor, x_hat: Tensor) -> Tensor:
        """y - A(eta) x_hat (- L(eta)), (N, S, *obs), for eta (N, S, d) and x_hat
        (N, S, *event)."""
        return self.y.unsqueeze(1) - self.model(eta, x_hat)

    def _whiten(self, r: Tensor) -> Tensor:
        """whiten(r) for r (N, S', *obs) (any S'), float64."""
        return self.noise.whiten(r.double())

    def _scale(self, w: Tensor | float) -> Tensor | float:
        """1 + w / v̄ (the non-diagonal widening): (N, S) float64 for w (N, S), else a float."""
        if isinstance(w, Tensor):
            return 1.0 + w.double() / self.mean_var
        return 1.0 + float(w) / self.mean_var

    def __call__(self, eta: Tensor, x_hat: Tensor, w: Tensor | float = 0.0) -> Tensor:
        """The log-likelihood (N, S) (float64) at lenses eta (N, S, d), sources x_hat
        (N, S, *event) and widening w (N, S) or a float."""
        r = self.residual(eta, x_hat).double()
        if not self.diagonal:
            z = self._whiten(r)
            return -0.5 * (z * z).flatten(2).sum(-1) / self._scale(w)
        var = self.var.unsqueeze(1).double()
        if isinstance(w, Tensor):
            var = var + w.double().reshape(*w.shape, *([1] * (r.dim() - 2)))
        elif w:
            var = var + w
        return -0.5 * (r * r / var).flatten(2).sum(-1)

    def precision(self, w: Tensor | float, like: Tensor) -> Tensor:
        """(Σ_y + w)^-1 per pixel, (N, S, M), float64 (diagonal noise only)."""
        var = self.var.unsqueeze(1).double().flatten(2)
        if isinstance(w, Tensor):
            var = var + w.double().reshape(*w.shape, 1)
        elif w:
            var = var + w
        return (1.0 / var).expand(*like.shape[:2], var.shape[-1])

    def gram(self, jac: Tensor, w: Tensor | float) -> Tensor:
        """Jᵀ (Σ_y + w)^-1 J (N, S, k, k), float64, of the image's Jacobian jac (N, S, k, M)."""
        if self.diagonal:
            prec = self.precision(w, jac)  # (n, s, M)
            return torch.einsum("nsim,nsm,nsjm->nsij", jac, prec, jac)
        n, s, k, _ = jac.shape
        obs = tuple(self.y.shape[1:])
        wj = self._whiten(jac.reshape(n, s * k, *obs)).reshape(n, s, k, -1)
        g = torch.einsum("nsim,nsjm->nsij", wj, wj)
        scale = self._scale(w)
        return g / (scale[..., None, None] if isinstance(scale, Tensor) else scale)


# ----------------------------------------------------------------------------- lens chains


class LensChains:
    r"""Preconditioned MALA chains on the lens parameters of N observations × S samples.

    Arguments:
        forward: the :class:`~hierprior.physics.lensing.BlindLensing` (its prior defines the
            unconstrained space).
        likelihood: the :class:`LensLikelihood`.
        eta: the initial lens parameters (N, S, d), inside the prior's support.
        step: the initial step size (whitened units).
        fd_step: the finite-difference step in z of the preconditioner's Jacobian.

    The state is ``z`` (N, S, k) (k = the prior's ``zdim``); :meth:`eta` maps it back.
    """

    def __init__(
        self,
        forward: BlindLensing,
        likelihood: LensLikelihood,
        eta: Tensor,
        step: float = 1.0,
        fd_step: float = 1e-3,
    ):
        self.forward, self.prior, self.likelihood = forward, forward.prior, likelihood
        self.z = self.prior.to_unconstrained(eta.detach()).to(eta.dtype)
        n, s, k = self.z.shape
        self.step = torch.full((n, s), float(step), dtype=torch.float64, device=eta.device)
        eye = torch.eye(k, dtype=torch.float64, device=eta.device)
        self.chol = eye.expand(n, s, k, k).clone()  # G = C C^T, the inverse preconditioner
        self.fd_step = float(fd_step)
        self.proposed = 0
        self.accepted = torch.zeros((n, s), dtype=torch.float64, device=eta.device)
        self._target = None  # (x_hat, w) of the cached log density
        self._logp = self._grad = None

    def eta(self) -> Tensor:
        """The current lens parameters (N, S, d)."""
        return self.prior.from_unconstrained(self.z)[0]

    # ------------------------------------------------------------------ target
    def log_target(self, z: Tensor, x_hat: Tensor, w) -> tuple[Tensor, Tensor]:
        """log π(z) (N, S) float64 and its gradient (N, S, k) at z."""
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            eta, log_prior = self.prior.log_prob_unconstrained(zg)
            logp = self.likelihood(eta, x_hat, w) + log_prior.double()
            (grad,) = torch.autograd.grad(logp.sum(), zg)
        return logp.detach(), grad.double()

    def set_target(self, x_hat: Tensor, w) -> None:
        """Sets the target π(η) ∝ p(η) N(y | A(η) x_hat, Σ_y + w) and evaluates it at the
        current state; a non-finite value there is a one-line error naming the observation."""
        self._target = (x_hat.detach(), w)
        self._logp, self._grad = self.log_target(self.z, *self._target)
        bad = ~(torch.isfinite(self._logp) & torch.isfinite(self._grad).all(-1))
        if bool(bad.any()):
            obs = sorted(set(bad.nonzero()[:, 0].tolist()))
            raise PosteriorSamplingError(
                f"joint: the lens chains of observations {obs[:10]} have a non-finite log "
                "density at their current lens parameters",
                self.eta().detach(),
                bad.any(1),
            )

    # ------------------------------------------------------------------ preconditioner
    def precondition(self, ridge: float = 1.0) -> None:
        r"""Sets G = Jᵀ (Σ_y + w)^{-1} J + ridge·I at the current state (J: the image's
        Jacobian in z by forward differences, k + 1 renders) and the Cholesky factor C
        (G = C Cᵀ)."""
        x_hat, w = self._target
        n, s, k = self.z.shape
        h = self.fd_step
        eye = torch.eye(k, dtype=self.z.dtype, device=self.z.device)
        steps = torch.cat([eye.new_zeros(1, k), eye * h])  # (k + 1, k): the state, then steps
        zs = (self.z.unsqueeze(2) + steps).reshape(n, s * (k + 1), k)
        with torch.no_grad():
            eta = self.prior.from_unconstrained(zs)[0]
            src = x_hat.unsqueeze(2).expand(n, s, k + 1, *x_hat.shape[2:])
            img = self.likelihood.model(eta, src.reshape(n, s * (k + 1), *x_hat.shape[2:]))
        img = img.reshape(n, s, k + 1, -1).double()
        jac = (img[:, :, 1:] - img[:, :, :1]) / h  # (n, s, k, M): forward differences
        g = self.likelihood.gram(jac, w)
        g = g + ridge * torch.eye(k, dtype=g.dtype, device=g.device)
        chol, info = torch.linalg.cholesky_ex(g)
        ok = (info == 0) & torch.isfinite(chol).all((-2, -1))
        keep = torch.eye(k, dtype=g.dtype, device=g.device).expand_as(chol)
        self.chol = torch.where(ok[..., None, None], chol, keep).contiguous()

    # ------------------------------------------------------------------ MALA
    def _drift(self, grad: Tensor) -> Tensor:
        """P ∇log π = G^{-1} ∇log π (N, S, k)."""
        return torch.cholesky_solve(grad.unsqueeze(-1), self.chol).squeeze(-1)

    def run(
        self,
        steps: int,
        generator: torch.Generator | None,
        adapt: bool = True,
        precondition_every: int = 0,
        gain: float = 0.3,
        collect: int = 0,
    ) -> Tensor | None:
        """``steps`` MALA steps on the current target (``set_target`` first).

        Arguments:
            steps: MALA steps.
            generator: the source of randomness.
            adapt: adapt the step sizes (Robbins–Monro on log ε towards 0.574 acceptance).
            precondition_every: refresh the preconditioner every this many steps (0: never).
            gain: the adaptation gain.
            collect: keep every ``collect``-th state (0: none).

        Returns:
            The collected lens parameters (N, S, K, d), or None.
        """
        x_hat, w = self._target
        dtype, device = self.z.dtype, self.z.device
        kept = []
        for i in range(steps):
            if precondition_every and i % precondition_every == 0:
                self.precondition()
            eps = self.step.unsqueeze(-1)  # (n, s, 1), float64
            z = self.z.double()
            mean = z + 0.5 * eps**2 * self._drift(self._grad)
            xi = torch.randn(z.shape, generator=generator, device=device, dtype=dtype).double()
            # L xi with L L^T = P = C^{-T} C^{-1}: solve C^T u = xi
            noise = torch.linalg.solve_triangular(
                self.chol.transpose(-2, -1), xi.unsqueeze(-1), upper=True
            ).squeeze(-1)
            prop = mean + eps * noise
            logp, grad = self.log_target(prop.to(dtype), x_hat, w)
            back = prop + 0.5 * eps**2 * self._drift(grad)

            def log_q(a: Tensor, mu: Tensor) -> Tensor:  # log q(a | mu), up to a constant
                d = (self.chol.transpose(-2, -1) @ (a - mu).unsqueeze(-1)).squeeze(-1)
                return -0.5 * (d * d).sum(-1) / self.step**2

            log_ratio = logp - self._logp + log_q(z, back) - log_q(prop, mean)
            finite = torch.isfinite(logp) & torch.isfinite(grad).all(-1)
            log_ratio = torch.where(finite, log_ratio, torch.full_like(log_ratio, -math.inf))
            u = torch.rand(log_ratio.shape, generator=generator, device=device, dtype=dtype)
            accept = torch.log(u.double()) < log_ratio
            self.z = torch.where(accept.unsqueeze(-1), prop.to(dtype), self.z)
            self._logp = torch.where(accept, logp, self._logp)
            self._grad = torch.where(accept.unsqueeze(-1), grad, self._grad)
            self.accepted += accept.double()
            self.proposed += 1
            if adapt:
                prob = torch.exp(log_ratio.clamp(max=0.0))
                self.step = (self.step.log() + gain * (prob - TARGET_ACCEPT)).exp()
                self.step = self.step.clamp(1e-3, 3.0)
            if collect and (i + 1) % collect == 0:
                kept.append(self.eta().detach())
        return torch.stack(kept, dim=2) if kept else None

    def prune(self, margin: float) -> int:
        """Moves every chain whose log density is more than ``margin`` below the best chain
        of its observation onto that chain's state (a warm-up device against local modes: the
        chains of one observation meet; never while sampling). Returns how many moved."""
        best = self._logp.argmax(1)  # (n,)
        rows = torch.arange(self.z.shape[0], device=self.z.device)
        top = self._logp[rows, best]
        bad = self._logp < top.unsqueeze(1) - margin  # (n, s)
        if not bool(bad.any()):
            return 0
        b = bad.unsqueeze(-1)
        self.z = torch.where(b, self.z[rows, best].unsqueeze(1), self.z)
        self._grad = torch.where(b, self._grad[rows, best].unsqueeze(1), self._grad)
        self._logp = torch.where(bad, top.unsqueeze(1), self._logp)
        self.step = torch.where(bad, self.step[rows, best].unsqueeze(1), self.step)
        bb = bad[..., None, None]
        self.chol = torch.where(bb, self.chol[rows, best].unsqueeze(1), self.chol)
        return int(bad.sum())

    def acceptance(self) -> Tensor:
        """The acceptance rate of each chain since the last reset, (N, S)."""
        return self.accepted / max(self.proposed, 1)

    def reset_counts(self) -> None:
        self.accepted.zero_()
        self.proposed = 0


def _check_lens_problem(forward: object, noise: object) -> None:
    if not isinstance(forward, BlindLensing):
        raise TypeError(
            "the joint method needs a BlindLensing forward model (lenses with unknown "
            f"parameters and their prior); got {type(forward).__name__}: for known lenses use "
            "mmps, pigdm, cla or daps"
        )
    if not forward.prior.has_density:
        raise ValueError(
            "the lens prior holds a pair prior with a fixed norm (for drawing only); the joint "
            "method needs a density for every free lens parameter"
        )
    if not _gaussian_enough(noise):
        raise TypeError(
            "the joint method needs Gaussian noise, diagonal (noise.diagonal) or with whiten "
            f"(e.g. CorrelatedNoise); got {type(noise).__name__}"
        )


def _gaussian_enough(noise: object) -> bool:
    """Diagonal Gaussian noise, or a Gaussian model that whitens (its exact quadratic form)."""
    if getattr(noise, "diagonal", False):
        return True
    return bool(getattr(noise, "gaussian", False)) and callable(getattr(noise, "whiten", None))


def _subtract_light(likelihood: LensLikelihood, eta: Tensor, x_hat: Tensor | None, out: Tensor):
    """out (N·S, *obs) <- y - L(eta) in place: the lens light at lenses eta (N, S, d), its
    amplitudes solved against y - A(eta) x_hat (x_hat None: against y)."""
    n, s = eta.shape[:2]
    with torch.no_grad():
        y = likelihood.y.unsqueeze(1).expand(n, s, *likelihood.y.shape[1:])
        target = y if x_hat is None else y - likelihood.forward.image(eta, x_hat)
        light = likelihood.forward.light_image(eta, target, likelihood.noise)
        out.copy_((y - light).reshape(out.shape).to(out.dtype))


def _check_finite(eta: Tensor, what: str = "lens parameters") -> None:
    bad = ~torch.isfinite(eta.reshape(eta.shape[0], -1)).all(1)
    if bool(bad.any()):
        raise PosteriorSamplingError(
            f"joint: the {what} of observations {bad.nonzero().flatten().tolist()[:10]} went "
            "non-finite",
            eta,
            bad,
        )


def _initial_lenses(
    forward: BlindLensing,
    n: int,
    s: int,
    eta_init: Tensor | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """(n, s, d) starting lenses: drawn from the prior, or the checked eta_init."""
    prior = forward.prior
    if eta_init is None:
        u = torch.rand(
            (n * s, prior.columns), generator=generator, dtype=torch.float64, device=device
        )
        return prior.from_uniform(u).to(dtype).reshape(n, s, prior.dim)
    if not isinstance(eta_init, Tensor) or tuple(eta_init.shape) not in (
        (n, prior.dim),
        (n, s, prior.dim),
    ):
        raise ValueError(
            f"eta_init must have shape ({n}, {prior.dim}) or ({n}, {s}, {prior.dim}); got "
            f"{tuple(getattr(eta_init, 'shape', ()))}"
        )
    eta = eta_init.to(device=device, dtype=dtype)
    if eta.dim() == 2:
        eta = eta.unsqueeze(1).expand(n, s, prior.dim)
    prior.check(eta)
    return eta.contiguous()


def lens_search(
    forward: BlindLensing,
    noise: GaussianNoise,
    y: Tensor,
    draws: int = 128,
    steps: int = 40,
    lr: float = 0.05,
    pool: int = 1,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
) -> Tensor:
    r"""A point estimate of every observation's lens without its source: the minimum of the
    back-projection misfit (Warren & Dye 2003's source-plane consistency), run before the joint
    sampler so that its chains start in the main mode of the lens posterior.

    For a lens :math:`\eta`, the source that each source pixel's rays see on average,
    :math:`\bar x(\eta) = A^\top \Sigma_y^{-1} y \,/\, A^\top \Sigma_y^{-1} 1`, is
    lensed back; the misfit :math:`\tfrac12 \lVert y - A(\eta)\, \bar x(\eta)
    \rVert^2_{\Sigma_y^{-1}} - \log p(z)` (z the prior's unconstrained coordinates, with
    the log-Jacobian) is small only where the multiple images of every source point agree,
    i.e. near the true lens, whatever the source. ``draws`` lenses from the prior are scored
    and the best one per observation is refined by ``steps`` Adam steps on z (gradients
    through both renders).

    Arguments:
        forward: the :class:`~hierprior.physics.lensing.BlindLensing`.
        noise: the Gaussian noise model.
        y: the observations (N, *obs).
        draws: prior draws scored per observation.
        steps: Adam steps from the best draw (0: none).
        lr: Adam's learning rate (in z).
        generator: the source of randomness (the prior draws).
        chunk: (observation, draw) rows per batch of the scoring.

    Returns:
        Lens parameters (N, d) inside the prior's support.
    """
    draws = check_int(draws, "draws")
    steps = check_int(steps, "steps", 0)
    prior = forward.prior
    n = y.shape[0]
    var = noise.std(y) ** 2  # (n, *obs)

    def misfit(z: Tensor, rows: Tensor) -> Tensor:  # z (b, r, k) -> (b, r)
        eta, log_prior = prior.log_prob_unconstrained(z)
        b, r = eta.shape[:2]
        yb, pb = y[rows].unsqueeze(1), (1.0 / var[rows]).unsqueeze(1)
        with torch.enable_grad():
            x0 = torch.zeros(b, r, *forward.input_shape, dtype=y.dtype, device=y.device)
            x0.requires_grad_(True)
            img = forward.image(eta, x0)
            create = z.requires_grad
            (num,) = torch.autograd.grad(
                (img * yb * pb).sum(), x0, retain_graph=True, create_graph=create
            )
            (den,) = torch.autograd.grad((img * pb).sum(), x0, create_graph=create)
        if pool > 1:  # coarser source cells: more rays per cell, a smoother misfit
            shape = num.shape
            cells = forward.geometry.input_shape
            num, den = (
                F.interpolate(
                    F.avg_pool2d(a.reshape(-1, *cells), pool), scale_factor=pool, mode="nearest"
                ).reshape(shape)
                for a in (num, den)
            )
        x_bar = num / den.clamp_min(1e-6 * float(den.detach().max()))
        res = yb - forward.image(eta, x_bar)
        return 0.5 * (res * res * pb).flatten(2).sum(-1) - log_prior

    u = torch.rand((n * draws, prior.columns), generator=generator, dtype=torch.float64)
    eta = prior.from_uniform(u.to(y.device)).to(y.dtype).reshape(n, draws, prior.dim)
    z = prior.to_unconstrained(eta)
    best_z, per = [], max(1, chunk // draws)
    for start in range(0, n, per):
        rows = torch.arange(start, min(start + per, n), device=y.device)
        with torch.no_grad():
            score = misfit(z[rows], rows)
        score = torch.where(torch.isfinite(score), score, torch.full_like(score, math.inf))
        best_z.append(z[rows, score.argmin(1)])
    z = torch.cat(best_z).unsqueeze(1).detach()  # (n, 1, k)
    if steps:
        rows = torch.arange(n, device=y.device)
        zz = z.clone().requires_grad_(True)
        opt = torch.optim.Adam([zz], lr=lr)
        best, best_val = z.clone(), torch.full((n, 1), math.inf, dtype=y.dtype, device=y.device)
        for _ in range(steps + 1):
            with torch.enable_grad():
                val = misfit(zz, rows)
                ok = torch.isfinite(val) & torch.isfinite(zz).all(-1)
                better = ok & (val.detach() < best_val)
                best = torch.where(better.unsqueeze(-1), zz.detach(), best)
                best_val = torch.where(better, val.detach(), best_val)
                opt.zero_grad()
                torch.where(ok, val, torch.zeros_like(val)).sum().backward()
            opt.step()
        z = best
    return prior.from_unconstrained(z)[0].squeeze(1).detach()


def lens_posterior(
    forward: BlindLensing,
    noise: GaussianNoise,
    y: Tensor,
    source: Tensor,
    num_chains: int = 4,
    num_samples: int = 500,
    *,
    warmup: int = 300,
    thin: int = 1,
    precondition_every: int = 50,
    anneal: float = 1.0,
    prune: float = 20.0,
    eta_init: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict]:
    r"""Samples of :math:`p(\eta \mid x, y) \propto p(\eta)\, p(y \mid A(\eta)\, x)` at a
    known source: the joint method's lens chains at t = 0, run long.

    Arguments:
        forward: the :class:`~hierprior.physics.lensing.BlindLensing` (its prior is p(η)).
        noise: the Gaussian noise model.
        y: the observations (N, *obs).
        source: the known sources (N, *event).
        num_chains: chains per observation C.
        num_samples: samples kept per chain K (after ``warmup``, every ``thin``-th state).
        warmup: adapting steps (step size, preconditioner every ``precondition_every``).
            The first two thirds anneal the likelihood: its variance is widened by w,
            falling geometrically from ``anneal`` (per pixel, in y's units squared; 0: no
            annealing) to 1e-6 of it, then w = 0, so chains started anywhere in the prior
            find the main mode rather than a local one.
        prune: after each annealing stage and halfway through the rest of the warm-up, chains
            whose log density is more than ``prune`` + d below their observation's best chain
            are moved onto it (0: never); lens posteriors have local modes that MALA does not
            leave (the chains are independent again once sampling starts).
        eta_init: starting lenses (N, d) or (N, C, d) inside the prior's support (default:
            drawn from the prior).
        generator: the source of randomness.

    Returns:
        Lens parameters (N, C·K, d) (and ``{"acceptance": (N, C), "pruned_late": chains
        moved at the last pruning}`` with return_info).
    """
    _check_lens_problem(forward, noise)
    num_chains = check_int(num_chains, "num_chains")
    num_samples = check_int(num_samples, "num_samples")
    warmup = check_int(warmup, "warmup", 0)
    thin = check_int(thin, "thin")
    n = y.shape[0]
    if tuple(source.shape) != (n, *forward.input_shape):
        raise ValueError(
            f"source must have shape ({n}, *{forward.input_shape}); got {tuple(source.shape)}"
        )
    eta0 = _initial_lenses(forward, n, num_chains, eta_init, generator, y.dtype, y.device)
    chains = LensChains(forward, LensLikelihood(forward, noise, y), eta0)
    x_hat = source.unsqueeze(1).expand(n, num_chains, *source.shape[1:]).contiguous()
    stages = 10 if anneal > 0 and warmup >= 30 else 0
    annealed = (2 * warmup // 3) // stages if stages else 0
    margin = prune + chains.z.shape[-1]
    for k in range(stages):
        chains.set_target(x_hat, anneal * 1e-6 ** (k / (stages - 1)))
        chains.run(annealed, generator, adapt=True, precondition_every=precondition_every)
        if prune > 0:
            chains.prune(margin)
    chains.set_target(x_hat, 0.0)
    rest = warmup - stages * annealed
    chains.run(rest // 2, generator, adapt=True, precondition_every=precondition_every)
    moved = chains.prune(margin) if prune > 0 else 0
    chains.run(rest - rest // 2, generator, adapt=True, precondition_every=precondition_every)
    chains.precondition()
    chains.reset_counts()
    kept = chains.run(num_samples * thin, generator, adapt=False, collect=thin)
    out = kept.reshape(n, num_chains * num_samples, -1)
    _check_finite(out)
    if return_info:
        return out, {"acceptance": chains.acceptance(), "pruned_late": moved}
    return out


# ----------------------------------------------------------------------------- the method


class _CurrentLens(ForwardModel):
    """The forward model of N·S rows at the chains' current lenses (the source step's)."""

    linear = True

    def __init__(self, blind: BlindLensing, eta: Tensor):
        n, s = eta.shape[:2]
        super().__init__(blind.input_shape, blind.output_shape, n * s)
        self.blind = blind
        self.set(eta)

    def set(self, eta: Tensor) -> None:
        self.lens = self.blind.at(eta.detach())

    def _forward(self, x: Tensor) -> Tensor:
        return self.lens._forward(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.lens._adjoint(y)


class _GibbsPrior(Denoiser):
    """The prior, with the lens step run on its denoised estimate after each evaluation."""

    def __init__(self, inner: Denoiser, hook):
        super().__init__()
        self.inner = inner
        self.schedule = inner.schedule
        self.event_shape = tuple(inner.event_shape)
        self.hook = hook

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        d = self.inner(x_t, t)
        self.hook(d.detach(), expand_time(t, x_t))
        return d


class _AnalyticGibbsPrior(_GibbsPrior):
    """For priors with a closed-form Tweedie covariance (MMPS uses it)."""

    def tweedie_cov(self, x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
        return self.inner.tweedie_cov(x_t, t, v)


@register_method
class Joint(PosteriorMethod):
    r"""Joint (source, lens) posterior sampling for lenses nobody has modelled (see the module
    docstring).

    Arguments:
        steps: time steps of the reverse diffusion (the source method's steps).
        source: the source step's linear-lens method: a name of :data:`JOINT_SOURCES`, a
            mapping ``{"method": name, **options}`` (as in ``conf/sampler/``) or a method;
            its ``steps``, ``spacing`` and ``batch_size`` are this method's.
        lens_steps: m, MALA steps on each chain's lens per denoiser evaluation.
        final_warmup: MALA steps at t = 0 that still adapt (step size, preconditioner).
        final_steps: MALA steps at t = 0 with both frozen (an exact kernel on p(η | x, y)).
        source_variance: v, the per-pixel prior variance of the source (the widening
            :math:`w_t = \rho\, v s_t^2 / (v + s_t^2)`).
        widening: ρ >= 0 (0: no widening, the plain likelihood at :math:`\hat x_t`).
        precondition_every: lens steps between refreshes of the preconditioner (0: never,
            identity).
        step_size: the initial MALA step size (whitened units).
        lens_below: lens steps only at the diffusion times whose noise ratio
            :math:`s_t = \sigma_t / \alpha_t` is at most this (None: at every time): the lens
            stays at its start while the source is still a blur (whose best lens is not the
            true one) and moves once the source has formed; pair it with ``init="search"``.
        init: where the lens chains start: ``"prior"`` (drawn from the lens prior) or
            ``"search"`` (every chain of an observation at :func:`lens_search`'s estimate,
            ``search_draws`` prior draws scored, ``search_steps`` Adam steps); an explicit
            ``eta_init`` of :meth:`sample_joint` overrides it.
        spacing: the time grid, ``"edm"``, ``"uniform"`` or ``"logsnr"`` (None: ``"edm"``).
        batch_size: observations per chunk, or None.

    :meth:`sample` returns the sources (N, S, *event) like every method (the lenses in
    ``info["params"]`` with ``return_info``); :meth:`sample_joint` returns both.
    """

    name = "joint"
    #: samples (source, lens parameters): the E-step stores the lenses beside the sources
    joint = True

    def __init__(
        self,
        steps: int = 64,
        *,
        source: str | Mapping | PosteriorMethod = "mmps",
        lens_steps: int = 3,
        final_warmup: int = 30,
        final_steps: int = 60,
        source_variance: float = 1.0,
        widening: float = 0.1,
        precondition_every: int = 12,
        step_size: float = 1.0,
        lens_below: float | None = None,
        init: str = "prior",
        search_draws: int = 128,
        search_steps: int = 40,
        spacing: str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(steps, spacing=spacing, batch_size=batch_size)
        from hierprior.posterior.sampling import posterior_method

        if isinstance(source, PosteriorMethod):
            source = source.options()
        if isinstance(source, str):
            source = {"method": source}
        if not isinstance(source, Mapping) or "method" not in source:
            raise ValueError(
                f"joint source must be a method name of {JOINT_SOURCES} or a mapping with a "
                f"'method' key; got {source!r}"
            )
        source = dict(source)
        if source["method"] not in JOINT_SOURCES:
            raise ValueError(
                f"joint source must be a linear-lens method, one of {list(JOINT_SOURCES)}; got "
                f"{source['method']!r}"
            )
        source.update(steps=self.steps, spacing=self.spacing, batch_size=None)
        self.source_method = posterior_method(source)
        self.source = self.source_method.options()
        self.lens_steps = check_int(lens_steps, "lens_steps", 0)
        self.final_warmup = check_int(final_warmup, "final_warmup", 0)
        self.final_steps = check_int(final_steps, "final_steps")
        self.source_variance = check_float(source_variance, "source_variance", 0.0, strict=True)
        self.widening = check_float(widening, "widening", 0.0)
        self.precondition_every = check_int(precondition_every, "precondition_every", 0)
        self.step_size = check_float(step_size, "step_size", 0.0, strict=True)
        self.lens_below = (
            None if lens_below is None else check_float(lens_below, "lens_below", 0.0, strict=True)
        )
        self.init = check_choice(init, "init", ("prior", "search"))
        self.search_draws = check_int(search_draws, "search_draws")
        self.search_steps = check_int(search_steps, "search_steps", 0)

    # ------------------------------------------------------------------ checks
    def check(self, prior: Denoiser, forward: ForwardModel) -> None:
        check_model(prior, forward)
        _check_lens_problem(forward, GaussianNoise(1.0))

    def check_noise(self, noise: NoiseModel, opts: dict) -> None:
        if not _gaussian_enough(noise):
            raise TypeError(
                "joint needs Gaussian noise, diagonal (noise.diagonal) or with whiten (e.g. "
                f"CorrelatedNoise); got {type(noise).__name__}"
            )

    def widening_at(self, t: Tensor, schedule) -> Tensor:
        r""":math:`w_t = \rho\, v s_t^2 / (v + s_t^2)` at times t (any shape), float64."""
        alpha, sigma = schedule.alpha_sigma(t.double())
        s2 = (sigma / alpha) ** 2
        v = self.source_variance
        return self.widening * v * s2 / (v + s2)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        prior: Denoiser,
        forward: ForwardModel,
        noise: NoiseModel,
        y: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        *,
        x_init: Tensor | None = None,
        progress: bool = False,
        return_info: bool = False,
    ) -> Tensor | tuple[Tensor, dict]:
        """The sources (N, S, *event) of :meth:`sample_joint` (with return_info, the info
        dict holds the lenses under ``"params"``)."""
        out = self.sample_joint(
            prior,
            forward,
            noise,
            y,
            num_samples,
            generator,
            x_init=x_init,
            progress=progress,
            return_info=return_info,
        )
        if return_info:
            x, eta, info = out
            return x, {**info, "params": eta}
        return out[0]

    def sample_joint(
        self,
        prior: Denoiser,
        forward: BlindLensing,
        noise: GaussianNoise,
        y: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        *,
        x_init: Tensor | None = None,
        eta_init: Tensor | None = None,
        progress: bool = False,
        return_info: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict]:
        r"""S joint samples :math:`(x, \eta) \sim p(x, \eta \mid y_i)` per observation.

        Arguments:
            prior: the source's diffusion prior.
            forward: the :class:`~hierprior.physics.lensing.BlindLensing` (lens prior and
                geometry; its ``truth`` is never read).
            noise: the Gaussian noise model.
            y: the observations (N, *obs).
            num_samples: S.
            generator: the source of all randomness.
            x_init: the source state at t = 1 (N, S, *event) (default: drawn).
            eta_init: starting lenses (N, d) or (N, S, d) inside the prior's support
                (default: drawn from the prior).
            return_info: also return ``{"acceptance": (N, S) final-phase acceptance rates,
                "step_size": (N, S), "chunks": [...]}`` (and, with a lens light,
                ``"light"``: its image (N, S, *obs) at each sample, amplitudes solved).

        Returns:
            Sources (N, S, *event) and lens parameters (N, S, d) (and the info dict).
        """
        check_int(num_samples, "num_samples")
        self.check(prior, forward)
        y = check_observations(prior, forward, noise, y)
        _check_lens_problem(forward, noise)
        device, dtype = device_dtype(prior)
        if generator is not None and torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but the prior is on {device}")
        y = y.to(device)
        n, s = y.shape[0], num_samples
        event = tuple(prior.event_shape)
        state = self._initial(prior, (n, s, *event), x_init, generator, device, dtype)
        if eta_init is None and self.init == "search":
            eta_init = lens_search(
                forward,
                noise,
                y.to(dtype),
                self.search_draws,
                self.search_steps,
                generator=generator,
            )
        eta0 = _initial_lenses(forward, n, s, eta_init, generator, dtype, device)
        timesteps = prior.schedule.timesteps(self.steps, spacing=self.spacing, device=device)
        chunk = self.batch_size or n
        xs, etas, infos = [], [], []
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n))
            sub_forward = forward if chunk >= n else forward[idx]
            sub_noise = noise if chunk >= n else noise[idx]
            x, eta, info = self._sample_chunk_joint(
                prior,
                sub_forward,
                sub_noise,
                y[idx.to(device)],
                state[idx.to(device)],
                eta0[idx.to(device)],
                timesteps,
                generator,
                progress,
            )
            xs.append(x)
            etas.append(eta)
            infos.append(info)
        x, eta = torch.cat(xs), torch.cat(etas)
        _check_finite(eta)
        bad = ~torch.isfinite(x.flatten(1)).all(1)
        if bool(bad.any()):
            raise PosteriorSamplingError(
                f"joint: the source samples of observations {bad.nonzero().flatten().tolist()}"
                " hold NaN or Inf",
                x,
                bad,
            )
        if return_info:
            info = {
                "acceptance": torch.cat([i["acceptance"] for i in infos]),
                "step_size": torch.cat([i["step_size"] for i in infos]),
                "chunks": infos,
            }
            if "light" in infos[0]:
                info["light"] = torch.cat([i["light"] for i in infos])
            return x, eta, info
        return x, eta

    def _sample_chunk_joint(
        self, prior, forward, noise, y, state, eta0, timesteps, generator, progress
    ):
        n, s = state.shape[:2]
        event = tuple(prior.event_shape)
        rows = torch.arange(n).repeat_interleave(s)
        flat_noise = noise[rows] if noise.num_obs is not None else noise
        likelihood = LensLikelihood(forward, noise, y)
        chains = LensChains(forward, likelihood, eta0, step=self.step_size)
        current = _CurrentLens(forward, eta0)
        calls = {"n": 0}
        y_rows = y[rows.to(y.device)]
        if likelihood.light is not None:  # the source step sees y minus the current lens light
            y_rows = y_rows.clone()
            _subtract_light(likelihood, eta0, None, y_rows)

        def lens_step(d: Tensor, t: Tensor) -> None:
            if self.lens_steps == 0:
                return
            if self.lens_below is not None:
                alpha, sigma = prior.schedule.alpha_sigma(t.double())
                if bool((sigma / alpha > self.lens_below).all()):
                    return
            x_hat = d.reshape(n, s, *event)
            w = self.widening_at(t.reshape(n, s), prior.schedule)
            chains.set_target(x_hat, w)
            every = self.precondition_every
            refresh = every and calls["n"] % max(1, every // max(self.lens_steps, 1)) == 0
            if refresh:
                chains.precondition()
            chains.run(self.lens_steps, generator, adapt=True)
            calls["n"] += 1
            eta = chains.eta()
            _check_finite(eta)
            current.set(eta)
            if likelihood.light is not None:
                _subtract_light(likelihood, eta, x_hat, y_rows)

        wrapper_cls = (
            _AnalyticGibbsPrior
            if type(prior).tweedie_cov is not Denoiser.tweedie_cov
            else _GibbsPrior
        )
        gibbs = wrapper_cls(prior, lens_step)
        observation = Observation(current, flat_noise, y_rows)
        opts = self.source_method.resolve(current, 1)
        self.source_method.check_noise(flat_noise, opts)
        x, _ = self.source_method._sample_chunk(
            gibbs,
            observation,
            state.reshape(n * s, 1, *event),
            timesteps,
            1,
            generator,
            opts,
            progress,
        )
        x = x.detach().reshape(n, s, *event)
        # t = 0: the exact conditional p(eta | x, y)
        chains.set_target(x, 0.0)
        chains.precondition()
        every = self.precondition_every
        chains.run(self.final_warmup, generator, adapt=True, precondition_every=every)
        chains.precondition()
        chains.reset_counts()
        chains.run(self.final_steps, generator, adapt=False)
        eta = chains.eta().detach()
        info = {"acceptance": chains.acceptance(), "step_size": chains.step.clone()}
        if likelihood.light is not None:  # the lens light of each (x, eta), amplitudes solved
            with torch.no_grad():
                info["light"] = likelihood.model(eta, x) - forward.image(eta, x)
        return x, eta, info

    def _sample_chunk(self, *args, **kwargs):  # pragma: no cover - sample() is overridden
        raise NotImplementedError("Joint.sample runs its own chunks (sample_joint)")
