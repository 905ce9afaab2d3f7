"""Feature-extraction throughput: images/s end-to-end from image files on disk, and model-only from
decoded in-memory tensors, plus peak RSS.

    python bench/bench_extract.py --n 256 --sizes 224,128                 # CPU, Lite0 real weights
    python bench/bench_extract.py --device cuda --backbone resnet50 --weights random --n 4096 --batch-size 256

Images: JPEG/PNG files written once from crops of scikit-learn's two sample photos (640x427), resized to
about 500x375 like typical dataset photos, or your own with --image-dir.

Two hostile cases (issue 17), through the same extraction code the extract job runs (no worker processes):

    python bench/bench_extract.py --mode drip --tasks 40 --drips 12 --image-timeout 30 --batch-size 8
    python bench/bench_extract.py --mode decode --copies 8 --megapixels 62 --batch-size 8

``drip``: a local HTTP server answers some tasks at once and drips one byte every 2 s for the others (the
per-read timeout never trips, only the per-image deadline IMAGE_TIMEOUT does); wall time of the run.
``decode``: ``--copies`` tasks of one RGBA PNG of ``--megapixels`` (a few hundred KB on disk), fetched by
``--fetch-concurrency`` threads; the rise of the process's peak RSS (Linux VmHWM, reset just before).
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


def _drip(i: int, tasks: int, drips: int) -> bool:
    return i * drips // tasks != (i + 1) * drips // tasks  # evenly spread: every batch gets its share


def bench_drip(backbone, tasks: int, drips: int, image_timeout: float, batch_size: int,
               concurrency: int) -> tuple[float, int, int]:  # fmt: skip
    """(seconds, extracted, skipped) for ``tasks`` images of which ``drips`` come from a dripping server."""
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from asvp_backend.features.extract import extract_items
    from asvp_backend.labelstudio.images import ImageFetcher

    stop = threading.Event()
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(good, "PNG")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (stdlib name)
            if self.path.startswith("/drip"):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    while not stop.wait(2.0):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:
                    pass
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(good.getvalue())))
            self.end_headers()
            self.wfile.write(good.getvalue())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    items = [(i, f"http://127.0.0.1:{port}/{'drip' if _drip(i, tasks, drips) else 'good'}/{i}") for i in range(tasks)]
    # the extract job's fetcher (jobs/extraction.py::image_fetcher)
    fetcher = ImageFetcher(allow_private_hosts=True, timeout=min(10.0, image_timeout), total_timeout=image_timeout)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gen = FeatureStore(Path(tmp) / "features").create_generation(generation_info(backbone, 0))
            start = time.perf_counter()
            report = extract_items(backbone, items, fetcher, gen, batch_size=batch_size, num_workers=0,
                                   fetch_concurrency=concurrency)  # fmt: skip
            return time.perf_counter() - start, report.extracted, len(report.skipped)
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def big_rgba_png(path: Path, megapixels: float) -> Path:
    """An RGBA PNG of ``megapixels`` that compresses to a few hundred KB: diagonal lines on a flat colour."""
    from PIL import ImageDraw

    side = int((megapixels * 1e6) ** 0.5)
    img = Image.new("RGBA", (side, side), (10, 20, 30, 128))
    draw = ImageDraw.Draw(img)
    for x in range(0, side, 97):
        draw.line([(x, 0), (side - x, side)], fill=(200, 200, 200, 200), width=3)
    img.save(path, compress_level=9)
    return path


def bench_decode(backbone, path: Path, copies: int, batch_size: int, concurrency: int,
                 budget_mb: int | None) -> tuple[float, float, int]:  # fmt: skip
    """(seconds, peak RSS rise in MiB, extracted) for ``copies`` tasks of the image at ``path``."""
    from asvp_backend.features.extract import extract_items
    from asvp_backend.imaging import LocalImageLoader

    options = {"decode_budget_mb": budget_mb} if budget_mb else {}  # older code has no budget
    loader = LocalImageLoader(max_pixels=100_000_000, **options)
    items = [(i, str(path)) for i in range(copies)]
    with tempfile.TemporaryDirectory() as tmp:
        gen = FeatureStore(Path(tmp) / "features").create_generation(generation_info(backbone, 0))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the current size
        before = _proc_status("VmRSS:")
        start = time.perf_counter()
        report = extract_items(backbone, items, loader, gen, batch_size=batch_size, num_workers=0,
                               fetch_concurrency=concurrency)  # fmt: skip
        seconds = time.perf_counter() - start
        return seconds, (_proc_status("VmHWM:") - before) / 2**20, report.extracted


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
    ap.add_argument("--mode", default="both", choices=["files", "tensors", "both", "drip", "decode"])
    ap.add_argument("--tasks", type=int, default=40, help="drip: tasks in all")
    ap.add_argument("--drips", type=int, default=12, help="drip: tasks served by the dripping server")
    ap.add_argument("--image-timeout", type=float, default=30.0, help="drip: IMAGE_TIMEOUT, seconds per image")
    ap.add_argument("--fetch-concurrency", type=int, default=8, help="drip, decode: FETCH_CONCURRENCY")
    ap.add_argument("--copies", type=int, default=8, help="decode: tasks of the big image")
    ap.add_argument("--megapixels", type=float, default=62.0, help="decode: size of the RGBA PNG")
    ap.add_argument("--decode-budget-mb", type=int, default=None, help="decode: DECODE_BUDGET_MB (default: the "
                    "code's default)")  # fmt: skip
    ap.add_argument("--image-dir", type=Path, help="use these image files instead of generated ones")
    ap.add_argument("--out", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    if args.mode in ("drip", "decode"):
        return hostile(args)

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


def hostile(args: argparse.Namespace) -> int:
    size = int(args.sizes.split(",")[0])
    backbone = create_backbone(args.backbone, args.weights, device=args.device, image_size=size)
    backbone.embed(torch.stack([backbone.transform(Image.new("RGB", (64, 64)))] * 2))  # warm up
    host = f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {platform.python_version()}"
    if args.mode == "drip":
        secs, extracted, skipped = bench_drip(backbone, args.tasks, args.drips, args.image_timeout, args.batch_size,
                                              args.fetch_concurrency)  # fmt: skip
        table = (f"{host}\n\n| tasks | dripping | IMAGE_TIMEOUT s | batch | FETCH_CONCURRENCY | extracted | "
                 "skipped | seconds |\n|---|---|---|---|---|---|---|---|\n"
                 f"| {args.tasks} | {args.drips} | {args.image_timeout:g} | {args.batch_size} | "
                 f"{args.fetch_concurrency} | {extracted} | {skipped} | {secs:.1f} |\n")  # fmt: skip
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = big_rgba_png(Path(tmp) / "big.png", args.megapixels)
            file_kb = path.stat().st_size / 1024
            secs, rise, extracted = bench_decode(backbone, path, args.copies, args.batch_size, args.fetch_concurrency,
                                                 args.decode_budget_mb)  # fmt: skip
        budget = args.decode_budget_mb or "default"
        table = (f"{host}\n\n| image | copies | FETCH_CONCURRENCY | DECODE_BUDGET_MB | extracted | seconds | "
                 f"peak RSS rise MiB |\n|---|---|---|---|---|---|---|\n| RGBA PNG {args.megapixels:g} MP, "
                 f"{file_kb:.0f} KB | {args.copies} | {args.fetch_concurrency} | {budget} | {extracted} | {secs:.1f} | "
                 f"{rise:.0f} |\n")  # fmt: skip
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
