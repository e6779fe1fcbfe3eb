r"""hierprior's strong-lensing model against the references: lenstronomy 1.14.2 and caustics 1.7.1.

**Mass models vs lenstronomy** (``LensModel``, float64 unless said): SIE + SHEAR deflections
agree to 9e-10 relative (lenstronomy's SIE is an NIE with a 1e-10 core; against its analytic
``EPL`` with gamma = 2, the same profile, 2e-15); convergences agree with ``EPL`` (gamma = 2)
to 1e-15, but lenstronomy's SIE convergence is a forward difference of its deflection (step
1e-10) and is off by up to 4.3e-5 relative, so it is checked at 1e-4 only; SIS and POINT_MASS
to 4e-16. float32: 6.5e-7 relative (the coordinates are rounded to float32), checked at 5e-6.
Points are kept 0.1" away from the centres.

**Lensed image vs the analytic source**: a circular Gaussian source (sigma = 0.15") sampled on
a 200 x 200 grid over 2" (0.01" pixels), lensed by ``Lensing`` (64 x 64 at 0.06", no PSF),
equals the analytic surface brightness at lenstronomy's ``ray_shooting`` positions to 0.10% of
the peak (0.40% with 100 x 100, 1.7% with 50 x 50: the bilinear interpolation error, ~h^2).

**Lensing vs caustics** (``LensSource`` with ``SIE(angle_system="e1_e2")`` + ``ExternalShear``
in one ``SinglePlane`` and a ``Pixelated`` source; caustics' parameters are lenstronomy's:
``Rein`` = theta_E, ``x0, y0`` = centre, ``gamma_1, gamma_2`` = gamma1, gamma2, the shear
origin at 0). Same conventions: pixel centres at (i + 1/2) p - F/2 for the image, the
sub-pixels (caustics ``upsample_factor`` = ``supersample``) and the source; x along columns, y
along rows, both increasing with the index; bilinear interpolation between source pixel
centres; the PSF as a true convolution (an asymmetric square kernel agrees: neither flips it);
caustics' ``utils.gaussian`` kernel equals ``gaussian_psf`` to 4e-19 for a float64 tensor FWHM
(1.2e-8 for a Python-float FWHM, which ``gaussian_psf`` turns into a float32 tensor before
its float64 arithmetic). Measured differences,
for a unit-peak source (the 64 x 64 configuration above, 100 x 100 source over 2"):

1. *float32 inside caustics*: its image grid is built in float32 (``utils.meshgrid``) and
   Python-float parameters become float32 tensors, both before ``.to(float64)``: the images
   differ by 7.1e-7 (supersample 1), 2.7e-7 (2), 2.2e-7 (3). With float64 tensor parameters
   and the grid rebuilt in float64: 1.8e-11, 1.0e-10, 4.8e-10; with an 11 x 11 PSF, 1.4e-15
   away from the border band of difference 3.
2. *Source edge*: caustics extrapolates the source linearly between its outermost pixel
   centres and the field edge and is zero beyond the edge; hierprior continues the source by
   zero pixels (``grid_sample``, zero padding), falling to zero half a pixel outside the field.
   A uniform source of 1: 47 of 4096 pixels differ, by up to 0.488, all among the 60 pixels
   whose rays land within half a source pixel of the field edge (elsewhere 1e-16). No
   difference for sources that vanish half a pixel inside their field.
3. *PSF at the image border*: caustics ray-traces a band of the PSF's half-width (5 pixels for
   11 x 11) around the image and blurs its light in; hierprior blurs the image alone (zero
   padding). A source whose image reaches the border (sigma = 0.5" over a 6" field): up to
   0.051 in the outer band (63% of a pixel's value in the outermost row); pixels 5 or more
   from the border agree to 1e-15.
4. *Supersampling with a PSF*: caustics convolves the supersampled image with a kernel given
   at the supersampled resolution, then averages; hierprior averages, then convolves with the
   kernel at the image resolution. FWHM 0.15" (2.5 pixels): 7.2e-5 (k = 2) and 6.3e-5
   (k = 3) of a 0.91 peak.
5. *Non-square PSF kernels (a caustics bug)*: ``LensSource`` rolls its FFT output by the
   column half-width along rows and by the row half-width along columns, so an h x w kernel
   with h != w shifts its image by (h//2 - w//2) rows and (w//2 - h//2) columns: 0.24 of the
   peak for a random 7 x 5 kernel; shifted back, the images agree to 7e-16. Square kernels
   (and ``Lensing``, any odd h x w) are centred.
6. *caustics usage*: ``.to(dtype=...)`` alone fails on the ``e1_e2`` pointer parameters (give
   device and dtype), ``e1``/``e2`` given values stay dynamic (``.to_static()``), and a
   redshift left as None becomes a dynamic parameter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hierprior.physics.lensing import SIE, SIS, Lensing, PointMass, Shear, gaussian_psf

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
CPU = torch.device("cpu")
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

# one lens, image and source configuration for the image-level comparisons
LENS = {"theta_E": 1.0, "e1": 0.12, "e2": -0.07, "center_x": 0.05, "center_y": -0.03}
SHEAR = {"gamma1": 0.03, "gamma2": 0.02}
N_PIX, PIXEL = 64, 0.06
N_SRC, FOV_SRC = 100, 2.0
GAUSS = (0.1, -0.05, 0.15)  # x0, y0, sigma [arcsec]


def lens_model(*names):
    return pytest.importorskip("lenstronomy.LensModel.lens_model").LensModel(list(names))


def random_lenses(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "theta_E": rng.uniform(0.5, 2.0, n),
        "e1": rng.uniform(-0.3, 0.3, n),
        "e2": rng.uniform(-0.3, 0.3, n),
        "center_x": rng.uniform(-0.3, 0.3, n),
        "center_y": rng.uniform(-0.3, 0.3, n),
        "gamma1": rng.uniform(-0.1, 0.1, n),
        "gamma2": rng.uniform(-0.1, 0.1, n),
    }


def random_points(p: dict[str, np.ndarray], m: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    """m points per lens in [-3, 3]^2, at least 0.1" from the lens centre."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, 3, (len(p["theta_E"]), 4 * m))
    y = rng.uniform(-3, 3, x.shape)
    keep = np.hypot(x - p["center_x"][:, None], y - p["center_y"][:, None]) > 0.1
    rows = [np.flatnonzero(k)[:m] for k in keep]
    return np.stack([x[i, r] for i, r in enumerate(rows)]), np.stack(
        [y[i, r] for i, r in enumerate(rows)]
    )


