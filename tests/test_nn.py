"""Tests for hierprior.nn: noise embeddings, the U-Net and the MLP backbones."""

import json
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hierprior.nn import MLP, FourierEmbedding, NoiseEmbedding, PositionalEmbedding, UNet
from hierprior.nn.unet import AttentionBlock

torch.set_num_threads(1)

# Tiny U-Net used wherever the architecture, not the size, is under test.
TINY = {"channels": (8, 16), "num_res_blocks": 1, "attention_resolutions": (8,), "groups": 4}


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Adds seeded noise to every parameter, so zero-initialised layers pass signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- embeddings


def test_positional_embedding_formula():
    emb = PositionalEmbedding(4, max_positions=100, scale=1.0)
    c = torch.tensor([0.0, 0.5, -2.0])
    # frequencies 100^(-k/2), k = 0, 1 -> [1, 0.1]
    expected = torch.stack(
        [torch.cos(c), torch.cos(0.1 * c), torch.sin(c), torch.sin(0.1 * c)], dim=-1
    )
    # float32 trig of arguments |x| <= 2: errors ~1e-7; 1e-6 leaves margin.
    torch.testing.assert_close(emb(c), expected, atol=1e-6, rtol=0)


def test_fourier_embedding_fixed_seed_and_no_global_rng():
    state = torch.get_rng_state()
    a, b = FourierEmbedding(32, scale=16.0), FourierEmbedding(32, scale=16.0)
    assert torch.equal(torch.get_rng_state(), state), "construction touched the global RNG"
    assert torch.equal(a.freqs, b.freqs)
    assert not torch.equal(a.freqs, FourierEmbedding(32, seed=1).freqs)
    c = torch.linspace(-3, 2, 7)
    out = a(c)
    assert out.shape == (7, 32)
    # cos^2 + sin^2 = 1 for every frequency; float32 trig, so 1e-5.
    torch.testing.assert_close(
        out[:, :16] ** 2 + out[:, 16:] ** 2, torch.ones(7, 16), atol=1e-5, rtol=0
    )
    # the frequency buffer travels with the state dict (reproducible checkpoints)
    assert "freqs" in a.state_dict()


@pytest.mark.parametrize("kind", ["positional", "fourier"])
def test_noise_embedding_shapes_and_errors(kind):
    emb = NoiseEmbedding(24, base_dim=7, kind=kind)  # odd base width is rounded up to 8
    assert emb(torch.randn(5)).shape == (5, 24)
    with pytest.raises(ValueError, match="embedding kind"):
        NoiseEmbedding(24, kind="learned")
    with pytest.raises(ValueError, match="even"):
        PositionalEmbedding(7)


# ---------------------------------------------------------------- U-Net


