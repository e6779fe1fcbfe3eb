"""Tests of hierprior.training (PriorModule, data, callbacks) and the sample CLI."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import pytorch_lightning as pl
import torch

from hierprior.cli import sample_main
from hierprior.diffusion import (
    EDMDenoiser,
    GaussianMixturePrior,
    dsm_loss,
    load_prior,
    save_prior,
)
from hierprior.nn import MLP, UNet
from hierprior.training import (
    BatchStream,
    LossCurve,
    PriorCheckpoint,
    PriorModule,
    SampleGrid,
    TensorDataModule,
    ema_decay_at,
    split_tensors,
    toy_mixture,
    update_ema,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


@pytest.fixture(autouse=True)
def _one_thread():
    # small ops are faster and less noisy on one thread of the 2-core test machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp_denoiser(features: int = 2, seed: int = 0) -> EDMDenoiser:
    torch.manual_seed(seed)
    return EDMDenoiser(MLP(features, hidden=(64, 64), emb_dim=32), (features,))


def _trainer(steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        limit_val_batches=0,
        **kwargs,
    )


def _eval_loss(denoiser, x: torch.Tensor) -> float:
    # the same times and noise for every call: a comparable estimate of the DSM loss
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(dsm_loss(denoiser, x, generator=g))


# --------------------------------------------------------------------------- EMA maths
def test_ema_decay_warmup():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.9, 10_000) == 0.9
    assert ema_decay_at(0.999, 0, warmup=False) == 0.999


def test_update_ema_is_the_convex_combination():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, 0.75)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        # exact up to float32 rounding of one lerp
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- training and the EMA
def _toy_mixture_oracle(modes: int = 4, std: float = 0.1) -> GaussianMixturePrior:
    """The exact denoiser of toy_mixture's distribution (its DSM loss is the minimum)."""
    angle = 2 * math.pi * torch.arange(modes) / modes
    means = torch.stack([angle.cos(), angle.sin()], 1)
    return GaussianMixturePrior(
        torch.ones(modes), means, std**2 * torch.eye(2).expand(modes, 2, 2)
    )


def test_training_lowers_the_loss_and_ema_tracks_the_weights():
    data = toy_mixture(n=2048, features=2, modes=4, std=0.1, seed=0)
    module = PriorModule(_mlp_denoiser(), lr=3e-3, warmup_steps=20, ema_decay=0.95)
    init = [p.detach().clone() for p in module.denoiser.parameters()]
    optimum = _eval_loss(_toy_mixture_oracle(), data)
    before = _eval_loss(module.denoiser, data)
    dm = TensorDataModule(data, batch_size=256, seed=0)
    _trainer(300).fit(module, datamodule=dm)
    after = _eval_loss(module.denoiser, data)
    ema_loss = _eval_loss(module.sampling_prior(), data)
    # The DSM loss has an irreducible part (the exact denoiser scores ~0.91 here); what
    # training removes is the excess over it. All estimates share the same 2048 samples,
    # times and noise, so the comparison is paired. Measured: excess 0.47 -> 0.014 (30x) in
    # 300 steps; demand 5x, for both the raw and the EMA weights.
    assert after - optimum < 0.2 * (before - optimum), (optimum, before, after)
    assert ema_loss - optimum < 0.2 * (before - optimum), (optimum, before, ema_loss)
    assert int(module.ema_updates) == 300
    raw = torch.cat([p.detach().flatten() for p in module.denoiser.parameters()])
    ema = torch.cat([p.flatten() for p in module.sampling_prior().parameters()])
    start = torch.cat([p.flatten() for p in init])
    # the EMA differs from the raw weights, but is much closer to them than the init is
    assert not torch.equal(raw, ema)
    assert (raw - ema).norm() < 0.25 * (raw - start).norm()
    assert not module.sampling_prior().training
    assert all(not p.requires_grad for p in module.ema.parameters())


def test_unet_prior_trains_on_tiny_images():
    torch.manual_seed(0)
    images = torch.zeros(256, 1, 8, 8)
    images[:, :, 2:6, 2:6] = 1.0  # one bright square: a trivially learnable image prior
    images = images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    net = UNet(1, image_size=8, channels=(8, 16), num_res_blocks=1, attention_resolutions=())
    module = PriorModule(EDMDenoiser(net, (1, 8, 8)), lr=3e-3, warmup_steps=10, ema_decay=0.9)
    before = _eval_loss(module.denoiser, images)
    _trainer(60).fit(module, datamodule=TensorDataModule(images, batch_size=64))
    # a 2x drop after 60 steps; the first steps already remove most of the loss on this data
    assert _eval_loss(module.denoiser, images) < 0.5 * before