def lenstronomy_kwargs(p: dict[str, np.ndarray], i: int, epl: bool = False) -> list[dict]:
    sie = {k: float(p[k][i]) for k in ("theta_E", "e1", "e2", "center_x", "center_y")}
    if epl:
        sie["gamma"] = 2.0
    return [sie, {"gamma1": float(p["gamma1"][i]), "gamma2": float(p["gamma2"][i])}]


# ============================================================== mass models vs lenstronomy


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-8), (torch.float32, 5e-6)])
def test_sie_shear_batched_vs_lenstronomy(dtype, rtol):
    sie_shear, epl_shear = lens_model("SIE", "SHEAR"), lens_model("EPL", "SHEAR")
    n = 8
    p = random_lenses(n)
    x, y = random_points(p, 200)

    def t(a):
        return torch.tensor(a, dtype=dtype)

    mass = SIE(t(p["theta_E"]), t(p["e1"]), t(p["e2"]), t(p["center_x"]), t(p["center_y"]))
    mass = mass + Shear(t(p["gamma1"]), t(p["gamma2"]))
    assert mass.num_obs == n
    ax, ay = mass.deflection(t(x), t(y))
    kappa = mass.convergence(t(x), t(y))
    assert ax.dtype == dtype and kappa.dtype == dtype
    for i in range(n):
        lax, lay = sie_shear.alpha(x[i], y[i], lenstronomy_kwargs(p, i))
        size = np.hypot(lax, lay)
        assert (
            np.max(np.hypot(ax[i].double().numpy() - lax, ay[i].double().numpy() - lay) / size)
            < rtol
        )
        exact = epl_shear.kappa(x[i], y[i], lenstronomy_kwargs(p, i, epl=True))
        assert np.max(np.abs(kappa[i].double().numpy() / exact - 1)) < max(rtol, 1e-10)
        # lenstronomy's own SIE convergence: a forward difference of its deflection
        fd = sie_shear.kappa(x[i], y[i], lenstronomy_kwargs(p, i))
        assert np.max(np.abs(kappa[i].double().numpy() / fd - 1)) < 1e-4


