"""Tests of hierprior.populations: simulated populations from truths, forward models and noise."""

from __future__ import annotations

import pytest
import torch

from hierprior.em import Population
from hierprior.physics import DenseLinear, GaussianNoise, Identity, Mask
from hierprior.populations import (
    GaussianSignals,
    MNISTDigits,
    RandomMask,
    RandomProjection,
    simulate_population,
)


def _images(n=40, shape=(1, 16, 16), seed=0):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _noise_of(pop: Population) -> torch.Tensor:
    with torch.no_grad():
        return pop.y - pop.forward(pop.truth)


# ------------------------------------------------------------------------ determinism, streams


def test_simulate_population_is_a_deterministic_function_of_its_seed():
    truths = GaussianSignals(torch.arange(4.0), dtype="float64")

    def make(seed):
        return simulate_population(
            truths, RandomProjection(2), GaussianNoise(0.1), num_obs=30, seed=seed
        )

    a, b, c = make(7), make(7), make(8)
    assert isinstance(a, Population) and len(a) == 30 and a.signal_shape == (4,)
    assert torch.equal(a.y, b.y) and torch.equal(a.truth, b.truth)
    assert torch.equal(a.forward.A, b.forward.A)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not torch.allclose(a.truth, c.truth) and not torch.allclose(a.forward.A, c.forward.A)
    assert not torch.allclose(_noise_of(a), _noise_of(c))
    assert a.meta["seed"] == 7


def test_population_parts_draw_from_independent_streams():
    truths = MNISTDigits(digits=(3, 7), resolution=12, source="bundled")

    def make(fraction=0.5, sigma=0.1, kind="pixels"):
        return simulate_population(
            truths, RandomMask(kind, fraction), GaussianNoise(sigma), num_obs=25, seed=3
        )

    ref = make()
    # another mask fraction: the same truths and the same noise draws, other masks
    other_mask = make(fraction=0.2)
    assert torch.equal(other_mask.truth, ref.truth)
    assert not torch.equal(other_mask.forward.observed, ref.forward.observed)
    torch.testing.assert_close(_noise_of(other_mask), _noise_of(ref), rtol=0, atol=1e-6)
    # another mask kind (drawing other random numbers): the same truths and noise draws
    patch = make(kind="patch")
    assert torch.equal(patch.truth, ref.truth)
    torch.testing.assert_close(_noise_of(patch), _noise_of(ref), rtol=0, atol=1e-6)
    # another noise level: the same truths and masks, noise scaled (same standard normals)
    louder = make(sigma=0.3)
    assert torch.equal(louder.truth, ref.truth)
    assert torch.equal(louder.forward.observed, ref.forward.observed)
    torch.testing.assert_close(_noise_of(louder), 3 * _noise_of(ref), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ forward-model generators


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6])
def test_random_pixel_mask_hides_about_the_requested_fraction(fraction):
    n, shape = 200, (3, 16, 16)
    mask = RandomMask("pixels", fraction)(n, shape, torch.Generator().manual_seed(0))
    assert isinstance(mask, Mask) and mask.num_obs == n and tuple(mask.input_shape) == shape
    hidden = ~mask.observed
    assert hidden.shape == (n, *shape)
    assert torch.equal(hidden, hidden[:, :1].expand_as(hidden))  # one mask for all channels
    share = hidden.float().mean().item()
    sd = (fraction * (1 - fraction) / (n * 16 * 16)) ** 0.5
    assert abs(share - fraction) <= 5 * sd + 1e-12, (share, fraction)
    if fraction > 0:  # masks differ between observations
        assert not torch.equal(hidden[0], hidden[1])


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_random_patch_mask_hides_one_square_of_the_requested_area(fraction):
    n, (h, w) = 50, (16, 20)
    mask = RandomMask("patch", fraction)(n, (1, h, w), torch.Generator().manual_seed(1))
    hidden = ~mask.observed[:, 0]
    side = round((fraction * h * w) ** 0.5)
    corners = set()
    for i in range(n):
        rows, cols = hidden[i].nonzero(as_tuple=True)
        assert len(rows) == side * side  # exactly one side x side square ...
        top, left = int(rows.min()), int(cols.min())
        assert int(rows.max()) - top == side - 1 and int(cols.max()) - left == side - 1
        corners.add((top, left))
    # ... covering the requested share up to the rounding of its side, at random positions
    assert abs(side * side / (h * w) - fraction) <= (2 * side + 1) / (h * w)
    assert len(corners) > n // 3


