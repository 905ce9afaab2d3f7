"""Benchmark LogME and LogME-PED (asvp_backend.alignment.transferability) on CPU.

The trigger scores the labelled set every round, so this times ``logme`` and ``logme_ped`` for labelled sets
of 1k, 10k and 50k synthetic 1,280-d float16 features (class-structured Gaussians, 10 classes), with a 60k
pool as PED's reference, subsampled to 10k rows as the backend does. Goal: a 10k labelled set under 5 s.

    python bench/bench_logme.py --out bench/results/logme_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvp_backend.alignment.transferability import logme, logme_ped  # noqa: E402

CHUNK = 65_536
GOAL_N, GOAL_S = 10_000, 5.0


def make_features(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = ", ".join(f"{p['internal_api']} {p['version']} ({p['num_threads']} threads)" for p in threadpool_info())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, numpy {np.__version__}, "
        f"BLAS {blas or 'unknown'}; load average at start {load:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000], help="labelled set sizes")
    p.add_argument("--dim", type=int, default=1280, help="feature dimension (EfficientNet-Lite0: 1280)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--pool", type=int, default=60_000, help="pool rows (PED reference before subsampling)")
    p.add_argument("--max-reference", type=int, default=10_000, help="logme_ped's reference subsample")
    p.add_argument("--noise", type=float, default=12.0, help="noise std (centres: norm ~sqrt(d))")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per size (the best is reported)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = p.parse_args(argv)

    if args.threads:
        threadpool_limits(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    t0 = time.perf_counter()
    pool, y_pool = make_features(max(args.pool, *args.sizes), centres, args.noise, rng)
    gen_s = time.perf_counter() - t0

    lines = [
        "# LogME / LogME-PED benchmark (CPU)",
        "",
        f"- command: `python {' '.join(['bench/bench_logme.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- data: {args.dim}-d synthetic float16 features, {args.classes} classes, noise {args.noise}; the labelled "
        f"set is the first n rows of a {len(pool):,}-row pool (generated in {gen_s:.1f} s), which is also PED's "
        f"reference, subsampled to {args.max_reference:,} rows; best of {args.repeats} run(s)",
        "",
        "| labelled | LogME s | LogME-PED s | LogME | LogME-PED |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    goal: list[float] = []
    for n in args.sizes:
        x, y = pool[:n], y_pool[:n]
        times: dict[str, float] = {}
        values: dict[str, float] = {}
        for name, fn in (
            ("logme", lambda x=x, y=y: logme(x, y)),
            ("logme_ped", lambda x=x, y=y: logme_ped(x, y, pool, max_reference=args.max_reference, seed=args.seed)),
        ):
            for _ in range(args.repeats):
                gc.collect()
                start = time.perf_counter()
                values[name] = fn()
                times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
        lines.append(
            f"| {n:,} | {times['logme']:.2f} | {times['logme_ped']:.2f} | {values['logme']:.4f} "
            f"| {values['logme_ped']:.4f} |"
        )
        print(lines[-1], flush=True)
        if n == GOAL_N:
            goal = [times["logme"], times["logme_ped"]]

    lines.append("")
    lines.append(f"Peak RSS of the process: {peak_rss_mib():,.0f} MiB (pool included).")
    if goal:
        met = max(goal) < GOAL_S
        lines.append(
            f"Goal ({GOAL_N:,} labelled under {GOAL_S:g} s): {'met' if met else 'NOT met'} "
            f"(LogME {goal[0]:.2f} s, LogME-PED {goal[1]:.2f} s)."
        )
    print("\n".join(lines[-2:]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
