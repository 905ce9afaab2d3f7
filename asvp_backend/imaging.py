"""Decode images and read image files with size guards, whatever the bytes' origin (no URLs, no HTTP).

Invariant: a decode costs at most ``max_pixels`` pixels, checked from the header before any pixel is
decoded, and decoding memory is bounded per process, across every thread: ``DecodeBudget`` admits a decode
only while the estimated peak bytes of those in progress (``decode_cost``, from the header) fit
``decode_budget_mb``. A local file is read only when it is a regular file under the byte cap (a FIFO or a
device is refused before it can block), between checks of the caller's deadline. The result is always an
EXIF-upright RGB image, whatever the mode (transparency on white, 16-bit and float grey rescaled).

Why a module of its own: fetching task images (``labelstudio/images.py``), extracting features from a
folder and fine-tuning decode the same way, and only fetching needs Label Studio's URL rules, private-host
checks and deadline-bounded HTTP. Keeping the decoder here lets the others use it without importing
``labelstudio/``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from PIL import Image, ImageFile, UnidentifiedImageError

_FILE_CHUNK = 2**20  # local reads check the deadline between chunks of this size


class ImageFetchError(Exception):
    """An image could not be fetched or decoded; ``reason`` is short and never contains secrets."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Deadline(Protocol):
    """A caller's wall-clock budget (the fetcher's per-image deadline): ``check()`` raises ImageFetchError
    once it has run out."""

    def check(self) -> None: ...


# ---------------------------------------------------------------------------------------------- decoding


HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DEFAULT_DECODE_BUDGET_MB = 1024
_STRIP_PIXELS = 2**18  # transparency is composited in strips of about this many pixels
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: transparency is composited on white (not black), 16-bit/float grey rescaled.

    Transparency is composited strip by strip into the RGB result, so the peak is the source plus the
    result (about 8 bytes per pixel for RGBA), not the four full-size copies a whole-image composite makes."""
    if img.mode == "RGB":
        return img
    if _has_alpha(img):
        return _composite_on_white(img)
    if img.mode in HIGH_BIT_DEPTH_MODES:
        return high_bit_depth_to_grey(img).convert("RGB")
    return img.convert("RGB")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """The image over opaque white, as RGB; pixel for pixel what ``alpha_composite`` on the whole gives."""
    width, height = img.size
    out = Image.new("RGB", img.size, (255, 255, 255))
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        strip = img.crop(box)  # keeps a palette's transparency
        if strip.mode != "RGBA":
            strip = strip.convert("RGBA")
        white = Image.new("RGBA", strip.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, strip).convert("RGB"), (0, top))
    return out


def high_bit_depth_to_grey(img: Image.Image) -> Image.Image:
    """8-bit grey ("L") of a 16-bit, 32-bit integer or float image, scaled linearly from min(0, darkest)
    to max(0, brightest): anchored at zero so that a dim image stays dim.

    Why Pillow's point transform and not NumPy: it works in the image's own 2- or 4-byte pixels, so the
    peak is a few bytes per pixel on top of the source, where float64 arrays took over 20 (a 124 KB 16-bit
    PNG once needed 1.45 GB). Non-finite float pixels (NaN as "no data") become the darkest value."""
    if img.mode in ("I;16B", "I;16L", "I;16N"):
        img = img.convert("I")  # Pillow's point and getextrema only take native I;16
    extrema = cast(tuple[float, float], img.getextrema())  # one band: (min, max)
    lo, hi = float(extrema[0]), float(extrema[1])
    if img.mode == "F" and not (math.isfinite(lo) and math.isfinite(hi)):
        img, lo, hi = _finite_float_image(img)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi <= lo:
        return Image.new("L", img.size)
    scale = 255.0 / (hi - lo)
    offset = -lo * scale
    return img.point(lambda v: v * scale + offset).convert("L")  # convert clips to 0..255


def _finite_float_image(img: Image.Image) -> tuple[Image.Image, float, float]:
    """A mode-F copy with NaN and infinities replaced by the smallest finite value, and its extrema."""
    import numpy as np

    arr = np.array(img, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.new("F", img.size), 0.0, 0.0
    lo = float(arr.min(where=finite, initial=np.inf))
    hi = float(arr.max(where=finite, initial=-np.inf))
    np.copyto(arr, np.float32(lo), where=~finite)
    return Image.fromarray(arr), lo, hi


# ----------------------------------------------------------------------------------------- decode budget


# Peak bytes per pixel of ``decode_image`` (decoder output, conversion, result), by the mode the decoder
# produces; measured in tests/unit/test_images_decode_memory.py, which fails when a mode exceeds its entry.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # others: 4 (Pillow)
_HIGH_BIT_DEPTH_PEAK = {"I;16": 8, "I;16L": 8, "I;16B": 8, "I;16N": 8, "I": 10, "F": 15}  # F: NaN pixels


def decode_cost(img: Image.Image, size: tuple[int, int] | None = None) -> int:
    """Estimated peak bytes of decoding ``img`` (opened, not yet loaded) to an upright RGB image, at ``size``
    (default: its own); read from the header only. The decoded source stays alive until the RGB result
    exists, so both count."""
    width, height = size or img.size
    stored = _STORED_BYTES.get(img.mode, 4)
    if img.mode == "RGB":
        per_pixel = stored
    elif img.mode in HIGH_BIT_DEPTH_MODES:
        per_pixel = _HIGH_BIT_DEPTH_PEAK[img.mode]
    else:
        per_pixel = stored + 4  # the RGB result (Pillow keeps RGB in 4 bytes a pixel) beside the source
    if img.format == "WEBP":
        per_pixel += 13  # libwebp decodes to RGBA in its own buffer, then Pillow copies and converts it
    if _header_orientation(img) in _TRANSPOSE:
        per_pixel = max(per_pixel, 8)  # the RGB result and its transposed copy
    return width * height * per_pixel + _STRIP_PIXELS * 40  # plus the copies of one strip being composited


class DecodeBudget:
    """Bytes of decoding memory that the threads of one process may use at once (``decode_cost`` of every
    decode in progress). First come, first served, so a large image is not starved by a stream of small
    ones; a decode larger than the whole budget waits until it is alone, then takes all of it."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a decode budget must be at least 1 byte, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most ever reserved at once (for tests and benchmarks)
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @contextlib.contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        cost = min(max(int(cost), 0), self.limit)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self.used + cost > self.limit:
                    self._cond.wait()
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self.used += cost
            self.peak = max(self.peak, self.used)
            self._cond.notify_all()  # the next in line may fit beside this one
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self._cond.notify_all()


