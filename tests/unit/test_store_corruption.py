"""Feature store corruption: each damaged file is detected, named, listed by verify() and repaired so that
exactly the lost tasks count as missing and everything else reads back as written."""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from asvp_backend.features.store import (
    FeatureStore,
    FeatureStoreCorrupt,
    FeatureStoreError,
    GenerationInfo,
    Problem,
)

DIM = 8
ALL = list(range(30))  # three shards of ten: s0000000 = 0..9, s0000001 = 10..19, s0000002 = 20..29
LOST = list(range(10, 20))  # what a damaged s0000001 takes with it
GARBAGE = np.random.default_rng(2).bytes(64)


def _info(g: int = 0) -> GenerationInfo:
    return GenerationInfo(generation=g, backbone="fake", weights_hash=f"h{g}", preprocessing={}, dim=DIM)


def _vec(ids, offset: float = 0.0) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.float32)
    return ids[:, None] + offset + np.arange(DIM, dtype=np.float32)[None, :] / 10


def _fill(store: FeatureStore, g: int = 0) -> None:
    gen = store.create_generation(_info(g))
    for start in range(0, len(ALL), 10):
        ids = ALL[start : start + 10]
        gen.append(ids, _vec(ids, offset=g))


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    store = FeatureStore(tmp_path / "features")
    _fill(store)
    store.activate(0)
    return store


def _shard_file(store: FeatureStore, kind: str, g: int = 0) -> Path:
    return store.root / f"g{g}" / "shards" / f"s0000001.{kind}.npy"


def _truncate(path: Path, nbytes: int) -> None:
    os.truncate(path, path.stat().st_size - nbytes)


def _assert_reads_back(store: FeatureStore, lost: list[int], g: int = 0) -> None:
    """The lost tasks are missing, all others read back equal, and re-extracting the lost ones works."""
    gen = store.current()
    assert gen is not None and gen.info.generation == g
    assert gen.missing(ALL) == lost
    kept = [i for i in ALL if i not in lost]
    found, vec = gen.lookup(kept)
    assert found.all()
    np.testing.assert_array_equal(vec, _vec(kept, offset=g).astype(np.float16))
    ids, mat = gen.matrix()
    assert ids.tolist() == kept
    np.testing.assert_array_equal(mat, _vec(kept, offset=g).astype(np.float16))
    assert store.verify() == []
    if lost:
        gen.append(lost, _vec(lost, offset=g))  # what the next extraction does
    ids, mat = FeatureStore(store.root).generation(g).matrix()
    assert ids.tolist() == ALL
    np.testing.assert_array_equal(mat, _vec(ALL, offset=g).astype(np.float16))


# ------------------------------------------------------------------------------------------- damaged shards


def _save(kind: str, array: np.ndarray) -> Callable[[FeatureStore], None]:
    return lambda store: np.save(_shard_file(store, kind), array)


SHARD_DAMAGE = {
    "vec truncated by 1 byte": ("vec", lambda s: _truncate(_shard_file(s, "vec"), 1), "truncated"),
    "vec truncated by 40 bytes": ("vec", lambda s: _truncate(_shard_file(s, "vec"), 40), "truncated"),
    "vec truncated into its header": ("vec", lambda s: _truncate(_shard_file(s, "vec"), 200), "not a valid .npy"),
    "ids truncated by 8 bytes": ("ids", lambda s: _truncate(_shard_file(s, "ids"), 8), "truncated"),
    "vec of another dimension": ("vec", _save("vec", np.zeros((10, DIM + 3), np.float16)), "dimension is 8"),
    "vec of another dtype": ("vec", _save("vec", np.zeros((10, DIM), np.float32)), "float32"),
    "vec with fewer rows": ("vec", _save("vec", np.zeros((9, DIM), np.float16)), "the manifest says 10"),
    "ids disagree with vec": ("ids", _save("ids", np.arange(10, 19, dtype=np.int64)), "9 ids"),
    "ids of another dtype": ("ids", _save("ids", np.arange(10, 20, dtype=np.float64)), "int64"),
    "vec deleted": ("vec", lambda s: _shard_file(s, "vec").unlink(), "is missing"),
    "ids deleted": ("ids", lambda s: _shard_file(s, "ids").unlink(), "is missing"),
    "vec is garbage": ("vec", lambda s: _shard_file(s, "vec").write_bytes(GARBAGE), "not a valid .npy"),
}