@pytest.mark.parametrize(
    "image_size, channels, in_channels, batch",
    [
        (16, (8, 16), 1, 2),
        (28, (8, 16), 3, 1),  # 28 / 2 = 14
        (28, (8, 16, 16), 1, 2),  # 28 / 4 = 7: three levels are fine too (four are not)
        (32, (8, 16, 16), 1, 3),
        (64, (8, 8, 16, 16), 3, 2),
    ],
)
def test_unet_output_shape(image_size, channels, in_channels, batch):
    torch.manual_seed(0)
    net = UNet(
        in_channels=in_channels,
        image_size=image_size,
        channels=channels,
        num_res_blocks=1,
        attention_resolutions=(image_size // 2,),
        groups=4,
    )
    assert net.event_shape == (in_channels, image_size, image_size)
    x = torch.randn(batch, *net.event_shape)
    y = net(x, torch.randn(batch))
    assert y.shape == x.shape
    # zero-initialised output convolution: F = 0 at initialisation, exactly
    assert torch.count_nonzero(y) == 0


def test_unet_out_channels_and_scalar_noise():
    net = UNet(in_channels=3, out_channels=2, image_size=16, **TINY)
    perturb_(net)
    x = torch.randn(4, 3, 16, 16)
    y = net(x, 0.3)
    assert y.shape == (4, 2, 16, 16)
    # a scalar code is the same as that code repeated over the batch
    torch.testing.assert_close(y, net(x, torch.full((4,), 0.3)), atol=0, rtol=0)


def test_unet_rejects_bad_arguments():
    # 28 = 4 * 7 works with 3 levels (28, 14, 7) but not with 4 (needs a multiple of 8)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(len\(channels\) - 1\) = 8"):
        UNet(image_size=28, channels=(8, 16, 16, 16), attention_resolutions=())
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(image_size=16, channels=(8, 16), attention_resolutions=(4,))
    with pytest.raises(ValueError, match="num_heads"):
        UNet(image_size=16, channels=(8, 12), attention_resolutions=(8,), num_heads=8)
    with pytest.raises(ValueError, match="embedding"):
        UNet(image_size=16, channels=(8, 16), embedding="sinusoid")
    with pytest.raises(ValueError, match=r"channels\[1\] must be an integer >= 1"):
        UNet(image_size=16, channels=(8, 16.5))
    with pytest.raises(ValueError, match="channels must not be empty"):
        UNet(image_size=16, channels=())
    with pytest.raises(ValueError, match="dropout"):
        UNet(image_size=16, channels=(8, 16), dropout=1.0)

    net = UNet(image_size=16, **TINY)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 16, 16\)"):
        net(torch.randn(2, 1, 32, 32), torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(B, 1, 16, 16\)"):
        net(torch.randn(1, 16, 16), torch.zeros(1))
    with pytest.raises(ValueError, match=r"c_noise must have shape \(2,\)"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(3))
    with pytest.raises(TypeError, match="c_noise"):
        net(torch.randn(2, 1, 16, 16), "0.1")


def test_unet_group_norm_divides_any_channel_count():
    net = UNet(in_channels=3, image_size=16, channels=(24, 40), num_res_blocks=1)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms
    for m in norms:
        assert m.num_channels % m.num_groups == 0
        assert m.num_groups == math.gcd(32, m.num_channels)
    perturb_(net)
    assert net(torch.randn(2, 3, 16, 16), torch.zeros(2)).shape == (2, 3, 16, 16)


def test_unet_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = UNet(in_channels=2, image_size=16, **TINY)
    perturb_(net)
    x = torch.randn(3, 2, 16, 16)
    net(x, torch.randn(3)).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, f"no gradient reaches {name}"


def test_unet_noise_code_matters_and_batch_independence():
    torch.manual_seed(0)
    net = UNet(image_size=16, dropout=0.1, **TINY).eval()
    perturb_(net)
    x = torch.randn(1, 1, 16, 16).expand(3, -1, -1, -1)
    c = torch.tensor([-2.0, 0.0, 1.5])
    y = net(x, c)
    # same image, different noise codes: outputs must differ by far more than round-off
    assert (y[0] - y[1]).abs().max() > 1e-3
    assert (y[1] - y[2]).abs().max() > 1e-3
    # eval mode is deterministic (dropout off) and samples do not interact (GroupNorm is
    # per sample); float32 convolutions over differently-batched inputs agree to ~1e-6.
    torch.testing.assert_close(net(x, c), y, atol=0, rtol=0)
    for i in range(3):
        torch.testing.assert_close(
            net(x[i : i + 1], c[i : i + 1]), y[i : i + 1], atol=1e-5, rtol=1e-5
        )


def test_unet_forward_in_eval_does_not_touch_global_rng():
    net = UNet(image_size=16, dropout=0.2, **TINY).eval()
    state = torch.get_rng_state()
    net(torch.zeros(2, 1, 16, 16), torch.zeros(2))
    assert torch.equal(torch.get_rng_state(), state)


def test_unet_attention_built_at_requested_resolutions():
    net = UNet(
        image_size=32,
        channels=(8, 16, 16),
        num_res_blocks=2,
        attention_resolutions=(16,),
        groups=4,
        mid_attention=False,
    )
    sizes = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[-1]))
        for m in net.modules()
        if isinstance(m, AttentionBlock)
    ]
    net(torch.randn(1, 1, 32, 32), torch.zeros(1))
    for h in hooks:
        h.remove()
    # level 1 (16 px): 2 encoder blocks + 3 decoder blocks, each followed by attention
    assert sizes == [16] * 5

    with_mid = UNet(
        image_size=32, channels=(8, 16, 16), num_res_blocks=2, attention_resolutions=(), groups=4
    )
    assert isinstance(with_mid.mid[1], AttentionBlock)
    assert sum(isinstance(m, AttentionBlock) for m in with_mid.modules()) == 1
    none = UNet(
        image_size=32,
        channels=(8, 16, 16),
        attention_resolutions=(),
        groups=4,
        mid_attention=False,
    )
    assert not any(isinstance(m, AttentionBlock) for m in none.modules())


