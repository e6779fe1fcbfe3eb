r"""Multistep exponential-integrator solvers in data-prediction form (DPM-Solver++, UniPC).

With the half log-SNR :math:`\lambda_t = \log(\alpha_t / \sigma_t)` and the denoiser
:math:`\hat x(\lambda) = D(x_t, t)`, the diffusion ODE/SDE family with stochasticity
:math:`\eta \in [0, 1]` (:math:`\eta = 0`: probability-flow ODE; :math:`\eta = 1`: the reverse
SDE) has, over one step :math:`t \to r` with :math:`h = \lambda_r - \lambda_t > 0` and
:math:`\rho = 1 + \eta^2`, the exact solution

.. math::
    x_r = \frac{\sigma_r}{\sigma_t} e^{-\eta^2 h} x_t
        + \rho\, \alpha_r \int_0^h e^{-\rho (h - \tau)} \hat x(\lambda_t + \tau)\, d\tau
        + \sigma_r \sqrt{1 - e^{-2 \eta^2 h}}\, z,

(for :math:`\eta = 0` the linear term is Lu et al.'s DPM-Solver++ form, for :math:`\eta = 1`
their SDE-DPM-Solver++ form; the noise variance is what keeps a point mass's marginals
exact). A *multistep* solver of order p replaces :math:`\hat x(\lambda_t + \tau)` by the
polynomial :math:`\sum_k a_k \tau^k / k!` through the last p denoiser outputs (at
:math:`\lambda_t` and the p - 1 previous grid points) and integrates it exactly:

.. math::
    \rho \int_0^h e^{-\rho (h - \tau)} \frac{\tau^k}{k!} d\tau = \rho^{-k} c_{k+1}(\rho h),
    \qquad c_1(h) = 1 - e^{-h}, \quad c_{k+1}(h) = \frac{h^k}{k!} - c_k(h)

(:math:`c_{k}(h) = h^{k} \varphi_{k}(-h)`, the :math:`\varphi`-functions of exponential
integrators). Order 1 is DDIM (:math:`\eta = 0`) or DDPM (:math:`\eta = 1`); order 2 is
DPM-Solver++(2M), order 3 DPM-Solver++(3M), in their exact-:math:`\varphi` form (the
published 2M update approximates :math:`c_2(h)` by :math:`h c_1(h) / 2`; both are second
order). Each step costs one denoiser evaluation: the outputs of earlier steps are reused, and
the first steps use the orders their history allows (1, 2, ...).

The **predictor-corrector** variant (UniPC-style, Zhao et al. 2023) also corrects every state
once the denoiser has been evaluated there: the step that produced :math:`x_r` is redone with
the polynomial through the new output :math:`\hat x(\lambda_r)` too (one order higher; an
exponential Adams–Moulton step), and the corrected state goes on, while :math:`\hat x(\lambda_r)`
(evaluated at the predicted state) is reused as the next step's newest output: no extra
evaluation. UniPC's B(h) variants approximate the same integrals.

Every grid here ends at t = 0 (:meth:`~hierprior.diffusion.schedule.Schedule.timesteps`),
where :math:`\lambda = \infty`: as in the other samplers, the last evaluation (at the
smallest positive time) returns the denoised estimate. With ``steps`` evaluations the solver
takes ``steps - 1`` steps, so order p is used at least once only when ``steps >= p + 1``
(checked: :func:`check_order`).

References:
    Lu et al. (2022), DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models, arXiv 2211.01095.
    Zhao et al. (2023), UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models, arXiv 2302.04867.
    Hochbruck & Ostermann (2010), Exponential integrators, Acta Numerica 19.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hierprior.checks import check_float, check_int
from hierprior.diffusion.denoiser import Denoiser
from hierprior.io import progress_bar
from hierprior.seeds import randn_like

__all__ = ["multistep_sampler", "check_order", "step_weights", "MAX_ORDER"]

#: the highest order of the multistep solvers (the interpolation is unstable beyond)
MAX_ORDER = 4


def check_order(order: object, steps: int | None = None, corrector: bool = False) -> int:
    """Checks a multistep order (1..MAX_ORDER) against the number of steps; returns it.

    ``steps`` evaluations give ``steps - 1`` solver steps, the last of which uses order p only
    if ``steps >= p + 1``; a smaller count raises a ValueError (the order would never be used).
    """
    check_int(order, "order", 1, MAX_ORDER)
    if steps is not None and steps < order + 1:
        kind = "predictor order" if corrector else "order"
        raise ValueError(
            f"{kind} {order} needs steps >= {order + 1} (steps - 1 solver steps, the first "
            f"ones of lower order), got steps={steps}"
        )
    return order


def _c(k: int, h: float) -> float:
    """c_k(h) = h^k phi_k(-h) = int_0^h e^{-(h - tau)} tau^(k-1) / (k-1)! dtau, k >= 1."""
    if h < 0.05:  # series: sum_j (-1)^j h^(k+j) / (k+j)!, no cancellation
        return sum((-1) ** j * h ** (k + j) / math.factorial(k + j) for j in range(12))
    c = -math.expm1(-h)
    for j in range(1, k):
        c = h**j / math.factorial(j) - c
    return c


def step_weights(taus: list[float], h: float, rho: float = 1.0) -> list[float]:
    r"""Weights w_j of one step: :math:`\rho \int_0^h e^{-\rho(h-\tau)} P(\tau) d\tau =
    \sum_j w_j \hat x_j` for the polynomial P through the points (taus[j], x̂_j).

    ``taus`` are the points' log-SNR offsets from the step's start (one of them 0), ``h`` the
    step, ``rho`` = 1 + eta^2.
    """
    m = len(taus)
    tau = torch.tensor(taus, dtype=torch.float64)
    k = torch.arange(m, dtype=torch.float64)
    fact = torch.exp(torch.lgamma(k + 1))
    vander = tau[:, None] ** k[None] / fact[None]  # P(tau_j) = sum_k a_k tau_j^k / k!
    integrals = torch.tensor(
        [rho ** (-j) * _c(j + 1, rho * h) for j in range(m)], dtype=torch.float64
    )
    # sum_k I_k a_k with a = V^{-1} x: weights w = V^{-T} I
    return torch.linalg.solve(vander.T, integrals).tolist()


def multistep_sampler(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    generator: torch.Generator | None = None,
    order: int = 2,
    eta: float = 0.0,
    corrector: bool = False,
    progress: bool = False,
) -> Tensor:
    """Multistep exponential integrator (DPM-Solver++(pM), UniPC-style with ``corrector``).

    Arguments:
        denoiser: any :class:`~hierprior.diffusion.denoiser.Denoiser`.
        x: the state at timesteps[0], with shape (B, *event_shape).
        timesteps: decreasing grid ending at 0 (``Schedule.timesteps``), (steps + 1,).
        generator: the noise source when ``eta > 0``.
        order: the (predictor) order p, 1..MAX_ORDER, with ``len(timesteps) >= p + 2``.
        eta: 0 (probability-flow ODE) to 1 (reverse SDE).
        corrector: also correct each state with the output evaluated there (order p + 1).
        progress: a progress bar.

    Returns the denoised estimate at the last positive time, with the shape of x.
    """
    n = len(timesteps) - 1
    check_order(order, n, corrector)
    check_float(eta, "eta", 0.0, maximum=1.0)
    rho = 1.0 + eta**2
    coef = [denoiser.schedule.coefficients(timesteps[i]) for i in range(n)]
    lam = [math.log(a / s) for a, s in coef]
    outs: list[Tensor] = []  # the latest denoiser outputs, newest last
    prev = None  # (x, noise) at the start of the last step, for the corrector
    name = f"{'unipc' if corrector else 'dpm'}{order}"

    def advance(i: int, x_t: Tensor, points: list[int], values: list[Tensor], z):
        """x at grid point i + 1 from x_t at grid point i, interpolating at grid points."""
        (_, s_t), (a_r, s_r) = coef[i], coef[i + 1]
        h = lam[i + 1] - lam[i]
        w = step_weights([lam[j] - lam[i] for j in points], h, rho)
        out = (s_r / s_t * math.exp(-(eta**2) * h)) * x_t
        for wj, v in zip(w, values):
            out = out + (a_r * wj) * v
        if z is not None:
            out = out + s_r * math.sqrt(-math.expm1(-2 * eta**2 * h)) * z
        return out

    for i in progress_bar(range(n), progress, name):
        x_hat = denoiser(x, timesteps[i])
        if i == n - 1:
            return x_hat
        if corrector and prev is not None:
            # redo the step i-1 -> i with the new output as one more interpolation point
            x_prev, z_prev = prev
            m = min(order + 1, len(outs) + 1)
            points = list(range(i - m + 1, i + 1))
            values = [*outs[len(outs) - (m - 1) :], x_hat]
            x = advance(i - 1, x_prev, points, values, z_prev)
        outs = [*outs[-(order - 1) :], x_hat] if order > 1 else [x_hat]
        m = len(outs)
        z = randn_like(x, generator) if eta > 0 else None
        prev = (x, z)
        x = advance(i, x, list(range(i - m + 1, i + 1)), outs, z)
    return x