def test_sie_shear_float_params_shared_vs_lenstronomy():
    model = lens_model("SIE", "SHEAR")
    p = {k: v[:1] for k, v in random_lenses(1, seed=5).items()}
    mass = SIE(*(float(p[k][0]) for k in ("theta_E", "e1", "e2", "center_x", "center_y")))
    mass = mass + Shear(float(p["gamma1"][0]), float(p["gamma2"][0]))
    assert mass.num_obs is None
    x, y = (t.reshape(10, 20) for t in random_points(p, 200, seed=6))  # any shape when shared
    ax, ay = mass.deflection(torch.from_numpy(x), torch.from_numpy(y))
    assert ax.shape == (10, 20) and ax.dtype == F64
    lax, lay = model.alpha(x.ravel(), y.ravel(), lenstronomy_kwargs(p, 0))
    size = np.hypot(lax, lay)
    err = np.hypot(ax.numpy().ravel() - lax, ay.numpy().ravel() - lay) / size
    assert err.max() < 1e-8


@pytest.mark.parametrize("name, cls", [("SIS", SIS), ("POINT_MASS", PointMass)])
def test_sis_and_point_mass_vs_lenstronomy(name, cls):
    model = lens_model(name)
    p = random_lenses(4, seed=2)
    x, y = random_points(p, 200, seed=3)
    t = torch.from_numpy
    mass = cls(t(p["theta_E"]), t(p["center_x"]), t(p["center_y"]))
    ax, ay = mass.deflection(t(x), t(y))
    kappa = mass.convergence(t(x), t(y))
    for i in range(4):
        kw = [{k: float(p[k][i]) for k in ("theta_E", "center_x", "center_y")}]
        lax, lay = model.alpha(x[i], y[i], kw)
        err = np.hypot(ax[i].numpy() - lax, ay[i].numpy() - lay) / np.hypot(lax, lay)
        assert err.max() < 1e-12
        lk = model.kappa(x[i], y[i], kw)
        if name == "SIS":
            assert np.max(np.abs(kappa[i].numpy() / lk - 1)) < 1e-12
        else:  # zero away from the point
            assert np.abs(lk).max() < 1e-12 and kappa[i].abs().max() == 0


# ============================================================== lensed image vs analytic


def lensing(n_src: int = N_SRC, fov: float = FOV_SRC, supersample: int = 1, psf=None) -> Lensing:
    return Lensing(
        SIE(**LENS) + Shear(**SHEAR), N_PIX, PIXEL, n_src, fov, supersample=supersample, psf=psf
    )


def gaussian_source(n: int, fov: float, x0: float, y0: float, sigma: float) -> torch.Tensor:
    c = (torch.arange(n, dtype=F64) + 0.5) * fov / n - fov / 2
    x, y = c[None, :], c[:, None]
    return torch.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))


def test_lensed_gaussian_source_vs_analytic_ray_shooting():
    model = lens_model("SIE", "SHEAR")
    n_src = 200  # 0.01" source pixels
    image = lensing(n_src)(gaussian_source(n_src, FOV_SRC, *GAUSS)[None, None])[0, 0].numpy()
    x, y = lensing(n_src).image_grid()
    kw = [dict(LENS), dict(SHEAR)]
    bx, by = model.ray_shooting(x.numpy(), y.numpy(), kw)
    x0, y0, sigma = GAUSS
    analytic = np.exp(-((bx - x0) ** 2 + (by - y0) ** 2) / (2 * sigma**2))
    assert analytic.max() > 0.9  # the source is multiply imaged inside the field
    assert np.abs(image - analytic).max() < 0.01 * analytic.max()  # measured 0.10%


