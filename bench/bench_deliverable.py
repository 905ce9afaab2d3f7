"""The deliverable of chosen rounds of a `simulate` run, as `--eval finetune` trains it, without the other rounds.

`simulate --eval finetune` trains a deliverable every round; on a CPU that is most of an hour per seed. Selection
does not depend on the deliverable (the proxy methods select with the proxy), so a `--eval proxy` run picks the
same labels, and this script trains only the rounds asked for, through the simulator's own step (the policy's
methods on the labels but the audit ones, `deliverable_rank` on the audit labels, the same seeds and deliverable
cache under OUT/cache). For each round it prints every candidate's test and audit accuracy and which one the
backend would deliver.

    python bench/bench_deliverable.py --out bench/results/gate_fmnist_350_cpu --rounds 9 --training-method audit

Writes OUT/deliverables.json (one row per run, round, TRAINING_METHOD and candidate; rows of other runs, rounds and
training methods already there are kept, and rerunning reads trained rounds back from the cache) and prints a table
of the delivered model per method, training method and round (mean over seeds). `--pool ft,lpft` instead trains
those methods again and measures each on the round's unlabelled pool as well (OUT/pool.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def serving_at_evaluation(rounds: list[dict[str, Any]], round_no: int) -> tuple[int, str | None]:
    """The feature generation and backbone checkpoint that served when round ``round_no``'s deliverable was
    trained: every refresh adopted in an earlier round, and one adopted at the start of this round (a refresh that
    waited for audit labels); a refresh fired in the round itself is judged after the evaluation, and then the
    round also records its `update`."""
    generation, checkpoint = 0, None
    for number, record in enumerate(rounds[: round_no + 1]):
        gate = record.get("gate") or {}
        if gate.get("outcome") == "adopted" and (number < round_no or "update" not in record):
            generation, checkpoint = generation + 1, gate.get("checkpoint")
    return generation, checkpoint


def merged(path: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows already in ``path`` that ``new`` does not measure again, and ``new``, in a stable order. Rows
    written before the file named their TRAINING_METHOD were all measured with ``audit``."""
    old = json.loads(path.read_text()) if path.is_file() else []
    measured = {(r["run"], r["round"], r["training_method"]) for r in new}
    kept = [{**r, "training_method": r.get("training_method", "audit")} for r in old]
    kept = [r for r in kept if (r["run"], r["round"], r["training_method"]) not in measured]
    return sorted(kept + new, key=lambda r: (r["method"], r["training_method"], r["seed"], r["round"],
                                             r["trained_with"]))


