"""Device rules of the EM loop, and the E-step's precision switch, checked on the CPU.

Without a GPU the device rules are checked on PyTorch's ``meta`` device: an operation that
mixes a meta tensor with a CPU tensor raises ("Tensor on device cpu is not on the expected
device meta"), so running a function with the population on ``meta`` and the bank on the CPU
proves that every combination happens on one device. Meta tensors hold no data; the
:class:`FakeCopyOut` mode turns their explicit moves to the CPU (``.cpu()``, ``.to("cpu")``)
into zeros so that the functions run to the end. The ``gpu`` test runs a shrunk
``experiment=mnist_shift`` (2 rounds) on CUDA end to end; the dry run of
``benchmarks/gpu_check.sh`` runs its steps with tiny sizes on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import hierprior.posterior.mmps as mmps_module
from hierprior.diffusion import EDMDenoiser
from hierprior.em import EStep, Monitor, NetworkMStep, Population, SampleBank
from hierprior.em.estep import (
    NetworkAutocast,
    check_precision,
    inference_prior,
    precision_scope,
)
from hierprior.physics import GaussianNoise, Mask
from hierprior.posterior import posterior_method

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


class FakeCopyOut(TorchFunctionMode):
    """Explicit moves of meta tensors to the CPU give zeros and data-dependent checks pass
    (meta tensors hold no data); any op that mixes meta and CPU tensors still raises."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            t = args[0]
            # data-dependent checks ("all finite?", "any NaN?") pass
            if func in (torch.Tensor.all, torch.all):
                return torch.tensor(True)
            if func in (torch.Tensor.any, torch.any, torch.Tensor.__bool__, torch.Tensor.item):
                return torch.tensor(False) if func in (torch.Tensor.any, torch.any) else False
            if func is torch.Tensor.cpu:
                return torch.zeros(t.shape, dtype=t.dtype)
            if func is torch.Tensor.to:
                target = kwargs.get("device", args[1] if len(args) > 1 else None)
                if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                    dtype = kwargs.get("dtype", args[2] if len(args) > 2 else t.dtype)
                    dtype = dtype if isinstance(dtype, torch.dtype) else t.dtype
                    return torch.zeros(t.shape, dtype=dtype)
        return func(*args, **kwargs)


def masked_population(n=6, r=4, device="cpu", seed=0) -> Population:
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n, 1, r, r, generator=g)
    forward, noise = Mask(torch.rand(n, 1, r, r, generator=g) < 0.5), GaussianNoise(0.1)
    y = forward(truth) + 0.1 * torch.randn(n, 1, r, r, generator=g)
    return Population(y=y, forward=forward, noise=noise, truth=truth).to(device)


