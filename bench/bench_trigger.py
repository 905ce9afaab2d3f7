"""How often the alignment trigger fires on noise: LogME-PED of a growing labelled set on generation 0 (the
pre-trained features, no update), under random selection, replayed through two rules:

- *pairwise* (the rule before the trend): fire when LogME-PED gains less than the threshold between two
  consecutive rounds;
- *trend* (AlignmentPolicy, the rule now): fire when the least-squares slope over the last ALIGN_WINDOW labels
  is below the threshold (alignment/policy.py `trend`).

Under random selection the labelled set is a growing i.i.d. sample: a fire there says nothing about the
features, so every fire counts as a false one. The label minimums and the update cap are left out (they
hide how often the statistic itself fires). The scores come from `labelled_set_scores`, the round job's own.

    python bench/bench_trigger.py                                   # Fashion-MNIST, 5k pool, 64 px, 3 seeds
    python bench/bench_trigger.py --dataset mnist-5k --out /tmp/trigger-mnist

Writes the table to stdout (bench/results/trigger_cpu.md holds a run) and the scores as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvp_backend.alignment.policy import trend  # noqa: E402
from asvp_backend.alignment.transferability import labelled_set_scores  # noqa: E402
from asvp_backend.evaluation.datasets import load_dataset  # noqa: E402
from asvp_backend.evaluation.simulate import SimulationConfig, Workspace  # noqa: E402


def scores_under_random(x: np.ndarray, labels: np.ndarray, seed: int, start: int, stop: int,
                        step: int) -> list[tuple[int, float]]:
    """(labels, LogME-PED) of a random labelled set grown from `start` to `stop` by `step`."""
    order = np.random.default_rng(seed).permutation(len(labels))
    history = []
    for labelled in range(start, stop + 1, step):
        rows = np.sort(order[:labelled])
        pool = np.sort(order[labelled:])
        _, ped = labelled_set_scores(x[rows], labels[rows], x[pool], seed)
        assert ped is not None
        history.append((labelled, ped))
    return history


def pairwise_fires(history: list[tuple[int, float]], threshold: float) -> tuple[int, int]:
    gains = [b - a for (_, a), (_, b) in zip(history, history[1:], strict=False)]
    return sum(g < threshold for g in gains), len(gains)


def trend_fires(history: list[tuple[int, float]], threshold: float, window: int) -> tuple[int, int]:
    fitted = [trend(history[: i + 1], window) for i in range(len(history))]
    judged = [t for t in fitted if t is not None]
    return sum(t.per_100 < threshold for t in judged), len(judged)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--subset", type=int, default=5000, help="train pool size (default 5000)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--start", type=int, default=100)
    p.add_argument("--stop", type=int, default=400)
    p.add_argument("--step", type=int, default=10, help="labels between rounds (RETRAIN_EVERY)")
    p.add_argument("--threshold", type=float, default=0.0, help="ALIGN_THRESHOLD")
    p.add_argument("--windows", type=int, nargs="+", default=[50, 100, 150], help="ALIGN_WINDOW values to replay")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-trigger"), help="feature cache and scores")
    args = p.parse_args()

    config = SimulationConfig(dataset=args.dataset, methods=("random",), subset=args.subset, test_subset=100,
                              image_size=args.image_size, device="cpu", eval="proxy")
    dataset = load_dataset(args.dataset, subset=args.subset, test_subset=100, seed=config.data_seed)
    ws = Workspace(config, dataset, args.out)
    x = np.asarray(ws.features(None, "train").vectors)
    labels = np.asarray(dataset.classes, dtype=object)[dataset.train.labels]
    started = time.perf_counter()
    runs = {seed: scores_under_random(x, labels, seed, args.start, args.stop, args.step) for seed in range(args.seeds)}
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(json.dumps({str(s): h for s, h in runs.items()}))

    print(f"# Alignment trigger on noise: {args.dataset} ({args.subset} pool), Lite0 {args.image_size} px, "
          f"random selection, {args.start}..{args.stop} labels every {args.step}, ALIGN_THRESHOLD={args.threshold:g}\n")
    print(f"{len(runs)} seeds; LogME-PED of {sum(len(h) for h in runs.values())} labelled sets in {seconds:.0f} s\n")
    header = ["rule", *[f"seed {s}" for s in runs], "all"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rules = [("pairwise (before)", lambda h: pairwise_fires(h, args.threshold))]
    rules += [(f"trend, ALIGN_WINDOW={w}", lambda h, w=w: trend_fires(h, args.threshold, w)) for w in args.windows]
    for name, rule in rules:
        counts = [rule(h) for h in runs.values()]
        fired, judged = sum(c[0] for c in counts), sum(c[1] for c in counts)
        cells = [f"{f} of {n}" for f, n in counts] + [f"{fired} of {judged} ({fired / max(1, judged):.0%})"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    slopes = [trend(h, args.stop - args.start).per_100 for h in runs.values()]  # type: ignore[union-attr]
    print(f"\nLogME-PED trend per 100 labels over the whole range: {', '.join(f'{s:+.4f}' for s in slopes)}")
    gains = np.array([b - a for h in runs.values() for (_, a), (_, b) in zip(h, h[1:], strict=False)])
    print(f"consecutive gains: mean {gains.mean():+.5f}, sd {gains.std(ddof=1):.5f}")


if __name__ == "__main__":
    main()
