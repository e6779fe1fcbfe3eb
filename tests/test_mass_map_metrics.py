"""MassMapMetrics (the δκ monitor's posterior evaluator) and its helpers."""

from __future__ import annotations

import math

import torch

from hierprior.em import Population
from hierprior.evaluation import MassMapMetrics, gaussian_smooth, power_spectrum
from hierprior.physics import GaussianNoise, Identity


def _population(n=40, R=8, sigma=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n, 1, R, R, generator=g)
    y = truth + sigma * torch.randn(n, 1, R, R, generator=g)
    return Population(y=y, forward=Identity((1, R, R)), noise=GaussianNoise(sigma), truth=truth)


def test_metrics_values_and_figures(tmp_path):
    pop = _population()
    ev = MassMapMetrics(smooth=0.0)
    # posterior samples equal to the truth: residual chi2 ~ 1, correlation 1, rmse 0
    samples = pop.truth.unsqueeze(1)
    out = ev(population=pop, samples=samples, prior_samples=pop.truth, round_dir=tmp_path)
    # A(0) = 0: chi2/nu = mean(y^2) / sigma^2 = (1 + 0.01) / 0.01
    assert abs(out["analytic_chi2_nu"] - 101) < 10
    assert abs(out["kappa_corr"] - 1) < 1e-12 and out["kappa_rmse"] < 1e-12
    assert out["power_log_ratio"] < 1e-12  # prior samples = truths: equal spectra
    for name in ("residuals_analytic", "residuals_posterior", "power_spectrum"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    # independent posterior samples: correlation ~ 0; a prior 10x too weak: spectra off by 2 dex
    other = _population(seed=1).truth
    out = ev(
        population=pop, samples=other.unsqueeze(1), prior_samples=0.1 * other, round_dir=tmp_path
    )
    assert abs(out["kappa_corr"]) < 0.1
    assert abs(out["power_log_ratio"] - 2) < 0.2


def test_smoothing_and_power_spectrum():
    x = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    x[..., 7, 7] = 1
    s = gaussian_smooth(x, 1.5)
    assert abs(float(s.sum()) - 1) < 1e-3  # mass conserved away from the edges
    assert float(s[..., 7, 7]) < 0.1
    # white noise has a flat spectrum of level sigma^2
    g = torch.Generator().manual_seed(0)
    k, p = power_spectrum(torch.randn(200, 1, 32, 32, generator=g))
    assert len(k) == 16 and float(k[0]) == 1 / 32
    assert float((p - 1).abs().max()) < 0.15
    # smoothing removes power at high k
    _, ps = power_spectrum(gaussian_smooth(torch.randn(200, 1, 32, 32, generator=g), 2.0))
    assert float(ps[-1]) < 1e-3 * float(ps[0])
    assert math.isfinite(float(ps.sum()))
