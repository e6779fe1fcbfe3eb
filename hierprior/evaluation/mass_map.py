r"""What a round of EM over a latent mass map (δκ) is measured by.

:class:`MassMapMetrics` is a monitor *posterior evaluator* (``em.monitor.posterior_evaluators``):
each round it sees the population, the bank of posterior δκ samples and the prior samples,
and returns

- ``analytic_chi2_nu``: the mean reduced χ² of the analytic-only model (δκ = 0) on observed
  pixels, :math:`\chi^2/\nu = \frac1M \sum_j (y_j - A_j(0))^2 / \sigma_j^2` per observation,
  averaged over observations (a property of the population: ≫ 1 when the perturbations are
  detectable; the monitor's ``residual_chi2_nu`` is the same statistic for the posterior
  samples);
- ``kappa_corr``: the Pearson correlation between the posterior-mean δκ and the true δκ of
  each observation, both smoothed by a Gaussian of ``smooth`` pixels (the pixel-scale part of
  δκ is not constrained by the data, only its smoothed, lensing-relevant part is), averaged
  over observations;
- ``kappa_rmse``: the RMS of (posterior mean − truth) after the same smoothing, averaged
  over observations;
- ``power_log_ratio``: the mean over wavenumber bins of
  :math:`|\log_{10} P_\text{prior}(k) / P_\text{truth}(k)|`, where P is the radially averaged
  power spectrum of prior samples and of the true δκ maps (0: equal spectra). The two spectra
  are plotted in ``power_spectrum.png`` each round.

It also writes grids: ``residuals_analytic.png`` (y − A(0)) and ``residuals_posterior.png``
(y − A(x), one posterior sample), in units of the noise σ, from −5σ to 5σ; the posterior and
prior δκ grids are the monitor's own (``posterior_samples.png``, ``prior_samples.png``).

What it cannot see: the correlation and RMS are per observation, not distributional (PQMass
``truth_chi2`` is); the smoothing scale hides pixel-scale errors by design; the power
spectrum ignores phases (morphology) and non-Gaussianity (subhalo cusps).

:class:`MassMapStructure` is a plain monitor *evaluator* (prior samples -> scalars; the monitor
also applies it to the truths and the oracle): what a δκ prior holds of the two structures of
the population, subhalos and multipoles. ``peaks_per_map`` and ``peak_mass_median``: compact
peaks of δκ above ``threshold`` (local maxima of 3 x 3 pixels,
:func:`hierprior.evaluation.structure.compact_peaks`) and the mass within 1.5 pixels of each
(:math:`\sum \delta\kappa\, h^2`, arcsec^2 in units of the critical density); on the
population of ``conf/population/mass_map.yaml`` the truths hold 3.2 peaks per map above 0.05
(3 subhalos on average) with a median mass of 0.005. ``multipole_m3``, ``multipole_m4``: the
RMS over maps of :math:`\hat a_m = 2 |\langle 2 r\, \delta\kappa\, e^{-i m \varphi}
\rangle|` over the pixels at 0.5-1.5 arcsec from the centre, which recovers :math:`a_m` of a
lenstronomy multipole :math:`\kappa = a_m \cos m(\varphi - \varphi_m) / 2r`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from hierprior.em.monitor import Monitor
from hierprior.io import atomic_write_bytes, figure_bytes, save_sample_grid

__all__ = ["MassMapMetrics", "MassMapStructure", "power_spectrum", "gaussian_smooth"]


def gaussian_smooth(x: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing (std ``sigma`` pixels, zero padding) of maps (..., H, W)."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    shape = x.shape
    z = x.reshape(-1, 1, *shape[-2:])
    z = torch.nn.functional.conv2d(z, k.view(1, 1, 1, -1), padding=(0, r))
    z = torch.nn.functional.conv2d(z, k.view(1, 1, -1, 1), padding=(r, 0))
    return z.reshape(shape)


def power_spectrum(maps: Tensor, bins: int | None = None) -> tuple[Tensor, Tensor]:
    """Radially averaged power spectrum of maps (n, [1,] R, R): (k in cycles/pixel, P(k)),
    averaged over the maps; ``bins`` rings of width 1/R from k = 1/R up (default R // 2)."""
    x = maps.reshape(-1, maps.shape[-2], maps.shape[-1]).double()
    R = x.shape[-1]
    f = torch.fft.fft2(x - x.mean((-2, -1), keepdim=True))
    p = (f.real**2 + f.imag**2).mean(0) / R**2
    k = torch.fft.fftfreq(R, dtype=torch.float64)
    kr = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2) * R  # in units of 1/R
    nb = bins or R // 2
    idx = torch.round(kr).long()
    out_k, out_p = [], []
    for b in range(1, nb + 1):
        sel = idx == b
        if sel.any():
            out_k.append(b / R)
            out_p.append(float(p[sel].mean()))
    return torch.tensor(out_k, dtype=torch.float64), torch.tensor(out_p, dtype=torch.float64)


