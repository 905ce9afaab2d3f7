"""`simulate` end to end on tiny data: files and fields, resumed == uninterrupted, a forced ASVP update, data sets.

Speed: timm's ~350k-parameter ``test_efficientnet`` with seeded random weights at 32 px on a stratified subset of
scikit-learn's digits; the loop, the cache and the bookkeeping are what is under test, not accuracy.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from asvp_backend.evaluation.command import main
from asvp_backend.evaluation.datasets import SEEDED_SPLIT, load_dataset, stratified_sample
from asvp_backend.evaluation.report import build_results, write_report
from asvp_backend.evaluation.simulate import (
    ConfigMismatchError,
    DeliverableCache,
    Simulation,
    SimulationConfig,
    Workspace,
)

TINY = {"backbone": "test_efficientnet", "weights": "random", "image_size": 32, "device": "cpu"}
BASE = {"dataset": "digits", "subset": 300, "test_subset": 120, "initial": 20, "budget_per_round": 20, "rounds": 2,
        "seeds": 1, "eval": "proxy", **TINY}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # tiny networks: OpenMP thread hand-offs cost more than they save (and stall when a core is busy); the
    # variable keeps the backbone code (configure_cpu_threads) from raising the count again
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def simulate(out: Path, stop: Any = None, **overrides: Any) -> tuple[Simulation, list]:
    sim = Simulation(SimulationConfig(**{**BASE, **overrides}), out, progress=False)
    return sim, sim.run(should_stop=stop)


def essentials(runs: list) -> dict[str, Any]:
    """What must not depend on whether a run was interrupted (timings may)."""
    return {
        r.name: [
            {k: v for k, v in rec.items() if k not in ("seconds", "update")} for rec in r.rounds
        ] + [r.generation, r.updates, r.scores]
        for r in runs
    }  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Simulation, list]:
    out = tmp_path_factory.mktemp("sim") / "full"
    sim, runs = simulate(out, methods=("random", "svpp"))
    return out, sim, runs


def test_files_and_fields(uninterrupted: tuple[Path, Simulation, list]):
    out, sim, runs = uninterrupted
    results = build_results(sim, runs, "asvp-backend simulate --dataset digits (test)")
    paths = write_report(out, results)
    assert {p.name for p in paths.values()} == {"results.json", "learning_curves.png", "report.md"}
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True
    assert data["dataset"]["test_split"] == SEEDED_SPLIT
    assert data["config"]["methods"] == ["random", "svpp"]
    assert data["code_version"].startswith("0.")
    for method in ("random", "svpp"):
        (run,) = data["runs"][method]
        labels = [n for n, _ in run["curve"]]
        assert labels == [20, 40, 60]  # the initial set, then + budget per round
        assert all(0.0 <= a <= 1.0 for _, a in run["curve"])
        assert run["gpu_hours"] == 0.0 and run["cpu_hours"] > 0  # a CPU run
        assert run["overall_cost"] == pytest.approx(60 * 0.1 + run["cpu_hours"] * 0.1)  # labels + CPU hours
        assert [len(s["added"]) for s in run["selections"]] == [20, 20, 20]
        summary = data["summary"][method]
        assert len(summary["ssr"]) == 2 and summary["final_accuracy"]["n"] == 1
    assert data["summary"]["random"]["ssr"][0]["mean_curves"] == 0.0  # the reference against itself
    random_curve = data["runs"]["random"][0]["curve"]
    assert data["targets"] == pytest.approx([random_curve[-1][1], random_curve[1][1]])  # whole and half budget
    # same seed, same initial set, for every method; selections never repeat a label
    first = {m: data["runs"][m][0]["selections"][0]["added"] for m in ("random", "svpp")}
    assert first["random"] == first["svpp"]
    for run in runs:
        assert len(set(run.labelled)) == len(run.labelled) == 60
    report = (out / "report.md").read_text()
    assert "`random`" in report and "`svpp`" in report and SEEDED_SPLIT in report
    assert "asvp-backend simulate --dataset digits (test)" in report
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_run_equals_uninterrupted(uninterrupted: tuple[Path, Simulation, list], tmp_path: Path):
    _, _, full = uninterrupted
    out = tmp_path / "resumed"
    sim, partial = simulate(out, stop=lambda method, seed, round_no: round_no >= 1, methods=("random", "svpp"))
    assert sim.stopped and [len(r.rounds) for r in partial] == [2, 0]  # killed after random's round 1
    sim, resumed = simulate(out, methods=("random", "svpp"))
    assert not sim.stopped
    assert essentials(resumed) == essentials(full)
    # rerunning a finished simulation changes nothing and re-extracts nothing
    cached = sorted(p.stat().st_mtime_ns for p in (out / "cache").glob("*.npy"))
    _, again = simulate(out, methods=("random", "svpp"))
    assert essentials(again) == essentials(full)
    assert sorted(p.stat().st_mtime_ns for p in (out / "cache").glob("*.npy")) == cached


def test_other_settings_in_the_same_out_are_refused(uninterrupted: tuple[Path, Simulation, list]):
    out, _, _ = uninterrupted
    with pytest.raises(ConfigMismatchError, match="budget_per_round"):
        simulate(out, methods=("random",), budget_per_round=10)


def test_forced_asvp_update_and_standard(tmp_path: Path):
    sim, runs = simulate(tmp_path, methods=("asvp-ungated", "standard", "svpp"), align_threshold=1e9,
                         align_window=1, align_min_labels=0, align_min_new_labels=0, finetune_epochs=1,
                         lp_epochs=1)  # fmt: skip
    asvp, standard, svpp = runs
    assert asvp.rounds[1]["accuracy"] == svpp.rounds[1]["accuracy"]  # identical until the update changes features
    decisions = [rec["decision"]["decision"] for rec in asvp.rounds]
    assert decisions == ["wait", "update", "wait"]  # round 0 has nothing to compare with; history resets
    assert asvp.generation == 1 and asvp.updates == 1 and asvp.labels_at_last_update == 40
    assert [rec["generation"] for rec in asvp.rounds] == [0, 0, 1]
    update = asvp.rounds[1]["update"]
    assert update["method"] == "ft" and (tmp_path / update["checkpoint"] / "model.safetensors").is_file()
    audit = set(asvp.audit) & set(asvp.rounds[0]["added"] + asvp.rounds[0]["selected"])
    assert update["trained_on"] == 40 - len(audit) and len(audit) == 4  # fine-tuning never sees audit labels
    assert asvp.rounds[1]["gate"]["outcome"] == "adopted"  # ungated: whatever the gate would say
    assert asvp.rounds[1]["seconds"]["training"] > 0 and asvp.rounds[1]["seconds"]["extraction"] > 0
    assert [rec["evaluated_by"] for rec in standard.rounds] == ["ft", "ft", "ft"]
    assert all(rec["seconds"]["training"] > 0 for rec in standard.rounds)
    results = build_results(sim, runs, "test")
    assert results["runs"]["asvp-ungated"][0]["feature_updates"] == 1
    assert [d["decision"] for d in results["runs"]["asvp-ungated"][0]["decisions"]] == decisions
    report = write_report(tmp_path, results)["report"].read_text()
    assert "Alignment decisions" in report and "After the feature updates" in report


def test_proxy_batches_hold_the_audit_picks_and_rounds_record_the_audit_estimate(tmp_path: Path):
    from asvp_backend.selection.audit import AuditPolicy, audit_keys

    _, (svpp,) = simulate(tmp_path, methods=("svpp",))
    first = svpp.rounds[0]
    pool = np.setdiff1d(np.arange(300), first["added"])
    picks = pool[np.argsort(audit_keys(pool, 0), kind="stable")][:4]  # 20% of the first 20 labels
    # placed as the backend's queue places them: one label in five, smallest keys first
    assert [first["selected"][i] for i in (4, 9, 14, 19)] == picks.tolist() and svpp.audit[:4] == picks.tolist()
    assert len(svpp.audit) == AuditPolicy().owed(40) == 8
    assert svpp.rounds[0]["audit"] is None and svpp.rounds[1]["audit"]["n"] == 4
    _, (plain,) = simulate(tmp_path / "off", methods=("svpp",), audit_fraction=0.0)
    assert plain.audit == [] and plain.rounds[1]["audit"] is None


def test_gated_asvp_holds_a_refresh_until_the_audit_can_judge_it(tmp_path: Path):
    forced = {"align_threshold": 1e9, "align_window": 1, "align_min_labels": 0, "align_min_new_labels": 0,
              "finetune_epochs": 1, "lp_epochs": 1}
    _, (held,) = simulate(tmp_path / "held", methods=("asvp",), rounds=3, audit_min_labels=1_000, **forced)
    gate = held.rounds[1]["gate"]
    assert gate["decision"] == "wait" and gate["outcome"] == "waiting" and gate["n"] == 4
    assert held.generation == 0 and held.held == {"checkpoint": held.rounds[1]["update"]["checkpoint"]}
    assert "waiting for audit labels" in held.rounds[2]["update_skipped"]
    _, (judged,) = simulate(tmp_path / "judged", methods=("asvp",), audit_min_labels=4, **forced)
    gate = judged.rounds[1]["gate"]
    assert gate["decision"] in ("adopt", "reject") and gate["n"] == 4
    assert judged.generation == (1 if gate["decision"] == "adopt" else 0) and judged.held is None
    assert {"test_challenger", "test_incumbent", "challenger_accuracy", "incumbent_accuracy"} <= set(gate)


def test_finetune_evaluation_trains_the_policy_deliverable(tmp_path: Path):
    sim, runs = simulate(tmp_path, methods=("random",), rounds=1, eval="finetune", finetune_epochs=1, lp_epochs=1)
    assert [rec["evaluated_by"] for rec in runs[0].rounds] == ["lpft", "lpft"]  # generation 0: LP-FT
    (run,) = build_results(sim, runs, "test")["runs"]["random"]
    assert run["seconds"]["final_model"] > 0 and run["cpu_hours"] > 0  # the shipped model is charged


@pytest.mark.parametrize("audit_min_labels", [4, 60])
def test_with_training_method_audit_a_refreshed_deliverable_is_trained_both_ways_and_the_audit_chooses(tmp_path: Path,
                                                                                          audit_min_labels: int):
    _, (asvp,) = simulate(tmp_path, methods=("asvp-ungated",), eval="finetune", align_threshold=1e9,
                          align_window=1, align_min_labels=0, align_min_new_labels=0, finetune_epochs=1,
                          lp_epochs=1, audit_min_labels=audit_min_labels, training_method="audit")  # fmt: skip
    assert [rec["generation"] for rec in asvp.rounds] == [0, 0, 1] and asvp.generation == 1
    assert [rec["evaluated_by"] for rec in asvp.rounds[:2]] == ["lpft", "lpft"]
    assert "deliverables" not in asvp.rounds[1]  # generation 0: LP-FT alone
    lpft, ft = asvp.rounds[2]["deliverables"]
    assert (lpft["method"], ft["method"]) == ("lpft", "ft") and lpft["chosen"] != ft["chosen"]
    chosen = lpft if lpft["chosen"] else ft
    assert asvp.rounds[2]["evaluated_by"] == chosen["method"] and asvp.rounds[2]["accuracy"] == pytest.approx(
        chosen["test_accuracy"], abs=1e-4)
    if audit_min_labels == 4:  # 8 audit labels judge: one the proxy did not beat, then the more accurate on
        # them, FT on a tie, as the backend's finetune job ranks them
        assert lpft["audit_accuracy"] is not None and ft["audit_accuracy"] is not None
        assert {lpft["verdict"], ft["verdict"]} <= {"model", "proxy"}
        assert chosen is max((ft, lpft), key=lambda c: (c["verdict"] == "model", c["audit_accuracy"]))
    else:  # too few audit labels to judge: FT, the method after a refresh
        assert lpft["audit_accuracy"] is None and lpft["verdict"] is None and chosen is ft


def test_runs_that_pick_the_same_labels_share_their_deliverables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    trained: list[tuple[str, int]] = []
    train = Workspace.finetune

    def counting(self: Workspace, method: str, rows: np.ndarray, seed: int) -> Any:
        trained.append((method, len(rows)))
        return train(self, method, rows, seed)

    monkeypatch.setattr(Workspace, "finetune", counting)
    _, runs = simulate(tmp_path, methods=("svpp", "asvp"), rounds=1, eval="finetune", finetune_epochs=1, lp_epochs=1)
    svpp, asvp = sorted(runs, key=lambda run: run.method != "svpp")
    assert asvp.updates == 0 and [r["added"] for r in asvp.rounds] == [r["added"] for r in svpp.rounds]
    # one run's two rounds (the second without its 4 audit labels); the other run read them back
    assert trained == [("lpft", 20), ("lpft", 36)]
    assert [(r["accuracy"], r["evaluated_by"]) for r in asvp.rounds] == [
        (r["accuracy"], r["evaluated_by"]) for r in svpp.rounds
    ]
    # a read-back round is charged what training cost (the bucket also holds the audit estimate, under a second)
    stored = sum(json.loads(f.read_text())["seconds"] for f in (tmp_path / "cache" / "deliverables").glob("*.json"))
    trained_seconds, read_back_seconds = (sum(r["seconds"]["evaluation"] for r in run.rounds) for run in (svpp, asvp))
    assert stored > 1 and stored <= read_back_seconds and abs(read_back_seconds - trained_seconds) < 1


def test_an_unreadable_deliverable_entry_is_trained_again(tmp_path: Path):
    cache, calls = DeliverableCache(tmp_path), []

    def train() -> dict[str, Any]:
        calls.append(1)
        return {"test_accuracy": 0.75, "audit_accuracy": 0.5}

    first, again = cache.get({"seed": 1}, train), cache.get({"seed": 1}, train)
    assert first["test_accuracy"] == again["test_accuracy"] == 0.75 and again["seconds"] == first["seconds"]
    assert len(calls) == 1
    (entry,) = (tmp_path / "deliverables").glob("*.json")
    entry.write_text('{"measured": ')  # cut short
    assert cache.get({"seed": 1}, train)["audit_accuracy"] == 0.5 and len(calls) == 2
    assert json.loads(entry.read_text())["measured"]["test_accuracy"] == 0.75


def test_update_decided_in_the_last_round_is_recorded_not_run(tmp_path: Path):
    _, (asvp,) = simulate(tmp_path, methods=("asvp",), rounds=1, align_threshold=1e9, align_window=1,
                          align_min_labels=0, align_min_new_labels=0)  # fmt: skip
    last = asvp.rounds[-1]
    assert last["decision"]["decision"] == "update" and "last round" in last["update_skipped"]
    assert asvp.generation == 0 and asvp.updates == 0 and not (tmp_path / "runs").exists()


def test_command_line_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main(["--dataset", "digits", "--subset", "200", "--test-subset", "100", "--methods", "random",
                 "--initial", "20", "--budget-per-round", "10", "--rounds", "1", "--seeds", "1", "--eval", "proxy",
                 "--backbone", "test_efficientnet", "--weights", "random", "--image-size", "32", "--device", "cpu",
                 "--targets", "0.2,0.3", "--label-price", "0.5", "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert "results.json" in capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["targets"] == [0.2, 0.3] and data["targets_rule"] == "given with --targets"
    assert data["runs"]["random"][0]["overall_cost"] == pytest.approx(30 * 0.5)
    assert "--targets 0.2,0.3" in data["command"]


def test_subcommand_wiring():
    import argparse

    from asvp_backend.evaluation.command import add_simulate_parser

    parser = argparse.ArgumentParser(prog="asvp-backend")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "--dataset", "digits", "--out", "x", "--methods", "random,asvp"])
    assert (args.command, args.methods, args.eval, args.align_min_labels) == ("simulate", ["random", "asvp"],
                                                                              "finetune", 500)  # fmt: skip


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--dataset", "nope:x", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown data set 'nope:x'" in capsys.readouterr().err
    assert main(["--dataset", f"folder:{tmp_path / 'missing'}", "--out", str(tmp_path / "o")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method"):
        SimulationConfig(dataset="digits", methods=("random", "bogus"))
    with pytest.raises(ValueError, match="softmax"):
        SimulationConfig(dataset="digits", methods=("standard",), strategy="coreset")


# ---------------------------------------------------------------------------------------------- data sets


def write_images(root: Path, per_class: int = 3) -> None:
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((6, 6), 40 * k + i, np.uint8)).save(root / name / f"{i}.png")  # grey


def test_folder_dataset(tmp_path: Path):
    write_images(tmp_path / "imgs", per_class=5)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert ds.classes == ("cat", "dog") and ds.test_split == SEEDED_SPLIT
    assert (len(ds.train), len(ds.test)) == (8, 2)
    assert sorted(ds.test.labels.tolist()) == [0, 1]  # stratified
    img = ds.train.image(0)
    assert img.mode == "RGB" and img.size == (6, 6)
    (tmp_path / "imgs" / "dog" / "4.png").write_bytes(b"garbage")
    broken = load_dataset(f"folder:{tmp_path / 'imgs'}")
    rows = [i for i in range(len(broken.train)) if broken.train.labels[i] == 1]
    with pytest.raises(ValueError, match=r"cannot read image .*4\.png"):
        for i in rows + list(range(len(broken.test))):
            broken.train.image(i) if i in rows else broken.test.image(i)


def test_a_truncated_image_is_skipped_with_its_reason_and_reported(tmp_path: Path):
    """Issue 17, finding 10: one truncated PNG in a folder data set aborted the whole simulate run."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(80 * k + rng.normal(100, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    whole = (root / "dog" / "3.png").read_bytes()
    (root / "dog" / "3.png").write_bytes(whole[: len(whole) // 2])  # cut inside the pixel data
    (root / "cat" / "9.png").write_bytes(b"<html>not an image</html>")
    out = tmp_path / "out"
    code = main(["--dataset", f"folder:{root}", "--methods", "random", "--initial", "4", "--budget-per-round", "2",
                 "--rounds", "1", "--seeds", "1", "--eval", "proxy", "--backbone", "test_efficientnet", "--weights",
                 "random", "--image-size", "32", "--device", "cpu", "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0
    data = json.loads((out / "results.json").read_text())["dataset"]
    reasons = {Path(entry["image"]).relative_to(root).as_posix(): entry["reason"] for entry in data["skipped"]}
    assert set(reasons) == {"dog/3.png", "cat/9.png"}
    assert "truncated" in reasons["dog/3.png"] and reasons["cat/9.png"] == "not a recognised image format"
    assert data["train"] + data["test"] == 18  # the 18 readable images, in one split or the other
    report = (out / "report.md").read_text()
    assert "2 unreadable image(s) skipped" in report and "dog/3.png" in report


def test_folder_with_own_split(tmp_path: Path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "test", per_class=1)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.test_split == "the data set's own" and (len(ds.train), len(ds.test)) == (6, 2)


def test_csv_dataset(tmp_path: Path):
    write_images(tmp_path / "imgs")
    rows = ["path,label,split"] + [f"imgs/{c}/{i}.png,{c},{'test' if i == 2 else 'train'}"
                                   for c in ("cat", "dog") for i in range(3)]  # fmt: skip
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(f"csv:{tmp_path / 'data.csv'}")
    assert (len(ds.train), len(ds.test), ds.test_split) == (4, 2, "the data set's own")
    (tmp_path / "bad.csv").write_text("path,label\nimgs/cat/0.png,cat\nimgs/cat/missing.png,cat\n")
    with pytest.raises(FileNotFoundError, match=r"bad\.csv:3: image file not found: .*missing\.png"):
        load_dataset(f"csv:{tmp_path / 'bad.csv'}")
    (tmp_path / "nohead.csv").write_text("file,class\nx.png,cat\n")
    with pytest.raises(ValueError, match="'path' and 'label'"):
        load_dataset(f"csv:{tmp_path / 'nohead.csv'}")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_folder(tmp_path: Path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = load_dataset(f"fashion-mnist:{tmp_path}", subset=20)
    assert ds.classes[0] == "T-shirt/top" and ds.test_split == "the data set's own"
    assert (len(ds.train), len(ds.test)) == (20, 10) and np.bincount(ds.train.labels).tolist() == [2] * 10
    assert ds.train.image(3).mode == "RGB"
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + (99).to_bytes(4, "big") + b"\x00")  # header says 99, holds 1
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: IDX header says"):
        load_dataset(f"fashion-mnist:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST files missing"):
        load_dataset(f"fashion-mnist:{tmp_path / 'empty'}")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")  # fmt: skip
def test_fashion_mnist_from_the_debian_package():
    ds = load_dataset("fashion-mnist", test_subset=100)
    assert (len(ds.train), len(ds.test)) == (60_000, 100)
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10


def test_stratified_sample_keeps_class_balance():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    rows = stratified_sample(labels, 10, seed=3)
    assert np.bincount(labels[rows]).tolist() == [5, 3, 2]
    assert stratified_sample(labels, 10, seed=3).tolist() == rows.tolist()
    assert len(stratified_sample(labels, 7, seed=0)) == 7
    assert len(stratified_sample(labels, 500, seed=0)) == 100


def test_mnist_5k_csv(tmp_path: Path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    rows = np.concatenate([rng.integers(0, 256, (50, 784)), labels[:, None]], axis=1)
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as fh:
        np.savetxt(fh, rows, fmt="%d", delimiter=",")
    data = load_dataset(f"mnist-5k:{path}")
    assert data.classes == tuple(str(c) for c in range(10)) and len(data.train) + len(data.test) == 50
    assert data.test_split == SEEDED_SPLIT and data.train.image(0).size == (28, 28)
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("1,2,3\n")
    with pytest.raises(ValueError, match="784 pixels"):
        load_dataset(f"mnist-5k:{bad}")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(f"mnist-5k:{tmp_path / 'missing.csv.gz'}")


def test_random_initial_labels_can_start_the_audit(tmp_path: Path):
    _, (svpp,) = simulate(tmp_path, methods=("svpp",), audit_existing="random")
    first = svpp.rounds[0]
    assert set(first["added"]) <= set(svpp.audit)  # the random initial labels are audit labels
    assert svpp.rounds[0]["audit"]["n"] == len(first["added"])  # and judge the first proxy
    with pytest.raises(ValueError, match="--audit-existing"):
        SimulationConfig(dataset="digits", audit_existing="some")