def test_lr_warmup_is_linear_per_step():
    module = PriorModule(_mlp_denoiser(), lr=1e-2, warmup_steps=4, ema_decay=0.0)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    dm = TensorDataModule(toy_mixture(n=64, seed=1), batch_size=16)
    _trainer(6, callbacks=[Record()]).fit(module, datamodule=dm)
    # LambdaLR with min(1, (k + 1) / 4): exact ratios of the peak rate
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_clipping_comes_from_the_trainer(clip):
    module = PriorModule(_mlp_denoiser(), lr=1e-3, warmup_steps=0)
    norms = []

    class Record(pl.Callback):
        # after the optimiser step the (clipped) gradients are still in .grad: Lightning
        # zeroes them at the start of the next step's closure
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads = [
                p.grad.flatten() for p in pl_module.denoiser.parameters() if p.grad is not None
            ]
            norms.append(float(torch.cat(grads).norm()))

    dm = TensorDataModule(toy_mixture(n=64, seed=1), batch_size=32)
    _trainer(3, callbacks=[Record()], gradient_clip_val=clip).fit(module, datamodule=dm)
    assert len(norms) == 3
    if clip is None:
        assert min(norms) > 1e-2  # the raw gradients of an untrained net are far above 1e-3
    else:
        # clip_grad_norm_ rescales to the threshold (its 1e-6 epsilon gives the slack)
        assert max(norms) <= clip * (1 + 1e-5)