def test_random_projection_shapes_and_scale():
    n, m, d = 500, 3, 8
    proj = RandomProjection(m, scale=2.0, dtype="float64")(
        n, (d,), torch.Generator().manual_seed(0)
    )
    assert isinstance(proj, DenseLinear) and proj.num_obs == n
    assert proj.A.shape == (n, m, d) and proj.A.dtype == torch.float64
    assert tuple(proj.output_shape) == (m,) and tuple(proj.input_shape) == (d,)
    assert proj(torch.ones(n, d, dtype=torch.float64)).shape == (n, m)
    # entries N(0, scale^2 / D): sd 2 / sqrt(8), measured on 12,000 entries
    assert proj.A.std().item() == pytest.approx(2.0 / d**0.5, rel=0.05)
    assert abs(proj.A.mean().item()) < 0.05


# ------------------------------------------------------------------------ truth generators


def test_mnist_digits_draws_distinct_digits_of_the_requested_classes():
    digits = MNISTDigits(digits=(2, 5), resolution=14, source="bundled")
    assert set(digits.labels.unique().tolist()) == {2, 5}
    x = digits(60, torch.Generator().manual_seed(0))
    assert x.shape == (60, 1, 14, 14)
    assert x.min() >= -1 and x.max() <= 1
    # each drawn image is one image of the pool, of a requested class, none twice
    flat_pool, flat_x = digits.images.flatten(1), x.flatten(1)
    match = (flat_x[:, None] == flat_pool[None]).all(-1)  # (60, pool)
    assert (match.sum(1) >= 1).all()
    picked = match.float().argmax(1)
    assert len(set(picked.tolist())) == 60
    assert set(digits.labels[picked].tolist()) <= {2, 5}
    assert len(set(digits.labels[picked].tolist())) == 2  # both classes appear in 60 draws
    # the same generator state gives the same draw, another seed another one
    assert torch.equal(x, digits(60, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, digits(60, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="only .* images"):
        digits(len(digits.images) + 1, torch.Generator().manual_seed(0))


def test_gaussian_signals_moments():
    cov = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    x = GaussianSignals([1.0, -2.0], cov, dtype="float64")(20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2) and x.dtype == torch.float64
    torch.testing.assert_close(x.mean(0), torch.tensor([1.0, -2.0], dtype=torch.float64),
                               atol=0.05, rtol=0)  # fmt: skip
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.08, rtol=0)


# ------------------------------------------------------------------------ bad input


def test_bad_population_inputs_raise_clear_errors():
    noise = GaussianNoise(0.1)
    truths = GaussianSignals(torch.zeros(4))
    with pytest.raises(ValueError, match="num_obs must be an integer >= 1, got None"):
        simulate_population(truths, RandomProjection(2), noise)
    with pytest.raises(ValueError, match="num_obs must be an integer >= 1, got 0"):
        simulate_population(truths, RandomProjection(2), noise, num_obs=0)
    with pytest.raises(ValueError, match="num_obs=5 but the truth tensor holds 4"):
        simulate_population(torch.zeros(4, 3), Identity((3,)), noise, num_obs=5)
    with pytest.raises(ValueError, match=r"truths have shape \(4,\) but the forward model takes"):
        simulate_population(truths, Identity((3,)), noise, num_obs=5)
    with pytest.raises(ValueError, match="RandomMask needs image signals"):
        simulate_population(truths, RandomMask(), noise, num_obs=5)
    with pytest.raises(ValueError, match="RandomProjection needs vector signals"):
        simulate_population(_images(3), RandomProjection(2), noise)
    with pytest.raises(ValueError, match="seed must be an integer, got 1.5"):
        simulate_population(truths, RandomProjection(2), noise, num_obs=5, seed=1.5)
    with pytest.raises(TypeError, match="noise must be a hierprior NoiseModel"):
        simulate_population(truths, RandomProjection(2), 0.1, num_obs=5)
    with pytest.raises(ValueError, match="unknown mask kind 'stripes'"):
        RandomMask("stripes")
    for fraction in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"missing_fraction must lie in \[0, 1\)"):
            RandomMask("pixels", fraction)
    with pytest.raises(ValueError, match="num_measurements must be an integer >= 1"):
        RandomProjection(0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        RandomProjection(2, scale=0.0)
    with pytest.raises(ValueError, match=r"mean must have shape \(D,\)"):
        GaussianSignals(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="cov must have shape"):
        GaussianSignals(torch.zeros(3), torch.eye(2))
