"""CorrelatedNoise: the stationary correlated Gaussian noise model applied by FFT.

Checked against the dense Gaussian on small grids (log_prob, Σ v, Σ⁻¹ v, with a scale map and
unobserved pixels marginalised exactly), whitening (sampled noise whitens to N(0, 1); ‖z‖² is
the χ²), sampling (empirical covariance), and the estimator of the autocovariance.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hierprior.physics import CorrelatedNoise, noise_autocovariance, spectrum_from_autocovariance

ACF = torch.tensor(
    [[0.02, 0.06, 0.01], [0.25, 1.0, 0.25], [0.01, 0.06, 0.02]], dtype=torch.float64
)  # (Δy, Δx) = (-1..1, -1..1): like the J1430 blank sky (rows 0.29 -> here 0.06 diag)
ACF = 0.5 * (ACF + ACF.flip(0, 1))


def dense_covariance(model: CorrelatedNoise, i: int = 0) -> torch.Tensor:
    """Σ = W C W on the full grid of observation i, from the spectrum (the circulant C)."""
    h, w = model.grid_shape
    c = torch.fft.ifft2(model.spectrum[i]).real  # c(Δ) on the torus
    r = torch.arange(h * w) // w
    col = torch.arange(h * w) % w
    cov = c[(r[:, None] - r[None, :]) % h, (col[:, None] - col[None, :]) % w]
    s = model.scale[i].flatten()
    return s[:, None] * cov * s[None, :]


def make(n_obs=None, masked=True, shape=(7, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    spectrum = spectrum_from_autocovariance(ACF * 0.3, shape)
    lead = () if n_obs is None else (n_obs,)
    scale = 1 + torch.rand(*lead, h, w, generator=g, dtype=torch.float64)
    observed = None
    if masked:
        observed = torch.ones(*lead, h, w, dtype=torch.bool)
        observed[..., 2:4, 3:5] = False
        observed[..., 0, 0] = False
        if n_obs is not None:
            observed[-1, 5, 1] = False  # a different |U| per observation
    if n_obs is not None:
        spectrum = spectrum.expand(n_obs, h, w) * torch.linspace(0.5, 2.0, n_obs)[:, None, None]
    return CorrelatedNoise(spectrum, scale, observed), g


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n_obs", [None, 3])
def test_actions_and_log_prob_equal_the_dense_gaussian(masked, n_obs):
    model, g = make(n_obs, masked)
    h, w = model.grid_shape
    rows = n_obs or 1
    r = torch.randn(rows, 2, 1, h, w, generator=g, dtype=torch.float64)
    v = r if n_obs is not None else r[0]
    lp = model.log_prob(v, torch.zeros_like(v))
    cov_v, inv_v = model.cov_action(v), model.inv_cov_action(v)
    z = model.whiten(v)
    for i in range(rows):
        obs = model.observed[i].flatten()
        sigma = dense_covariance(model, i)[obs][:, obs]
        dist = torch.distributions.MultivariateNormal(torch.zeros(len(sigma)), sigma)
        for s in range(2):
            x = r[i, s, 0].flatten()[obs]
            got = lp[i, s] if n_obs is not None else lp[s]
            torch.testing.assert_close(got, dist.log_prob(x), rtol=1e-10, atol=1e-10)
            cv = (cov_v[i, s] if n_obs is not None else cov_v[s]).flatten()
            iv = (inv_v[i, s] if n_obs is not None else inv_v[s]).flatten()
            torch.testing.assert_close(cv[obs], sigma @ x)
            torch.testing.assert_close(iv[obs], torch.linalg.solve(sigma, x))
            assert (cv[~obs] == 0).all() and (iv[~obs] == 0).all()
            zz = (z[i, s] if n_obs is not None else z[s]).flatten()
            torch.testing.assert_close((zz**2).sum(), x @ torch.linalg.solve(sigma, x))
    torch.testing.assert_close(model.score(v), -inv_v)


def test_sampled_noise_whitens_to_standard_normal_and_has_the_covariance():
    model, _ = make(None, masked=False, shape=(16, 16))
    g = torch.Generator().manual_seed(1)
    n = model.sample((4000, 1, 16, 16), generator=g, dtype=torch.float64)
    z = model.whiten(n)
    assert stats.kstest(z.flatten()[:20000].numpy(), "norm").pvalue > 0.01
    assert abs(float(z.std()) - 1) < 0.01
    # whitened neighbours are uncorrelated
    corr = float((z[..., :, 1:] * z[..., :, :-1]).mean() / z.var())
    assert abs(corr) < 0.01
    # the empirical covariance of two neighbours is Σ's
    sigma = dense_covariance(model)
    emp = (n[:, 0, 5, 5] * n[:, 0, 5, 6]).mean()
    assert abs(float(emp) - float(sigma[5 * 16 + 5, 5 * 16 + 6])) < 0.1 * float(
        sigma[5 * 16 + 5, 5 * 16 + 5]
    )
    # the generator alone decides the draw
    a = model.sample((2, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    b = model.sample((2, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_masked_model_sample_logprob_consistency():
    """E[-2 log p] over its own samples is |O| (1 + log 2π) + log det Σ_OO."""
    model, _ = make(None, masked=True, shape=(10, 10))
    n = model.sample((3000, 1, 10, 10), generator=torch.Generator().manual_seed(5))
    n = n.to(torch.float64)
    lp = model.log_prob(n, torch.zeros_like(n))
    expect = -0.5 * (float(model.num_observed()) * (1 + math.log(2 * math.pi)) + model.log_det())
    assert abs(float(lp.mean()) - float(expect)) < 4 * float(lp.std()) / math.sqrt(3000)
    chi2 = (model.whiten(n) ** 2).sum(dim=(-3, -2, -1))
    assert abs(float(chi2.mean()) - float(model.num_observed())) < 3 * math.sqrt(
        2 * 97 / 3000
    ) * math.sqrt(97)


def test_autocovariance_estimate_recovers_the_truth():
    model, _ = make(None, masked=False, shape=(32, 32))
    g = torch.Generator().manual_seed(2)
    n = model.sample((200, 1, 32, 32), generator=g, dtype=torch.float64)[:, 0]
    scale = model.scale[0]
    acf = noise_autocovariance(n / scale, max_lag=2)  # the stationary part u
    torch.testing.assert_close(acf[1:4, 1:4], 0.3 * ACF, atol=0.01, rtol=0)
    assert abs(float(acf[0, 0])) < 0.01 and acf.shape == (5, 5)
    fitted = CorrelatedNoise.from_patches(n / scale, (8, 8), max_lag=1)
    assert fitted.num_obs is None and fitted.grid_shape == (8, 8)
    per_obs = CorrelatedNoise.from_patches([n[:100] / scale, n[100:] / scale], (8, 8))
    assert per_obs.num_obs == 2


def test_selection_device_dtype_and_errors():
    model, g = make(3, masked=True)
    sub = model[[0, 2]]
    v = torch.randn(3, 1, 7, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sub.inv_cov_action(v[[0, 2]]), model.inv_cov_action(v)[[0, 2]])
    torch.testing.assert_close(
        sub.log_prob(v[[0, 2]], 0 * v[[0, 2]]), model.log_prob(v, 0 * v)[[0, 2]]
    )
    assert model.curvature().shape == (3,) and model.std(v).shape == v.shape
    v32 = v.float()
    assert model.inv_cov_action(v32).dtype == torch.float32
    with pytest.raises(ValueError, match="not positive definite"):
        spectrum_from_autocovariance(
            torch.tensor([[0.0, 0.0, 0.0], [0.9, 1.0, 0.9], [0.0] * 3]), (8, 8)
        )
    with pytest.raises(ValueError, match="3 observations"):
        model.log_prob(v[:2], v[:2])
    with pytest.raises(ValueError, match="S\\(k\\) = S\\(-k\\)"):
        CorrelatedNoise(torch.rand(6, 6, dtype=torch.float64) + 0.1)
    with pytest.raises(ValueError, match="> 0"):
        CorrelatedNoise(-torch.ones(6, 6))
    with pytest.raises(ValueError, match="disagree on N"):
        CorrelatedNoise(torch.ones(2, 6, 6), torch.ones(3, 6, 6))