class ConvNet(nn.Module):
    """A tiny backbone F(x, c_noise); records whether it ran under autocast."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.autocast_seen: list[bool] = []
        self.out_dtypes: list[torch.dtype] = []

    def forward(self, x, c_noise):
        self.autocast_seen.append(torch.is_autocast_enabled(x.device.type))
        out = torch.tanh(self.conv(x)) + 0.1 * c_noise.reshape(-1, 1, 1, 1)
        self.out_dtypes.append(self.conv(x).dtype)
        return out


def conv_prior(r=4, seed=0) -> EDMDenoiser:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EDMDenoiser(ConvNet(), (1, r, r))


# --------------------------------------------------------------------------------- bank


def test_bank_load_puts_the_samples_on_the_requested_device(tmp_path):
    bank = SampleBank(tmp_path, 5, 2, (3,))
    values = torch.arange(30.0).reshape(5, 2, 3)
    bank.write(torch.tensor([3, 4]), values[3:])
    bank.write(torch.tensor([0, 1, 2]), values[:3])
    out = bank.load()
    assert out.device.type == "cpu" and torch.equal(out, values)
    assert torch.equal(bank.load(device="cpu"), values)
    meta = bank.load(device="meta")
    assert meta.device.type == "meta" and meta.shape == values.shape


# ---------------------------------------------------------------------------- precision


def test_precision_names_and_options():
    assert check_precision("32", "E-step") == "32-true"
    assert check_precision(32, "E-step") == "32-true"
    assert check_precision("bf16", "E-step") == "bf16-mixed"
    for bad in ("16-mixed", "fp8", None, ["32"], True):
        with pytest.raises(ValueError, match="E-step precision must be one of"):
            check_precision(bad, "E-step")
    # the precision is part of a run's identity, fp32 included (32-true used to mean TF32 on
    # a GPU: run directories made then are not continued as fp32 ones)
    assert EStep("mmps").options()["precision"] == "32-true"
    assert EStep("mmps", precision="tf32").options()["precision"] == "tf32"
    assert EStep("mmps", precision="bf16-mixed").options()["precision"] == "bf16-mixed"
    assert Monitor().options()["precision"] == "32-true"
    assert Monitor(precision="tf32").options()["precision"] == "tf32"
    assert NetworkMStep(trainer={"precision": "tf32"}).options()["precision"] == "tf32"
    with pytest.raises(ValueError, match="monitor precision"):
        Monitor(precision="half")


def _tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_flags():
    """Restores the TF32 flags after a test that sets them (no GPU needed to set them)."""
    saved = _tf32()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("before", [(True, True), (False, False), (True, False)])
def test_precision_scope_turns_tf32_on_for_tf32_only(before, tf32_flags):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    for precision, inside in (
        ("32-true", (False, False)),  # plain fp32: even cuDNN's default TF32 is off
        ("bf16-mixed", (False, False)),  # the network autocasts; the solves stay fp32
        ("tf32", (True, True)),
        ("16-mixed", (False, False)),  # any Lightning precision but tf32
    ):
        with precision_scope(precision, "cuda"):
            assert _tf32() == inside, precision
        assert _tf32() == before
    for device in ("cpu", "meta"):  # the flags do not apply: nothing changes
        for precision in ("32-true", "tf32", "bf16-mixed"):
            with precision_scope(precision, device):
                assert _tf32() == before


def test_mstep_trains_in_its_own_precision_scope(monkeypatch, tf32_flags, tmp_path):
    """The M-step's fit runs with TF32 off at 32-true / bf16-mixed and on at tf32 (on CUDA;
    the device is faked, the flags are what is checked), and Lightning gets 32-true for tf32."""
    import pytorch_lightning as pl

    import hierprior.em.mstep as mstep_module

    seen = []

    def fit(trainer, *args, **kwargs):
        seen.append((trainer.precision, _tf32()))

    monkeypatch.setattr(mstep_module, "device_of", lambda module: torch.device("cuda"))
    monkeypatch.setattr(pl.Trainer, "fit", fit)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    samples = torch.randn(4, 1, 1, 4, 4)
    for precision in ("32-true", "tf32"):
        step = NetworkMStep(
            steps=1, batch_size=2, trainer={"accelerator": "cpu", "precision": precision}
        )
        step(conv_prior(), samples, tmp_path / precision, seed=0, round_index=1)
    assert seen == [("32-true", (False, False)), ("32-true", (True, True))]
    assert _tf32() == (True, True)


def test_hierprior_em_leaves_tf32_alone(monkeypatch, tf32_flags, tmp_path):
    """hierprior-em on a GPU used to turn TF32 on for the whole process before the run."""
    from hydra import compose, initialize_config_dir

    import hierprior.em
    import hierprior.em.cli as em_cli
    from hierprior.config import CONF_DIR, instantiate_checked
    from hierprior.em import Population

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "em",
            overrides=[
                "experiment=mnist_shift_tiny",
                "trainer.accelerator=gpu",
                "em.oracle=false",
            ],
        )
    pop = masked_population(n=4, r=16)
    prior = conv_prior(r=16)
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(em_cli, "_initial_prior", lambda cfg, run_dir: prior)
    monkeypatch.setattr(type(prior), "cuda", lambda self: self)
    monkeypatch.setattr(Population, "to", lambda self, device: self)

    def run_em(*args, **kwargs):
        seen.append(_tf32())
        return SimpleNamespace(run_dir=tmp_path, stop_reason="mocked", table=lambda: "")

    monkeypatch.setattr(hierprior.em, "run_em", run_em)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    pieces = [instantiate_checked(cfg.em[k], k) for k in ("estep", "mstep", "monitor", "stop")]
    em_cli._run(cfg, tmp_path, pop, *pieces)
    assert seen == [(False, False)] and _tf32() == (False, False)


def test_round0_training_runs_in_its_precision_scope(monkeypatch, tmp_path):
    """trainer.precision=tf32: Lightning trains at 32-true inside precision_scope("tf32")."""
    import contextlib

    from hydra import compose, initialize_config_dir

    import hierprior.training.train as train_module
    from hierprior.config import CONF_DIR
    from hierprior.training import build_trainer, fit_prior

    scopes = []

    @contextlib.contextmanager
    def scope(precision, device):
        scopes.append((precision, torch.device(device).type))
        yield

    monkeypatch.setattr(train_module, "precision_scope", scope)
    overrides = [
        "experiment=mnist04_prior_tiny",
        f"run_dir={tmp_path}",
        "trainer.precision=tf32",
        "train.steps=1",
        "train.warmup_steps=0",
        "train.sample_every=0",
        "train.checkpoint_every=0",
        "sample.n=4",
        "sample.steps=2",
        "logger=none",
        "data.source=bundled",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_prior", overrides=overrides)
    assert build_trainer(cfg).precision == "32-true"
    fit_prior(cfg)
    assert scopes == [("tf32", "cpu")]


def test_inference_prior_wraps_networks_only():
    from hierprior.diffusion import GaussianPrior

    prior = conv_prior()
    assert inference_prior(prior, "32-true") is prior
    assert inference_prior(prior, "tf32") is prior
    wrapped = inference_prior(prior, "bf16-mixed")
    assert isinstance(wrapped, NetworkAutocast) and wrapped.inner is prior
    gaussian = GaussianPrior(torch.zeros(3), torch.eye(3))
    assert inference_prior(gaussian, "bf16-mixed") is gaussian


def test_bf16_estep_on_the_cpu_is_bit_identical_to_fp32(tmp_path):
    pop = masked_population()
    banks = {}
    for precision in ("32-true", "bf16-mixed"):
        estep = EStep(
            {"method": "mmps", "steps": 3}, 2, 4, {"accelerator": "cpu"}, False, precision
        )
        bank = SampleBank(tmp_path / precision, len(pop), 2, pop.signal_shape)
        estep(conv_prior(), pop, bank, seed=0, round_index=0)
        banks[precision] = bank.load()
    assert torch.equal(banks["32-true"], banks["bf16-mixed"])


def test_autocast_covers_the_network_only(monkeypatch):
    """Under NetworkAutocast (enabled on the CPU here) the network runs in bf16, while the
    MMPS solve and the forward model see fp32 tensors outside autocast."""
    pop = masked_population(n=3)
    prior = conv_prior()
    net = prior.backbone
    seen = []
    solve = mmps_module.solve

    def spy(system, b, *args, **kwargs):
        seen.append((b.dtype, torch.is_autocast_enabled("cpu")))
        return solve(system, b, *args, **kwargs)

    monkeypatch.setattr(mmps_module, "solve", spy)
    wrapped = NetworkAutocast(prior, device_types=("cpu",))
    method = posterior_method({"method": "mmps", "steps": 2, "iterations": 2})
    g = torch.Generator().manual_seed(0)
    x = method.sample(wrapped, pop.forward, pop.noise, pop.y, 2, g)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert net.autocast_seen and all(net.autocast_seen)
    assert set(net.out_dtypes) == {torch.bfloat16}
    assert seen and all(dtype == torch.float32 and not on for dtype, on in seen)
    # without the wrapper (fp32) nothing is autocast
    net.autocast_seen.clear()
    method.sample(prior, pop.forward, pop.noise, pop.y, 2, torch.Generator().manual_seed(0))
    assert not any(net.autocast_seen)


def test_precision_follows_the_trainer_config():
    from hydra import compose, initialize_config_dir

    from hierprior.config import CONF_DIR, instantiate_checked

    for experiment, expected in (("mnist_shift", "bf16-mixed"), ("mnist_shift_tiny", "32-true")):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("em", overrides=[f"experiment={experiment}"])
        estep = instantiate_checked(cfg.em.estep, "em.estep")
        monitor = instantiate_checked(cfg.em.monitor, "em.monitor")
        assert estep.precision == monitor.precision == expected, experiment
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("em", overrides=["experiment=mnist_shift", "em.estep.precision=tf32"])
    assert instantiate_checked(cfg.em.estep, "em.estep").precision == "tf32"


# ------------------------------------------------------------------------------ devices


def test_residuals_run_on_the_population_device_and_return_cpu():
    samples = torch.randn(6, 2, 1, 4, 4)  # a bank loaded on the CPU
    with FakeCopyOut():
        pop = masked_population(device="meta")
        chi2 = Monitor.residual_chi2_per_observation(pop, samples, chunk=4)
    assert chi2.device.type == "cpu" and chi2.dtype == torch.float64 and chi2.shape == (6,)
    # mixing the two devices without the explicit move is what the meta device catches
    with FakeCopyOut(), pytest.raises(RuntimeError, match="device"):
        pop.forward(samples[:, 0]) - pop.y


def test_monitor_round_with_the_population_on_another_device(tmp_path):
    """The population on ``meta`` and the bank on the CPU: residuals on the population's
    device, PQMass/TARP/MIRA/posterior-mean error/evaluators/grids on the CPU."""
    with FakeCopyOut():
        pop = masked_population(n=8, device="meta")
    prior = conv_prior()  # on the CPU: the prior samples are drawn where the prior is
    samples = torch.randn(len(pop), 4, *pop.signal_shape)
    seen = []

    def evaluator(x):
        seen.append(x.device.type)
        return {"mean": float(x.mean())}

    def posterior_evaluator(*, population, samples, prior_samples, round_dir, round_index):
        seen.extend([samples.device.type, prior_samples.device.type])
        return {}

    monitor = Monitor(
        num_prior_samples=8,
        method="ddim",
        steps=2,
        num_refs=2,
        re_tessellations=2,
        permutations=3,
        tarp_observations=4,
        tarp_samples=4,
        grid_size=4,
        evaluators=[evaluator],
        posterior_evaluators=[posterior_evaluator],
    )
    with FakeCopyOut():
        row, images, prior_x = monitor(
            1, prior, pop, samples, None, tmp_path, seed=0, previous_prior_samples=None
        )
    assert prior_x.device.type == "cpu"
    assert {"residual_chi2_nu", "posterior_mean_rmse", "tarp_atc", "mira_z"} <= set(row)
    assert seen == ["cpu", "cpu", "cpu"]
    assert images


def test_posterior_sampling_module_moves_each_batch_to_its_device():
    from hierprior.em.estep import PosteriorSamplingModule

    pop = masked_population()
    module = PosteriorSamplingModule(
        conv_prior(), pop, posterior_method({"method": "mmps", "steps": 2}), 1, 0, 0
    )
    out = module.predict_step(torch.arange(3))
    assert out["samples"].device == module.device and out["indices"].device.type == "cpu"


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mnist_shift_runs_two_short_rounds_on_cuda(tmp_path):
    import importlib.util

    from omegaconf import open_dict

    from hierprior.em.cli import run_from_config

    spec = importlib.util.spec_from_file_location(
        "em_experiment", ROOT / "tests" / "test_em_experiment.py"
    )
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    SHORT, compose_em = experiment.SHORT, experiment.compose_em

    overrides = [o for o in SHORT if not o.startswith(("experiment=", "em.rounds="))]
    cfg = compose_em(
        [
            "experiment=mnist_shift",
            *overrides,
            "em.rounds=2",
            f"run_dir={tmp_path / 'run'}",
            f"paths.priors={tmp_path / 'priors'}",
        ]
    )
    with open_dict(cfg):
        (share,) = cfg.em.monitor.evaluators
        share.epochs = 1
        share.cache_dir = str(tmp_path / "cache")
    assert cfg.trainer.accelerator == "gpu" and cfg.em.estep.precision == "bf16-mixed"
    result = run_from_config(cfg)
    assert [row["round"] for row in result.metrics] == [0, 1, 2]
    for key in ("residual_chi2_nu", "posterior_mean_rmse", "share_56789"):
        assert key in result.metrics[-1], key
    assert next(result.prior.parameters()).device.type == "cuda"


# ------------------------------------------------------------------------- the script


@pytest.mark.slow  # the dry run takes ~55 s
def test_gpu_check_dry_run_writes_its_report(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every step with tiny sizes on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "dry-run-cpu.md").read_text()
    for heading in ("E-step", "M-step", "EM run", "Environment"):
        assert heading in report, heading
    assert "target" in report
