"""The galaxy morphology classifier (elliptical / disk / spiral) and the SpiralShare evaluator.

One classifier is trained per module (R = 32, value range (0, 1), the galaxy demo's setting)
into a temporary cache folder; the tests measure it on held-out procedural galaxies whose seeds
differ from the training and test seeds of the loader.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from hierprior.data import make_galaxies
from hierprior.evaluation import MorphologyClassifier, SpiralShare, load_morphology_classifier
from hierprior.evaluation.morphology import CLASSES

R = 32
VALUE_RANGE = (0.0, 1.0)
N = 200  # held-out galaxies per class
SEED = 9_123_457  # held-out galaxies: neither training (7_000_001..) nor test (7_100_001..) seeds


def _galaxies(kind: str, n: int = N, seed: int = SEED) -> torch.Tensor:
    if kind == "disk":
        return make_galaxies(
            "spiral", n, R, seed=seed, value_range=VALUE_RANGE, params={"arm_contrast": 0.0}
        )
    return make_galaxies(kind, n, R, seed=seed, value_range=VALUE_RANGE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("morphology_cache")
    start = time.perf_counter()
    clf = load_morphology_classifier(R, VALUE_RANGE, cache_dir=cache)
    return clf, cache, time.perf_counter() - start


@pytest.fixture(scope="module")
def held_out():
    return {kind: _galaxies(kind, seed=SEED + k) for k, kind in enumerate(CLASSES)}


def test_accuracy_per_class(trained, held_out, report):
    clf, _, seconds = trained
    confusion = torch.zeros(3, 3, dtype=torch.long)
    for k, kind in enumerate(CLASSES):
        predicted = clf.classify(held_out[kind])
        confusion[k] = torch.bincount(predicted, minlength=3)
    accuracy = (confusion.diag() / confusion.sum(1)).tolist()
    report(
        f"morphology classifier r{R}: trained in {seconds:.1f} s; loader test accuracy "
        f"{clf.test_accuracy:.3f}, per class "
        + ", ".join(f"{k} {v:.3f}" for k, v in clf.class_accuracy.items())
        + f", confusion {clf.confusion.tolist()}"
    )
    report(
        f"morphology classifier r{R}: held-out accuracy "
        + ", ".join(f"{k} {a:.3f}" for k, a in zip(CLASSES, accuracy))
        + f", confusion (rows true E/D/S) {confusion.tolist()}"
    )
    assert all(a >= 0.9 for a in accuracy), accuracy
    assert clf.test_accuracy >= 0.95
    assert set(clf.class_accuracy) == set(CLASSES)
    assert all(a >= 0.9 for a in clf.class_accuracy.values())
    assert clf.confusion.shape == (3, 3) and int(clf.confusion.sum()) == 600
    assert clf.train_seconds > 0


def test_spiral_share(trained, held_out, report):
    _, cache, _ = trained
    share = SpiralShare(resolution=R, value_range=VALUE_RANGE, cache_dir=str(cache))
    assert share.name == "share_spiral"
    out = {kind: share(held_out[kind]) for kind in CLASSES}
    for metrics in out.values():
        assert set(metrics) == {
            "share_spiral",
            "share_disk",
            "share_elliptical",
            "morphology_confidence",
        }
        total = metrics["share_spiral"] + metrics["share_disk"] + metrics["share_elliptical"]
        assert math.isclose(total, 1.0, abs_tol=1e-6)
        assert 1 / 3 <= metrics["morphology_confidence"] <= 1
    report(
        "SpiralShare r32: share_spiral on spirals {:.3f}, disks {:.3f}, ellipticals {:.3f}".format(
            out["spiral"]["share_spiral"],
            out["disk"]["share_spiral"],
            out["elliptical"]["share_spiral"],
        )
    )
    assert out["spiral"]["share_spiral"] > 0.9
    assert out["disk"]["share_spiral"] < 0.1
    assert out["elliptical"]["share_spiral"] < 0.05


def test_robust_to_mild_degradation(trained, held_out, report):
    """Slightly noisy, blurred, dimmed, unclipped galaxies, as a diffusion prior may draw them."""

    clf, _, _ = trained
    generator = torch.Generator().manual_seed(5)
    kernel = torch.exp(-(torch.arange(-2.0, 3.0) ** 2) / (2 * 0.5**2))
    kernel = (kernel[:, None] * kernel[None, :] / kernel.sum() ** 2)[None, None]
    shares = {}
    for kind in CLASSES:
        x = torch.nn.functional.conv2d(held_out[kind], kernel, padding=2) * 0.85
        x = x + 0.02 * torch.randn(x.shape, generator=generator)
        shares[kind] = (clf.classify(x) == 2).float().mean().item()
    report(
        "morphology classifier r32, noise 0.02 + blur 0.5 px + brightness 0.85: share_spiral "
        + ", ".join(f"{k} {v:.3f}" for k, v in shares.items())
    )
    assert shares["spiral"] > 0.8
    assert shares["disk"] < 0.15 and shares["elliptical"] < 0.1


def test_value_range_is_mapped(trained, held_out):
    clf, cache, _ = trained
    other = load_morphology_classifier(R, (-1.0, 1.0), cache_dir=cache)
    x = held_out["spiral"][:50]
    torch.testing.assert_close(other.predict_proba(2 * x - 1), clf.predict_proba(x))


def test_cache_round_trip(trained, held_out, monkeypatch):
    clf, cache, _ = trained
    path = cache / f"morphology_classifier_r{R}.pt"
    assert path.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the second load must read the cache, not train")

    monkeypatch.setattr("hierprior.evaluation.morphology._train", no_training)
    again = load_morphology_classifier(R, VALUE_RANGE, cache_dir=cache)
    x = torch.cat([held_out[kind][:20] for kind in CLASSES])
    assert torch.equal(again.classify(x), clf.classify(x))
    torch.testing.assert_close(again.predict_proba(x), clf.predict_proba(x))
    assert again.test_accuracy == clf.test_accuracy
    assert again.class_accuracy == clf.class_accuracy
    assert torch.equal(again.confusion, clf.confusion)
    assert not again.training


def test_corrupted_cache_raises(tmp_path):
    path = tmp_path / f"morphology_classifier_r{R}.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read the morphology classifier cache"):
        load_morphology_classifier(R, VALUE_RANGE, cache_dir=tmp_path)
    torch.save({"format": 1, "resolution": 16}, path)
    with pytest.raises(RuntimeError, match="not a morphology classifier checkpoint"):
        load_morphology_classifier(R, VALUE_RANGE, cache_dir=tmp_path)


def test_bad_shapes_raise(trained):
    clf, cache, _ = trained
    share = SpiralShare(resolution=R, value_range=VALUE_RANGE, cache_dir=str(cache))
    for bad in (torch.zeros(4, R, R), torch.zeros(4, 3, R, R), torch.zeros(4, 1, 16, 16)):
        with pytest.raises(ValueError, match="SpiralShare needs images"):
            share(bad)
        with pytest.raises(ValueError, match="expected images with shape"):
            clf.predict_proba(bad)
    with pytest.raises(ValueError, match="SpiralShare needs images"):
        share(torch.zeros(0, 1, R, R))
    # 2R px galaxies span the same field: they are pooled to R px
    assert set(share(torch.rand(3, 1, 2 * R, 2 * R))) >= {"share_spiral", "share_disk"}
    assert clf.predict_proba(torch.zeros(0, 1, R, R)).shape == (0, 3)
    with pytest.raises(ValueError, match="epochs"):
        load_morphology_classifier(R, cache_dir=cache, epochs=0)
    with pytest.raises(ValueError, match="resolution"):
        MorphologyClassifier(resolution=4)


def test_training_is_deterministic(tmp_path):
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    a = load_morphology_classifier(R, VALUE_RANGE, cache_dir=tmp_path / "a", epochs=1)
    b = load_morphology_classifier(R, VALUE_RANGE, cache_dir=tmp_path / "b", epochs=1)
    c = load_morphology_classifier(R, VALUE_RANGE, cache_dir=tmp_path / "c", epochs=1, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert torch.get_num_threads() == threads
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
