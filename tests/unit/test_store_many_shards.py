"""Feature store with hundreds of small shards, as extraction writes them (a flush every ~512 vectors):
reads and compaction must not hold a file descriptor per shard, and re-indexing after an append must
only read the new shard."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import numpy as np
import pytest

from asvp_backend.features import store_format
from asvp_backend.features.store import FeatureGeneration, FeatureStore, GenerationInfo

DIM = 4
SHARDS = 200
PER_SHARD = 3


def _vec(ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.float32)
    return ids[:, None] + np.arange(DIM, dtype=np.float32)[None, :] / 10


@pytest.fixture
def many_shards(tmp_path, monkeypatch) -> FeatureGeneration:
    store = FeatureStore(tmp_path / "features")
    gen = store.create_generation(GenerationInfo(0, "fake", "h", {}, DIM))
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: None)  # durability is not under test; 600 fsyncs would be slow
        for k in range(SHARDS):
            ids = np.arange(k * PER_SHARD, (k + 1) * PER_SHARD)[::-1]  # unsorted within a shard
            gen.append(ids, _vec(ids))
    return FeatureStore(store.root).generation(0)


@pytest.fixture
def few_file_descriptors() -> Iterator[None]:
    """Allow far fewer open files than the generation has shard files (2 x 200)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_reads_and_compaction_need_no_descriptor_per_shard(many_shards, few_file_descriptors):
    n = SHARDS * PER_SHARD
    ids, mat = many_shards.matrix()
    assert ids.tolist() == list(range(n))
    np.testing.assert_array_equal(mat, _vec(ids).astype(np.float16))
    found, vec = many_shards.lookup([n - 1, 5, n + 7, 0])
    assert found.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(vec, _vec([n - 1, 5, 0]).astype(np.float16))
    assert sum(len(b) for b, _ in many_shards.iter_batches(128)) == n
    assert many_shards.verify() == []
    many_shards.compact()
    assert many_shards.shard_count() == 1
    ids, mat = many_shards.matrix()
    assert isinstance(mat, np.memmap) and ids.tolist() == list(range(n))
    np.testing.assert_array_equal(mat, _vec(ids).astype(np.float16))


def test_reindex_after_append_reads_only_the_new_shard(many_shards, monkeypatch):
    assert len(many_shards) == SHARDS * PER_SHARD
    read: list[str] = []
    real = store_format.read_npy_header

    def counting(path):
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(store_format, "read_npy_header", counting)
    many_shards.append([10_000], _vec([10_000]))
    assert len(many_shards) == SHARDS * PER_SHARD + 1
    assert sorted(read) == [f"s{SHARDS:07d}.ids.npy", f"s{SHARDS:07d}.vec.npy"]


def test_iter_batches_resumes_after_a_concurrent_compaction(many_shards):
    """A batch stream continues in id order when a writer compacts (and deletes shards) in between."""
    other = FeatureStore(many_shards.path.parent).generation(0)
    batches = many_shards.iter_batches(100)
    first, _ = next(batches)
    other.compact()
    rest = [ids for ids, vec in batches]
    seen = np.concatenate([first, *rest])
    assert seen.tolist() == list(range(SHARDS * PER_SHARD))