def test_attention_block_matches_naive_attention():
    torch.manual_seed(0)
    block = AttentionBlock(8, num_heads=2, groups=4)
    perturb_(block)
    x = torch.randn(2, 8, 4, 4)
    q, k, v = block.qkv(block.norm(x)).reshape(2, 3, 2, 4, 16).unbind(1)  # (B, heads, d, HW)
    weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / 2.0, dim=-1)  # sqrt(d) = 2
    y = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(2, 8, 4, 4)
    expected = x + block.proj(y)
    # same float32 maths in a different order: agreement to ~1e-6.
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_unet_benchmark_config_is_about_9m_parameters():
    # the ~9M configuration documented in UNet's docstring and docs/_parts/nn.md
    net = UNet(
        in_channels=1,
        image_size=32,
        channels=(64, 128, 128),
        num_res_blocks=3,
        attention_resolutions=(16,),
    )
    count = sum(p.numel() for p in net.parameters())
    assert count == 9_145_857  # measured; any change to the layout must update the docs
    assert abs(count - 9e6) <= 0.15 * 9e6  # the brief's ±15% of 9M


def test_unet_rebuilds_from_config_and_hydra():
    torch.manual_seed(0)
    net = UNet(in_channels=3, image_size=16, embedding="fourier", **TINY)
    perturb_(net)
    config = json.loads(json.dumps(net.config))  # plain types only
    twin = type(net)(**config)
    twin.load_state_dict(net.state_dict())
    x, c = torch.randn(2, 3, 16, 16), torch.randn(2)
    torch.testing.assert_close(twin(x, c), net(x, c), atol=0, rtol=0)

    cfg = OmegaConf.create({"_target_": "hierprior.nn.UNet", **config})
    built = instantiate(cfg)  # lists arrive as ListConfig
    assert built.config == net.config
    built.load_state_dict(net.state_dict())
    torch.testing.assert_close(built(x, c), net(x, c), atol=0, rtol=0)


def test_unet_float64():
    net = UNet(image_size=16, **TINY).double()
    perturb_(net)
    y = net(torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.zeros(2))
    assert y.dtype == torch.float64


# ---------------------------------------------------------------- MLP


@pytest.mark.parametrize("features, hidden, batch", [(1, (16,), 1), (5, (32, 16, 16), 7)])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_mlp_shapes_and_zero_init(features, hidden, batch, activation):
    net = MLP(features, hidden=hidden, emb_dim=16, activation=activation)
    assert net.event_shape == (features,)
    y = net(torch.randn(batch, features), torch.randn(batch))
    assert y.shape == (batch, features)
    assert torch.count_nonzero(y) == 0


def test_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP(3, activation="swish")
    with pytest.raises(ValueError, match="features"):
        MLP(0)
    with pytest.raises(TypeError, match="hidden"):
        MLP(3, hidden=64)
    net = MLP(3, hidden=(8,), emb_dim=8)
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        net(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="c_noise"):
        net(torch.randn(4, 3), torch.zeros(4, 1))


def test_mlp_gradient_noise_code_and_rebuild():
    torch.manual_seed(0)
    net = MLP(4, hidden=(16, 8), emb_dim=8, embedding="fourier")
    perturb_(net)
    x = torch.randn(1, 4).expand(2, -1)
    y = net(x, torch.tensor([-1.0, 1.0]))
    assert (y[0] - y[1]).abs().max() > 1e-3
    y.square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name

    twin = type(net)(**json.loads(json.dumps(net.config)))
    twin.load_state_dict(net.state_dict())
    torch.testing.assert_close(twin(x, torch.zeros(2)), net(x, torch.zeros(2)), atol=0, rtol=0)


def test_mlp_fits_a_tiny_regression():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 2, generator=g)
    c = 4 * torch.rand(256, generator=g) - 3  # codes in [-3, 1]
    target = torch.stack([torch.sin(2 * x[:, 0]) * c, x[:, 1] * torch.cos(c)], dim=-1)
    net = MLP(2, hidden=(64, 64), emb_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = torch.nn.functional.mse_loss(net(x, c), target).item()
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(net(x, c), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = torch.nn.functional.mse_loss(net(x, c), target).item()
    # the brief asks for a 10x drop; the zero-initialised net starts at E[target^2] ~ 0.9
    # and reached 4e3-1e4x lower over 3 init seeds, so 10x has a wide margin.
    assert last < first / 10, (first, last)


def test_unet_fits_a_tiny_regression():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 16, 16, generator=g)
    c = 4 * torch.rand(16, generator=g) - 3
    box = torch.full((1, 1, 3, 3), 1 / 9)
    # a noise-level-dependent blur: needs the convolutions and the embedding
    target = torch.nn.functional.conv2d(x, box, padding=1) * torch.tanh(c)[:, None, None, None]
    net = UNet(image_size=16, **TINY)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = torch.nn.functional.mse_loss(net(x, c), target).item()
    for _ in range(80):
        loss = torch.nn.functional.mse_loss(net(x, c), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = torch.nn.functional.mse_loss(net(x, c), target).item()
    # measured ~25x after 80 steps (66x after 100); 10x is the brief's bar.
    assert last < first / 10, (first, last)
