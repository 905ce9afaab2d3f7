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
from asvp_backend.imaging import decode_image

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


# ----------------------------------------------------------------------- decode budget (issue 17, finding 7)
#
# One 62-megapixel RGBA PNG of 260 KB peaked at 1.22 GB to decode (four whole-image copies to composite its
# transparency, one more to apply EXIF orientation), and every fetch thread decoded at once: four such images
# took 4 GB. Now transparency is composited in strips, and DecodeBudget admits decodes only while the sum of
# their estimated peaks (decode_cost, read from the header) fits the process's budget.

ESTIMATE = """
import io, sys
from PIL import Image
from asvp_backend.imaging import decode_budget, decode_cost, decode_image

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

data = open(sys.argv[1], "rb").read()
estimate = decode_cost(Image.open(io.BytesIO(data)))
budget = decode_budget(int(sys.argv[2]))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
decode_image(data, budget=budget)
print(status("VmHWM:") - before, estimate)
"""

CONCURRENT = """
import sys, threading
from asvp_backend.imaging import decode_budget, decode_image

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

data = open(sys.argv[1], "rb").read()
budget = decode_budget(int(sys.argv[2]))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
go = threading.Barrier(8)

def work():
    go.wait()
    decode_image(data, budget=budget, then=lambda img: img.resize((32, 32)))

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(status("VmHWM:") - before, budget.peak)
"""


def _run(script: str, *args: object) -> list[int]:
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [int(v) for v in done.stdout.split()]


def _picture(mode: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    ramp = (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.stack([ramp, ramp[::-1], ramp, ramp[:, ::-1]], axis=-1))
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(ramp), Image.fromarray(ramp[::-1])])
    if mode == "P":
        img = Image.fromarray(np.stack([ramp] * 3, axis=-1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        img.info["transparency"] = 3
        return img
    if mode == "F":
        values = ramp.astype(np.float32)
        values[0, :10] = np.nan  # the no-data path, the costliest
        return Image.fromarray(values)
    if mode == "I;16":
        return Image.fromarray(ramp.astype(np.uint16) * 257)
    return Image.fromarray(np.stack([ramp, ramp[::-1], ramp], axis=-1)).convert(mode)


@pytest.mark.parametrize(
    "name, mode, fmt, options",
    [
        ("rgba.png", "RGBA", "PNG", {}),
        ("la.png", "LA", "PNG", {}),
        ("p_transparent.png", "P", "PNG", {"transparency": 3}),
        ("rgb.png", "RGB", "PNG", {}),
        ("grey.png", "L", "PNG", {}),
        ("rotated.jpg", "RGB", "JPEG", {"exif": b"rotate"}),
        ("cmyk.jpg", "CMYK", "JPEG", {}),
        ("rgba.webp", "RGBA", "WEBP", {"quality": 80}),
        ("grey16.png", "I;16", "PNG", {}),
        ("nan.tif", "F", "TIFF", {}),
    ],
)
def test_the_estimate_covers_the_measured_peak(can_reset_peak, tmp_path, name, mode, fmt, options):
    """decode_cost, read from the header, is at least the real peak: what the budget counts is what is used."""
    if options.get("exif") == b"rotate":
        exif = Image.Exif()
        exif[0x0112] = 6
        options = {"exif": exif.tobytes()}
    _picture(mode, (2000, 1500)).save(tmp_path / name, fmt, **options)
    peak, estimate = _run(ESTIMATE, tmp_path / name, 4096)
    assert peak <= estimate, f"{name}: peak {peak / 2**20:.0f} MiB above the estimate {estimate / 2**20:.0f} MiB"
    assert estimate < 2 * peak + 16 * 2**20, f"{name}: estimate {estimate / 2**20:.0f} MiB far above {peak / 2**20:.0f}"


def test_eight_threads_decode_within_the_budget(can_reset_peak, tmp_path):
    """Eight RGBA images decoded by eight threads at once: the peak stays near the budget (two at a time), where
    without it all eight decode together."""
    _picture("RGBA", (2000, 2000)).save(tmp_path / "rgba.png")
    budget_mb = 100  # about two of them: decode_cost is 42 MiB each
    peak, reserved = _run(CONCURRENT, tmp_path / "rgba.png", budget_mb)
    assert reserved <= budget_mb * 2**20
    assert peak < (budget_mb + 24) * 2**20, f"peak {peak / 2**20:.0f} MiB with a budget of {budget_mb} MiB"
    unbounded, _ = _run(CONCURRENT, tmp_path / "rgba.png", 100_000)
    assert unbounded > 2 * peak, (unbounded, peak)  # what the budget prevents


def test_an_image_larger_than_the_budget_is_decoded_alone_or_reduced():
    import io

    from asvp_backend.imaging import DecodeBudget, decode_image

    budget = DecodeBudget(20 * 2**20)
    png, jpeg = io.BytesIO(), io.BytesIO()
    _picture("RGBA", (3000, 2000)).save(png, "PNG")
    _picture("RGB", (4000, 3000)).save(jpeg, "JPEG")
    assert decode_image(png.getvalue(), budget=budget).size == (3000, 2000)  # PNG: full size, the whole budget
    assert budget.peak == budget.limit and budget.used == 0
    assert decode_image(jpeg.getvalue(), budget=budget).size == (1000, 750)  # JPEG: decoded at 1/4 scale


def test_the_budget_serves_in_order():
    """A large decode waiting for room is not overtaken by small ones that arrive after it."""
    import threading
    import time

    from asvp_backend.imaging import DecodeBudget

    budget = DecodeBudget(10)
    order: list[str] = []
    first = budget.reserve(6)
    first.__enter__()

    def take(name: str, cost: int) -> None:
        with budget.reserve(cost):
            order.append(name)

    large = threading.Thread(target=take, args=("large", 8))
    large.start()
    time.sleep(0.2)
    small = threading.Thread(target=take, args=("small", 2))  # would fit beside the first, but comes later
    small.start()
    time.sleep(0.2)
    assert order == []
    first.__exit__(None, None, None)
    large.join(5)
    small.join(5)
    assert order == ["large", "small"] and budget.used == 0
