"""Tests of hierprior.data: MNIST loading and procedural galaxies."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import gammaincinv

from hierprior.data import (
    ELLIPTICAL_PARAMS,
    SPIRAL_PARAMS,
    Choice,
    LogUniform,
    Uniform,
    from_value_range,
    load_mnist,
    make_galaxies,
    sersic_b,
    to_value_range,
)

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- MNIST


def test_bundled_defaults():
    x, y = load_mnist(source="bundled")
    assert x.shape == (2250, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(y.unique(), torch.arange(5))
    assert torch.equal(torch.bincount(y), torch.full((5,), 450))
    # bytes / 255 mapped to [-1, 1]: every value is on the 256-level grid (float32 round-off)
    levels = (x + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_value_range_and_inverse():
    a, _ = load_mnist(digits=(1,), source="bundled")
    b, _ = load_mnist(digits=(1,), source="bundled", value_range=(0.0, 1.0))
    assert b.min().item() == 0.0 and b.max().item() == 1.0
    # the same affine map of the same bytes; float32 round-off only
    torch.testing.assert_close(a, to_value_range(b, (-1, 1)), atol=1e-6, rtol=0)
    torch.testing.assert_close(from_value_range(a, (-1, 1)), b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="low < high"):
        load_mnist(source="bundled", value_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="2 entries"):
        load_mnist(source="bundled", value_range=(0.0, 0.5, 1.0))


@pytest.mark.parametrize("resolution", [16, 32])
def test_interpolate_resolution(resolution):
    x, y = load_mnist(digits=(2, 3), resolution=resolution, source="bundled", split="test")
    assert x.shape == (100, 1, resolution, resolution)
    assert x.min() >= -1.0 and x.max() <= 1.0
    # antialiased resampling preserves the mean intensity of a digit to a few percent
    ref, _ = load_mnist(digits=(2, 3), source="bundled", split="test")
    mean_ratio = ((x + 1).mean() / (ref + 1).mean()).item()
    assert abs(mean_ratio - 1) < 0.05


def test_pad_resolution():
    x, _ = load_mnist(digits=(0,), resolution=32, resize="pad", source="bundled", split="test")
    ref, _ = load_mnist(digits=(0,), source="bundled", split="test")
    assert x.shape == (50, 1, 32, 32)
    assert torch.equal(x[..., 2:30, 2:30], ref)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[..., border] == -1.0).all()
    with pytest.raises(ValueError, match="resolution >= 28"):
        load_mnist(resolution=16, resize="pad", source="bundled")


def test_digit_filter():
    _, y = load_mnist(digits=(7,), source="bundled", split="all")
    assert (y == 7).all() and len(y) == 500
    _, y = load_mnist(digits=[5, 3, 5], source="bundled", split="test")
    assert set(y.tolist()) == {3, 5} and len(y) == 100
    _, y = load_mnist(digits=4, source="bundled", split="test")
    assert set(y.tolist()) == {4}


@pytest.mark.parametrize("digits", [(11,), (-1, 2), (3, 10)])
def test_digit_outside_range(digits):
    with pytest.raises(ValueError, match=r"must be an integer in \[0, 9\]"):
        load_mnist(digits=digits, source="bundled")


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        load_mnist(digits=(), source="bundled")
    with pytest.raises(ValueError, match="digits"):
        load_mnist(digits=(1.5,), source="bundled")
    with pytest.raises(ValueError, match="source"):
        load_mnist(source="internet")
    with pytest.raises(ValueError, match="split"):
        load_mnist(source="bundled", split="valid")
    with pytest.raises(ValueError, match="resize"):
        load_mnist(source="bundled", resize="crop")
    with pytest.raises(ValueError, match="needs root"):
        load_mnist(source="torchvision")
    with pytest.raises(ValueError, match="max_per_digit"):
        load_mnist(source="bundled", max_per_digit=0)


def test_missing_root_torchvision(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as info:
        load_mnist(root=tmp_path, source="torchvision")
    assert "train-images-idx3-ubyte" in str(info.value)
    assert not (tmp_path / "MNIST").exists()  # nothing downloaded or created


def test_auto_falls_back_to_bundled(tmp_path):
    with pytest.warns(UserWarning, match="bundled"):
        x, y = load_mnist(digits=(1,), root=tmp_path, source="auto", split="test")
    ref, _ = load_mnist(digits=(1,), source="bundled", split="test")
    assert torch.equal(x, ref)


def _write_idx(path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_source(tmp_path):
    # a miniature MNIST in torchvision's raw layout: 20 train and 10 test digits
    rng = np.random.RandomState(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for prefix, count in (("train", 20), ("t10k", 10)):
        images = rng.randint(0, 256, size=(count, 28, 28))
        labels = np.arange(count) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = images, labels
    x, y = load_mnist(digits=range(10), root=tmp_path, source="torchvision", split="test")
    images, labels = data["t10k"]
    order = np.argsort(labels, kind="stable")
    assert torch.equal(y, torch.from_numpy(labels[order]))
    expected = torch.from_numpy(images[order]).float()[:, None] / 255 * 2 - 1
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)  # float32 round-off
    x_all, _ = load_mnist(digits=(0, 1), root=tmp_path, source="auto", split="all")
    assert x_all.shape == (6, 1, 28, 28)  # 2 + 2 train and 1 + 1 test digits


def test_bundled_split_is_fixed_and_disjoint():
    xtr, ytr = load_mnist(digits=range(10), source="bundled", split="train")
    xte, yte = load_mnist(digits=range(10), source="bundled", split="test")
    xall, _ = load_mnist(digits=range(10), source="bundled", split="all")
    assert torch.equal(torch.bincount(ytr), torch.full((10,), 450))
    assert torch.equal(torch.bincount(yte), torch.full((10,), 50))
    xtr2, _ = load_mnist(digits=range(10), source="bundled", split="train")
    assert torch.equal(xtr, xtr2)

    def rows(x):
        return {bytes(r) for r in ((x + 1) * 127.5).round().to(torch.uint8).flatten(1).numpy()}

    train, test, every = rows(xtr), rows(xte), rows(xall)
    assert not train & test
    assert train | test == every
    # pins the split itself: the byte sum of the test split under the documented permutation
    test_bytes = ((xte + 1) * 127.5).round().to(torch.int64).sum().item()
    assert test_bytes == 13_064_335


def test_max_per_digit():
    x, y = load_mnist(digits=(3, 8), source="bundled", max_per_digit=7)
    assert torch.equal(torch.bincount(y, minlength=10)[[3, 8]], torch.tensor([7, 7]))
    full, _ = load_mnist(digits=(3, 8), source="bundled")
    assert torch.equal(x[:7], full[:7])  # without a generator, the first ones

    state = torch.get_rng_state()
    a, _ = load_mnist(digits=(3,), source="bundled", max_per_digit=5, generator=1)
    b, _ = load_mnist(digits=(3,), source="bundled", max_per_digit=5, generator=1)
    c, _ = load_mnist(
        digits=(3,), source="bundled", max_per_digit=5, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- galaxies


def _azimuthal_power(images, params, kind, radii=(0.15, 0.25, 0.35, 0.45), n_angles=64):
    """Power of the azimuthal Fourier modes m = 1..8 over m = 0 along deprojected rings.

    Ellipticals are sampled on their isophotal ellipses, spirals on circles of the disk plane,
    so an axisymmetric (in its own plane) galaxy has no power. Returns (B, len(radii), 8).
    """

    u = (images + 1) / 2
    q = params["axis_ratio"] if kind == "elliptical" else params["cos_inclination"]
    t = torch.arange(n_angles, dtype=torch.float64) * 2 * math.pi / n_angles
    rho = torch.tensor(radii, dtype=torch.float64)
    power = []
    for b in range(len(images)):
        cu, cv = rho[:, None] * torch.cos(t), q[b] * rho[:, None] * torch.sin(t)
        pa = params["position_angle"][b]
        x = params["x0"][b] + cu * torch.cos(pa) - cv * torch.sin(pa)
        y = params["y0"][b] + cu * torch.sin(pa) + cv * torch.cos(pa)
        grid = torch.stack([x, y], -1)[None].float()
        ring = F.grid_sample(u[b : b + 1], grid, align_corners=False)[0, 0].double()
        c = torch.fft.rfft(ring, dim=-1).abs() ** 2
        power.append(c[:, 1:9] / c[:, :1])
    return torch.stack(power)


@pytest.mark.parametrize("kind", ["elliptical", "spiral"])
@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_galaxy_shapes_and_range(kind, resolution):
    x = make_galaxies(kind, 6, resolution, seed=0)
    assert x.shape == (6, 1, resolution, resolution) and x.dtype == torch.float32
    assert x.min() >= -1.0
    # every image is normalised to peak 1, i.e. value_range[1]
    torch.testing.assert_close(x.amax(dim=(1, 2, 3)), torch.ones(6), atol=1e-6, rtol=0)
    y = make_galaxies(kind, 6, resolution, seed=0, value_range=(0.0, 2.0))
    torch.testing.assert_close(y, x + 1, atol=1e-6, rtol=0)  # same image, shifted range


@pytest.mark.parametrize("kind", ["elliptical", "spiral"])
def test_galaxy_determinism(kind):
    state = torch.get_rng_state()
    a = make_galaxies(kind, 8, 32, seed=5)
    b = make_galaxies(kind, 8, 32, seed=5)
    c = make_galaxies(kind, 8, 32, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert (a - c).abs().amax(dim=(1, 2, 3)).min() > 0.05  # every galaxy differs
    g = torch.Generator().manual_seed(5)
    assert torch.equal(make_galaxies(kind, 8, 32, seed=g), a)
    # a batch's first galaxies equal a smaller batch, and chunking changes nothing; the FFT
    # size follows the widest PSF of a chunk, so only float32 round-off may differ
    torch.testing.assert_close(make_galaxies(kind, 3, 32, seed=5), a[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        make_galaxies(kind, 8, 32, seed=5, chunk_size=3), a, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("kind", ["elliptical", "spiral"])
def test_galaxy_resolution_consistency(kind):
    # parameters live in units of the half-width: a 64 px image pooled to 32 px is close to the
    # 32 px render; both are mean-of-subpixel images, so the gap is the oversampling error
    # (32 px uses 2x2, 64 px 1x1 subpixels) plus the per-image peak normalisation
    fine = make_galaxies(kind, 8, 64, seed=2, value_range=(0, 1))
    coarse = make_galaxies(kind, 8, 32, seed=2, value_range=(0, 1))
    pooled = F.avg_pool2d(fine, 2)
    pooled = pooled / pooled.amax(dim=(2, 3), keepdim=True)
    assert (pooled - coarse).abs().mean() < 0.01


def test_spirals_have_arms():
    xe, pe = make_galaxies("elliptical", 48, 64, seed=3, return_params=True)
    xs, ps = make_galaxies("spiral", 48, 64, seed=3, return_params=True)
    ell = _azimuthal_power(xe, pe, "elliptical").sum(-1).mean(-1)
    spi = _azimuthal_power(xs, ps, "spiral").sum(-1).mean(-1)
    # measured medians (seed 3, 64 px): ellipticals ~2e-4 (pixelisation, PSF rounding),
    # spirals ~5e-2; a factor 20 leaves a wide margin on both sides
    assert spi.median() > 20 * ell.median()
    assert spi.median() > 0.01


def test_face_on_spirals_have_m_arms():
    x, p = make_galaxies(
        "spiral",
        24,
        64,
        seed=4,
        params={"cos_inclination": 1.0, "n_clumps": 0},
        return_params=True,
    )
    power = _azimuthal_power(x, p, "spiral", radii=(0.3, 0.4, 0.5)).mean(1)
    dominant = power.argmax(-1) + 1
    # an m-armed pattern puts most azimuthal power in mode m; allow a few exceptions where a
    # tight, clipped pattern puts more into a harmonic at these radii
    assert (dominant == p["n_arms"]).float().mean() >= 0.9  # measured: 24 of 24


def test_clump_sits_on_arm_crest():
    fixed = {
        "cos_inclination": 1.0,
        "position_angle": 0.3,
        "x0": 0.0,
        "y0": 0.0,
        "chirality": 1,
        "n_arms": 2,
        "pitch_angle": 0.3,
        "arm_phase": 1.0,
        "disk_scale": 0.25,
        "n_clumps": 1,
        "clump_radius": 2.0,
        "clump_size": 0.02,
        "clump_dphi": 0.0,
        "psf_fwhm": 0.0,
    }
    bright = make_galaxies(
        "spiral", 1, 64, seed=0, value_range=(0, 1), params={**fixed, "clump_brightness": 3.0}
    )
    plain = make_galaxies(
        "spiral", 1, 64, seed=0, value_range=(0, 1), params={**fixed, "clump_brightness": 0.0}
    )
    # predicted centre: arm 0 crest 2 (phi - ln(r/h)/tan p) - 1 = 0 at r = 2h, rotated by PA
    r = 2.0 * 0.25
    phi = 1.0 / 2 + math.log(2.0) / math.tan(0.3) + 0.3
    cx, cy = r * math.cos(phi), r * math.sin(phi)
    # compare in [0,1] after each image's own peak normalisation; the clump adds light
    diff = bright[0, 0] / bright.max() - plain[0, 0] / plain.max()
    row, col = divmod(diff.argmax().item(), 64)
    centre = torch.tensor([-1 + (2 * col + 1) / 64, -1 + (2 * row + 1) / 64])
    # within 1.5 pixels (pixel = 2/64): the argmax pixel centre is at most 0.7 px off
    assert (centre - torch.tensor([cx, cy])).norm() < 1.5 * 2 / 64


def test_params_override_and_return():
    x, p = make_galaxies("spiral", 10, 32, seed=1, return_params=True)
    assert set(SPIRAL_PARAMS) | {"clump_arm"} == set(p)
    assert p["n_arms"].dtype == torch.int64 and set(p["n_arms"].tolist()) <= {2, 3, 4}
    assert p["clump_radius"].shape == (10, 8)
    lo, hi = SPIRAL_PARAMS["disk_scale"].low, SPIRAL_PARAMS["disk_scale"].high
    assert ((p["disk_scale"] >= lo) & (p["disk_scale"] <= hi)).all()

    _, q = make_galaxies(
        "spiral",
        10,
        32,
        seed=1,
        return_params=True,
        params={"n_arms": 3, "pitch_angle": (0.2, 0.25), "arm_contrast": Uniform(1.0, 1.0)},
    )
    assert (q["n_arms"] == 3).all()
    assert ((q["pitch_angle"] >= 0.2) & (q["pitch_angle"] <= 0.25)).all()
    assert (q["arm_contrast"] == 1.0).all()
    # every parameter has its own column of draws: the others are unchanged
    for key in ("disk_scale", "cos_inclination", "arm_phase", "clump_radius"):
        assert torch.equal(p[key], q[key])

    tensor_q = torch.linspace(0.5, 1.0, 10, dtype=torch.float64)
    _, r = make_galaxies(
        "elliptical", 10, 16, seed=0, params={"axis_ratio": tensor_q}, return_params=True
    )
    assert torch.equal(r["axis_ratio"], tensor_q)
    _, s = make_galaxies(
        "spiral", 4, 16, seed=0, params={"n_arms": Choice((4,))}, return_params=True
    )
    assert (s["n_arms"] == 4).all()


def test_galaxy_errors():
    with pytest.raises(ValueError, match="kind"):
        make_galaxies("irregular", 2)
    with pytest.raises(ValueError, match="unknown elliptical galaxy parameters"):
        make_galaxies("elliptical", 2, params={"n_arms": 2})
    with pytest.raises(ValueError, match="axis_ratio"):
        make_galaxies("elliptical", 2, params={"axis_ratio": 1.5})
    with pytest.raises(ValueError, match="integer"):
        make_galaxies("spiral", 2, params={"n_arms": 2.5})
    with pytest.raises(ValueError, match="shape"):
        make_galaxies("elliptical", 3, params={"r_eff": torch.ones(2)})
    with pytest.raises(ValueError, match="LogUniform"):
        LogUniform(0.0, 1.0)
    with pytest.raises(ValueError, match="Uniform"):
        Uniform(2.0, 1.0)
    with pytest.raises(ValueError, match="stretch"):
        make_galaxies("elliptical", 2, stretch=-1.0)
    with pytest.raises(TypeError):
        ELLIPTICAL_PARAMS["r_eff"] = Uniform(0.1, 0.2)  # the defaults are read-only


def test_stretch_brightens_outskirts():
    lin = make_galaxies("elliptical", 4, 32, seed=0, value_range=(0, 1))
    soft = make_galaxies("elliptical", 4, 32, seed=0, value_range=(0, 1), stretch=0.05)
    assert torch.allclose(soft.amax(dim=(1, 2, 3)), torch.ones(4))  # peak stays 1
    assert (soft >= lin - 1e-6).all() and soft.mean() > 2 * lin.mean()


def test_sersic_b_matches_exact_root():
    # exact b_n solves Gamma(2n) = 2 gamma(2n, b_n); Ciotti & Bertin's series is good to 3e-5
    # relative for n >= 1 (measured 2.1e-5 on this grid)
    n = np.linspace(1.0, 8.0, 50)
    exact = torch.from_numpy(gammaincinv(2 * n, 0.5))
    torch.testing.assert_close(sersic_b(torch.from_numpy(n)), exact, rtol=3e-5, atol=0)


@pytest.mark.slow
def test_galaxy_speed():
    import time

    torch.set_num_threads(2)
    for kind in ("elliptical", "spiral"):
        start = time.perf_counter()
        make_galaxies(kind, 5000, 64, seed=0)
        # a few seconds on 2 idle CPU cores; 30 s leaves room for a loaded machine
        assert time.perf_counter() - start < 30
