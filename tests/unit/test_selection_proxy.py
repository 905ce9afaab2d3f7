"""Proxy models: learning, BatchNorm guard, save/load, labels, degenerate sets, cross-validation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from asvp_backend.selection.proxy import (
    PROXIES,
    LogisticProxy,
    MLPProxy,
    Proxy,
    cosine_716,
    create_proxy,
    cross_val_accuracy,
    epoch_batches,
    load_proxy,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # tiny networks: OpenMP thread hand-offs cost more than they save (and stall when a core is busy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n_samples=1200, n_features=16, centers=4, cluster_std=1.5, random_state=0)
    return X.astype(np.float32), y


def small_mlp(**kw) -> MLPProxy:
    return MLPProxy(**{"hidden": 32, "epochs": 20, "batch_size": 128, "min_steps": 50, **kw})


@pytest.mark.parametrize("factory", [small_mlp, LogisticProxy])
def test_learns_separable_blobs(factory, blobs) -> None:
    X, y = blobs
    proxy = factory().fit(X[:400], y[:400])
    assert isinstance(proxy, Proxy)
    assert (proxy.predict(X[400:]) == y[400:]).mean() > 0.95
    probs = proxy.predict_proba(X[400:])
    assert probs.dtype == np.float32 and probs.shape == (800, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_reference_mlp_defaults_learn_and_are_deterministic(blobs) -> None:
    X, y = blobs
    a = MLPProxy(hidden=64).fit(X[:300], y[:300])
    b = MLPProxy(hidden=64).fit(X[:300], y[:300])
    assert a.n_steps_ == 100 and a.n_epochs_ == 100  # 1 batch/epoch: epochs scaled up to min_steps
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert (a.predict(X[300:]) == y[300:]).mean() > 0.95


def test_epoch_batches_never_leave_a_batch_of_one() -> None:
    assert epoch_batches(5, 2) == [(0, 2), (2, 5)]
    assert epoch_batches(4, 2) == [(0, 2), (2, 4)]
    assert epoch_batches(1, 2048) == [(0, 1)]
    for n in range(2, 40):
        assert all(stop - start >= 2 for start, stop in epoch_batches(n, 4))


def test_last_batch_of_one_does_not_crash(blobs) -> None:
    X, y = blobs
    proxy = MLPProxy(hidden=16, epochs=2, batch_size=64, min_steps=1).fit(X[: 3 * 64 + 1], y[: 3 * 64 + 1])
    assert proxy.n_steps_ == 2 * 3


def test_cosine_716_schedule() -> None:
    assert cosine_716(0, 100) == 1.0
    assert cosine_716(100, 100) == pytest.approx(np.cos(7 * np.pi / 16))
    assert cosine_716(50, 100) > cosine_716(60, 100)


@pytest.mark.parametrize("factory", [small_mlp, LogisticProxy])
def test_save_load_round_trip(factory, blobs, tmp_path) -> None:
    X, y = blobs
    proxy = factory().fit(X[:200], y[:200])
    path = tmp_path / "sub" / "proxy.pt"
    proxy.save(path)
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    loaded = type(proxy).load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X), proxy.predict_proba(X))
    np.testing.assert_array_equal(loaded.classes_, proxy.classes_)
    again = load_proxy(path)
    assert type(again) is type(proxy)
    np.testing.assert_array_equal(again.predict_proba(X[:10]), proxy.predict_proba(X[:10]))


def test_load_rejects_other_kind_and_foreign_files(blobs, tmp_path) -> None:
    X, y = blobs
    path = tmp_path / "lr.pt"
    LogisticProxy().fit(X[:50], y[:50]).save(path)
    with pytest.raises(ValueError, match="logistic"):
        MLPProxy.load(path)
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an asvp proxy"):
        load_proxy(tmp_path / "other.pt")


@pytest.mark.parametrize("factory", [small_mlp, LogisticProxy])
def test_string_labels_survive_fit_and_save(factory, blobs, tmp_path) -> None:
    X, y = blobs
    names = np.array(["zebra", "cat", "dog", "ant"])[y]
    proxy = factory().fit(X[:300], names[:300])
    assert list(proxy.classes_) == ["ant", "cat", "dog", "zebra"]
    assert (proxy.predict(X[300:]) == names[300:]).mean() > 0.95
    proxy.save(tmp_path / "p.pt")
    loaded = load_proxy(tmp_path / "p.pt")
    assert list(loaded.classes_) == list(proxy.classes_) and loaded.classes_.dtype == proxy.classes_.dtype


@pytest.mark.parametrize("factory", [small_mlp, LogisticProxy])
def test_binary_problem(factory, blobs) -> None:
    X, y = blobs
    mask = y < 2
    proxy = factory().fit(X[mask][:200], y[mask][:200] + 10)
    assert list(proxy.classes_) == [10, 11]
    assert proxy.predict_proba(X[:5]).shape == (5, 2)
    assert (proxy.predict(X[mask][200:]) == y[mask][200:] + 10).mean() > 0.95


@pytest.mark.parametrize("factory", [small_mlp, LogisticProxy])
@pytest.mark.parametrize("n", [1, 5])
def test_single_class_is_a_constant_model(factory, n, blobs) -> None:
    X, _ = blobs
    proxy = factory().fit(X[:n], np.full(n, 7))
    np.testing.assert_array_equal(proxy.predict_proba(X[:3]), np.ones((3, 1), np.float32))
    np.testing.assert_array_equal(proxy.predict(X[:3]), [7, 7, 7])
    hidden, logits = proxy.hidden_and_logits(X[:3])
    assert logits.shape == (3, 1) and hidden.shape[0] == 3


def test_two_samples_two_classes(blobs) -> None:
    X, y = blobs
    i, j = np.flatnonzero(y == 0)[0], np.flatnonzero(y == 1)[0]
    proxy = small_mlp().fit(X[[i, j]], y[[i, j]])
    assert proxy.predict_proba(X[:4]).shape == (4, 2)


def test_empty_and_bad_shapes_raise(blobs) -> None:
    X, y = blobs
    with pytest.raises(ValueError, match="empty"):
        small_mlp().fit(X[:0], y[:0])
    with pytest.raises(ValueError, match="labels"):
        small_mlp().fit(X[:5], y[:4])
    proxy = LogisticProxy().fit(X[:20], y[:20])
    with pytest.raises(ValueError, match="shape"):
        proxy.predict_proba(X[:5, :3])
    with pytest.raises(RuntimeError, match="not fitted"):
        MLPProxy().predict_proba(X[:5])


def test_float16_features_and_batched_prediction(blobs) -> None:
    X, y = blobs
    proxy = small_mlp(predict_batch_size=7).fit(X[:300].astype(np.float16), y[:300])
    p16 = proxy.predict_proba(X.astype(np.float16))
    assert p16.dtype == np.float32 and p16.shape == (1200, 4)
    np.testing.assert_allclose(p16, proxy.predict_proba(X), atol=1e-2)  # same model, fp32 input


def test_hidden_and_logits_shapes(blobs) -> None:
    X, y = blobs
    mlp = small_mlp().fit(X[:100], y[:100])
    h, z = mlp.hidden_and_logits(X[:10])
    assert h.shape == (10, 32) and z.shape == (10, 4) and (h >= 0).all()  # after ReLU
    np.testing.assert_allclose(
        torch.softmax(torch.from_numpy(z), 1).numpy(), mlp.predict_proba(X[:10]), atol=1e-6
    )
    lr = LogisticProxy().fit(X[:100], y[:100])
    h, z = lr.hidden_and_logits(X[:10])
    np.testing.assert_array_equal(h, X[:10])
    assert z.shape == (10, 4)


def test_init_only_stores_params() -> None:
    proxy = MLPProxy(hidden=8, seed=3)
    assert proxy.get_params()["hidden"] == 8 and proxy.seed == 3
    assert not any(k.endswith("_") for k in vars(proxy))


def test_registry_and_unknown_name() -> None:
    assert set(PROXIES) == {"mlp", "logistic"}
    assert isinstance(create_proxy("mlp", hidden=4), MLPProxy)
    with pytest.raises(ValueError, match="known: logistic, mlp"):
        create_proxy("svm")


def test_cross_val_accuracy(blobs) -> None:
    X, y = blobs
    acc = cross_val_accuracy(LogisticProxy, X[:200], y[:200], folds=5)
    assert acc is not None and acc > 0.95
    assert cross_val_accuracy(LogisticProxy, X[:10], np.zeros(10)) is None  # one class
    assert cross_val_accuracy(LogisticProxy, X[:3], np.array([0, 1, 1])) is None  # a class with one label
    assert cross_val_accuracy(LogisticProxy, X[:0], y[:0]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_roughly(blobs) -> None:
    X, y = blobs
    proxy = small_mlp(device="cuda").fit(X[:400], y[:400])
    assert (proxy.predict(X[400:]) == y[400:]).mean() > 0.95


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_gpu_trained_proxy_loads_on_cpu(blobs, tmp_path) -> None:
    X, y = blobs
    proxy = small_mlp().fit(X[:100], y[:100])
    proxy.device = "cuda"  # as if it had been trained on a GPU
    proxy.save(tmp_path / "gpu.pt")
    loaded = load_proxy(tmp_path / "gpu.pt")
    assert isinstance(loaded, MLPProxy) and loaded.device == "cpu"
    fresh = small_mlp().fit(X[:100], y[:100])
    np.testing.assert_array_equal(loaded.predict_proba(X[:20]), fresh.predict_proba(X[:20]))
