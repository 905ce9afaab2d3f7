"""`simulate`'s outputs: ``results.json`` (everything), ``learning_curves.png`` and ``report.md`` (the table a
person reads).

Targets of the sample saving ratio (when ``--targets`` is not given) come from random sampling's mean curve,
so that the reference always reaches them: (1) random's mean final accuracy, i.e. "how many labels does a
method need to match what random reached with the whole budget" (the worked ratio in docs/method.md, *Measuring
the savings*), and (2) random's mean accuracy at the middle of its label range, "... with half the budget".
Both lie where the methods have already diverged; an accuracy just above the initial set's would be crossed by
every method in the first round and measure only noise. Ratios are read off the seed-averaged curves; the
per-seed ratios (same target, each seed's method against the same seed's random run) give the spread, and a
seed that never reached a target is counted, not averaged.

Cost: GPU hours are device seconds on CUDA only (on a CPU run they are 0 and the CPU hours are shown beside
them), summed over selection, training and extraction plus, with ``--eval finetune``, the final round's
deliverable training (every method ships one model; ``standard``'s is the one it already trained). LogME/PED
run on the CPU and count as CPU hours. Evaluating the earlier rounds' deliverables only draws the curve and
is not charged.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from asvp_backend.fsutil import atomic_write_bytes

from .metrics import (
    DEFAULT_CPU_PRICE,
    DEFAULT_GPU_PRICE,
    DEFAULT_LABEL_PRICE,
    labels_to_reach,
    mean_and_spread,
    mean_curve,
    overall_cost,
    sample_saving_ratio,
)
from .simulate import BUCKETS, RunState, Simulation

RESULTS_FORMAT = "asvp-simulate-results"
REFERENCE = "random"
_CHARGED = ("selection", "training", "extraction")


def code_version() -> str:
    """``asvp_backend.__version__`` plus the git commit (and ``-dirty``) when run from a checkout."""
    from asvp_backend import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} (git {commit}{'-dirty' if dirty else ''})"


def machine() -> dict[str, Any]:
    import os

    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)),
                            "torch_threads": torch.get_num_threads(),
                            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------- results


def run_summary(run: RunState, eval_mode: str, label_price: float, gpu_price: float,
                cpu_price: float = 0.0) -> dict[str, Any]:
    """One (method, seed): its curve, seconds per bucket, GPU/CPU hours, cost and alignment decisions."""
    seconds = {b: sum(r["seconds"].get(b, 0.0) for r in run.rounds) for b in BUCKETS}
    last = run.rounds[-1] if run.rounds else None
    final_model = 0.0
    if last is not None and eval_mode == "finetune" and run.method != "standard":
        final_model = float(last["seconds"].get("evaluation", 0.0))
    charged = sum(seconds[b] for b in _CHARGED) + final_model
    on_gpu = run.device == "cuda"
    gpu_hours = charged / 3600 if on_gpu else 0.0
    cpu_hours = (seconds["alignment"] + (0.0 if on_gpu else charged)) / 3600
    labels = last["labels"] if last else 0
    return {
        "method": run.method,
        "seed": run.seed,
        "device": run.device,
        "rounds": len(run.rounds),
        "curve": [[r["labels"], r["accuracy"]] for r in run.rounds],
        "evaluated_by": [r["evaluated_by"] for r in run.rounds],
        "labels": labels,
        "final_accuracy": last["accuracy"] if last else None,
        "seconds": {**{b: round(v, 3) for b, v in seconds.items()}, "final_model": round(final_model, 3)},
        "gpu_hours": gpu_hours,
        "cpu_hours": cpu_hours,
        "overall_cost": overall_cost(labels, gpu_hours, label_price, gpu_price, cpu_hours, cpu_price),
        "feature_updates": run.updates,
        "decisions": [
            {"round": r["round"], **r["decision"], "skipped": r.get("update_skipped")}
            for r in run.rounds
            if "decision" in r
        ],
        "updates": [{"round": r["round"], **r["update"]} for r in run.rounds if "update" in r],
        "gates": [{"round": r["round"], **r["gate"]} for r in run.rounds if r.get("gate")],
        "audit": [{"round": r["round"], "labels": r["labels"], "test": r["accuracy"], **r["audit"]}
                  for r in run.rounds if r.get("audit") and r["evaluated_by"] == "proxy"],
        "selections": [{"round": r["round"], "added": r["added"]} for r in run.rounds],
    }


def default_targets(reference_curve: list[tuple[float, float]]) -> list[float]:
    """Random's mean accuracy with the whole budget and with half of it (interpolated at the middle label count)."""
    if not reference_curve:
        return []
    labels = [n for n, _ in reference_curve]
    half = float(np.interp((labels[0] + labels[-1]) / 2, labels, [a for _, a in reference_curve]))
    return [reference_curve[-1][1], half]


