r"""Matrix-free solvers for many small systems at once, one per (observation, sample) row.

Every tensor here has shape (*batch, *event): the first ``batch_dims`` axes index independent
systems :math:`A_b u_b = b_b` (in the posterior samplers, batch = (N, S): observation i,
sample s), and the remaining axes hold the vector. Every inner product, step size,
convergence test and breakdown test is taken per row, so no row ever influences another.

- :func:`conjugate_gradient` (CG, Hestenes & Stiefel 1952) for symmetric positive definite
  operators. With exact arithmetic it is exact after as many iterations as the rank. It
  *guards* against the breakdown seen with learned denoisers, whose Jacobians need not be
  symmetric, so that :math:`p^\top A p \le 0` can happen (DESIGN.md §4: azula's CG returned
  NaN there): a row with non-positive or non-finite curvature is frozen at its last finite
  iterate and flagged; a row whose residual fell below ``rtol`` of its right-hand side is
  frozen as converged (so that tiny curvatures near convergence do not blow up).
- :func:`gmres` (minimal residual over the Krylov space, Saad & Schultz 1986) for any
  operator: it builds an orthonormal Krylov basis :math:`V_k` by modified Gram-Schmidt (twice,
  for stability) and returns :math:`V_k c` with :math:`c = \arg\min \|b - A V_k c\|`, solved
  by the k×k normal equations with a tiny relative ridge (:math:`10^{-13}`), which keeps the
  rank deficiency of a (happy) breakdown harmless.
- :func:`solve` runs CG and re-solves the flagged rows with GMRES (falling back to the last
  finite CG iterate where GMRES fails too). Rows whose right-hand side is not finite come out
  as NaN: a guard never hides bad input.

Intermediate computations are in float64 (like azula); the operator is applied in the dtype
of ``b`` and the result is returned in it.

References:
    Hestenes & Stiefel (1952), Methods of conjugate gradients for solving linear systems.
    Saad & Schultz (1986), GMRES: a generalized minimal residual algorithm.
    Rozet et al. (2024), Learning Diffusion Priors from Observations by Expectation
    Maximization, arXiv 2405.13712.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hierprior.checks import check_int, check_tensor

__all__ = ["batch_dot", "conjugate_gradient", "gmres", "solve", "SOLVERS"]

SOLVERS = ("cg", "gmres")


def batch_dot(a: Tensor, b: Tensor, batch_dims: int = 2) -> Tensor:
    """Row-wise inner products of a and b (same shape (*batch, *event)) -> shape batch."""
    return (a * b).flatten(batch_dims).sum(-1)


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshapes a batch-shaped tensor to broadcast against like with shape (*batch, *event)."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _check(b: Tensor, iterations: int, batch_dims: int) -> None:
    check_tensor(b, "b")
    check_int(iterations, "iterations")
    if b.ndim <= batch_dims:
        raise ValueError(
            f"b must have shape (*batch, *event) with {batch_dims} batch dims, "
            f"got {tuple(b.shape)}"
        )


def conjugate_gradient(
    A: Callable[[Tensor], Tensor],
    b: Tensor,
    iterations: int,
    *,
    batch_dims: int = 2,
    rtol: float = 1e-12,
) -> tuple[Tensor, Tensor]:
    r"""Solves :math:`A u = b` row by row with at most ``iterations`` guarded CG iterations.

    Arguments:
        A: the operator, mapping tensors with the shape of b to the same shape; it must act
            on each row independently.
        b: right-hand sides, with shape (*batch, *event).
        iterations: maximum number of iterations (one operator call each).
        batch_dims: number of leading batch axes.
        rtol: a row stops (converged) once :math:`\|r\| \le` rtol :math:`\|b\|`.

    Returns:
        The solution, with the shape and dtype of b (NaN rows where b is not finite), and the
        breakdown flags (non-positive or non-finite curvature met), with shape batch.
    """
    _check(b, iterations, batch_dims)
    f64 = torch.float64
    bd = b.to(f64)
    bb = batch_dot(bd, bd, batch_dims)
    finite = torch.isfinite(bb)
    bd = torch.where(_expand(finite, bd), bd, 0.0)
    bb = torch.where(finite, bb, 0.0)
    tol = rtol**2 * bb
    x = torch.zeros_like(bd)
    r = bd.clone()
    p = bd.clone()
    rr = bb.clone()
    active = rr > tol
    broken = torch.zeros_like(active)
    for _ in range(iterations):
        if not bool(active.any()):
            break
        Ap = A(p.to(b.dtype)).to(f64)
        pAp = batch_dot(p, Ap, batch_dims)
        bad = active & ~(torch.isfinite(pAp) & (pAp > 0))
        broken = broken | bad
        active = active & ~bad
        step = torch.where(active, rr / torch.where(active, pAp, 1.0), 0.0)
        act = _expand(active, x)
        x = torch.where(act, x + _expand(step, p) * p, x)
        r = torch.where(act, r - _expand(step, Ap) * Ap, r)
        rr_new = batch_dot(r, r, batch_dims)
        beta = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0)
        p = torch.where(act, r + _expand(beta, p) * p, p)
        rr = torch.where(active, rr_new, rr)
        active = active & (rr_new > tol)
    x = torch.where(_expand(finite, x), x, float("nan"))
    return x.to(b.dtype), broken


def gmres(
    A: Callable[[Tensor], Tensor],
    b: Tensor,
    iterations: int,
    *,
    batch_dims: int = 2,
) -> Tensor:
    r"""Minimal-residual solution of :math:`A u = b` over the k-th Krylov space, row by row.

    Arguments:
        A: the operator (any square operator acting on each row independently).
        b: right-hand sides, with shape (*batch, *event).
        iterations: the Krylov dimension k (k operator calls).
        batch_dims: number of leading batch axes.

    Returns:
        The solution, with the shape and dtype of b; NaN on rows where b or the operator's
        output is not finite.
    """
    _check(b, iterations, batch_dims)
    f64 = torch.float64
    bd = b.to(f64)
    bb = batch_dot(bd, bd, batch_dims)
    ok = torch.isfinite(bb)
    bd = torch.where(_expand(ok, bd), bd, 0.0)
    beta = torch.where(ok, bb, 0.0).sqrt()
    basis = [bd / _expand(torch.where(beta > 0, beta, 1.0), bd)]
    images = []
    for j in range(iterations):
        w = A(basis[j].to(b.dtype)).to(f64)
        finite = torch.isfinite(w.flatten(batch_dims)).all(-1)
        ok = ok & finite
        w = torch.where(_expand(finite, w), w, 0.0)
        images.append(w)
        if j + 1 == iterations:
            break
        h = w
        for _ in range(2):  # modified Gram-Schmidt, repeated once for orthogonality
            for v in basis:
                h = h - _expand(batch_dot(h, v, batch_dims), h) * v
        norm = batch_dot(h, h, batch_dims).sqrt()
        scale = batch_dot(w, w, batch_dims).sqrt()
        keep = norm > 1e-12 * scale
        safe = _expand(torch.where(keep, norm, 1.0), h)
        basis.append(torch.where(_expand(keep, h), h / safe, 0.0))
    lead = bd.shape[:batch_dims]
    V = torch.stack([v.reshape(*lead, -1) for v in basis[: len(images)]], dim=-1)
    W = torch.stack([w.reshape(*lead, -1) for w in images], dim=-1)
    # normal equations of min ||b - W c|| with a relative ridge: zero columns (breakdown)
    # get zero coefficients instead of a singular system
    gram = W.mT @ W
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(f64).tiny)
    eye = torch.eye(len(images), dtype=f64, device=bd.device)
    gram = gram + 1e-13 * scale[..., None, None] * eye
    chol, _ = torch.linalg.cholesky_ex(gram)
    coef = torch.cholesky_solve(W.mT @ bd.reshape(*lead, -1, 1), chol)
    x = (V @ coef).reshape(bd.shape)
    x = torch.where(_expand(ok, x), x, float("nan"))
    return x.to(b.dtype)


def solve(
    A: Callable[[Tensor], Tensor],
    b: Tensor,
    solver: str = "cg",
    iterations: int = 8,
    *,
    batch_dims: int = 2,
) -> tuple[Tensor, Tensor]:
    """Guarded matrix-free solve of A u = b, row by row.

    With ``solver="cg"``, rows where CG meets non-positive or non-finite curvature are solved
    again by GMRES with the same number of iterations (and keep their last finite CG iterate
    where GMRES is not finite either). ``solver="gmres"`` runs GMRES alone.

    Arguments:
        A: the operator; symmetric positive definite for CG to be exact.
        b: right-hand sides, with shape (*batch, *event).
        solver: ``"cg"`` or ``"gmres"``.
        iterations: iterations (operator calls) of the solver.
        batch_dims: number of leading batch axes.

    Returns:
        The solution, with the shape of b, and the fallback flags (rows where CG broke down),
        with shape batch.
    """
    if solver == "cg":
        x, broken = conjugate_gradient(A, b, iterations, batch_dims=batch_dims)
        if bool(broken.any()):
            xg = gmres(A, b, iterations, batch_dims=batch_dims)
            good = broken & torch.isfinite(xg.flatten(batch_dims)).all(-1)
            x = torch.where(_expand(good, x), xg, x)
        return x, broken
    if solver == "gmres":
        x = gmres(A, b, iterations, batch_dims=batch_dims)
        return x, torch.zeros(b.shape[:batch_dims], dtype=torch.bool, device=b.device)
    raise ValueError(f"unknown solver {solver!r}; expected one of {list(SOLVERS)}")