def test_warm_start_from_an_ema_state_dict():
    previous = _mlp_denoiser(seed=1)
    raw = _mlp_denoiser(seed=2)
    module = PriorModule(raw, ema_state_dict=previous.state_dict())
    for a, b in zip(module.ema.parameters(), previous.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(module.denoiser.parameters(), raw.parameters()):
        assert torch.equal(a, b)
    # a warm-started EMA is already an average: no decay warm-up unless asked for
    assert module.ema_warmup is False
    assert PriorModule(raw, ema_state_dict=previous.state_dict(), ema_warmup=True).ema_warmup
    # the optimiser is fresh: no state before the first step
    optimizer = module.configure_optimizers()["optimizer"]
    assert len(optimizer.state) == 0
    # the EMA moves from the previous prior towards the new raw weights by (1 - decay)
    module = PriorModule(raw, ema_state_dict=previous.state_dict(), ema_decay=0.9, lr=1e-3)
    dm = TensorDataModule(toy_mixture(n=64, seed=1), batch_size=32)
    _trainer(1).fit(module, datamodule=dm)
    for e, p, q in zip(
        module.ema.parameters(), previous.parameters(), module.denoiser.parameters()
    ):
        torch.testing.assert_close(e, 0.9 * p + 0.1 * q, rtol=0, atol=1e-6)


class _RecordRawWeights(pl.Callback):
    """The raw weights after every optimiser step (the EMA update runs inside the step)."""

    def __init__(self):
        self.raw = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw.append([p.detach().double().clone() for p in pl_module.denoiser.parameters()])


@pytest.mark.parametrize("warm_start", [False, True])
def test_ema_trajectory_matches_the_closed_form_recursion(warm_start):
    # ema_{n+1} = b_n ema_n + (1 - b_n) raw_{n+1} with b_n = min(beta, (1 + n) / (10 + n))
    # (n = earlier updates), or b_n = beta when warm-started from an ema_state_dict.
    steps, beta = 6, 0.9
    torch.manual_seed(0)
    denoiser = EDMDenoiser(MLP(2, hidden=(8,), emb_dim=8), (2,))
    previous = None
    if warm_start:  # an EMA that starts from another network (the EM M-step)
        torch.manual_seed(1)
        previous = EDMDenoiser(MLP(2, hidden=(8,), emb_dim=8), (2,))
    module = PriorModule(
        denoiser,
        lr=1e-2,
        warmup_steps=0,
        ema_decay=beta,
        ema_state_dict=None if previous is None else previous.state_dict(),
    )
    assert module.ema_warmup is not warm_start
    ema = [p.detach().double().clone() for p in module.ema.parameters()]
    record = _RecordRawWeights()
    dm = TensorDataModule(toy_mixture(n=64, seed=1), batch_size=16)
    _trainer(steps, callbacks=[record]).fit(module, datamodule=dm)
    assert len(record.raw) == steps
    assert int(module.ema_updates) == steps
    decays = [ema_decay_at(beta, n, warmup=not warm_start) for n in range(steps)]
    if warm_start:
        assert decays == [beta] * steps
    else:
        assert decays[0] == pytest.approx(0.1) and decays[-1] == pytest.approx(6 / 15)
    for decay, raw in zip(decays, record.raw):
        ema = [decay * e + (1 - decay) * r for e, r in zip(ema, raw)]
    got = [p.detach().double() for p in module.ema.parameters()]
    # float32 lerps: round-off ~1e-7 per step on weights of size ~1
    for e, g in zip(ema, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    # the recursion is not vacuous: the raw weights moved and the EMA lags behind them
    final = torch.cat([r.flatten() for r in record.raw[-1]])
    assert (torch.cat([g.flatten() for g in got]) - final).abs().max() > 1e-3


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="ema_state_dict does not fit"):
        PriorModule(_mlp_denoiser(2), ema_state_dict=_mlp_denoiser(3).state_dict())
    with pytest.raises(ValueError, match="time_distribution"):
        PriorModule(_mlp_denoiser(), time_distribution="beta")
    with pytest.raises(ValueError, match="ema_decay"):
        PriorModule(_mlp_denoiser(), ema_decay=1.0)
    with pytest.raises(ValueError, match="lr"):
        PriorModule(_mlp_denoiser(), lr=0.0)
    with pytest.raises(TypeError, match="Denoiser"):
        PriorModule(torch.nn.Linear(2, 2))


def test_hparams_hold_no_modules_or_tensors():
    module = PriorModule(_mlp_denoiser(), ema_state_dict=_mlp_denoiser(seed=3).state_dict())
    assert "denoiser" not in module.hparams and "ema_state_dict" not in module.hparams
    assert all(isinstance(v, (int, float, str, list, type(None))) for v in module.hparams.values())


# ------------------------------------------------------------------------- data module
def test_tensor_datamodule_epoch_batches_and_order():
    data = torch.arange(100, dtype=torch.float32).reshape(50, 2)
    dm = TensorDataModule(data, val=data[:7], batch_size=16, seed=3, infinite=False)
    batches = list(dm.train_dataloader())
    assert [b.shape for b in batches] == [torch.Size([16, 2])] * 3  # drop_last: 50 > 16
    again = list(TensorDataModule(data, batch_size=16, seed=3, infinite=False).train_dataloader())
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # seeded order
    other = list(TensorDataModule(data, batch_size=16, seed=4, infinite=False).train_dataloader())
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    assert [len(b) for b in dm.val_dataloader()] == [7]
    # a dataset smaller than a batch still yields one (smaller) batch
    small = list(TensorDataModule(data[:5], batch_size=16, infinite=False).train_dataloader())
    assert [b.shape[0] for b in small] == [5]
    assert dm.event_shape == (2,)


def test_batch_stream_is_a_function_of_the_batch_counter():
    stream = BatchStream(n=10, batch_size=4, seed=7)
    first = list(itertools.islice(iter(stream), 6))
    assert all(len(b) == 4 for b in first)
    # E = 10 // 4 = 2 batches per pass: each pass holds 8 distinct indices of one permutation
    assert len(set(first[0] + first[1])) == 8 and len(set(first[2] + first[3])) == 8
    assert first[0] + first[1] != first[2] + first[3]  # a new permutation every pass
    # starting at batch 3 continues exactly where the full stream is at batch 3
    assert list(itertools.islice(iter(BatchStream(10, 4, seed=7, start=3)), 3)) == first[3:]
    assert list(itertools.islice(iter(BatchStream(10, 4, seed=8)), 6)) != first
    # the default data module serves this stream: endless, seeded
    dm = TensorDataModule(torch.arange(10.0)[:, None], batch_size=4, seed=7)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 6))
    assert [b[:, 0].long().tolist() for b in batches] == first


def test_tensor_datamodule_errors():
    with pytest.raises(ValueError, match="shape"):
        TensorDataModule(torch.zeros(10))
    with pytest.raises(TypeError, match="floating"):
        TensorDataModule(torch.zeros(10, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="val must have shape"):
        TensorDataModule(torch.zeros(10, 2), val=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="batch_size"):
        TensorDataModule(torch.zeros(10, 2), batch_size=0)


def test_split_tensors():
    data = torch.arange(20.0).reshape(10, 2)
    train, val = split_tensors(data, 0.2, seed=0)
    assert train.shape == (8, 2) and val.shape == (2, 2)
    assert sorted(torch.cat([train, val])[:, 0].tolist()) == data[:, 0].tolist()
    assert split_tensors(data, 0.0)[1] is None
    with pytest.raises(ValueError, match="val_fraction"):
        split_tensors(data, 1.0)


# ---------------------------------------------------------------- callbacks, checkpoints
def test_callbacks_write_artefacts_and_prior_round_trips(tmp_path):
    data = toy_mixture(n=512, features=2, seed=0)
    module = PriorModule(_mlp_denoiser(), lr=3e-3, warmup_steps=5, ema_decay=0.9)
    callbacks = [
        LossCurve(tmp_path, every_n_steps=5),
        SampleGrid(tmp_path, every_n_steps=10, n=32, method="heun", steps=4),
        PriorCheckpoint(tmp_path, every_n_steps=10, meta={"config": {"name": "toy"}}),
    ]
    _trainer(20, callbacks=callbacks).fit(
        module, datamodule=TensorDataModule(data, batch_size=128)
    )
    for name in ("loss.csv", "loss.png", "samples.png", "prior.ckpt", "checkpoints/last.ckpt"):
        assert (tmp_path / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_0000010.png",
        "step_0000020.png",
    ]
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,split,loss" and [ln.split(",")[0] for ln in lines[1:]] == [
        "5",
        "10",
        "15",
        "20",
    ]
    raw = torch.load(tmp_path / "prior.ckpt", weights_only=True)
    assert raw["meta"]["step"] == 20 and raw["meta"]["config"] == {"name": "toy"}
    prior = load_prior(tmp_path / "prior.ckpt")
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.05, 0.95, 16)
    with torch.no_grad():
        # the saved prior is the EMA denoiser: bit-identical outputs on CPU
        assert torch.equal(prior(x, t), module.sampling_prior()(x, t))
        assert not torch.equal(prior(x, t), module.denoiser(x, t))


