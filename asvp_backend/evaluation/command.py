"""The `simulate` subcommand: argparse wiring only (the loop is simulate.py, the outputs report.py).

``add_simulate_parser(subparsers)`` adds it to the CLI's subparsers; ``cmd_simulate(args)`` runs it and returns
an exit code; ``main(argv)`` runs it standalone (``python -m asvp_backend.evaluation.command ...``).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from asvp_backend.alignment.policy import TRAINING_METHODS, AlignmentPolicy

from .metrics import DEFAULT_CPU_PRICE, DEFAULT_GPU_PRICE, DEFAULT_LABEL_PRICE

DESCRIPTION = """\
Replay active learning offline with an oracle (the data set's labels), through the backend's own feature,
selection and alignment code, and report how many labels each method saves against random sampling and what
labels and GPU hours cost together. Killed runs continue from their finished rounds when the same command is
run again with the same --out.

methods: random (uniform picks), svpp (proxy on pre-trained features, never refreshed), asvp (proxy + the
LogME-PED trigger + the training-method policy + the refresh gate on the audit labels), asvp-ungated (asvp
whose refreshes always serve), standard (fine-tune every round, select with its softmax). The proxy methods'
batches hold the backend's audit sample (--audit-fraction 0 turns it off).

writes OUT/results.json, OUT/learning_curves.png, OUT/report.md (and OUT/cache, OUT/progress, OUT/runs)."""

EPILOG = """\
examples:
  asvp-backend simulate --dataset digits --methods random,svpp --eval proxy --rounds 3 --out /tmp/sim
  asvp-backend simulate --dataset fashion-mnist --subset 3000 --test-subset 1000 --image-size 64 \\
      --initial 50 --budget-per-round 50 --rounds 8 --seeds 2 --eval proxy --out runs/fmnist-cpu"""


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated accuracies, e.g. 0.80,0.84; got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"target accuracies must lie in [0, 1], got {text!r}")
    return values


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "auto") else int(text)


def add_simulate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``simulate`` to an ``add_subparsers()`` object; returns the new parser."""
    p = subparsers.add_parser("simulate", help="replay active learning offline: learning curves, sample saving "
                              "ratio, overall cost", description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_simulate_arguments(p)
    return p


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    policy = AlignmentPolicy()
    data = p.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="folder:ROOT (ROOT/<class>/<image>), csv:FILE (path,label "
                      "header; paths relative to the CSV), fashion-mnist[:DIR] (the four IDX .gz files; default "
                      "/usr/share/datasets/fashion-mnist), or digits (scikit-learn)")  # fmt: skip
    data.add_argument("--subset", type=int, default=None, help="seeded stratified subset of N train items (the pool)")
    data.add_argument("--test-subset", type=int, default=None, help="seeded stratified subset of N test items")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the subsets and of the 20%% test split "
                      "for data sets without their own (default 0)")  # fmt: skip

    loop = p.add_argument_group("active learning")
    loop.add_argument("--methods", type=_csv, default=["random", "svpp", "asvp", "standard"],
                      help="comma-separated methods (default random,svpp,asvp,standard)")  # fmt: skip
    loop.add_argument("--strategy", default="margin", help="acquisition strategy of the proxy methods and of "
                      "standard (default margin)")  # fmt: skip
    loop.add_argument("--proxy", default="mlp", help="proxy model on cached features: mlp or logistic (default mlp)")
    loop.add_argument("--initial", type=int, default=100, help="random initial labels, the same for every method "
                      "of a seed (default 100)")  # fmt: skip
    loop.add_argument("--budget-per-round", type=int, default=100, help="labels added per round (default 100)")
    loop.add_argument("--rounds", type=int, default=10, help="rounds after the initial one (default 10)")
    loop.add_argument("--seeds", type=int, default=3, help="repeats with seeds 0..N-1 (default 3)")
    loop.add_argument("--out", required=True, help="output folder; rerun with the same one to continue")

    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name "
                       "(default tf_efficientnet_lite0: ImageNet weights install offline)")  # fmt: skip
    model.add_argument("--weights", default="auto", help="auto (offline package, then timm), random, or a "
                       "checkpoint path (default auto)")  # fmt: skip
    model.add_argument("--image-size", type=int, default=None, help="square input size in pixels (default: the "
                       "backbone's, 224 for Lite0); small values make CPU runs feasible")  # fmt: skip
    model.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")
    model.add_argument("--eval", default="finetune", choices=("finetune", "proxy"), help="accuracy of the "
                       "deliverable: finetune trains FT/LP-FT on each round's labels (default), proxy measures "
                       "the proxy (cheap)")  # fmt: skip
    model.add_argument("--finetune-epochs", type=_optional_int, default=None, help="FT epochs of every fine-tune "
                       "(default: scaled to the labelled set, 5..50)")  # fmt: skip
    model.add_argument("--lp-epochs", type=_optional_int, default=None, help="LP epochs of LP-FT (default: the "
                       "recipe's 10)")  # fmt: skip

    align = p.add_argument_group("alignment (asvp; defaults are the backend's)")
    align.add_argument("--align-threshold", type=float, default=policy.threshold, help="fire a feature update when "
                       f"the LogME-PED trend per 100 labels is below this (default {policy.threshold:g})")  # fmt: skip
    align.add_argument("--align-window", type=int, default=policy.window, help="labels the LogME-PED trend "
                       f"spans (default {policy.window})")  # fmt: skip
    align.add_argument("--align-min-labels", type=int, default=policy.min_labels,
                       help=f"no update below this many labels (default {policy.min_labels})")  # fmt: skip
    align.add_argument("--align-min-new-labels", type=int, default=policy.min_new_labels,
                       help=f"labels needed since the last update (default {policy.min_new_labels})")  # fmt: skip
    align.add_argument("--align-max-updates", type=int, default=policy.max_updates,
                       help=f"at most this many feature updates (default {policy.max_updates})")  # fmt: skip
    align.add_argument("--training-method", default=policy.training_method, choices=TRAINING_METHODS,
                       help="auto: LP-FT before the first update, FT after (default auto); audit: after an "
                            "update train both and let the audit labels choose")  # fmt: skip

    from asvp_backend.alignment.gate import Gate
    from asvp_backend.selection.audit import AuditPolicy

    audit = p.add_argument_group("audit sample and refresh gate (svpp, asvp; defaults are the backend's)")
    audit.add_argument("--audit-fraction", type=float, default=AuditPolicy.fraction,
                       help=f"share of labels drawn at random to judge models (default {AuditPolicy.fraction:g})")
    audit.add_argument("--audit-early-fraction", type=float, default=AuditPolicy.early_fraction,
                       help="the share until there are --audit-min-labels audit labels "
                            f"(default {AuditPolicy.early_fraction:g})")  # fmt: skip
    audit.add_argument("--audit-min-labels", type=int, default=AuditPolicy.min_labels,
                       help=f"audit labels the gate needs to judge (default {AuditPolicy.min_labels})")
    audit.add_argument("--audit-existing", choices=("ignore", "random"), default="ignore",
                       help="random: the random initial labels start the audit sample, as AUDIT_EXISTING=random "
                            "does for labels given before a project's first round (default ignore)")
    audit.add_argument("--gate-z", type=float, default=Gate.z, help="standard errors of the paired difference a "
                       f"refresh must gain on the audit labels (default {Gate.z:g})")  # fmt: skip

    report = p.add_argument_group("report")
    report.add_argument("--targets", type=_floats, default=None, help="target accuracies of the sample saving "
                        "ratio, e.g. 0.80,0.84 (default: random's mean final accuracy and the half-way point "
                        "from its first to its final accuracy)")  # fmt: skip
    report.add_argument("--label-price", type=float, default=DEFAULT_LABEL_PRICE,
                        help=f"dollars per label (default {DEFAULT_LABEL_PRICE:g}, an assumption)")  # fmt: skip
    report.add_argument("--gpu-price", type=float, default=DEFAULT_GPU_PRICE,
                        help=f"dollars per GPU hour (default {DEFAULT_GPU_PRICE:g})")  # fmt: skip
    report.add_argument("--cpu-price", type=float, default=DEFAULT_CPU_PRICE,
                        help=f"dollars per CPU-hour (default {DEFAULT_CPU_PRICE:g}, an assumption)")  # fmt: skip
    report.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> Any:
    from .simulate import SimulationConfig

    return SimulationConfig(
        dataset=args.dataset, methods=tuple(args.methods), strategy=args.strategy, proxy=args.proxy,
        initial=args.initial, budget_per_round=args.budget_per_round, rounds=args.rounds, seeds=args.seeds,
        backbone=args.backbone, weights=args.weights, image_size=args.image_size, device=args.device,
        eval=args.eval, finetune_epochs=args.finetune_epochs, lp_epochs=args.lp_epochs, subset=args.subset,
        test_subset=args.test_subset, data_seed=args.data_seed, align_threshold=args.align_threshold,
        align_window=args.align_window,
        align_min_labels=args.align_min_labels, align_min_new_labels=args.align_min_new_labels,
        align_max_updates=args.align_max_updates, training_method=args.training_method,
        audit_fraction=args.audit_fraction, audit_early_fraction=args.audit_early_fraction,
        audit_min_labels=args.audit_min_labels, audit_existing=args.audit_existing, gate_z=args.gate_z,
    )  # fmt: skip


def cmd_simulate(args: argparse.Namespace, command: str | None = None) -> int:
    """Run (or continue) the simulation, write the report; 0 on success, 1 when stopped early, 2 on bad input."""
    from .report import build_results, write_report
    from .simulate import Simulation

    command = command or "asvp-backend " + shlex.join(sys.argv[1:])
    try:
        config = config_from_args(args)
        sim = Simulation(config, args.out, progress=not args.no_progress)
        runs = sim.run()
    except (ValueError, FileNotFoundError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    results = build_results(sim, runs, command, args.targets, args.label_price, args.gpu_price, args.cpu_price)
    paths = write_report(args.out, results)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0 if results["complete"] else 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m asvp_backend.evaluation.command --dataset digits ...``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="asvp-backend simulate", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_simulate_arguments(parser)
    args = parser.parse_args(argv)
    return cmd_simulate(args, command="asvp-backend simulate " + shlex.join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