# Pillow allocates pixels in blocks of 16 MiB by default. Once glibc's dynamic mmap threshold has risen past
# that (it follows the size of freed mapped chunks, up to 32 MiB), blocks come from per-thread arenas and what
# a decode frees stays in the process: eight threads decoding 62-megapixel images two at a time still held
# 2.4 GB. Blocks above 32 MiB are always mapped, and unmapped when freed, so the budget bounds the resident
# size. PILLOW_BLOCK_SIZE, when set, wins.
PIXEL_BLOCK_BYTES = 64 * 2**20
if "PILLOW_BLOCK_SIZE" not in os.environ:
    with contextlib.suppress(AttributeError, ValueError):
        Image.core.set_block_size(PIXEL_BLOCK_BYTES)

_budgets: dict[int, DecodeBudget] = {}
_budgets_lock = threading.Lock()


def decode_budget(megabytes: float = DEFAULT_DECODE_BUDGET_MB) -> DecodeBudget:
    """This process's budget of ``megabytes`` MiB, shared by every fetcher and thread that asks for it."""
    limit = max(1, int(megabytes * 2**20))
    with _budgets_lock:
        budget = _budgets.get(limit)
        if budget is None:
            budget = _budgets[limit] = DecodeBudget(limit)
        return budget


def _forget_budgets() -> None:  # a forked child (a DataLoader worker) starts with its own, unlocked budgets
    global _budgets_lock
    _budgets.clear()
    _budgets_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_budgets)


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation of a loaded image (a PNG's eXIf chunk may follow its pixels)."""
    try:
        value = img.getexif().get(_ORIENTATION)
    except Exception:  # malformed EXIF must not lose an otherwise good image
        return None
    return value if isinstance(value, int) else None


def _header_orientation(img: Image.Image) -> int | None:
    """The orientation an opened, unloaded image declares in its header, for ``decode_cost``: without
    ``getexif()``, which would load a PNG's pixels, or cache an EXIF read before its eXIf chunk."""
    value = getattr(img, "tag_v2", {}).get(_ORIENTATION)  # TIFF
    raw = img.info.get("exif")
    if value is None and isinstance(raw, bytes):
        try:
            exif = Image.Exif()
            exif.load(raw)
            value = exif.get(_ORIENTATION)
        except Exception:
            return None
    return value if isinstance(value, int) else None


def _draft_to_fit(img: Image.Image, budget: DecodeBudget) -> None:
    """JPEG only (Pillow's only lazy decoder): decode at 1/2, 1/4 or 1/8 scale, the largest that fits the
    whole budget (or 1/8). Every other format is decoded at full size whatever the budget."""
    if img.format != "JPEG" or decode_cost(img) <= budget.limit:
        return
    width, height = img.size
    for factor in (2, 4, 8):
        size = (-(-width // factor), -(-height // factor))  # what libjpeg's scaled decode gives
        if decode_cost(img, size) <= budget.limit or factor == 8:
            img.draft(img.mode, size)  # takes effect once: the scale must be chosen before
            return


def decode_image(
    data: bytes,
    max_pixels: int = 64_000_000,
    budget: DecodeBudget | None = None,
    then: Callable[[Image.Image], Any] | None = None,
) -> Any:
    """Decode bytes to an EXIF-upright RGB image, checking the pixel count before decoding pixels.

    The decode waits for room in ``budget`` (this process's default budget when None); ``then``, when
    given, runs on the image while the room is still held (a transform that shrinks it), and its result
    is returned instead of the image. A JPEG larger than the whole budget is decoded at a reduced scale."""
    if not data:
        raise ImageFetchError("empty file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    budget = budget if budget is not None else decode_budget()
    with _decode_errors():
        img: Image.Image = Image.open(io.BytesIO(data))
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageFetchError("image has no pixels")
        if w * h > max_pixels:
            raise ImageFetchError(f"image too large: {w}x{h} pixels exceeds {max_pixels}")
        _draft_to_fit(img, budget)
    with budget.reserve(decode_cost(img)):
        with _decode_errors():
            img.load()
            orientation = _orientation(img)
            img = to_rgb(img)  # the decoded source is freed here
            if orientation in _TRANSPOSE:
                img = img.transpose(_TRANSPOSE[orientation])
        return then(img) if then is not None else img  # a transform's own errors are not decoding errors


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Pillow's exceptions as ImageFetchError with a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageFetchError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageFetchError("image too large (decompression bomb guard)") from e
    except UnidentifiedImageError as e:
        raise ImageFetchError("not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageFetchError(f"corrupt or truncated image ({type(e).__name__})") from e


# ------------------------------------------------------------------------------------------- local files


def read_local_file(path: str | os.PathLike, max_bytes: int, deadline: Deadline | None = None) -> bytes:
    """The bytes of a regular file, read under ``deadline`` (checked between 1 MiB reads).

    Opened without blocking and checked with fstat on the open descriptor (no window between a check and
    the open): a FIFO would block the read until some writer came, a device could stream forever, so
    only regular files are read. A read the kernel itself blocks in (a hung network mount) cannot be
    interrupted from here."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise ImageFetchError("file not found") from e
    except IsADirectoryError as e:
        raise ImageFetchError("path is a directory") from e
    except PermissionError as e:
        raise ImageFetchError("permission denied") from e
    except OSError as e:  # a socket (ENXIO), a name too long, ...
        raise ImageFetchError(f"local file unreadable ({type(e).__name__})") from e
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageFetchError("path is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ImageFetchError("not a regular file (a FIFO, socket or device)")
        if info.st_size > max_bytes:
            raise ImageFetchError(f"file too large: {info.st_size} bytes exceeds {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        while True:
            if deadline is not None:
                deadline.check()
            chunk = os.read(fd, _FILE_CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # the file grew after fstat
                raise ImageFetchError(f"file too large: exceeds {max_bytes} bytes")
    except ImageFetchError:
        raise
    except OSError as e:
        raise ImageFetchError(f"local file unreadable ({type(e).__name__})") from e
    finally:
        os.close(fd)


def read_local_image_file(
    path: str | os.PathLike,
    max_bytes: int,
    max_pixels: int,
    deadline: Deadline | None = None,
    budget: DecodeBudget | None = None,
    then: Callable[[Image.Image], Any] | None = None,
) -> Any:
    """Read and decode a file on disk with the same size guards as downloads (``decode_image``)."""
    data = read_local_file(path, max_bytes, deadline)
    if deadline is not None:
        deadline.check()
    return decode_image(data, max_pixels, budget, then)


@dataclass(frozen=True)
class LocalImageLoader:
    """Picklable ``load(path, task_id)`` for image files on disk (``extract --images DIR``)."""

    max_bytes: int = 50 * 2**20
    max_pixels: int = 64_000_000
    decode_budget_mb: float = DEFAULT_DECODE_BUDGET_MB

    def load(self, path: str, task_id: int | None = None) -> Image.Image:
        return cast(Image.Image, self.load_prepared(path, task_id))

    def load_prepared(
        self, path: str, task_id: int | None = None, then: Callable[[Image.Image], Any] | None = None
    ) -> Any:
        """``then(image)``, run while the image's decode budget is held (see ``decode_image``)."""
        return read_local_image_file(path, self.max_bytes, self.max_pixels, None,
                                     decode_budget(self.decode_budget_mb), then)  # fmt: skip
