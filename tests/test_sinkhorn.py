"""Tests for hierprior.metrics.sinkhorn (oracle: POT 0.9.7, optional; analytic checks).

- the value :math:`\\mathrm{OT}_\\varepsilon` and the plan's transport cost agree with POT's
  log-domain Sinkhorn (``ot.sinkhorn(..., method="sinkhorn_log")``), weighted measures included;
- a translation by tau gives :math:`S_\\varepsilon = \\|\\tau\\|^2` at every epsilon (exact for the
  squared Euclidean cost), S(x, permuted x) = 0, S >= 0;
- as epsilon -> 0 the divergence tends to the exact :math:`W_2^2` (linear assignment), as
  epsilon -> infinity to the squared difference of the means;
- over-relaxation, blocks and float32 change nothing beyond the tolerance;
- bad input fails early with one line; a run that does not converge warns.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import special
from scipy.optimize import linear_sum_assignment

from hierprior.metrics import EntropicOTResult, entropic_ot, sinkhorn_divergence

torch.set_num_threads(1)


def clouds(n=120, m=100, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(m, d, generator=g, dtype=torch.float64) + 0.5
    return x, y


@pytest.mark.parametrize("eps", [1.0, 0.1, 0.03])
@pytest.mark.parametrize("weighted", [False, True])
def test_entropic_ot_matches_pot(eps, weighted):
    ot = pytest.importorskip("ot")
    x, y = clouds()
    g = torch.Generator().manual_seed(1)
    a = torch.rand(len(x), generator=g, dtype=torch.float64) + 0.1 if weighted else None
    b = torch.rand(len(y), generator=g, dtype=torch.float64) + 0.1 if weighted else None
    r = entropic_ot(x, y, eps, a=a, b=b, tol=1e-10)
    assert isinstance(r, EntropicOTResult) and r.converged
    wa = np.full(len(x), 1 / len(x)) if a is None else (a / a.sum()).numpy()
    wb = np.full(len(y), 1 / len(y)) if b is None else (b / b.sum()).numpy()
    cost = ot.dist(x.numpy(), y.numpy())  # squared Euclidean
    plan = ot.sinkhorn(wa, wb, cost, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=10**5)
    transport = float((plan * cost).sum())
    kl = float((special.xlogy(plan, plan) - plan * np.log(np.outer(wa, wb))).sum())
    assert r.cost == pytest.approx(transport, rel=1e-7)
    assert r.value == pytest.approx(transport + eps * kl, rel=1e-7)
    assert r.f.shape == (len(x),) and r.g.shape == (len(y),)


@pytest.mark.parametrize("eps", [1.0, 0.1, 0.01])
def test_translation_is_exact(eps):
    x, _ = clouds(n=150)
    tau = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    s = sinkhorn_divergence(x, x + tau, eps, tol=1e-5)
    assert s.converged
    assert s.divergence == pytest.approx(float(tau.square().sum()), rel=1e-6)
    # the entropic value itself is biased, the divergence is not
    assert s.xy.value != pytest.approx(float(tau.square().sum()), rel=1e-3)


def test_same_measure_gives_zero_and_divergence_is_positive():
    x, y = clouds()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    assert abs(sinkhorn_divergence(x, x[perm], 0.05, tol=1e-5).divergence) < 1e-6
    near = sinkhorn_divergence(x, x + 0.1, 0.05).divergence
    far = sinkhorn_divergence(x, y, 0.05).divergence
    assert 0 < near < far


def test_small_epsilon_tends_to_w2():
    x, y = clouds(n=60, m=60, d=2, seed=4)
    rows, cols = linear_sum_assignment(torch.cdist(x, y).square().numpy())
    w2 = float(torch.cdist(x, y).square()[rows, cols].mean())
    errors = [abs(sinkhorn_divergence(x, y, eps).divergence - w2) for eps in (0.1, 0.01, 1e-3)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01 * w2


def test_large_epsilon_tends_to_mean_difference():
    x, y = clouds(n=80, m=70, seed=7)
    s = sinkhorn_divergence(x, y, 1e4).divergence
    assert s == pytest.approx(float((x.mean(0) - y.mean(0)).square().sum()), rel=1e-3)


def test_solver_options_agree():
    x, y = clouds(n=200, m=150, seed=5)
    ref = entropic_ot(x, y, 0.01, tol=1e-9)
    plain = entropic_ot(x, y, 0.01, tol=1e-9, overrelaxation=1.0)
    blocks = entropic_ot(x, y, 0.01, tol=1e-9, block_entries=1000)
    single = entropic_ot(x, y, 0.01, tol=1e-3, dtype=torch.float32)
    assert plain.value == pytest.approx(ref.value, rel=1e-8)
    assert blocks.value == pytest.approx(ref.value, rel=1e-10)
    assert blocks.cost == pytest.approx(ref.cost, rel=1e-10)
    assert single.converged and single.value == pytest.approx(ref.value, rel=1e-4)
    # over-relaxation needs fewer updates than plain Sinkhorn
    assert ref.iterations < plain.iterations


def test_images_are_flattened():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 1, 2, 2, generator=g)
    y = torch.randn(30, 4, generator=g)
    s = sinkhorn_divergence(x, y, 0.1)
    assert math.isfinite(s.divergence) and s.divergence > 0


def test_bad_input():
    x, y = clouds(n=10, m=8)
    with pytest.raises(ValueError, match="dimensions"):
        entropic_ot(x, y[:, :2])
    with pytest.raises(ValueError, match="non-finite"):
        entropic_ot(x * float("nan"), y)
    with pytest.raises(ValueError, match="shape"):
        entropic_ot(x[:0], y)
    with pytest.raises(ValueError, match="epsilon"):
        entropic_ot(x, y, 0.0)
    with pytest.raises(ValueError, match="overrelaxation"):
        entropic_ot(x, y, overrelaxation=2.0)
    with pytest.raises(ValueError, match="scaling"):
        entropic_ot(x, y, scaling=1.0)
    with pytest.raises(ValueError, match="a must"):
        entropic_ot(x, y, a=-torch.ones(10))
    with pytest.raises(ValueError, match="b must"):
        entropic_ot(x, y, b=torch.ones(3))


def test_non_convergence_warns():
    x, y = clouds(n=50, m=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = entropic_ot(x, y, 1e-3, max_iter=1, tol=1e-12)
    assert not r.converged
    assert any("did not converge" in str(w.message) for w in caught)