# ============================================================== Lensing vs caustics


def caustics_simulator(
    n_src: int = N_SRC,
    fov: float = FOV_SRC,
    supersample: int = 1,
    psf: torch.Tensor | None = None,
    float64_grid: bool = True,
):
    """The same lens, image and source in caustics, float64 (tensor parameters)."""
    caustics = pytest.importorskip("caustics")

    def t(v: float) -> torch.Tensor:  # Python floats would become float32 tensors
        return torch.tensor(v, dtype=F64)

    cosmo = caustics.FlatLambdaCDM(name="cosmo")
    sie = caustics.SIE(
        cosmology=cosmo,
        name="sie",
        angle_system="e1_e2",
        x0=t(LENS["center_x"]),
        y0=t(LENS["center_y"]),
        Rein=t(LENS["theta_E"]),
        e1=t(LENS["e1"]),
        e2=t(LENS["e2"]),
    )
    sie.e1.to_static()  # given values, caustics' e1/e2 stay dynamic
    sie.e2.to_static()
    shear = caustics.ExternalShear(
        cosmology=cosmo,
        name="shear",
        x0=t(0.0),
        y0=t(0.0),
        gamma_1=t(SHEAR["gamma1"]),
        gamma_2=t(SHEAR["gamma2"]),
    )
    lens = caustics.SinglePlane(
        cosmology=cosmo, lenses=[sie, shear], name="lens", z_l=t(0.5), z_s=t(1.0)
    )
    source = caustics.Pixelated(
        name="src", x0=t(0.0), y0=t(0.0), pixelscale=t(fov / n_src), shape=(n_src, n_src)
    )
    extra = {} if psf is None else {"psf": psf}
    sim = caustics.LensSource(
        lens=lens,
        source=source,
        pixelscale=PIXEL,
        pixels_x=N_PIX,
        upsample_factor=supersample,
        **extra,
    )
    sim.to(device=CPU, dtype=F64)
    if float64_grid:  # caustics builds its grid in float32; rebuild it in float64
        gx, gy = caustics.utils.meshgrid(PIXEL / supersample, *sim._n_pix, dtype=F64)
        sim._grid = (gx[..., None], gy[..., None])
    return sim


@pytest.mark.parametrize("supersample", [1, 2, 3])
def test_lensing_vs_caustics_same_conventions(supersample):
    source = gaussian_source(N_SRC, FOV_SRC, *GAUSS)
    ours = lensing(supersample=supersample)(source[None, None])[0, 0]
    assert ours.max() > 0.9
    theirs = caustics_simulator(supersample=supersample)([source])
    assert (ours - theirs).abs().max() < 1e-8  # measured 1.8e-11, 1.0e-10, 4.8e-10
    # caustics' own float32 grid: 7.1e-7, 2.7e-7, 2.2e-7
    theirs32 = caustics_simulator(supersample=supersample, float64_grid=False)([source])
    assert (ours - theirs32).abs().max() < 5e-6


