"""Start Training on tens of labels: the fine-tuned deliverable against the proxy, on images neither saw.

    python bench/bench_finetune_labels.py --threads 1                     # 64 px (3 draws) and 224 px (1 draw)
    python bench/bench_finetune_labels.py --sizes 64 --seeds 0,1,2 --methods lpft,ft
    python bench/bench_finetune_labels.py --code-root /tmp/old            # the code of an older commit, after
        git archive COMMIT asvp_backend | tar -x -C /tmp/old

The situation: 120 images of 4 classes, 50 of them labelled, Start Training pressed. Images: scikit-learn's copy of
the UCI 8x8 handwritten digits (shipped with the package, no download), classes 3, 5, 8 and 9 (often confused), 30
of each, dark on light, upscaled to 96x96 px. A seed draws the 50 labels (stratified); the other 70 images are the
test set that no model trains on.

Per input size and seed:
- the proxies (mlp and logistic, as a round fits them) on the backbone's pre-trained features of the 50 labels;
- the Start Training model: ``recipe_for(method, 50)`` fine-tuned on the 50 labels (it holds some out itself);
  its accuracy on its held-out slice, and the proxy's (``--proxy``, fitted on the other labels) on the same slice:
  the verdict the backend records (the model is the deliverable only when it is the more accurate).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = (3, 5, 8, 9)
PER_CLASS, LABELLED, SIDE = 30, 50, 96


class Images:
    """LabelledImages over in-memory images."""

    def __init__(self, images: list[Image.Image], labels: list[str]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def label(self, index: int) -> str:
        return self.labels[index]

    def load(self, index: int) -> Image.Image:
        return self.images[index]


def digits(seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in CLASSES:
        for i in rng.choice(np.flatnonzero(data.target == c), PER_CLASS, replace=False):
            pixels = (255 - data.images[i] * 255 / 16).clip(0, 255).astype(np.uint8)
            images.append(Image.fromarray(pixels).resize((SIDE, SIDE), Image.Resampling.BICUBIC).convert("RGB"))
            labels.append(f"digit-{c}")
    return images, np.array(labels, dtype=object)


def draw_labels(y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled positions, stratified over the classes, and the rest (the test set)."""
    rng = np.random.default_rng([seed, 7])
    classes = sorted(set(y.tolist()))
    labelled: list[int] = []
    for k, c in enumerate(classes):
        take = n // len(classes) + (1 if k < n % len(classes) else 0)
        labelled += rng.permutation(np.flatnonzero(y == c))[:take].tolist()
    lab = np.sort(np.array(labelled))
    return lab, np.setdiff1d(np.arange(len(y)), lab)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,224", help="input sizes in px")
    ap.add_argument("--seeds", default=None, help="label draws (default: 0,1,2 at 64 px and below, 0 above)")
    ap.add_argument("--methods", default="lpft", help="comma-separated: lpft (Start Training at generation 0), ft")
    ap.add_argument("--proxy", default="mlp", help="the proxy the verdict compares with (PROXY)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared host)")
    ap.add_argument("--code-root", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the folder whose asvp_backend package to measure")  # fmt: skip
    ap.add_argument("--out", type=Path, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.code_root))

    import torch

    from asvp_backend.alignment.checkpoint import FineTunedModel
    from asvp_backend.alignment.finetune import finetune, recipe_for
    from asvp_backend.features.backbones import create_backbone
    from asvp_backend.selection import create_proxy

    if args.threads:
        torch.set_num_threads(args.threads)
    images, y = digits()
    rows: list[str] = []
    summary: dict[tuple[int, str], list[float]] = {}
    for px in [int(s) for s in args.sizes.split(",")]:
        seeds = [int(s) for s in (args.seeds or ("0,1,2" if px <= 64 else "0")).split(",")]
        bb = create_backbone("tf_efficientnet_lite0", "auto", device="cpu", image_size=px)
        x = np.concatenate([bb.embed_images(images[i : i + 32]) for i in range(0, len(images), 32)])
        for seed in seeds:
            lab, test = draw_labels(y, LABELLED, seed)
            for name in ("mlp", "logistic"):
                proxy = create_proxy(name, device="cpu", seed=0).fit(x[lab], y[lab])
                acc = float(np.mean(proxy.predict(x[test]) == y[test]))
                summary.setdefault((px, f"proxy {name}"), []).append(acc)
                rows.append(f"| {px} | {seed} | proxy {name} | {acc:.3f} | | | | |")
                print(rows[-1], file=sys.stderr, flush=True)
            for method in args.methods.split(","):
                recipe = recipe_for(method, LABELLED)
                start = time.perf_counter()
                result = finetune("tf_efficientnet_lite0", "auto", Images([images[i] for i in lab], list(y[lab])),
                                  recipe, device="cpu", image_size=px)  # fmt: skip
                seconds = time.perf_counter() - start
                model = FineTunedModel(result.model, result.backbone, result.classes, result.preprocessing, {},
                                       torch.device("cpu"))  # fmt: skip
                classes = np.array(result.classes, dtype=object)
                acc = float(np.mean(classes[model.predict_proba([images[i] for i in test]).argmax(1)] == y[test]))
                held = lab[np.asarray(result.holdout_indices, dtype=np.int64)]
                kept = np.setdiff1d(lab, held)
                judge = create_proxy(args.proxy, device="cpu", seed=0).fit(x[kept], y[kept])
                proxy_held = float(np.mean(judge.predict(x[held]) == y[held]))
                model_held = float(
                    np.mean(classes[model.predict_proba([images[i] for i in held]).argmax(1)] == y[held])
                )
                verdict = "model" if model_held > proxy_held else "proxy"
                m: dict[str, Any] = result.metrics
                steps = m.get("ft_steps", recipe.epochs * -(-m["train_size"] // recipe.batch_size))
                summary.setdefault((px, method), []).append(acc)
                rows.append(
                    f"| {px} | {seed} | {method} ({recipe.epochs} ep, batch {recipe.batch_size}, ~{steps} steps) | "
                    f"{acc:.3f} | {model_held:.3f} ({len(held)}) | {proxy_held:.3f} | {verdict} | {seconds:.0f} |"
                )
                print(rows[-1], file=sys.stderr, flush=True)
    cmd = "python bench/bench_finetune_labels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"`{cmd.strip()}` on {datetime.date.today().isoformat()}: tf_efficientnet_lite0 (pip weights), torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}; code from {args.code_root}\n\n"
        "| px | seed | model | test accuracy (70) | fine-tune held-out (n) | proxy on the same held-out | verdict | "
        "seconds |\n" + "|---" * 8 + "|\n"
    )
    means = "\n".join(
        f"| {px} | mean of {len(v)} | {name} | {np.mean(v):.3f} | | | | |" for (px, name), v in summary.items()
    )
    table = header + "\n".join(rows) + "\n" + means + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
