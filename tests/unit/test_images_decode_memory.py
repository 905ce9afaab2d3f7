"""Decoding 16-bit and float images stays within a few bytes per pixel.

Measured as the rise of the peak resident set size in a fresh process (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``): Pillow allocates pixels outside Python's allocator, so tracemalloc alone would
miss most of them. The old float64 path peaked at about 25 bytes per pixel for a 16-bit PNG and 28 for a
float TIFF, the Pillow path at 8 and 10; the bound leaves room for allocator noise and fails the old path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MAX_BYTES_PER_PIXEL = 14
HEIGHT, WIDTH = 2000, 3000

MEASURE = f"""
import sys
from asvp_backend.labelstudio.images import decode_image

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current size
before = status("VmRSS:")
img = decode_image(data)
assert img.mode == "RGB" and img.size == ({WIDTH}, {HEIGHT}), (img.mode, img.size)
print((status("VmHWM:") - before) / (img.size[0] * img.size[1]))
"""


def _peak_bytes_per_pixel(path: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip())


def _gradient(dtype: type, top: float) -> np.ndarray:
    return np.repeat(np.linspace(0, top, WIDTH, dtype=np.float64)[None, :], HEIGHT, axis=0).astype(dtype)


@pytest.fixture(scope="module")
def can_reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")


@pytest.mark.parametrize(
    "name, image",
    [
        ("gradient16.png", lambda: Image.fromarray(_gradient(np.uint16, 65535))),
        ("gradient_f.tif", lambda: Image.fromarray(_gradient(np.float32, 1000.0))),
    ],
)
def test_high_bit_depth_decode_peak_memory(can_reset_peak, tmp_path, name, image):
    img = image()
    assert img.mode in ("I;16", "F")
    path = tmp_path / name
    img.save(path)
    per_pixel = _peak_bytes_per_pixel(path)
    assert per_pixel < MAX_BYTES_PER_PIXEL, f"{name}: {per_pixel:.1f} bytes per pixel"
