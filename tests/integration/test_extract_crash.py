"""A SIGKILLed extraction keeps every vector flushed before the kill, and a re-run with the still-missing ids
finishes the job. A real process and a real kill (no Redis needed); a few seconds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from asvp_backend.features import backbones as bb
from asvp_backend.features.extract import extract_items, generation_info
from asvp_backend.features.store import FeatureStore
from asvp_backend.imaging import LocalImageLoader
from tests.helpers import png_bytes

REPO = Path(__file__).resolve().parents[2]
TINY = "test_efficientnet"

# Loads images in order (one fetch thread) and kills its own process while loading the 23rd image. Fetching
# runs up to two batches (of four) ahead of embedding, so 3 to 5 batches were embedded by then: 8 or 16
# vectors flushed (every 8), the rest in the buffer.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from asvp_backend.features import backbones as bb
    from asvp_backend.features.extract import extract_items, generation_info
    from asvp_backend.features.store import FeatureStore
    from asvp_backend.imaging import LocalImageLoader

    class KilledAt:
        def __init__(self, n):
            self.n, self.loads, self.inner = n, 0, LocalImageLoader()
        def load(self, url, task_id=None):
            self.loads += 1
            if self.loads == self.n:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.inner.load(url, task_id)

    store_root, image_dir = sys.argv[1], sys.argv[2]
    tiny = bb.create_backbone("test_efficientnet", weights="random", device="cpu", image_size=32)
    generation = FeatureStore(store_root).create_generation(generation_info(tiny, 0))
    items = [(i, os.path.join(image_dir, f"{i}.png")) for i in range(40)]
    extract_items(tiny, items, KilledAt(23), generation, batch_size=4, num_workers=0, fetch_concurrency=1,
                  flush_every=8, flush_seconds=1e9)
    print("not killed")
    """
)


def test_sigkill_mid_run_keeps_flushed_vectors_and_resumes(tmp_path):
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()
    for i in range(40):
        (image_dir / f"{i}.png").write_bytes(png_bytes(i))
    store_root = tmp_path / "features"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(store_root), str(image_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -9, (done.returncode, done.stdout, done.stderr)

    tiny = bb.create_backbone(TINY, weights="random", device="cpu", image_size=32)
    generation = FeatureStore(store_root).create_generation(generation_info(tiny, 0))  # reopens: same info
    kept = generation.task_ids().tolist()
    assert len(kept) in (8, 16) and kept == list(range(len(kept)))  # whole flushes, nothing of the buffer

    items = [(i, str(image_dir / f"{i}.png")) for i in generation.missing(range(40))]
    report = extract_items(tiny, items, LocalImageLoader(), generation, batch_size=4, num_workers=0)
    assert (report.extracted, report.remaining) == (40 - len(kept), 0)
    assert generation.task_ids().tolist() == list(range(40))