class MassMapMetrics:
    """Per-round δκ metrics (see the module docstring).

    Arguments:
        smooth: the Gaussian smoothing (pixels of the δκ grid) before the correlation/RMS.
        grid_size: images per residual grid.
        chunk: observations per forward-model call.
    """

    def __init__(self, smooth: float = 1.0, grid_size: int = 16, chunk: int = 64):
        if not (math.isfinite(smooth) and smooth >= 0):
            raise ValueError(f"MassMapMetrics: smooth must be >= 0; got {smooth}")
        self.smooth = float(smooth)
        self.grid_size = int(grid_size)
        self.chunk = int(chunk)
        self._analytic: tuple[int, float] | None = None

    def _normalised_residuals(self, population, x: Tensor) -> Tensor:
        """(y - A(x)) / sigma of the first grid_size observations, x (N, *event)."""
        sub = population[: self.grid_size]
        with torch.no_grad():
            pred = sub.forward(x[: self.grid_size].to(sub.y))
        return ((sub.y - pred) / sub.noise.std(pred)).cpu()

    def __call__(
        self,
        *,
        population,
        samples: Tensor,
        prior_samples: Tensor,
        round_dir: str | Path,
        round_index: int = 0,
    ) -> dict[str, float]:
        round_dir = Path(round_dir)
        out: dict[str, float] = {}
        zeros = torch.zeros(len(population), 1, *population.signal_shape, dtype=population.y.dtype)
        chi2_0 = Monitor.residual_chi2_per_observation(population, zeros, self.chunk)
        out["analytic_chi2_nu"] = float(chi2_0.mean())
        for name, x in (
            ("residuals_analytic", zeros[:, 0]),
            ("residuals_posterior", samples[:, 0]),
        ):
            r = self._normalised_residuals(population, x)
            if r.dim() == 4:
                save_sample_grid(r.float(), round_dir / f"{name}.png", (-5.0, 5.0))
        truth = population.truth
        if truth is not None:
            mean = gaussian_smooth(samples.mean(1).double().cpu(), self.smooth)
            true = gaussian_smooth(truth.double().cpu(), self.smooth)
            a = mean.flatten(1) - mean.flatten(1).mean(1, keepdim=True)
            b = true.flatten(1) - true.flatten(1).mean(1, keepdim=True)
            corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
            out["kappa_corr"] = float(corr.mean())
            out["kappa_rmse"] = float((mean - true).flatten(1).pow(2).mean(1).sqrt().mean())
            k, p_prior = power_spectrum(prior_samples.cpu())
            _, p_true = power_spectrum(truth.cpu())
            ratio = torch.log10(p_prior.clamp_min(1e-300) / p_true.clamp_min(1e-300))
            out["power_log_ratio"] = float(ratio.abs().mean())

            def draw(fig):
                ax = fig.add_subplot(1, 1, 1)
                ax.loglog(k.numpy(), p_true.numpy(), "k-", label="truth δκ")
                ax.loglog(k.numpy(), p_prior.numpy(), "C1--", label=f"prior, round {round_index}")
                ax.set_xlabel("k [cycles / pixel]")
                ax.set_ylabel("P(k)")
                ax.legend()

            atomic_write_bytes(round_dir / "power_spectrum.png", figure_bytes(draw, (4.5, 3.5)))
        return out


class MassMapStructure:
    """Subhalo peaks and multipoles of δκ samples (B, 1, n, n) in latent units (δκ /
    ``kappa_scale``); see the module docstring.

    Arguments:
        kappa_scale: the latent's unit (δκ = kappa_scale x).
        kappa_fov: the side of the δκ grid [arcsec] (pixels of kappa_fov / n, centred on 0).
        threshold: the δκ above which a local maximum counts as a compact peak.
        radius: the radius [pixels] of the disk a peak's mass is summed over.
        annulus: the radii [arcsec] of the multipole measurement.
    """

    def __init__(
        self,
        kappa_scale: float = 1.0,
        kappa_fov: float = 1.0,
        threshold: float = 0.05,
        radius: float = 1.5,
        annulus: tuple[float, float] = (0.5, 1.5),
    ):
        self.kappa_scale = float(kappa_scale)
        self.kappa_fov = float(kappa_fov)
        self.threshold = float(threshold)
        self.radius = float(radius)
        self.annulus = tuple(float(a) for a in annulus)
        if not (self.kappa_scale > 0 and self.kappa_fov > 0 and self.radius > 0):
            raise ValueError("MassMapStructure: kappa_scale, kappa_fov and radius must be > 0")

    def __call__(self, samples: Tensor) -> dict[str, float]:
        from hierprior.evaluation.structure import compact_peaks

        if samples.ndim != 4 or samples.shape[1] != 1 or samples.shape[-1] != samples.shape[-2]:
            raise ValueError(
                f"MassMapStructure needs maps (B, 1, n, n), got {tuple(samples.shape)}"
            )
        kappa = samples.detach().double().cpu() * self.kappa_scale
        n = kappa.shape[-1]
        h = self.kappa_fov / n
        counts, masses = compact_peaks(kappa, self.threshold, radius=self.radius,
                                       pixel_area=h * h)  # fmt: skip
        allm = torch.cat(masses) if masses else torch.zeros(0)
        c = (torch.arange(n, dtype=torch.float64) + 0.5) * h - self.kappa_fov / 2
        x, y = c[None, :].expand(n, n), c[:, None].expand(n, n)
        r, phi = torch.sqrt(x**2 + y**2), torch.atan2(y, x)
        ring = (r >= self.annulus[0]) & (r <= self.annulus[1])
        out = {
            "peaks_per_map": float(counts.double().mean()),
            "peak_mass_median": float(allm.median()) if len(allm) else 0.0,
        }
        for m in (3, 4):
            weight = (2 * r * torch.polar(torch.ones_like(phi), -m * phi))[ring]
            coeff = (kappa[:, 0][:, ring] * weight).mean(-1)
            out[f"multipole_m{m}"] = float((2 * coeff.abs()).pow(2).mean().sqrt())
        return out
