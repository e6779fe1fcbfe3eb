"""Tests of hierprior.physics: forward models (shapes, adjoints, slicing, linearisation) and
Gaussian noise (sampling, log-likelihood, validation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hierprior.physics import (
    Blur,
    Compose,
    DenseLinear,
    Downsample,
    ForwardModel,
    GaussianNoise,
    Identity,
    Mask,
    NonLinear,
    observation_index,
)

D64 = torch.float64
N = 3  # observations in every per-observation fixture


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = D64) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = D64) -> torch.Tensor:
    return torch.rand(shape, generator=gen(seed), dtype=dtype)


# ------------------------------------------------------------------------- model zoo
def _nonlinear_fn(x: torch.Tensor, params: dict) -> torch.Tensor:
    # y = a * tanh(W x) + b * |x|^2, a (B, 4), b (B,), x (B, 6)
    W = torch.linspace(-1, 1, 24, dtype=x.dtype).reshape(4, 6)
    return params["a"] * torch.tanh(x @ W.T) + params["b"][:, None] * (x**2).sum(-1, True)


def _nonlinear_single(x: torch.Tensor, params: dict) -> torch.Tensor:
    return _nonlinear_fn(x[None], {k: v[None] for k, v in params.items()})[0]


def make_nonlinear(batched: bool = True, forward_ad: bool = True) -> NonLinear:
    params = {"a": rand(N, 4, seed=1) + 0.5, "b": randn(N, seed=2)}
    fn = _nonlinear_fn if batched else _nonlinear_single
    return NonLinear(fn, (6,), (4,), params, batched=batched, forward_ad=forward_ad)


LINEAR = {
    "dense_obs": lambda: DenseLinear(randn(N, 4, 6)),
    "dense_shared": lambda: DenseLinear(randn(4, 6)),
    "dense_image": lambda: DenseLinear(randn(N, 5, 2 * 3 * 4), input_shape=(2, 3, 4)),
    "mask_obs": lambda: Mask(rand(N, 2, 5, 4) > 0.5),
    "mask_shared": lambda: Mask((rand(5, 4) > 0.5).to(D64), per_observation=False),
    "blur_obs": lambda: Blur(rand(N, 3, 5), (2, 8, 7), per_observation=True),
    "blur_obs_channel": lambda: Blur(rand(N, 2, 5, 3), (2, 9, 6)),
    "blur_obs_gray": lambda: Blur(rand(N, 5, 5), (8, 8)),
    "blur_shared": lambda: Blur(rand(3, 3), (2, 6, 7)),
    "blur_shared_channel": lambda: Blur(rand(2, 5, 3), (2, 6, 7), per_observation=False),
    "blur_big_kernel": lambda: Blur(rand(N, 11, 9), (1, 6, 5)),
    "downsample": lambda: Downsample(2, (2, 6, 4)),
    "identity": lambda: Identity((3, 4)),
    "compose_obs": lambda: Compose(
        Blur(rand(N, 3, 3), (2, 6, 6)), Downsample(2, (2, 6, 6)), Mask(rand(N, 2, 3, 3) > 0.3)
    ),
    "compose_shared": lambda: Compose(
        Downsample(3, (1, 6, 9)), DenseLinear(randn(5, 6), input_shape=(1, 2, 3))
    ),
}
PER_OBS = [k for k in LINEAR if LINEAR[k]().num_obs is not None]


def x_for(model: ForwardModel, S: int | None, seed: int = 3) -> torch.Tensor:
    lead = (N,) if S is None else (N, S)
    return randn(*lead, *model.input_shape, seed=seed)


def y_for(model: ForwardModel, S: int | None, seed: int = 4) -> torch.Tensor:
    lead = (N,) if S is None else (N, S)
    return randn(*lead, *model.output_shape, seed=seed)


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(-1)


# ------------------------------------------------------------------------- adjoints
@pytest.mark.parametrize("S", [None, 4])
@pytest.mark.parametrize("name", list(LINEAR))
def test_adjoint_dot_product(name, S):
    model = LINEAR[name]()
    assert model.linear
    x, y = x_for(model, S), y_for(model, S)
    Ax, ATy = model(x), model.adjoint(y)
    assert Ax.shape == y.shape and ATy.shape == x.shape
    lhs, rhs = rowdot(Ax, y), rowdot(x, ATy)
    # per observation row; float64 rounding of sums over <= a few hundred products is
    # ~1e-14 relative to the Cauchy-Schwarz scale |Ax||y|, so 1e-11 leaves ample margin
    scale = Ax.flatten(1).norm(dim=-1) * y.flatten(1).norm(dim=-1)
    assert torch.all((lhs - rhs).abs() <= 1e-11 * scale)


@pytest.mark.parametrize("name", list(LINEAR))
def test_default_vjp_adjoint_equals_explicit(name):
    model = LINEAR[name]()
    yb = randn(N if model.num_obs else 1, 2, *model.output_shape, seed=5)
    explicit = model._adjoint(yb)
    default = ForwardModel._adjoint(model, yb)  # the base class' VJP at zero
    # both are exact linear maps in float64: only rounding differs (~1e-15)
    torch.testing.assert_close(default, explicit, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dense_obs", "blur_obs", "compose_obs"])
def test_linear_jvp_vjp_use_A(name):
    model = LINEAR[name]()
    x, v, u = x_for(model, 2), x_for(model, 2, seed=6), y_for(model, 2)
    y, jv = model.jvp(x, v)
    y2, jtu = model.vjp(x, u)
    # exact identities in float64
    torch.testing.assert_close(y, model(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y2, model(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(jv, model(v), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(jtu, model.adjoint(u), rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------- blur
def direct_blur(x: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), psf (N, h, w): true convolution with F.conv2d (flipped kernel)."""
    h, w = psf.shape[-2:]
    rows = []
    for n in range(x.shape[0]):
        k = psf[n].flip(-2, -1)[None, None]
        rows.append(F.conv2d(x[n][:, None], k, padding=(h // 2, w // 2))[:, 0])
    return torch.stack(rows)


@pytest.mark.parametrize("hw", [(9, 9), (8, 10), (7, 12), (5, 6)])
@pytest.mark.parametrize("ksize", [(3, 3), (5, 3), (7, 7)])
def test_blur_equals_direct_convolution(hw, ksize):
    psf = rand(N, *ksize, seed=7)
    x = randn(N, 2, *hw, seed=8)
    blur = Blur(psf, (2, *hw), per_observation=True)
    # float64 FFT round-off is ~1e-15 relative; direct sums agree to ~1e-14
    torch.testing.assert_close(blur(x), direct_blur(x, psf), rtol=1e-12, atol=1e-12)


def test_blur_float32_matches_conv2d_to_1e5():
    psf = rand(N, 5, 5, seed=9, dtype=torch.float32)
    psf = psf / psf.sum((-2, -1), keepdim=True)
    x = randn(N, 1, 16, 15, seed=10, dtype=torch.float32)
    blur = Blur(psf, (1, 16, 15), per_observation=True)
    # float32 FFT error is ~1e-7 * log(size) relative to |x| ~ 1; 1e-5 is the spec's bar
    torch.testing.assert_close(blur(x), direct_blur(x, psf), rtol=0, atol=1e-5)


def test_blur_per_channel_kernels_and_shared_kernel():
    psf = rand(N, 2, 3, 5, seed=11)
    x = randn(N, 4, 2, 7, 8, seed=12)
    out = Blur(psf, (2, 7, 8))(x)
    for c in range(2):
        ref = direct_blur(x[:, :, c], psf[:, c])
        torch.testing.assert_close(out[:, :, c], ref, rtol=1e-12, atol=1e-12)  # float64 exact
    shared = Blur(psf[0, 0], (2, 7, 8))
    ref = direct_blur(x.flatten(0, 1), psf[0, 0].expand(N * 4, 3, 5)).reshape(x.shape)
    torch.testing.assert_close(shared(x), ref, rtol=1e-12, atol=1e-12)  # float64 exact


def test_blur_delta_psf_is_identity_and_cache_follows_psf():
    psf = torch.zeros(N, 3, 3, dtype=D64)
    psf[:, 1, 1] = 1
    blur = Blur(psf, (5, 6))
    x = randn(N, 5, 6)
    torch.testing.assert_close(blur(x), x, rtol=1e-13, atol=1e-13)  # exact up to FFT round-off
    blur.psf.mul_(2)  # in-place change must invalidate the cached transfer function
    torch.testing.assert_close(blur(x), 2 * x, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------- slicing
INDICES = [1, -1, slice(0, 3, 2), [2, 0], torch.tensor([0, 2]), torch.tensor([True, False, True])]
INDICES += [[False, True, True]]


def as_rows(idx) -> list[int]:
    return observation_index(idx, N).tolist()


@pytest.mark.parametrize("idx", INDICES, ids=lambda i: repr(i).replace(" ", ""))
@pytest.mark.parametrize("name", PER_OBS + ["nonlinear"])
def test_slicing_commutes(name, idx):
    model = make_nonlinear() if name == "nonlinear" else LINEAR[name]()
    rows = as_rows(idx)
    x = x_for(model, 2)
    sub = model[idx]
    assert sub.num_obs == len(rows) and len(sub) == len(rows)
    # same arithmetic on the same rows: equal up to float64 rounding of batched FFT/matmul
    torch.testing.assert_close(sub(x[rows]), model(x)[rows], rtol=1e-12, atol=1e-12)
    if model.linear:
        y = y_for(model, 2)
        torch.testing.assert_close(
            sub.adjoint(y[rows]), model.adjoint(y)[rows], rtol=1e-12, atol=1e-12
        )


def test_int_index_keeps_observation_axis_and_shared_returns_self():
    model = LINEAR["dense_obs"]()
    assert model[2].num_obs == 1
    assert model[2](x_for(model, None)[2:3]).shape == (1, 4)
    shared = LINEAR["dense_shared"]()
    assert shared[[0, 1]] is shared and shared[5] is shared


def test_bad_indices():
    model = LINEAR["mask_obs"]()
    with pytest.raises(IndexError, match="out of range"):
        model[3]
    with pytest.raises(IndexError, match="out of range"):
        model[[0, -4]]
    with pytest.raises(ValueError, match="length 2"):
        model[torch.tensor([True, False])]
    with pytest.raises(TypeError, match="integer or bool"):
        model[torch.tensor([0.0, 1.0])]
    with pytest.raises(ValueError, match="no observations"):
        model[[]]
    with pytest.raises(ValueError, match="1-D"):
        model[torch.zeros(1, 1, dtype=torch.long)]
    with pytest.raises(TypeError):
        model["a"]
    with pytest.raises(TypeError, match="bool"):
        model[True]


# ------------------------------------------------------------------------- S axis / batching
@pytest.mark.parametrize("name", PER_OBS + ["nonlinear"])
def test_sample_axis_broadcasts_row_parameters(name):
    model = make_nonlinear() if name == "nonlinear" else LINEAR[name]()
    x = x_for(model, 3)
    out = model(x)
    assert out.shape == (N, 3, *model.output_shape)
    for s in range(3):
        # same rows, same parameters: equal up to float64 rounding
        torch.testing.assert_close(out[:, s], model(x[:, s]), rtol=1e-12, atol=1e-12)
    for i in range(N):
        torch.testing.assert_close(out[i : i + 1], model[i](x[i : i + 1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [k for k in LINEAR if k not in PER_OBS])
def test_shared_models_accept_any_leading_dims(name):
    model = LINEAR[name]()
    x = randn(2, 3, 4, *model.input_shape, seed=13)
    out = model(x)
    assert out.shape == (2, 3, 4, *model.output_shape)
    flat = model(x.reshape(-1, *model.input_shape)).reshape(out.shape)
    torch.testing.assert_close(out, flat, rtol=1e-12, atol=1e-12)  # same ops, float64
    single = model(x[1, 2, 3])  # no leading dims at all
    torch.testing.assert_close(single, out[1, 2, 3], rtol=1e-12, atol=1e-12)
    assert model.adjoint(out).shape == x.shape
    with pytest.raises(TypeError, match="shared"):
        len(model)
    assert bool(model)  # truth tests do not go through len()


def test_shape_errors():
    dense = LINEAR["dense_obs"]()
    with pytest.raises(ValueError, match="event shape"):
        dense(randn(N, 5))
    with pytest.raises(ValueError, match="N = 3"):
        dense(randn(2, 6))
    with pytest.raises(ValueError, match="N = 3"):
        dense(randn(N, 2, 2, 6))
    with pytest.raises(ValueError, match="event shape"):
        dense.adjoint(randn(N, 6))
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        dense([[0.0] * 6] * 3)
    with pytest.raises(ValueError, match="v must have shape"):
        dense.jvp(randn(N, 6), randn(N, 2, 6))
    with pytest.raises(ValueError, match="u must have shape"):
        dense.vjp(randn(N, 6), randn(N, 5))
    blur = LINEAR["blur_shared"]()
    with pytest.raises(ValueError, match="event shape"):
        blur(randn(4, 2, 7, 6))
    with pytest.raises(TypeError, match="not linear"):
        make_nonlinear().adjoint(randn(N, 4))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"\(N, M, D\)"):
        DenseLinear(randn(6))
    with pytest.raises(ValueError, match="NaN"):
        DenseLinear(torch.full((2, 3), math.nan))
    with pytest.raises(TypeError, match="floating"):
        DenseLinear(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="elements"):
        DenseLinear(randn(4, 6), input_shape=(2, 2))
    with pytest.raises(ValueError, match="0 and 1"):
        Mask(torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="shared"):
        Mask(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="odd"):
        Blur(rand(4, 3), (8, 8))
    with pytest.raises(ValueError, match="ambiguous"):
        Blur(rand(2, 3, 3), (2, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        Blur(rand(N, 3, 3, 3), (2, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        Blur(rand(N, 3, 3), (8, 8), per_observation=False)
    with pytest.raises(ValueError, match="divisible"):
        Downsample(3, (8, 8))
    with pytest.raises(ValueError, match="factor"):
        Downsample(0, (8, 8))
    with pytest.raises(ValueError, match="chain"):
        Compose(Identity((4,)), DenseLinear(randn(3, 5)))
    with pytest.raises(ValueError, match="num_obs"):
        Compose(DenseLinear(randn(2, 4, 4)), DenseLinear(randn(3, 4, 4)))
    with pytest.raises(ValueError, match="disagree"):
        NonLinear(_nonlinear_fn, (6,), (4,), {"a": randn(N, 4), "b": randn(N + 1)})
    with pytest.raises(ValueError, match="leading observation dim"):
        NonLinear(_nonlinear_fn, (6,), (4,), {"a": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="callable"):
        NonLinear(3, (6,), (4,))
    with pytest.raises(ValueError, match="positive integers"):
        Identity((0, 3))


def test_to_moves_and_casts_buffers():
    model = Compose(Blur(rand(N, 3, 3, dtype=torch.float32), (4, 4)), Mask(rand(N, 4, 4) > 0.5))
    model = model.to("cpu").to(D64)
    assert model.models[0].psf.dtype == D64
    assert model.models[1].masks.dtype == torch.bool
    assert model(randn(N, 4, 4)).dtype == D64
    nonlinear = make_nonlinear().to(torch.float32)
    assert nonlinear.params["a"].dtype == torch.float32


# ------------------------------------------------------------------------- non-linear
@pytest.mark.parametrize("forward_ad", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("S", [None, 2])
def test_nonlinear_jvp_vjp_finite_differences(S, batched, forward_ad):
    model = make_nonlinear(batched, forward_ad)
    x, v, u = x_for(model, S), x_for(model, S, seed=14), y_for(model, S, seed=15)
    y, jv = model.jvp(x, v)
    torch.testing.assert_close(y, model(x), rtol=1e-13, atol=1e-13)  # same evaluation
    eps = 1e-6
    fd = (model(x + eps * v) - model(x - eps * v)) / (2 * eps)
    # central differences: truncation O(eps^2 |f'''|) ~ 1e-12, rounding ~1e-16/eps = 1e-10
    torch.testing.assert_close(jv, fd, rtol=1e-7, atol=1e-7)
    y2, jtu = model.vjp(x, u)
    assert jtu.shape == x.shape
    torch.testing.assert_close(y2, y, rtol=1e-13, atol=1e-13)
    # <J v, u> = <v, J^T u> per observation, exact up to float64 rounding
    torch.testing.assert_close(rowdot(jv, u), rowdot(v, jtu), rtol=1e-11, atol=1e-11)


def test_nonlinear_batched_and_vmapped_agree_and_shared():
    x = x_for(make_nonlinear(), 2)
    a, b = make_nonlinear(True)(x), make_nonlinear(False)(x)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)  # same arithmetic, float64
    shared = NonLinear(lambda z: torch.sin(z) * z, (2, 3), (2, 3))
    assert shared.num_obs is None and shared[0] is shared
    z = randn(4, 5, 2, 3)
    torch.testing.assert_close(shared(z), torch.sin(z) * z, rtol=0, atol=0)  # identical ops
    _, jv = shared.jvp(z, torch.ones_like(z))
    torch.testing.assert_close(jv, torch.cos(z) * z + torch.sin(z), rtol=1e-13, atol=1e-13)


def test_nonlinear_double_vjp_handles_grid_sample():
    # F.grid_sample has no forward-mode derivative: forward_ad=False must still give J v
    image = randn(1, 1, 6, 6, seed=16)

    def fn(grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(image.expand(grid.shape[0], -1, -1, -1), grid, align_corners=False)

    model = NonLinear(fn, (5, 5, 2), (1, 5, 5), forward_ad=False)
    grid, v = 1.6 * rand(2, 5, 5, 2, seed=17) - 0.8, randn(2, 5, 5, 2, seed=18)
    _, jv = model.jvp(grid, v)
    eps = 1e-6
    fd = (model(grid + eps * v) - model(grid - eps * v)) / (2 * eps)
    # bilinear interpolation is piecewise quadratic in the grid: FD exact up to ~1e-10
    # rounding, unless a point crosses a pixel edge within eps (probability ~1e-5 here)
    torch.testing.assert_close(jv, fd, rtol=1e-7, atol=1e-7)


def test_nonlinear_checks_fn_output():
    model = NonLinear(lambda z: z[:, :3], (6,), (4,))
    with pytest.raises(ValueError, match="fn returned"):
        model(randn(2, 6))


def test_compose_with_nonlinear():
    nonlinear = make_nonlinear()
    model = Compose(nonlinear, DenseLinear(randn(N, 2, 4, seed=19)))
    assert not model.linear and model.num_obs == N
    x, v = x_for(model, 2), x_for(model, 2, seed=20)
    torch.testing.assert_close(  # same arithmetic, float64
        model(x), model.models[1](nonlinear(x)), rtol=1e-13, atol=1e-13
    )
    _, jv = model.jvp(x, v)
    _, jv1 = nonlinear.jvp(x, v)
    torch.testing.assert_close(jv, model.models[1](jv1), rtol=1e-12, atol=1e-12)  # chain rule
    sub = model[[2]]
    torch.testing.assert_close(sub(x[[2]]), model(x)[[2]], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- noise
def test_noise_per_observation_sigmas_are_honoured():
    sigma = torch.tensor([0.1, 1.0, 3.0], dtype=D64)
    noise = GaussianNoise(sigma)
    n = noise.sample((N, 20_000), generator=gen(21))
    assert n.dtype == D64
    # the sample std of 20,000 draws has relative sd 1/sqrt(2 * 20000) = 0.5%; 3% is 6 sd
    torch.testing.assert_close(n.std(dim=1), sigma, rtol=0.03, atol=0)
    # per-pixel sigma over an S axis: 4000 draws per cell, relative sd 1.1%; 8% is 7 sd
    pix = 0.1 + rand(N, 2, 3, seed=22)
    m = GaussianNoise(pix).sample((N, 4000, 2, 3), generator=gen(23))
    torch.testing.assert_close(m.std(dim=1), pix, rtol=0.08, atol=0)


def test_noise_sample_uses_only_the_generator():
    noise = GaussianNoise(0.5)
    state = torch.get_rng_state()
    a = noise.sample((4, 7), generator=gen(24))
    b = noise.sample((4, 7), generator=gen(24))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert a.dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="device"):
        noise.sample((2,), generator=gen(), device="meta")
    assert noise.sample((2,), generator=gen(), device="cpu").device.type == "cpu"


SIGMAS = {
    "float": lambda: GaussianNoise(0.3),
    "per_obs": lambda: GaussianNoise(torch.tensor([0.1, 0.5, 2.0], dtype=D64)),
    "per_pixel": lambda: GaussianNoise(0.2 + rand(N, 2, 4, seed=25)),
    "shared_map": lambda: GaussianNoise(0.2 + rand(2, 4, seed=26), per_observation=False),
}


@pytest.mark.parametrize("S", [None, 5])
@pytest.mark.parametrize("kind", list(SIGMAS))
def test_noise_log_prob_matches_torch_distributions(kind, S):
    noise = SIGMAS[kind]()
    lead = (N,) if S is None else (N, S)
    y = randn(N, 2, 4, seed=27)
    y_pred = randn(*lead, 2, 4, seed=28)
    std = noise.std(y_pred)
    assert std.shape == y_pred.shape
    y_b = y if S is None else y[:, None]
    ref = torch.distributions.Normal(y_pred, std).log_prob(y_b).flatten(len(lead)).sum(-1)
    lp = noise.log_prob(y, y_pred)
    assert lp.shape == lead
    # same closed form in float64; only rounding differs
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)


def test_noise_std_broadcast_and_covariance_actions():
    sigma = torch.tensor([0.1, 0.5, 2.0], dtype=D64)
    noise = GaussianNoise(sigma)
    v = randn(N, 4, 2, 5, seed=29)
    std = noise.std(v)
    for i in range(N):
        assert torch.all(std[i] == sigma[i])
    torch.testing.assert_close(noise.variance_like(v), std**2, rtol=0, atol=0)  # same op
    # diagonal scalings: exact up to one rounding each
    torch.testing.assert_close(noise.cov_action(v), v * std**2, rtol=1e-15, atol=0)
    torch.testing.assert_close(noise.inv_cov_action(noise.cov_action(v)), v, rtol=1e-14, atol=0)
    assert noise.std(v.float()).dtype == torch.float32


def test_noise_slicing():
    pix = 0.1 + rand(N, 2, 4, seed=30)
    noise = GaussianNoise(pix)
    assert len(noise) == N
    sub = noise[[True, False, True]]
    assert sub.num_obs == 2 and torch.equal(sub.sigma, pix[[0, 2]])
    assert noise[1].num_obs == 1 and torch.equal(noise[1].sigma, pix[1:2])
    shared = GaussianNoise(0.1)
    assert shared[0] is shared and shared.num_obs is None
    with pytest.raises(TypeError, match="shared"):
        len(shared)
    assert bool(shared)


@pytest.mark.parametrize(
    "sigma, error, match",
    [
        (0.0, ValueError, "> 0"),
        (-1.0, ValueError, "> 0"),
        (math.nan, ValueError, "finite"),
        (math.inf, ValueError, "finite"),
        (torch.tensor([0.1, 0.0]), ValueError, "> 0"),
        (torch.tensor([0.1, math.nan]), ValueError, "finite"),
        (True, TypeError, "float or a tensor"),
        ("0.1", TypeError, "float or a tensor"),
    ],
)
def test_noise_invalid_sigma(sigma, error, match):
    with pytest.raises(error, match=match):
        GaussianNoise(sigma)


def test_noise_shape_errors():
    per_obs = SIGMAS["per_obs"]()
    pixel = SIGMAS["per_pixel"]()
    with pytest.raises(ValueError, match="N = 3"):
        per_obs.std(randn(2, 4))
    with pytest.raises(ValueError, match="N = 3"):
        per_obs.sample((2, 4), generator=gen())
    with pytest.raises(ValueError, match="obs_shape"):
        pixel.std(randn(N, 4, 2))
    with pytest.raises(ValueError, match=r"\(N, S"):
        pixel.std(randn(N, 2, 2, 2, 4))
    with pytest.raises(ValueError, match="same N"):
        pixel.log_prob(randn(N, 2, 4), randn(2, 2, 4))
    with pytest.raises(ValueError, match="same N"):
        per_obs.log_prob(randn(N, 4), randn(N, 5))
    with pytest.raises(ValueError, match="leading observation axis"):
        per_obs.log_prob(torch.tensor(0.0), randn(N))