@pytest.mark.parametrize("case", SHARD_DAMAGE, ids=list(SHARD_DAMAGE))
def test_damaged_shard_is_named_listed_and_dropped(store, case):
    kind, damage, problem = SHARD_DAMAGE[case]
    bad = _shard_file(store, kind)
    damage(store)
    gen = store.current()  # the manifest is fine: opening works, the read that needs the shard fails
    assert gen is not None
    for read in (gen.matrix, gen.task_ids, lambda: gen.lookup([1]), lambda: gen.missing([1])):
        with pytest.raises(FeatureStoreCorrupt) as err:
            read()
        assert err.value.path == bad and problem in err.value.problem and bad.name in str(err.value)
    assert [p.path for p in gen.verify()] == [bad]
    assert [p.path for p in store.verify()] == [bad]

    report = gen.repair()
    assert [p.path for p in report.problems] == [bad]
    assert report.dropped_shards == [gen.path / "shards" / "s0000001"]
    assert report.lost_vectors == 10
    assert not any(p.name.startswith("s0000001.") for p in (gen.path / "shards").iterdir())
    kept_aside = {"s0000001.ids.npy", "s0000001.vec.npy"} - ({bad.name} if case.endswith("deleted") else set())
    assert {p.name for p in (gen.path / "corrupt").iterdir()} == kept_aside
    _assert_reads_back(store, LOST)


def test_current_with_repair_fixes_a_bad_shard_and_logs_it(store, caplog):
    _truncate(_shard_file(store, "vec"), 16)
    with caplog.at_level(logging.WARNING, logger="asvp_backend.features.store"):
        gen = store.current(repair=True)
    assert gen is not None and gen.missing(ALL) == LOST
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "s0000001.vec.npy" in logged and "truncated" in logged
    _assert_reads_back(store, LOST)


def test_good_shards_after_a_bad_one_and_newest_vector_are_kept(store):
    gen = store.current()
    gen.append([12], _vec([12]))  # s0000003 re-appends an id of the shard that will be lost
    _shard_file(store, "vec").unlink()
    gen.repair()
    assert gen.missing(ALL) == [i for i in LOST if i != 12]
    found, vec = gen.lookup([12, 25])
    assert found.all()
    np.testing.assert_array_equal(vec, _vec([12, 25]).astype(np.float16))


def test_missing_shard_with_unchanged_manifest_fails_at_once(store, monkeypatch):
    """No retry loop ending in a vague error: the manifest did not change, so the file really is gone."""
    _shard_file(store, "ids").unlink()
    sleeps: list[float] = []
    monkeypatch.setattr("asvp_backend.features.store.time.sleep", sleeps.append)
    with pytest.raises(FeatureStoreCorrupt):
        store.current().task_ids()
    assert sleeps == []


def test_verify_and_repair_leave_a_clean_store_alone(store):
    manifest = (store.root / "g0" / "manifest.json").read_bytes()
    assert store.verify() == [] and store.current().verify() == []
    report = store.repair()
    assert report.clean and report.actions == [] and report.to_dict()["problems"] == []
    assert (store.root / "g0" / "manifest.json").read_bytes() == manifest
    _assert_reads_back(store, [])


# ------------------------------------------------------------------------------------------- CURRENT


GARBAGE_POINTERS = {
    "random bytes": np.random.default_rng(0).bytes(64),
    "empty": b"",
    "a list": b"[]",
    "a string generation": b'{"generation": "0"}',
    "a negative generation": b'{"generation": -1}',
    "a boolean generation": b'{"generation": true}',
    "no generation": b'{"g": 0}',
}


@pytest.mark.parametrize("case", GARBAGE_POINTERS, ids=list(GARBAGE_POINTERS))
def test_garbage_current_is_named_and_repointed_at_newest_clean_generation(store, case):
    _fill(store, g=1)  # newer, complete, never activated
    current = store.root / "CURRENT"
    current.write_bytes(GARBAGE_POINTERS[case])
    for read in (store.current, store.current_generation):
        with pytest.raises(FeatureStoreCorrupt) as err:
            read()
        assert err.value.path == current
    assert [p.path for p in store.verify()] == [current]

    gen = store.current(repair=True)
    assert gen is not None and gen.info.generation == 1
    assert json.loads(current.read_bytes()) == {"generation": 1}
    _assert_reads_back(store, [], g=1)


def test_current_naming_a_missing_generation(store):
    (store.root / "CURRENT").write_text('{"generation": 7}')
    with pytest.raises(FeatureStoreCorrupt, match="generation 7") as err:
        store.current()
    assert err.value.path == store.root / "CURRENT"
    assert store.current_generation() == 7  # the pointer itself parses
    assert [p.path for p in store.verify()] == [store.root / "CURRENT"]
    report = store.repair()
    assert [p.path for p in report.problems] == [store.root / "CURRENT"]
    _assert_reads_back(store, [])


def test_fallback_skips_a_generation_that_cannot_be_repaired(store):
    _fill(store, g=1)
    (store.root / "g1" / "info.json").unlink()  # a generation from before info.json: not rebuildable
    (store.root / "g1" / "manifest.json").write_bytes(b"\x00garbage")
    (store.root / "CURRENT").write_bytes(b"\xff\xfe")
    report = store.repair()
    assert {p.path for p in report.problems} == {store.root / "g1" / "manifest.json", store.root / "CURRENT"}
    assert [p.name.startswith(".corrupt-g1-") for p in report.quarantined] == [True]
    assert (report.quarantined[0] / "shards" / "s0000001.vec.npy").exists()  # moved aside, not deleted
    assert store.generations() == [0] and store.current_generation() == 0
    _assert_reads_back(store, [])


