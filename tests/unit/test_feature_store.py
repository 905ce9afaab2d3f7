"""Feature store: append/lookup semantics, tombstones, skips, generations, crash leftovers."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from asvp_backend.features.store import FeatureStore, FeatureStoreError, GenerationInfo

DIM = 8


def _info(g: int = 0, **kw) -> GenerationInfo:
    base: dict[str, Any] = dict(
        generation=g,
        backbone="tf_efficientnet_lite0",
        weights_hash="abc",
        preprocessing={"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5)},
        dim=DIM,
    )
    base.update(kw)
    return GenerationInfo(**base)


def _vec(ids, offset: float = 0.0) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.float32)
    return (ids[:, None] + offset + np.arange(DIM, dtype=np.float32)[None, :] / 10).astype(np.float32)


@pytest.fixture
def store(tmp_path):
    return FeatureStore(tmp_path / "features")


def test_empty_store_has_no_current(store):
    assert store.current() is None
    assert store.generations() == []
    assert store.next_generation() == 0


def test_append_lookup_in_input_order(store):
    gen = store.create_generation(_info())
    gen.append([5, 3, 9], _vec([5, 3, 9]))
    gen.append([1], _vec([1]))
    assert gen.task_ids().tolist() == [1, 3, 5, 9]
    found, vec = gen.lookup([9, 42, 1, 3])
    assert found.tolist() == [True, False, True, True]
    assert vec.dtype == np.float16 and vec.shape == (3, DIM)
    np.testing.assert_allclose(vec, _vec([9, 1, 3]).astype(np.float16))
    assert gen.missing([1, 2, 3, 4]) == [2, 4]
    assert gen.shard_count() == 2


def test_lookup_on_empty_generation(store):
    gen = store.create_generation(_info())
    found, vec = gen.lookup([1, 2])
    assert found.tolist() == [False, False] and vec.shape == (0, DIM)
    ids, mat = gen.matrix()
    assert ids.shape == (0,) and mat.shape == (0, DIM)


def test_reappend_newest_wins_and_duplicates_in_one_call(store):
    gen = store.create_generation(_info())
    gen.append([1, 2], _vec([1, 2]))
    gen.append([2], _vec([2], offset=100))
    gen.append([7, 7], np.stack([_vec([7])[0], _vec([7], offset=50)[0]]))
    found, vec = gen.lookup([2, 7])
    assert found.all()
    np.testing.assert_allclose(vec[0], _vec([2], offset=100)[0].astype(np.float16))
    np.testing.assert_allclose(vec[1], _vec([7], offset=50)[0].astype(np.float16))
    assert len(gen) == 3


def test_drop_tombstones_then_reappend(store):
    gen = store.create_generation(_info())
    gen.append([1, 2, 3], _vec([1, 2, 3]))
    assert gen.drop([2, 3, 99]) == 2
    assert gen.task_ids().tolist() == [1]
    assert gen.drop([2]) == 0
    gen.append([3], _vec([3], offset=1))
    assert gen.task_ids().tolist() == [1, 3]
    found, vec = gen.lookup([3])
    np.testing.assert_allclose(vec[0], _vec([3], offset=1)[0].astype(np.float16))


def test_matrix_and_compact_give_zero_copy_memmap(store):
    gen = store.create_generation(_info())
    gen.append([4, 2], _vec([4, 2]))
    gen.append([3, 1], _vec([3, 1]))
    gen.drop([4])
    ids, mat = gen.matrix()
    assert ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(mat, _vec([1, 2, 3]).astype(np.float16))
    gen.compact()
    assert gen.shard_count() == 1
    ids2, mat2 = gen.matrix()
    assert isinstance(mat2, np.memmap)
    assert ids2.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(mat, mat2)
    assert sorted(p.name for p in (gen.path / "shards").iterdir()) == ["s0000002.ids.npy", "s0000002.vec.npy"]
    batches = list(gen.iter_batches(2))
    assert [b[0].tolist() for b in batches] == [[1, 2], [3]]


def test_skips_recorded_and_cleared_by_append(store):
    gen = store.create_generation(_info())
    gen.record_skips({5: "decode error: truncated", 6: "HTTP 404"})
    assert gen.skipped() == {5: "decode error: truncated", 6: "HTTP 404"}
    assert gen.missing([5, 6]) == [5, 6]
    gen.append([5], _vec([5]))
    assert gen.skipped() == {6: "HTTP 404"}
    gen.clear_skips()
    assert gen.skipped() == {}


def test_shape_and_nan_are_rejected(store):
    gen = store.create_generation(_info())
    with pytest.raises(FeatureStoreError):
        gen.append([1, 2], np.zeros((2, DIM + 1)))
    with pytest.raises(FeatureStoreError):
        gen.append([1], np.full((1, DIM), np.nan))
    with pytest.raises(FeatureStoreError):
        gen.append([1], np.full((1, DIM), 1e6))  # overflows float16
    assert len(gen) == 0


def test_generations_and_atomic_activation(store, tmp_path):
    g0 = store.create_generation(_info(0))
    g0.append([1], _vec([1]))
    assert store.current() is None  # not current until activated
    store.activate(0)
    g1 = store.create_generation(_info(1, weights_hash="def"))
    g1.append([1], _vec([1], offset=9))
    assert store.current().info.generation == 0
    store.activate(1)
    reopened = FeatureStore(tmp_path / "features")
    current = reopened.current()
    assert current is not None and current.info.generation == 1
    assert current.info.weights_hash == "def"
    assert reopened.generations() == [0, 1]
    assert json.loads((store.root / "CURRENT").read_text()) == {"generation": 1}
    with pytest.raises(FeatureStoreError):
        store.activate(7)
    with pytest.raises(FeatureStoreError):
        store.remove_generation(1)
    store.remove_generation(0)
    assert store.generations() == [1]


def test_create_generation_is_idempotent_for_same_info(store):
    a = store.create_generation(_info())
    a.append([1], _vec([1]))
    b = store.create_generation(_info())
    assert b.task_ids().tolist() == [1]
    assert b.info.preprocessing["input_size"] == [3, 64, 64]
    with pytest.raises(FeatureStoreError):
        store.create_generation(_info(weights_hash="other"))


def test_half_created_generation_is_replaced(store):
    (store.root / "g0").mkdir()  # crash before the manifest existed
    assert store.generations() == []
    gen = store.create_generation(_info())
    assert len(gen) == 0


def test_unnamed_shard_files_are_ignored_and_cleaned(store):
    gen = store.create_generation(_info())
    gen.append([1], _vec([1]))
    # A crashed writer left a full shard it never named in the manifest.
    np.save(gen.path / "shards" / "s0000001.vec.npy", _vec([2]).astype(np.float16))
    np.save(gen.path / "shards" / "s0000001.ids.npy", np.array([2], np.int64))
    (gen.path / "shards" / "s0000005.vec.npy").write_bytes(b"torn")
    assert gen.task_ids().tolist() == [1]
    gen.append([3], _vec([3]))
    assert gen.task_ids().tolist() == [1, 3]
    names = sorted(p.name for p in (gen.path / "shards").iterdir())
    assert names == ["s0000000.ids.npy", "s0000000.vec.npy", "s0000001.ids.npy", "s0000001.vec.npy"]
    found, vec = gen.lookup([3])
    np.testing.assert_allclose(vec[0], _vec([3])[0].astype(np.float16))


def test_two_handles_see_each_others_writes(store):
    a = store.create_generation(_info())
    b = store.generation(0)
    assert len(b) == 0
    a.append([1, 2], _vec([1, 2]))
    assert b.task_ids().tolist() == [1, 2]
    b.append([3], _vec([3]))
    assert a.task_ids().tolist() == [1, 2, 3]