def _spread(values: list[float | None]) -> dict[str, Any]:
    return mean_and_spread(values).to_dict()


def build_results(
    sim: Simulation,
    runs: list[RunState],
    command: str,
    targets: list[float] | None = None,
    label_price: float = DEFAULT_LABEL_PRICE,
    gpu_price: float = DEFAULT_GPU_PRICE,
    cpu_price: float = DEFAULT_CPU_PRICE,
) -> dict[str, Any]:
    """The whole record: configuration, code version, per-run results and the per-method summary."""
    cfg = sim.config
    assert sim.dataset is not None
    per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    for run in runs:
        if run.rounds:
            per_method[run.method].append(run_summary(run, cfg.eval, label_price, gpu_price, cpu_price))
    curves = {m: mean_curve([r["curve"] for r in rs]) for m, rs in per_method.items() if rs}
    reference = curves.get(REFERENCE)
    rule = "given with --targets"
    if targets is None:
        targets = default_targets(reference or [])
        rule = ("random's mean accuracy at its final label count, and at the middle of its label range"
                if reference else "none: no random run to derive them from")  # fmt: skip
    ref_by_seed = {r["seed"]: r["curve"] for r in per_method.get(REFERENCE, [])}
    summary: dict[str, Any] = {}
    for method, rs in per_method.items():
        if not rs:
            continue
        ssr = []
        for target in targets:
            per_seed = [sample_saving_ratio(ref_by_seed[r["seed"]], r["curve"], target)
                        if r["seed"] in ref_by_seed else None for r in rs]  # fmt: skip
            ssr.append({
                "target": target,
                "labels_to_reach": labels_to_reach(curves[method], target),
                "mean_curves": sample_saving_ratio(reference, curves[method], target) if reference else None,
                "per_seed": _spread(per_seed),
            })  # fmt: skip
        summary[method] = {
            "seeds": len(rs),
            "labels": _spread([r["labels"] for r in rs]),
            "final_accuracy": _spread([r["final_accuracy"] for r in rs]),
            "mean_curve": [[n, a] for n, a in curves[method]],
            "curve_std": _curve_std([r["curve"] for r in rs]),
            "ssr": ssr,
            "gpu_hours": _spread([r["gpu_hours"] for r in rs]),
            "cpu_hours": _spread([r["cpu_hours"] for r in rs]),
            "overall_cost": _spread([r["overall_cost"] for r in rs]),
            "feature_updates": _spread([r["feature_updates"] for r in rs]),
            "seconds": {k: float(np.mean([r["seconds"][k] for r in rs])) for k in rs[0]["seconds"]},
        }
    return {
        "format": RESULTS_FORMAT,
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": code_version(),
        "command": command,
        "machine": machine(),
        "complete": not sim.stopped and all(len(r.rounds) == cfg.rounds + 1 or _exhausted(r) for r in runs),
        "config": cfg.to_dict(),
        "dataset": sim.dataset.describe(),
        "reference": REFERENCE,
        "targets": targets,
        "targets_rule": rule,
        "label_price": label_price,
        "gpu_price": gpu_price,
        "cpu_price": cpu_price,
        "runs": per_method,
        "summary": summary,
    }