def test_garbage_current_without_any_generation_is_removed(tmp_path):
    store = FeatureStore(tmp_path / "features")
    (store.root / "CURRENT").write_bytes(b"\x13\x37")
    assert [p.path for p in store.verify()] == [store.root / "CURRENT"]
    assert store.current(repair=True) is None
    assert not (store.root / "CURRENT").exists()
    assert store.verify() == []


# ------------------------------------------------------------------------------------------- manifests


BAD_MANIFESTS = {
    "truncated JSON": lambda raw: raw[: len(raw) // 2],
    "random bytes": lambda raw: np.random.default_rng(1).bytes(len(raw)),
    "not an object": lambda raw: b"[]",
    "no info": lambda raw: json.dumps({**json.loads(raw), "info": {}}).encode(),
    "shard without count": lambda raw: json.dumps({**json.loads(raw), "shards": [{"name": "s0000000"}]}).encode(),
    "next_shard would overwrite": lambda raw: json.dumps({**json.loads(raw), "next_shard": 1}).encode(),
    "another generation's": lambda raw: raw.replace(b'"generation":0', b'"generation":3'),
    "a tombstone that is no id": lambda raw: json.dumps({**json.loads(raw), "tombstones": ["x"]}).encode(),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS, ids=list(BAD_MANIFESTS))
def test_corrupt_manifest_is_named_and_rebuilt_from_shards(store, case):
    gen = store.current()
    gen.append([5], _vec([5], offset=0.5))  # a newer vector for 5: the rebuild must keep write order
    gen.append([5], _vec([5]))  # ... and the newest one wins again
    manifest = gen.path / "manifest.json"
    manifest.write_bytes(BAD_MANIFESTS[case](manifest.read_bytes()))
    reads = (store.current, lambda: store.generation(0), gen.task_ids, gen.skipped, lambda: gen.append([1], _vec([1])))
    for read in reads:
        with pytest.raises(FeatureStoreCorrupt) as err:
            read()
        assert err.value.path == manifest
    assert [p.path for p in store.verify()] == [manifest]
    assert len(list((gen.path / "shards").iterdir())) == 10  # the failed append deleted nothing

    report = store.repair()
    assert report.rebuilt == [manifest] and report.lost_vectors == 0 and report.quarantined == []
    _assert_reads_back(store, [])
    store.current().append([99], _vec([99]))  # next_shard continues after the rebuilt shards
    assert store.current().shard_count() == 6


def test_corrupt_manifest_of_a_generation_without_info_is_quarantined(store):
    gen = store.current()
    (gen.path / "info.json").unlink()  # as in generations written before info.json existed
    (gen.path / "manifest.json").write_text('{"format": 1, "shards": [')
    with pytest.raises(FeatureStoreCorrupt, match="no info.json"):
        gen.repair()
    assert store.current(repair=True) is None  # moved aside, CURRENT removed: extraction starts afresh
    (quarantined,) = store.root.glob(".corrupt-g0-*")
    assert len(list((quarantined / "shards").iterdir())) == 6
    assert store.generations() == [] and store.verify() == []
    gen = store.create_generation(_info(0))
    assert gen.missing(ALL) == ALL


def test_older_generation_gains_info_on_next_write(store):
    info = store.root / "g0" / "info.json"
    info.unlink()
    store.current().append([40], _vec([40]))
    assert GenerationInfo.from_dict(json.loads(info.read_bytes())) == _info(0)


def test_lost_manifest_with_shards_is_rebuilt_not_replaced(store):
    (store.root / "g0" / "manifest.json").unlink()
    problems = {p.path for p in store.verify()}
    assert problems == {store.root / "g0" / "manifest.json", store.root / "CURRENT"}
    assert store.generations() == []
    report = store.repair()
    assert report.rebuilt == [store.root / "g0" / "manifest.json"]
    _assert_reads_back(store, [])


def test_create_generation_moves_aside_shards_without_manifest(store):
    (store.root / "g0" / "manifest.json").unlink()
    store.create_generation(_info(0))
    (quarantined,) = store.root.glob(".corrupt-g0-*")
    assert len(list((quarantined / "shards").iterdir())) == 6


# ------------------------------------------------------------------------------------------- the exception


def test_corrupt_is_a_store_error_and_survives_pickling():
    err = FeatureStoreCorrupt(Path("/x/g0/shards/s0000001.vec.npy"), "is truncated")
    assert isinstance(err, FeatureStoreError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.problem, str(back)) == (err.path, err.problem, str(err))
    assert err.as_problem() == Problem(err.path, "is truncated")
    assert err.as_problem().to_dict() == {"path": "/x/g0/shards/s0000001.vec.npy", "problem": "is truncated"}
