"""Benchmark the selection package on synthetic cached features.

A *round* = fit the MLP proxy (reference recipe) on the labelled set + ``predict_proba`` over the pool +
margin scores and order, i.e. what the backend does after each batch of labels. Then each strategy's
selection time for a few batch sizes on one pool. Features are class-structured Gaussians generated in
float16 chunks (the cache's storage type), so a 1M x 1280 pool takes 2.4 GiB.

    python bench/bench_selection.py --device cpu --out bench/results/selection_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvp_backend.selection import (  # noqa: E402
    STRATEGIES,
    LogisticProxy,
    MLPProxy,
    SelectionInput,
    create_strategy,
)

CHUNK = 65_536


def make_features(
    n: int, centres: np.ndarray, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float16 features around class centres, generated chunk by chunk; returns (X, y)."""
    c, d = centres.shape
    X = np.empty((n, d), np.float16)
    y = rng.integers(0, c, n)
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        block = rng.standard_normal((e - s, d), dtype=np.float32)
        block *= noise
        block += centres[y[s:e]]
        X[s:e] = block
    return X, y


def timed(fn: Callable[[], Any], sync: bool) -> tuple[Any, float]:
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.startswith("cuda"):
        desc += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{desc}; load average at start {load:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--dim", type=int, default=1280, help="feature dimension (EfficientNet-Lite0: 1280)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--labels", type=int, default=2000, help="labelled set size for the proxy")
    p.add_argument("--pools", type=int, nargs="+", default=[100_000, 1_000_000], help="pool sizes for rounds")
    p.add_argument("--strategy-pool", type=int, default=100_000, help="pool size for the strategy timings")
    p.add_argument("--batches", type=int, nargs="+", default=[100, 1000], help="batch sizes per strategy")
    p.add_argument("--strategies", nargs="+", default=sorted(STRATEGIES), choices=sorted(STRATEGIES))
    p.add_argument("--noise", type=float, default=12.0, help="noise std (centres: norm ~sqrt(d))")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and BLAS/OpenMP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = p.parse_args(argv)

    if args.threads:  # torch, and the BLAS/OpenMP pools scikit-learn uses (k-means, PCA)
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    sync = args.device.startswith("cuda")
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    X_lab, y_lab = make_features(args.labels, centres, args.noise, rng)
    X_test, y_test = make_features(5_000, centres, args.noise, rng)
    big = max([*args.pools, args.strategy_pool])
    X_pool, gen_s = timed(lambda: make_features(big, centres, args.noise, rng)[0], False)

    lines = [
        "# Selection benchmark",
        "",
        f"- command: `python {' '.join(['bench/bench_selection.py', *(argv or sys.argv[1:])])}`",
        f"- machine: {machine(args.device)}",
        f"- data: {args.dim}-d synthetic float16 features, {args.classes} classes, noise {args.noise}; "
        f"{args.labels} labels; pool generation {gen_s:.1f} s for {big:,} rows",
        "",
        "## Rounds (fit proxy on the labels + predict_proba on the pool + margin ranking)",
        "",
        "| proxy | pool | fit s | SGD steps | predict_proba s | margin rank s | round s | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def report(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    margin = create_strategy("margin")
    proxies: list[tuple[str, Callable[[], Any]]] = [
        ("mlp (reference recipe)", lambda: MLPProxy(device=args.device, seed=args.seed)),
        ("logistic", lambda: LogisticProxy(device=args.device, seed=args.seed)),
    ]
    mlp = None
    for label, factory in proxies:
        for n in args.pools:
            proxy, fit_s = timed(lambda f=factory: f().fit(X_lab, y_lab), sync)
            pool = X_pool[:n]
            probs, pred_s = timed(lambda pr=proxy, po=pool: pr.predict_proba(po), sync)
            inp = SelectionInput(pool, probs, X_lab)
            _, rank_s = timed(lambda i=inp: margin.rank(i, 100), False)
            acc = float((proxy.predict(X_test) == y_test).mean())
            steps = getattr(proxy, "n_steps_", "lbfgs")
            total = fit_s + pred_s + rank_s
            report(
                f"| {label} | {n:,} | {fit_s:.2f} | {steps} | {pred_s:.2f} | {rank_s:.2f} | **{total:.2f}** "
                f"| {acc:.3f} |"
            )
            if isinstance(proxy, MLPProxy) and mlp is None:
                mlp = proxy
            del probs, inp

    n = args.strategy_pool
    assert mlp is not None or not args.pools
    mlp = mlp or MLPProxy(device=args.device).fit(X_lab, y_lab)
    pool = X_pool[:n]
    inp = SelectionInput(pool, mlp.predict_proba(pool), X_lab, mlp)
    report("")
    report(f"## Strategy selection time on a {n:,}-item pool ({args.labels} labelled, MLP proxy probs)")
    report("")
    report("| strategy | " + " | ".join(f"batch {b} s" for b in args.batches) + " | notes |")
    report("|---|" + "---|" * (len(args.batches) + 1))
    for name in args.strategies:
        extra = {"device": args.device} if STRATEGIES[name].set_based else {}
        strategy = create_strategy(name, seed=args.seed, **extra)
        cells = []
        for b in args.batches:
            r, s = timed(lambda st=strategy, bb=b: st.rank(inp, bb), sync)
            assert len(np.unique(r.order[:b])) == min(b, n)
            cells.append(f"{s:.2f}")
        params = {k: v for k, v in vars(strategy).items() if k.startswith(("max_", "partition"))}
        report(f"| {name} | " + " | ".join(cells) + f" | {params or 'whole pool sorted'} |")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
