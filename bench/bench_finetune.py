"""Fine-tuning throughput: images/s of the LP and FT stages (training, augmentation included), the time to
load the labelled images into the decoded cache, the held-out accuracy and peak RSS.

    python bench/bench_finetune.py --n 256 --batch-size 32                  # CPU, Lite0 real weights, 224 px
    python bench/bench_finetune.py --device cuda --n 4096 --batch-size 128 --epochs 3

Images: JPEG files written once from crops of scikit-learn's two sample photos (640x427), resized to about
500x375; the label is the photo a crop came from (two classes). Or your own with --image-dir DIR, where the
label of a file is the name of its parent folder.
"""

from __future__ import annotations

import argparse
import datetime
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

from asvp_backend.alignment.finetune import FinetuneRecipe, finetune  # noqa: E402
from asvp_backend.features.device import available_cpus  # noqa: E402
from asvp_backend.features.extract import list_images  # noqa: E402
from asvp_backend.imaging import LocalImageLoader  # noqa: E402


class FileImages:
    """LabelledImages over image files: decoded from disk by ``load``, as a job decodes fetched bytes."""

    def __init__(self, paths: list[Path], labels: list[str]) -> None:
        self.paths, self.labels = paths, labels
        self.loader = LocalImageLoader()

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> str:
        return self.labels[index]

    def load(self, index: int) -> Image.Image:
        return self.loader.load(str(self.paths[index]))


def make_images(directory: Path, n: int, seed: int = 0) -> FileImages:
    from sklearn.datasets import load_sample_images

    directory.mkdir(parents=True, exist_ok=True)
    data = load_sample_images()
    photos = [Image.fromarray(a) for a in data.images]
    names = [Path(f).stem for f in data.filenames]
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for i in range(n):
        k = i % len(photos)
        w, h = photos[k].size
        cw, ch = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        p = directory / f"img_{i:06d}.jpg"
        photos[k].crop((x, y, x + cw, y + ch)).resize((500, 375)).save(p, quality=90)
        paths.append(p)
        labels.append(names[k])
    return FileImages(paths, labels)


def folder_images(directory: Path) -> FileImages:
    paths = list_images(directory)
    return FileImages(paths, [p.parent.name for p in paths])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="auto", help="auto | random | path")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--methods", default="ft,lpft", help="comma-separated: ft, lpft")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--n", type=int, default=256, help="number of generated images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1, help="FT epochs (the FT stage of lpft)")
    ap.add_argument("--lp-epochs", type=int, default=1, help="LP epochs of lpft")
    ap.add_argument("--load-concurrency", type=int, default=8)
    ap.add_argument("--image-dir", type=Path, help="use these files (label = parent folder name)")
    ap.add_argument("--out", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.image_dir is not None:
            images = folder_images(args.image_dir)
        else:
            t = time.perf_counter()
            images = make_images(Path(tmp) / "images", args.n)
            print(f"wrote {args.n} images in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        for method in args.methods.split(","):
            recipe = FinetuneRecipe(method, epochs=args.epochs, batch_size=args.batch_size, lp_epochs=args.lp_epochs)
            r = finetune(
                args.backbone,
                args.weights,
                images,
                recipe,
                device=args.device,
                image_size=args.image_size,
                load_concurrency=args.load_concurrency,
            )
            m = r.metrics
            lp_images = m["train_size"] * m["lp_epochs"]
            ft_images = m["train_size"] * m["epochs"]
            lp = f"{lp_images / m['lp_seconds']:.1f} ({m['lp_seconds']:.1f}s)" if m["lp_seconds"] else "-"
            ft = f"{ft_images / m['ft_seconds']:.1f} ({m['ft_seconds']:.1f}s)" if m["ft_seconds"] else "-"
            acc = "-" if m["holdout_accuracy"] is None else f"{m['holdout_accuracy']:.3f}"
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append(
                f"| {method} | {m['device']} | {args.image_size} | {len(images)} | {m['train_size']} | "
                f"{args.batch_size} | {m['cache_seconds']:.1f} ({len(images) / m['cache_seconds']:.0f} img/s) | "
                f"{lp} | {ft} | {m['images_per_second']:.1f} | {acc} ({m['holdout_size']}) | "
                f"{m['seconds']:.1f} | {rss:.0f} |"
            )
            print(rows[-1], file=sys.stderr)
    cmd = "python bench/bench_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"`{cmd.strip()}` on {datetime.date.today().isoformat()}: {args.backbone} (weights {args.weights}), "
        f"torch {torch.__version__}, {available_cpus()} CPUs, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
        + "\n\n| method | device | px | images | train | batch | cache load s | LP img/s (s) | FT img/s (s) | "
        "train img/s | holdout acc (n) | total s | peak RSS MiB |\n" + "|---" * 13 + "|\n"
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