def test_lensing_vs_caustics_psf_kernel_and_orientation():
    caustics = pytest.importorskip("caustics")
    fwhm = 0.15
    kernel = gaussian_psf(fwhm, PIXEL)
    size = kernel.shape[-1]
    theirs_kernel = caustics.utils.gaussian(PIXEL, size, size, fwhm * FWHM_TO_SIGMA, dtype=F64)
    assert (kernel - theirs_kernel).abs().max() < 1e-7  # measured 1.2e-8 (float32 FWHM)
    exact = gaussian_psf(torch.tensor([fwhm], dtype=F64), PIXEL)[0]
    assert (exact - theirs_kernel).abs().max() < 1e-15  # measured 4e-19
    source = gaussian_source(N_SRC, FOV_SRC, *GAUSS)[None, None]
    # asymmetric kernels: both convolve (neither flips), with the same row orientation
    g = torch.Generator().manual_seed(0)
    square = torch.rand(5, 5, generator=g, dtype=F64)
    for psf in (kernel, square / square.sum()):
        ours = lensing(psf=psf)(source)[0, 0]
        diff = (ours - caustics_simulator(psf=psf)([source[0, 0]])).abs()
        half = psf.shape[0] // 2
        assert diff[half:-half, half:-half].max() < 1e-10  # measured 1.4e-15, 1.5e-12
        assert diff.max() < 1e-6  # the border band (difference 3): 4.3e-8, the source's tails
    # difference 5: a non-square kernel shifts caustics' image by (h//2 - w//2, w//2 - h//2)
    for shape in ((7, 5), (5, 7)):
        psf = torch.rand(*shape, generator=g, dtype=F64)
        psf = psf / psf.sum()
        ours = lensing(psf=psf)(source)[0, 0]
        theirs = caustics_simulator(psf=psf)([source[0, 0]])
        shift = (shape[0] // 2 - shape[1] // 2, shape[1] // 2 - shape[0] // 2)
        inner = slice(8, -8)
        assert (ours - theirs)[inner, inner].abs().max() > 0.1  # measured 0.24, 0.22
        moved = torch.roll(ours, shift, dims=(0, 1))
        assert (moved - theirs)[inner, inner].abs().max() < 1e-10  # measured 6.7e-16


def test_lensing_vs_caustics_edges():
    """Differences 2 (source edge) and 3 (PSF at the image border) of the module docstring."""
    # 2. a uniform source: only rays within half a source pixel of the field edge differ
    ones = torch.ones(N_SRC, N_SRC, dtype=F64)
    model = lensing()
    diff = (model(ones[None, None])[0, 0] - caustics_simulator()([ones])).abs()
    bx, by = model.ray_trace()
    half_pixel, edge = FOV_SRC / N_SRC / 2, FOV_SRC / 2
    band = ((bx.abs() - edge).abs() < half_pixel) | ((by.abs() - edge).abs() < half_pixel)
    assert diff[~band].max() < 1e-12
    assert 0.4 < diff.max() <= 0.5  # measured 0.488 (47 pixels)
    # 3. a source whose image reaches the border, with a PSF: only the border band differs
    n_src, fov = 150, 6.0
    wide = gaussian_source(n_src, fov, 0.0, 0.0, 0.5)
    kernel = gaussian_psf(0.15, PIXEL)
    half = kernel.shape[-1] // 2
    no_psf = lensing(n_src, fov)(wide[None, None])[0, 0]
    assert no_psf[0].max() > 0.1  # light at the border
    assert (no_psf - caustics_simulator(n_src, fov)([wide])).abs().max() < 1e-12
    ours = lensing(n_src, fov, psf=kernel)(wide[None, None])[0, 0]
    diff = (ours - caustics_simulator(n_src, fov, psf=kernel)([wide])).abs()
    assert diff[half:-half, half:-half].max() < 1e-12
    assert 0.01 < diff.max() < 0.1  # measured 0.051


@pytest.mark.parametrize("supersample", [2, 3])
def test_lensing_vs_caustics_supersampled_psf(supersample):
    """Difference 4: where the PSF acts (after or before the sub-pixel average)."""
    caustics = pytest.importorskip("caustics")
    fwhm = 0.15
    kernel = gaussian_psf(fwhm, PIXEL)
    size = kernel.shape[-1] * supersample
    size += 1 - size % 2  # odd
    fine = caustics.utils.gaussian(
        PIXEL / supersample, size, size, fwhm * FWHM_TO_SIGMA, dtype=F64
    )
    source = gaussian_source(N_SRC, FOV_SRC, *GAUSS)
    ours = lensing(supersample=supersample, psf=kernel)(source[None, None])[0, 0]
    theirs = caustics_simulator(supersample=supersample, psf=fine)([source])
    assert (ours - theirs).abs().max() < 2e-4 * ours.max()  # measured 7.2e-5, 6.3e-5
