"""Wall time of one whole feature update (ASVP feature alignment): FT on the labelled set, then re-extract
every pool feature with the fine-tuned backbone, through the same code the `align` and `extract` jobs run.

    # the goal (issue 8): under 5 minutes on one H200-class GPU
    python bench/bench_alignment.py --device cuda --labels 2000 --extract 60000 --image-size 224
    # what a 2-core CPU does in a few minutes
    python bench/bench_alignment.py --device cpu --labels 200 --extract 2000 --image-size 64 --epochs 3

Data: Fashion-MNIST from its IDX files (Debian `dataset-fashion-mnist`, or --data DIR holding the four .gz
files), grey 28x28 upsampled by the backbone's own transform; weights: EfficientNet-Lite0 ImageNet (offline).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvp_backend.alignment.checkpoint import save_checkpoint  # noqa: E402
from asvp_backend.alignment.finetune import finetune, recipe_for  # noqa: E402
from asvp_backend.alignment.integrity import CHECKPOINT_WEIGHTS  # noqa: E402
from asvp_backend.evaluation.datasets import load_dataset, stratified_sample  # noqa: E402
from asvp_backend.features.backbones import create_backbone  # noqa: E402
from asvp_backend.features.extract import extract_items, generation_info  # noqa: E402
from asvp_backend.features.store import FeatureStore  # noqa: E402


class Labelled:
    """alignment.finetune.LabelledImages over rows of a data set split."""

    def __init__(self, split, rows: np.ndarray, classes: tuple[str, ...]) -> None:
        self.split, self.rows, self.classes = split, rows, classes

    def __len__(self) -> int:
        return len(self.rows)

    def label(self, index: int) -> str:
        return self.classes[int(self.split.labels[self.rows[index]])]

    def load(self, index: int):
        return self.split.image(int(self.rows[index]))


class SplitLoader:
    """features.extract.ImageLoader: the 'URL' is the row number of the split."""

    def __init__(self, split) -> None:
        self.split = split

    def load(self, url: str, task_id: int | None = None):
        return self.split.image(int(url))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder with the four Fashion-MNIST .gz files (default: Debian's)")
    p.add_argument("--labels", type=int, default=2000, help="labelled images the FT trains on")
    p.add_argument("--extract", type=int, default=60000, help="pool images re-extracted with the FT backbone")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=None, help="FT epochs (default: scaled to the labels)")
    p.add_argument("--batch-size", type=int, default=None, help="FT batch (default: scaled)")
    p.add_argument("--extract-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: 0 on CPU, 8 on GPU)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = p.parse_args(argv)

    spec = "fashion-mnist" + (f":{args.data}" if args.data else "")
    dataset = load_dataset(spec, subset=max(args.labels, args.extract), seed=args.seed)
    train = dataset.train
    labelled = Labelled(train, stratified_sample(train.labels, args.labels, args.seed), dataset.classes)
    recipe = recipe_for("ft", args.labels, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)

    started = time.perf_counter()
    result = finetune(args.backbone, "auto", labelled, recipe, device=args.device, image_size=args.image_size)
    ft_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(result, Path(tmp) / "model")
        backbone = create_backbone(args.backbone, str(checkpoint / CHECKPOINT_WEIGHTS), device=args.device,
                                   image_size=args.image_size)
        store = FeatureStore(Path(tmp) / "features")
        generation = store.create_generation(generation_info(backbone, 1))
        workers = args.workers if args.workers is not None else (0 if backbone.device.type == "cpu" else 8)
        items = [(i, str(i)) for i in range(args.extract)]
        report = extract_items(backbone, items, SplitLoader(train), generation, batch_size=args.extract_batch_size,
                               num_workers=workers, shard_size=16384, flush_every=16384)
    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = result.metrics
    device = str(backbone.device) + (f" ({torch.cuda.get_device_name()})" if backbone.device.type == "cuda" else "")
    lines = [
        f"- command: `python bench/bench_alignment.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- device: {device}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}",
        f"- recipe: {recipe.method}, {recipe.epochs} epochs, batch {recipe.batch_size}, input {args.image_size} px",
        "",
        "| step | images | seconds | images/s |",
        "|---|---|---|---|",
        f"| fine-tune (FT, incl. image cache and held-out eval) | {args.labels} x {recipe.epochs} epochs | "
        f"{ft_seconds:.1f} | {metrics.get('images_per_second') or 0:.1f} (training steps) |",
        f"| re-extract with the FT backbone | {report.extracted} | {report.seconds:.1f} | "
        f"{report.images_per_second:.1f} |",
        f"| whole update | | **{total:.1f}** | |",
        "",
        f"- held-out accuracy of the FT model: {metrics.get('holdout_accuracy')} on {metrics.get('holdout_size')} "
        f"labels; skipped images: {metrics.get('skipped')}",
        f"- peak RSS: {peak:.0f} MiB",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