def on_the_pool(workspace: Any, run: Any, round_no: int, rows: np.ndarray, methods: list[str]) -> dict[str, Any]:
    """Each method's deliverable of the round trained again (the rows, recipe and seed `_evaluate` uses) and
    measured on the test split and on the round's unlabelled pool: the images its pre-annotations would be shown
    on, which the audit labels sample and the test split does not (margin sampling empties the pool of hard ones)."""
    from asvp_backend.evaluation.simulate import _EVAL, derive_seed

    audit = np.intersect1d(np.asarray(run.audit, np.int64), rows)
    trained = rows[~np.isin(rows, audit)]
    train, test = workspace.dataset.train, workspace.dataset.test
    pool = np.setdiff1d(np.arange(len(train)), rows)
    measured: dict[str, Any] = {"pool": len(pool)}
    for method in methods:
        result = workspace.finetune(method, trained, derive_seed(run.seed, round_no, _EVAL))
        on_test = workspace.classify(result, test, np.arange(len(test)), f"test {method}").argmax(axis=1)
        on_pool = workspace.classify(result, train, pool, f"pool {method}").argmax(axis=1)
        on_audit = workspace.classify(result, train, audit, f"audit {method}").argmax(axis=1)
        measured[method] = {"test_accuracy": float(np.mean(on_test == test.labels)),
                            "pool_accuracy": float(np.mean(on_pool == train.labels[pool])),
                            "audit_accuracy": float(np.mean(on_audit == train.labels[audit]))}
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a simulate OUT folder (config.json, progress/)")
    parser.add_argument("--rounds", required=True, help="comma-separated round numbers, e.g. 8,9")
    parser.add_argument("--methods", default="svpp,asvp", help="comma-separated simulate methods to retrain")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: every seed in progress/)")
    parser.add_argument("--training-method", default=None, help="TRAINING_METHOD for the deliverable (default: the "
                        "run's); audit trains LP-FT and FT after a refresh and shows both")
    parser.add_argument("--pool", default=None, help="comma-separated methods (e.g. ft,lpft): train each again and "
                        "measure it on the round's unlabelled pool too; writes OUT/pool.json (one more fine-tune each)")
    args = parser.parse_args(argv)

    from asvp_backend.evaluation.datasets import load_dataset
    from asvp_backend.evaluation.simulate import METHODS, Laps, RunState, SimulationConfig, Workspace

    config = SimulationConfig.from_dict(json.loads((args.out / "config.json").read_text())["config"])
    training_method = args.training_method or config.training_method
    config = dataclasses.replace(config, eval="finetune", training_method=training_method)
    dataset = load_dataset(config.dataset, config.subset, config.test_subset, config.data_seed, skip_unreadable=True)
    workspace = Workspace(config, dataset, args.out, progress=False)
    rounds = [int(r) for r in args.rounds.split(",")]
    seeds = None if args.seeds is None else {int(s) for s in args.seeds.split(",")}
    rows_out: list[dict[str, Any]] = []
    pool_rows: list[dict[str, Any]] = []
    for method_name in args.methods.split(","):
        for path in sorted((args.out / "progress").glob(f"{method_name}-seed*.json")):
            saved = json.loads(path.read_text())
            if seeds is not None and int(saved["seed"]) not in seeds:
                continue
            method = METHODS[method_name](workspace)
            for round_no in rounds:
                if round_no >= len(saved["rounds"]):
                    parser.error(f"{path.stem} has rounds 0..{len(saved['rounds']) - 1}")
                run = RunState.from_dict(saved)
                run.generation, run.checkpoint = serving_at_evaluation(saved["rounds"], round_no)
                rows = np.concatenate([np.asarray(r["added"], np.int64) for r in saved["rounds"][: round_no + 1]])
                if args.pool:
                    measured = on_the_pool(workspace, run, round_no, rows, args.pool.split(","))
                    pool_rows.append({"run": path.stem, "round": round_no, "labels": len(rows), **measured})
                    print(f"{path.stem} round {round_no}: {json.dumps(measured)}", flush=True)
                    continue
                extra: dict[str, Any] = {}
                accuracy, by = method._evaluate(run, round_no, rows, None, Laps(), extra=extra)
                candidates = extra.get("deliverables") or [{"method": by, "test_accuracy": accuracy,
                                                            "audit_accuracy": None, "chosen": True}]
                for c in candidates:
                    rows_out.append({"run": path.stem, "method": method_name, "seed": saved["seed"],
                                     "training_method": training_method, "round": round_no, "labels": len(rows),
                                     "generation": run.generation,
                                     "audit": len(np.intersect1d(np.asarray(run.audit, np.int64), rows)),
                                     "trained_with": c["method"], "test_accuracy": c["test_accuracy"],
                                     "audit_accuracy": c["audit_accuracy"], "chosen": c["chosen"]})
                shown = ", ".join(f"{c['method']} {c['test_accuracy']:.3f} (audit {c['audit_accuracy']})"
                                  f"{' *' if c['chosen'] else ''}" for c in candidates)
                print(f"{path.stem} round {round_no} ({len(rows)} labels, generation {run.generation}): {shown}",
                      flush=True)
    if args.pool:
        path = args.out / "pool.json"
        old = [r for r in (json.loads(path.read_text()) if path.is_file() else [])
               if (r["run"], r["round"]) not in {(n["run"], n["round"]) for n in pool_rows}]
        path.write_text(json.dumps(old + pool_rows, indent=1))
        return 0
    rows_out = merged(args.out / "deliverables.json", rows_out)
    (args.out / "deliverables.json").write_text(json.dumps(rows_out, indent=1))
    columns: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows_out:
        cells = columns[(row["method"], row["training_method"], row["labels"])]
        cells[row["trained_with"]].append(row["test_accuracy"])
        if row["chosen"]:
            cells["delivered"].append(row["test_accuracy"])
    print("\n| method | TRAINING_METHOD | labels | delivered | lpft | ft | seeds |\n|---|---|---|---|---|---|---|")
    for (name, training, labels), cells in sorted(columns.items()):
        mean = {k: f"{np.mean(v):.3f}" if v else "" for k, v in cells.items()}
        print(f"| {name} | {training} | {labels} | {mean['delivered']} | {mean.get('lpft', '')} | "
              f"{mean.get('ft', '')} | {len(cells['delivered'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