def test_sample_grid_for_images(tmp_path):
    from PIL import Image

    from hierprior.training import save_sample_grid

    path = save_sample_grid(torch.rand(10, 1, 8, 8) * 2 - 1, tmp_path / "grid.png")
    image = Image.open(path)
    assert image.size[0] >= 4 * 8 and image.mode == "L"
    with pytest.raises(ValueError, match="images with shape"):
        save_sample_grid(torch.zeros(3, 2, 4, 4), tmp_path / "bad.png")


def test_bad_checkpoint_gives_a_clear_error(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable hierprior prior"):
        load_prior(junk)
    torch.save({"state_dict": {}}, tmp_path / "lightning.ckpt")
    with pytest.raises(ValueError, match="not a hierprior prior checkpoint"):
        load_prior(tmp_path / "lightning.ckpt")
    with pytest.raises(FileNotFoundError):
        load_prior(tmp_path / "missing.ckpt")


# --------------------------------------------------------------------------- sample CLI
def test_sample_cli_writes_png_and_tensor(tmp_path, capsys):
    torch.manual_seed(0)
    net = UNet(1, image_size=8, channels=(8, 16), num_res_blocks=1, attention_resolutions=())
    ckpt = save_prior(EDMDenoiser(net, (1, 8, 8)), tmp_path / "prior.ckpt")
    png = sample_main(
        [f"ckpt={ckpt}", "n=6", "method=heun", "steps=3", "seed=0", f"out={tmp_path / 's.png'}"]
    )
    assert png.is_file()
    pt = sample_main(
        [
            "--ckpt",
            str(ckpt),
            "--n",
            "5",
            "--steps",
            "3",
            "--method",
            "ddim",
            "--out",
            str(tmp_path / "s.pt"),
        ]
    )
    x = torch.load(pt, weights_only=True)
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
    # the same seed gives the same samples
    pt2 = sample_main(
        [f"ckpt={ckpt}", "n=5", "steps=3", "method=ddim", f"out={tmp_path / 't.pt'}"]
    )
    assert torch.equal(x, torch.load(pt2, weights_only=True))
    # a multistep solver on its log-SNR grid
    pt3 = sample_main(
        [
            f"ckpt={ckpt}",
            "n=3",
            "steps=5",
            "method=unipc",
            "spacing=logsnr",
            f"out={tmp_path / 'u.pt'}",
        ]
    )
    u = torch.load(pt3, weights_only=True)
    assert u.shape == (3, 1, 8, 8) and torch.isfinite(u).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=euler"], "unknown sampler"),
        (["steps=0"], "steps must be an integer >= 1"),
        (["n=0"], "n must be an integer >= 1"),
        (["out=x.jpg"], "out must end in .png or .pt"),
        (["spacing=cosine"], "unknown time spacing 'cosine'"),
        (["method=unipc", "steps=3"], "sampler 'unipc'"),
        (["method=heun", "eta=0.5"], "eta is not an option of sampler 'heun'"),
    ],
)
def test_sample_cli_rejects_bad_arguments_before_loading(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as err:
        sample_main([f"ckpt={tmp_path / 'missing.ckpt'}", *args])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_sample_cli_rejects_missing_and_foreign_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample_main([f"ckpt={tmp_path / 'missing.ckpt'}"])
    assert "no prior checkpoint at" in capsys.readouterr().err
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        sample_main([f"ckpt={tmp_path / 'other.pt'}", f"out={tmp_path / 'o.png'}"])
    assert "not a hierprior prior" in capsys.readouterr().err
