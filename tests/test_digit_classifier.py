"""Tests of hierprior.evaluation.digits: training, caching and use of the digit classifier."""

from __future__ import annotations

import time

import pytest
import torch

import hierprior.evaluation.digits as digits_module
from hierprior.data import load_mnist
from hierprior.evaluation import DigitClassifier, default_cache_dir, load_digit_classifier

torch.set_num_threads(1)

# 4 epochs at 16 px train in ~5 s on one core and reach ~0.95 test accuracy (0.98 with the
# default 12 epochs); the test asks for 0.9, which a classifier that confuses one digit class
# in two (or fails to learn) cannot reach, yet leaves room for seed and platform variation
FAST_EPOCHS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    state = torch.get_rng_state()
    start = time.perf_counter()
    model = load_digit_classifier(16, cache_dir=cache, epochs=FAST_EPOCHS)
    seconds = time.perf_counter() - start
    return model, cache, seconds, torch.equal(state, torch.get_rng_state())


@pytest.fixture(scope="module")
def test_split():
    return load_mnist(range(10), 16, source="bundled", split="test")


def test_accuracy_on_test_split(trained, test_split):
    model, _, seconds, _ = trained
    x, y = test_split
    accuracy = (model.classify(x) == y).float().mean().item()
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(model.test_accuracy, abs=1e-6)  # the stored figure
    assert seconds < 45  # ~5 s when the CPU is free
    assert not model.training


def test_training_leaves_global_rng(trained):
    assert trained[3]


def test_cache_file_and_weights_only(trained):
    model, cache, _, _ = trained
    path = cache / "digit_classifier_r16.pt"
    assert path.is_file()
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left
    state = torch.load(path, weights_only=True)
    assert state["resolution"] == 16 and state["epochs"] == FAST_EPOCHS
    assert state["test_accuracy"] == pytest.approx(model.test_accuracy)
    for key, value in model.state_dict().items():
        assert torch.equal(state["state_dict"][key], value)


def test_cached_reload_is_identical(trained, test_split, monkeypatch):
    model, cache, _, _ = trained

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should be loaded, not retrained")

    monkeypatch.setattr(digits_module, "_train", no_training)
    again = load_digit_classifier(16, cache_dir=cache)
    x, _ = test_split
    assert torch.equal(again.predict_proba(x), model.predict_proba(x))
    assert torch.equal(again.classify(x), model.classify(x))
    assert again.test_accuracy == model.test_accuracy


def test_value_range_is_an_input_map(trained, test_split):
    _, cache, _, _ = trained
    unit = load_digit_classifier(16, value_range=(0.0, 1.0), cache_dir=cache)
    x, _ = test_split
    ref = load_digit_classifier(16, cache_dir=cache).predict_proba(x)
    # the same weights see the same [0, 1] intensities; float32 round-off only
    torch.testing.assert_close(unit.predict_proba((x + 1) / 2), ref, atol=1e-5, rtol=0)


def test_proba_classify_share(trained, test_split):
    model, _, _, _ = trained
    x, y = test_split
    model.train()
    p = model.predict_proba(x[:10])
    assert model.training  # the mode is restored
    model.eval()
    assert p.shape == (10, 10)
    torch.testing.assert_close(p.sum(-1), torch.ones(10), atol=1e-5, rtol=0)
    labels = model.classify(x)
    assert labels.shape == (500,) and labels.dtype == torch.int64
    high = x[y >= 5]
    # on held-out 5-9 digits, the share is the accuracy-like figure experiments report
    assert model.share(high, range(5, 10)) >= 0.9
    assert model.share(high, range(5, 10)) + model.share(high, range(5)) == pytest.approx(1.0)
    logits = model(x[:3])
    assert logits.shape == (3, 10) and logits.requires_grad


def test_input_errors(trained):
    model, cache, _, _ = trained
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        model.classify(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        model.classify(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="digits"):
        model.share(torch.zeros(2, 1, 16, 16), [10])
    with pytest.raises(ValueError, match="resolution"):
        load_digit_classifier(4, cache_dir=cache)
    with pytest.raises(ValueError, match="pad"):
        load_digit_classifier(16, resize="pad", cache_dir=cache)
    with pytest.raises(ValueError, match="low < high"):
        DigitClassifier(16, value_range=(1, 0))


def test_corrupt_cache_is_reported(tmp_path):
    (tmp_path / "digit_classifier_r20.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="digit_classifier_r20.pt"):
        load_digit_classifier(20, cache_dir=tmp_path)


def test_training_is_deterministic(tmp_path):
    a = load_digit_classifier(12, cache_dir=tmp_path / "a", epochs=1, seed=3)
    b = load_digit_classifier(12, cache_dir=tmp_path / "b", epochs=1, seed=3)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HIERPRIOR_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("HIERPRIOR_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "hierprior")


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [16, 28])
def test_default_training_meets_target(tmp_path, resolution):
    # CPU seconds on one thread bound the wall time on 2 cores and, unlike wall time, hardly
    # depend on other load; the brief's budget is 90 s (measured ~17 s at 16 px, ~28 s at 28 px)
    torch.set_num_threads(1)
    start = time.process_time()
    model = load_digit_classifier(resolution, cache_dir=tmp_path)
    assert time.process_time() - start < 90
    assert model.test_accuracy >= 0.95  # measured 0.98 (16 px) and 0.99 (28 px)
