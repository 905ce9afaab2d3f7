"""Feature-extraction throughput: images/s end-to-end from image files on disk, and model-only from
decoded in-memory tensors, plus peak RSS.

    python bench/bench_extract.py --n 256 --sizes 224,128                 # CPU, Lite0 real weights
    python bench/bench_extract.py --device cuda --backbone resnet50 --weights random --n 4096 --batch-size 256

Images: JPEG/PNG files written once from crops of scikit-learn's two sample photos (640x427), resized to
about 500x375 like typical dataset photos, or your own with --image-dir.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvp_backend.features.backbones import create_backbone  # noqa: E402
from asvp_backend.features.extract import extract_dir, generation_info, list_images  # noqa: E402
from asvp_backend.features.store import FeatureStore  # noqa: E402


def peak_rss_mb() -> tuple[float, float]:
    """(this process, largest finished child) peak resident set, MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def make_images(directory: Path, n: int, seed: int = 0) -> list[Path]:
    from sklearn.datasets import load_sample_images

    directory.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = src.size
        cw, ch = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        img = src.crop((x, y, x + cw, y + ch)).resize((500, 375))
        p = directory / f"img_{i:06d}.{'jpg' if i % 4 else 'png'}"
        img.save(p, quality=90) if p.suffix == ".jpg" else img.save(p)
        paths.append(p)
    return paths


def bench_files(backbone, image_dir: Path, batch_size: int, num_workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        gen = FeatureStore(Path(tmp) / "features").create_generation(generation_info(backbone, 0))
        report, files = extract_dir(backbone, image_dir, gen, batch_size=batch_size, num_workers=num_workers)
        assert report.extracted == len(files), report.skipped
        return report.seconds, report.extracted


def bench_tensors(backbone, image_dir: Path, batch_size: int, n: int) -> tuple[float, int]:
    files = list_images(image_dir)[:n]
    x = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in files])
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        backbone.embed(x[i : i + batch_size])
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, len(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="auto", help="auto | random | path")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--sizes", default="224,128", help="comma-separated input sizes")
    ap.add_argument("--n", type=int, default=256, help="number of images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--mode", default="both", choices=["files", "tensors", "both"])
    ap.add_argument("--image-dir", type=Path, help="use these image files instead of generated ones")
    ap.add_argument("--out", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        image_dir = args.image_dir or Path(tmp) / "images"
        if args.image_dir is None:
            t = time.perf_counter()
            make_images(image_dir, args.n)
            print(f"wrote {args.n} images in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        rows = []
        for size in [int(s) for s in args.sizes.split(",")]:
            backbone = create_backbone(args.backbone, args.weights, device=args.device, image_size=size)
            warm = torch.stack([backbone.transform(Image.new("RGB", (64, 64)))] * min(4, args.batch_size))
            backbone.embed(warm)
            modes = ["files", "tensors"] if args.mode == "both" else [args.mode]
            for mode in modes:
                if mode == "files":
                    secs, n = bench_files(backbone, image_dir, args.batch_size, args.num_workers)
                else:
                    secs, n = bench_tensors(backbone, image_dir, args.batch_size, args.n)
                own, kids = peak_rss_mb()
                rows.append(
                    f"| {args.backbone} | {args.weights if args.weights in ('auto', 'random') else 'file'} | "
                    f"{backbone.device.type} | {size} | {mode} | {n} | {args.batch_size} | "
                    f"{args.num_workers if mode == 'files' else '-'} | {secs:.2f} | {n / secs:.1f} | "
                    f"{own:.0f} / {kids:.0f} |"
                )
                print(rows[-1], file=sys.stderr)
    header = (
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
        f", python {platform.python_version()}\n\n"
        "| backbone | weights | device | px | mode | images | batch | workers | seconds | images/s | "
        "peak RSS MiB (main / worker) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    table = header + "\n".join(rows) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
