"""Feature-store scale check: write N x D float16 synthetic vectors in shards, then time and measure memory
for opening, loading the matrix (sharded copy vs compacted zero-copy memory map), streaming, lookups and
appending 10,000 more.

    python bench/bench_store.py --root /tmp/asvp-store-bench --n 1000000 --dim 1280   # 2.5 GB on disk

RSS counts file-backed pages of memory maps that were touched; the kernel can drop those under pressure,
unlike anonymous memory (reported separately as RssAnon).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvp_backend.features.store import FeatureStore, GenerationInfo  # noqa: E402


def mem() -> dict[str, float]:
    """Current/peak RSS and anonymous RSS in MiB from /proc (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


class Timer:
    def __init__(self, rows: list[str], name: str) -> None:
        self.rows, self.name = rows, name

    def __enter__(self) -> Timer:
        gc.collect()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        secs = time.perf_counter() - self.start
        m = mem()
        self.rows.append(f"| {self.name} | {secs:.2f} | {m['VmRSS']:.0f} | {m['RssAnon']:.0f} | {m['VmHWM']:.0f} |")
        print(self.rows[-1], file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/asvp-store-bench"))
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--shard", type=int, default=4096, help="vectors per shard while writing (extract default)")
    ap.add_argument("--append", type=int, default=10_000)
    ap.add_argument("--keep", action="store_true", help="keep the store on disk afterwards")
    ap.add_argument("--out", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)

    if args.root.exists():
        shutil.rmtree(args.root)
    rows: list[str] = []
    rng = np.random.default_rng(0)
    info = GenerationInfo(0, "synthetic", "none", {}, args.dim)
    store = FeatureStore(args.root)
    gen = store.create_generation(info)

    with Timer(rows, f"write {args.n:,} vectors in shards of {args.shard:,} (fsync each)"):
        block = rng.standard_normal((args.shard, args.dim), dtype=np.float32).astype(np.float16)
        for start in range(0, args.n, args.shard):
            stop = min(start + args.shard, args.n)
            gen.append(np.arange(start, stop), block[: stop - start])
    store.activate(0)
    del block

    reader = FeatureStore(args.root)
    with Timer(rows, f"open + index ({gen.shard_count()} shards)"):
        g = reader.current()
        n_live = len(g)
    assert n_live == args.n
    with Timer(rows, "matrix() sharded: one float16 copy"):
        ids, mat = g.matrix()
        checksum = float(mat[:: max(1, args.n // 1000), :8].astype(np.float32).sum())
    del ids, mat
    gc.collect()
    with Timer(rows, "iter_batches(65,536): stream all rows"):
        total = 0
        for _ids, v in g.iter_batches(65536):
            total += len(v)
    assert total == args.n
    with Timer(rows, "lookup 10,000 random ids"):
        found, v = g.lookup(rng.choice(args.n, 10_000, replace=False))
    assert found.all()
    with Timer(rows, "compact() to one shard (streamed)"):
        g.compact()
    fresh = FeatureStore(args.root).current()
    with Timer(rows, "open + index (compacted)"):
        len(fresh)
    with Timer(rows, "matrix() compacted: zero-copy memmap"):
        ids, mat = fresh.matrix()
        assert isinstance(mat, np.memmap)
    with Timer(rows, "matrix() compacted + read every row (sum)"):
        s = 0.0
        for start in range(0, len(mat), 65536):
            s += float(mat[start : start + 65536, 0].astype(np.float32).sum())
    del ids, mat
    new_ids = np.arange(args.n, args.n + args.append)
    new_vec = rng.standard_normal((args.append, args.dim), dtype=np.float32)
    with Timer(rows, f"append {args.append:,} (one shard)"):
        fresh.append(new_ids, new_vec)
    with Timer(rows, f"append {args.append:,} as 10 shards of {args.append // 10:,}"):
        for k in range(10):
            part = slice(k * args.append // 10, (k + 1) * args.append // 10)
            fresh.append(new_ids[part] + args.append, new_vec[part])
    with Timer(rows, "re-index after appends"):
        n_after = len(fresh)
    assert n_after == args.n + 2 * args.append
    disk = sum(p.stat().st_size for p in args.root.rglob("*") if p.is_file()) / 2**30
    table = (
        f"{args.n:,} x {args.dim} float16 (checksum {checksum:.1f}); on disk after the run: {disk:.2f} GiB\n\n"
        "| step | seconds | RSS MiB | RssAnon MiB | peak RSS MiB |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(table + "\n")
    if not args.keep:
        shutil.rmtree(args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
