"""BatchNorm's statistics in fine-tuning: re-estimated from the augmented crops, or the pre-trained ones kept.

Retrains one round's deliverable of a `simulate --eval finetune` run (the same labelled rows, recipe and seed as
the run used) with only the BatchNorm rule changed, and measures it on the test split:

- *re-estimated*: the FT stage puts BatchNorm in train mode, so its running statistics become averages over the
  augmented crops of the labelled images;
- *kept*: BatchNorm normalises with the pre-trained statistics throughout.

The script forces the rule (``FinetuneRecipe.trains_batchnorm``) on either method; the backend's own rule is
LP-FT: kept, FT: re-estimated from batch 32 (docs/decisions.md, *BatchNorm's statistics in fine-tuning*).

    python bench/bench_batchnorm.py --out bench/results/gate_mnist_350_finetune_cpu --run svpp-seed0 --round 2

--out is a simulate OUT (its config.json and progress/); the round's rows are the run's initial set plus the
picks of the rounds before it. Prints one line per (method, rule); bench/results/batchnorm_cpu.md holds a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULES = ("re-estimated", "kept")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a simulate --eval finetune OUT folder")
    parser.add_argument("--run", required=True, help="a run of it, e.g. svpp-seed0")
    parser.add_argument("--round", type=int, required=True, help="the round whose labelled rows to train on")
    parser.add_argument("--methods", default="lpft,ft", help="comma-separated: lpft, ft")
    parser.add_argument("--rules", default="re-estimated,kept", help="comma-separated: re-estimated, kept")
    args = parser.parse_args(argv)

    from asvp_backend.alignment.finetune import FinetuneRecipe
    from asvp_backend.evaluation.datasets import load_dataset
    from asvp_backend.evaluation.simulate import _EVAL, SimulationConfig, Workspace, derive_seed

    config = SimulationConfig.from_dict(json.loads((args.out / "config.json").read_text())["config"])
    if config.eval != "finetune":
        parser.error(f"{args.out} is a --eval {config.eval} run; its rounds trained no deliverable")
    record = json.loads((args.out / "progress" / f"{args.run}.json").read_text())
    if not 0 <= args.round < len(record["rounds"]):
        parser.error(f"{args.run} has rounds 0..{len(record['rounds']) - 1}")
    dataset = load_dataset(config.dataset, config.subset, config.test_subset, config.data_seed, skip_unreadable=True)
    rows = np.concatenate([np.asarray(r["added"], np.int64) for r in record["rounds"][: args.round + 1]])
    seed = derive_seed(record["seed"], args.round, _EVAL)
    done = record["rounds"][args.round]
    print(f"{args.run} round {args.round}: {len(rows)} labels; the run recorded {done['accuracy']} "
          f"({done['evaluated_by']})", flush=True)  # fmt: skip
    workspace = Workspace(config, dataset, Path("/tmp/bench_batchnorm"), progress=False)
    test = dataset.test

    for method in args.methods.split(","):
        for rule in args.rules.split(","):
            if rule not in RULES:
                parser.error(f"unknown rule {rule!r}; choose from {RULES}")
            FinetuneRecipe.trains_batchnorm = property(lambda _recipe, r=rule: r == "re-estimated")  # type: ignore[method-assign]
            recipe = workspace.recipe(method, len(rows), seed)
            start = time.perf_counter()
            probs = workspace.classify(workspace.finetune(method, rows, seed), test, np.arange(len(test)), "test")
            accuracy = float(np.mean(probs.argmax(axis=1) == test.labels))
            print(f"{method:5s} {rule:13s} batch {recipe.batch_size:3d} epochs {recipe.epochs:3d} "
                  f"test accuracy {accuracy:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