def _exhausted(run: RunState) -> bool:
    return bool(run.rounds) and bool(run.rounds[-1].get("exhausted"))


def _curve_std(curves: list[list[list[float]]]) -> list[list[float]]:
    by: dict[float, list[float]] = {}
    for curve in curves:
        for n, a in curve:
            by.setdefault(float(n), []).append(float(a))
    return [[n, float(np.std(v, ddof=1)) if len(v) > 1 else 0.0] for n, v in sorted(by.items())]


# ------------------------------------------------------------------------------------------------ outputs


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    """Accuracy vs labels: the seed mean per method, shaded mean ± std; the targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, s in results["summary"].items():
        xs = np.array([p[0] for p in s["mean_curve"]], dtype=float)
        ys = np.array([p[1] for p in s["mean_curve"]], dtype=float)
        sd = np.array([p[1] for p in s["curve_std"]], dtype=float)
        note = ", its fine-tuned model" if method == "standard" and results["config"]["eval"] == "proxy" else ""
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"{method} ({s['seeds']} seeds{note})")
        ax.fill_between(xs, ys - sd, ys + sd, color=line.get_color(), alpha=0.2, linewidth=0)
    for target in results["targets"]:
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    cfg = results["config"]
    ax.set_xlabel("labels")
    ax.set_ylabel(f"test accuracy ({'proxy' if cfg['eval'] == 'proxy' else 'fine-tuned deliverable'})")
    ax.set_title(f"{results['dataset']['name']}: {cfg['backbone']}, {cfg['strategy']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def _fmt(spread: dict[str, Any], digits: int = 4, pct: bool = False) -> str:
    if spread["mean"] is None:
        return f"never reached (0/{spread['total']})" if spread["total"] else "-"
    scale = 100.0 if pct else 1.0
    text = f"{spread['mean'] * scale:.{digits}f}"
    if spread["total"] > 1:
        text += f" ± {spread['std'] * scale:.{digits}f}"
    if spread["n"] < spread["total"]:
        text += f" ({spread['count']}/{spread['total']} seeds)"
    return text


def _ssr_cell(entry: dict[str, Any]) -> str:
    head = "never reached" if entry["mean_curves"] is None else f"{entry['mean_curves']:+.3f}"
    per_seed = entry["per_seed"]
    if per_seed["mean"] is None:
        return f"{head} [per seed: undefined for {per_seed['total']}/{per_seed['total']}]"
    return f"{head} [{per_seed['mean']:+.3f} ± {per_seed['std']:.3f}, {per_seed['n']}/{per_seed['total']}]"


def render_markdown(results: dict[str, Any]) -> str:
    cfg, data = results["config"], results["dataset"]
    targets = results["targets"]
    lines = [
        f"# simulate: {data['name']}",
        "",
        f"{data['train']} train (the pool) / {data['test']} test images, {len(data['classes'])} classes; "
        f"test split: **{data['test_split']}**. Backbone `{cfg['backbone']}` (weights `{cfg['weights']}`, input "
        f"{cfg['image_size'] or 'default'} px), proxy `{cfg['proxy']}`, strategy `{cfg['strategy']}`; "
        f"{cfg['initial']} random initial labels, +{cfg['budget_per_round']} per round, {cfg['rounds']} rounds, "
        f"{cfg['seeds']} seeds. Accuracy measured with `--eval {cfg['eval']}` "
        + ("(the proxy's test accuracy; `standard` has no proxy and shows its fine-tuned model)."
           if cfg["eval"] == "proxy" else "(FT or LP-FT per the training-method policy, trained on each round's labels)."),  # noqa: E501
        "",
    ]  # fmt: skip
    skipped = data.get("skipped") or []
    if skipped:
        lines += [f"**{len(skipped)} unreadable image(s) skipped** (in neither the pool nor the test split):", ""]
        lines += [f"- `{entry['image']}`: {entry['reason']}" for entry in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"- and {len(skipped) - 20} more (results.json lists them all)")
        lines.append("")
    if not results["complete"]:
        lines += ["**Incomplete**: some runs have not finished all rounds; rerun the same command to continue.", ""]
    head = ["method", "labels", "final accuracy"]
    head += [f"SSR @ {t:.4f}" for t in targets]
    head += ["GPU hours", "CPU hours", "overall cost ($)", "feature updates"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in results["summary"].items():
        row = [f"`{method}`", _fmt(s["labels"], 0), _fmt(s["final_accuracy"])]
        row += [_ssr_cell(e) for e in s["ssr"]]
        row += [_fmt(s["gpu_hours"], 4), _fmt(s["cpu_hours"], 4), _fmt(s["overall_cost"], 2),
                _fmt(s["feature_updates"], 1)]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Targets: {', '.join(f'{t:.4f}' for t in targets) or 'none'} ({results['targets_rule']}). "
        "SSR = (n_random - n_method) / n_random at the target, labels read off the seed-mean curves by linear "
        "interpolation at the first crossing; in brackets the per-seed ratios (mean ± std, seeds that reached the "
        "target / seeds). Positive = fewer labels than random.",
        f"Overall cost = labels x ${results['label_price']:g} + GPU hours x ${results['gpu_price']:g}/h + CPU hours "
        f"x ${results.get('cpu_price', 0.0):g}/h (GPU hours count device seconds on CUDA only; CPU hours are the "
        "wall hours of the work a CPU run did, and of LogME on any run).",
        "",
        "Mean seconds per run:",
        "",
        "| method | " + " | ".join(BUCKETS) + " | final model |",
        "|---|" + "---|" * (len(BUCKETS) + 1),
    ]
    for method, s in results["summary"].items():
        cells = [f"{s['seconds'][b]:.1f}" for b in BUCKETS] + [f"{s['seconds']['final_model']:.1f}"]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    lines += _decision_lines(results)
    lines += _update_effect_lines(results)
    lines += _gate_lines(results)
    lines += _audit_lines(results)
    lines += [
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {json.dumps(results['machine'])}. Code: {results['code_version']}. Created {results['created']}.",
        "",
    ]
    return "\n".join(lines)


def _decision_lines(results: dict[str, Any]) -> list[str]:
    runs = [r for rs in results["runs"].values() for r in rs if r["decisions"]]
    if not runs:
        return []
    lines = ["", "Alignment decisions (ASVP):", "", "| run | round | labels | generation | LogME-PED | gain | "
             "decision | reason |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        for d in r["decisions"]:
            ped = "-" if d["logme_ped"] is None else f"{d['logme_ped']:.4f}"
            gain = "-" if d["gain"] is None else f"{d['gain']:+.3g}"
            decision = f"{d['decision']} (not run: {d['skipped']})" if d.get("skipped") else d["decision"]
            lines.append(f"| {r['method']}-seed{r['seed']} | {d['round']} | {d['labelled']} | {d['generation']} | "
                         f"{ped} | {gain} | {decision} | {d['reason']} |")  # fmt: skip
    return lines


def _gate_lines(results: dict[str, Any]) -> list[str]:
    """Every verdict of the refresh gate, beside what the test split says of the same two proxies: a false
    adopt serves features the test split finds worse, a false reject keeps features it finds worse."""
    runs = [r for rs in results["runs"].values() for r in rs if r.get("gates")]
    if not runs:
        return []
    lines = ["", "Refresh gate (proxy on the refreshed features against the serving ones: on the audit labels, and on "
             "the test split, which the gate never sees):", "", "| run | round | labels | audit n | audit: new vs "
             "serving | test: new vs serving | verdict | outcome |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    wrong = {"false adopt": 0, "false reject": 0, "judged": 0}
    # asvp and asvp-ungated of a seed are the same run up to the first verdict: count each verdict once
    counted = "asvp" if any(r["method"] == "asvp" for r in runs) else "asvp-ungated"
    for r in runs:
        for g in r["gates"]:
            audit = (f"{g['challenger_accuracy']:.3f} vs {g['incumbent_accuracy']:.3f}"
                     if g.get("challenger_accuracy") is not None else "-")  # fmt: skip
            gain = g["test_challenger"] - g["test_incumbent"]
            lines.append(f"| {r['method']}-seed{r['seed']} | {g['round']} | {g['labels']} | {g['n']} | {audit} | "
                         f"{g['test_challenger']:.3f} vs {g['test_incumbent']:.3f} ({gain:+.3f}) | {g['decision']} | "
                         f"{g['outcome']} |")  # fmt: skip
            if g["decision"] in ("adopt", "reject") and r["method"] == counted:
                wrong["judged"] += 1
                wrong["false adopt"] += g["decision"] == "adopt" and gain < 0
                wrong["false reject"] += g["decision"] == "reject" and gain > 0
    lines += ["", f"Of {wrong['judged']} verdicts ({counted} runs): {wrong['false adopt']} false adopts (adopted, the "
              f"test split says worse), {wrong['false reject']} false rejects (rejected, the test split says better). "
              "An asvp-ungated refresh serves whatever its verdict says."]  # fmt: skip
    return lines


def _audit_lines(results: dict[str, Any]) -> list[str]:
    """How often the audit estimate's 95% interval held the proxy's test accuracy."""
    points = [a for rs in results["runs"].values() for r in rs for a in r.get("audit", [])]
    if not points:
        return []
    held = sum(1 for a in points if a["low"] <= a["test"] <= a["high"])
    error = float(np.mean([abs(a["accuracy"] - a["test"]) for a in points]))
    return ["", f"Audit estimate: in {held} of {len(points)} rounds the 95% interval held the proxy's test accuracy "
            f"(mean |estimate - test| {error:.3f}; audit n {min(a['n'] for a in points)}-"
            f"{max(a['n'] for a in points)}). The rounds are not independent: a run's audit grows by a few labels a "
            "round."]  # fmt: skip


def _update_effect_lines(results: dict[str, Any]) -> list[str]:
    """What each feature update was followed by: ASVP's accuracy in the rounds after it against SVPp of the same
    seed at the same label counts (the two share everything up to the first update)."""
    svpp = {r["seed"]: dict((n, a) for n, a in r["curve"]) for r in results["runs"].get("svpp", [])}
    rows = []
    aligned = [r for method in ("asvp", "asvp-ungated") for r in results["runs"].get(method, [])]
    for r in aligned:
        if not r["updates"]:
            continue
        first = r["updates"][0]
        after = [(n, a) for rnd, (n, a) in enumerate(r["curve"]) if rnd > first["round"]]  # curve index = round
        pairs = [(a, svpp[r["seed"]][n]) for n, a in after if n in svpp.get(r["seed"], {})]
        if not pairs:
            continue
        mine, theirs = float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))
        rounds = ", ".join(f"{u['round']} ({u['labels']} labels, {u['method']})" for u in r["updates"])
        rows.append(f"| {r['method']}-seed{r['seed']} | {rounds} | {len(pairs)} | {mine:.4f} | {theirs:.4f} | "
                    f"{mine - theirs:+.4f} |")  # fmt: skip
    if not rows:
        return []
    return ["", "After the feature updates (mean accuracy over the rounds after the first update, against SVPp of the "
            "same seed at the same label counts; a rejected refresh changes nothing):", "",
            "| run | updates at round | rounds compared | asvp | svpp | difference |", "|---|---|---|---|---|---|",
            *rows]  # fmt: skip


def write_report(out: Path | str, results: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, learning_curves.png and report.md under ``out``; returns their paths."""
    out = Path(out)
    paths = {"results": out / "results.json", "plot": out / "learning_curves.png", "report": out / "report.md"}
    atomic_write_bytes(paths["results"], json.dumps(results, indent=1, default=str).encode())
    plot_curves(results, paths["plot"])
    atomic_write_bytes(paths["report"], render_markdown(results).encode())
    return paths
