"""Fetch and decode task images from every URL kind Label Studio produces, with SSRF and size guards.

Why the guards: task data is user-controlled, so an image URL can point at cloud metadata
(169.254.169.254), at internal services, or at a decompression bomb. We only speak http(s) and data:,
resolve every hop's hostname and refuse non-public addresses (except Label Studio's own host), follow
redirects by hand so each hop is checked, stream with a byte cap, and check pixel counts before decoding.
The Label Studio token is sent only to the Label Studio origin. Residual risk: the HTTP library resolves
the name again when connecting, so a DNS-rebinding host could still swap addresses between the check and
the connection.

URL kinds (docs: label-studio.md section 6):
``/data/upload/...``            GET from Label Studio with auth (falls back to /storage-data/uploaded/)
``/data/local-files/?d=...``    read under ``document_root`` when set (no traversal), else GET from LS
``s3://``, ``gs://``, ``azure-blob://``   LS ``/tasks/{task_id}/presign/?fileuri=<base64>`` (redirects)
``http(s)://...``               downloaded directly
``data:image/...;base64,...``   decoded inline
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import ipaddress
import os
import posixpath
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote_to_bytes, urljoin, urlsplit

import requests
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
REDIRECT_CODES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


class ImageFetchError(Exception):
    """An image could not be fetched or decoded; ``reason`` is short and never contains secrets."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def default_resolve(host: str) -> list[str]:
    """All addresses ``host`` resolves to (IP literals resolve to themselves)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def is_public_address(addr: str) -> bool:
    """True for globally routable unicast addresses; False for loopback, private, link-local (cloud
    metadata), CGNAT, multicast, reserved and unspecified ones, including IPv4-mapped IPv6 forms."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return parts.scheme, parts.hostname.lower(), port


# ---------------------------------------------------------------------------------------------- decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: transparency is composited on white (not black), 16-bit/float grey rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode bytes to an EXIF-upright RGB image, checking the pixel count before decoding pixels."""
    if not data:
        raise ImageFetchError("empty file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageFetchError("image has no pixels")
            if w * h > max_pixels:
                raise ImageFetchError(f"image too large: {w}x{h} pixels exceeds {max_pixels}")
            img.load()
    except ImageFetchError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageFetchError("image too large (decompression bomb guard)") from e
    except UnidentifiedImageError as e:
        raise ImageFetchError("not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageFetchError(f"corrupt or truncated image ({type(e).__name__})") from e
    with contextlib.suppress(Exception):  # malformed EXIF must not lose an otherwise good image
        img = ImageOps.exif_transpose(img) or img
    return to_rgb(img)


def read_local_image_file(path: str | os.PathLike, max_bytes: int, max_pixels: int) -> Image.Image:
    """Read and decode a file on disk with the same size guards as downloads."""
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise ImageFetchError(f"file too large: {size} bytes exceeds {max_bytes}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise ImageFetchError("file not found") from e
    except IsADirectoryError as e:
        raise ImageFetchError("path is a directory") from e
    except PermissionError as e:
        raise ImageFetchError("permission denied") from e
    return decode_image(data, max_pixels)


@dataclass(frozen=True)
class LocalImageLoader:
    """Picklable ``load(path, task_id)`` for image files on disk (``extract --images DIR``)."""

    max_bytes: int = 50 * 2**20
    max_pixels: int = 64_000_000

    def load(self, path: str, task_id: int | None = None) -> Image.Image:
        return read_local_image_file(path, self.max_bytes, self.max_pixels)


# ---------------------------------------------------------------------------------------------- fetcher


@dataclass
class ImageFetcher:
    """Turns a task's image URL into bytes or an RGB image. Picklable (DataLoader workers)."""

    label_studio_url: str | None = None
    auth_headers: Callable[[], dict[str, str]] | None = None  # sent ONLY to the LS origin
    document_root: str | None = None  # LOCAL_FILES_DOCUMENT_ROOT
    allow_private_hosts: bool = False  # LS's own host is always allowed
    timeout: float = 10.0
    max_bytes: int = 50 * 2**20
    max_pixels: int = 64_000_000
    resolve: Callable[[str], list[str]] = default_resolve
    verify_ssl: bool = True
    _session: requests.Session | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None  # sessions hold sockets; each worker process opens its own
        return state

    # -- public --------------------------------------------------------------------------------------------

    def load(self, url: str, task_id: int | None = None) -> Image.Image:
        """RGB, EXIF-transposed image for ``url``; raises ImageFetchError with a short reason."""
        if self.document_root and self._is_local_files(url):
            return read_local_image_file(self._local_path(url), self.max_bytes, self.max_pixels)
        return decode_image(self.fetch_bytes(url, task_id), self.max_pixels)

    def fetch_bytes(self, url: str, task_id: int | None = None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("empty image URL")
        url = url.strip()
        lower = url.lower()
        if lower.startswith("data:"):
            return self._data_uri(url)
        scheme = lower.split(":", 1)[0] if ":" in lower.split("/", 1)[0] else ""
        if scheme in CLOUD_SCHEMES:
            return self._presigned(url, task_id)
        if self._is_local_files(url):
            if self.document_root:
                path = self._local_path(url)
                try:
                    size = os.stat(path).st_size
                    if size > self.max_bytes:
                        raise ImageFetchError(f"file too large: {size} bytes exceeds {self.max_bytes}")
                    with open(path, "rb") as f:
                        return f.read()
                except OSError as e:
                    raise ImageFetchError(f"local file unreadable ({type(e).__name__})") from e
            return self._download(self._ls_url(url))
        if url.startswith("/data/upload/"):
            return self._upload(url)
        if url.startswith("/"):
            return self._download(self._ls_url(url))
        if scheme in ("http", "https"):
            return self._download(url)
        raise ImageFetchError(f"unsupported URL scheme {scheme!r}" if scheme else "unsupported relative URL")

    # -- URL kinds -----------------------------------------------------------------------------------------

    def _ls_url(self, path: str) -> str:
        if not self.label_studio_url:
            raise ImageFetchError("Label Studio URL is not configured (needed for Label Studio-relative URLs)")
        return self.label_studio_url.rstrip("/") + "/" + path.lstrip("/")

    def _is_local_files(self, url: str) -> bool:
        if url.startswith("/data/local-files"):
            return True
        ls = _origin(self.label_studio_url or "")
        return ls is not None and _origin(url) == ls and urlsplit(url).path.startswith("/data/local-files")

    def _local_path(self, url: str) -> str:
        """Map ``?d=`` under document_root like LS's own view does; refuse anything that escapes it."""
        assert self.document_root
        values = parse_qs(urlsplit(url).query, keep_blank_values=True).get("d")
        rel = values[-1] if values else ""
        if not rel or "\x00" in rel:
            raise ImageFetchError("local-files URL has no file path")
        root = os.path.abspath(self.document_root)
        path = os.path.abspath(os.path.join(root, posixpath.normpath(rel).lstrip("/")))
        if os.path.commonpath([path, root]) != root:
            raise ImageFetchError("local-files path escapes the document root")
        return path

    def _upload(self, url: str) -> bytes:
        try:
            return self._download(self._ls_url(url))
        except ImageFetchError as first:
            if not first.reason.startswith("HTTP 4"):
                raise
            # Label Studio with cloud-backed default storage serves uploads through the storage proxy.
            filepath = url.lstrip("/").removeprefix("data/")
            try:
                return self._download(self._ls_url(f"/storage-data/uploaded/?filepath={filepath}"))
            except ImageFetchError:
                raise first from None

    def _presigned(self, url: str, task_id: int | None) -> bytes:
        if task_id is None:
            raise ImageFetchError("cloud storage URL needs a task id for Label Studio's presign endpoint")
        fileuri = base64.urlsafe_b64encode(url.encode()).decode()
        return self._download(self._ls_url(f"/tasks/{int(task_id)}/presign/?fileuri={fileuri}"))

    def _data_uri(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise ImageFetchError("malformed data URI")
        # base64 grows data by 4/3: refuse before decoding anything oversized
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise ImageFetchError(f"data URI too large (over {self.max_bytes} bytes)")
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(payload.strip(), validate=False)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as e:
            raise ImageFetchError("malformed base64 in data URI") from e
        if len(data) > self.max_bytes:
            raise ImageFetchError(f"data URI too large (over {self.max_bytes} bytes)")
        return data

    # -- HTTP ----------------------------------------------------------------------------------------------

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # no proxies from env: they would bypass our host checks
        return self._session

    def _is_ls(self, url: str) -> bool:
        ls = _origin(self.label_studio_url or "")
        return ls is not None and _origin(url) == ls

    def _check_host(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ImageFetchError(f"unsupported URL scheme {parts.scheme!r}")
        host = parts.hostname
        if not host:
            raise ImageFetchError("URL has no host")
        if parts.username or parts.password:
            raise ImageFetchError("credentials in URLs are not allowed")
        if self.allow_private_hosts or self._is_ls(url):
            return
        try:
            addrs = self.resolve(host)
        except (OSError, UnicodeError) as e:
            raise ImageFetchError(f"cannot resolve host {host}") from e
        if not addrs:
            raise ImageFetchError(f"cannot resolve host {host}")
        for a in addrs:
            try:
                public = is_public_address(a)
            except ValueError as e:
                raise ImageFetchError(f"host {host} resolved to an invalid address") from e
            if not public:
                raise ImageFetchError(f"refused: host {host} resolves to a non-public address")

    def _download(self, url: str) -> bytes:
        deadline = time.monotonic() + max(self.timeout * 3, self.timeout + 5)
        for _hop in range(MAX_REDIRECTS + 1):
            self._check_host(url)
            host = urlsplit(url).hostname
            headers = {"Accept": "image/*,*/*;q=0.5"}
            if self.auth_headers is not None and self._is_ls(url):
                headers.update(self.auth_headers())
            try:
                resp = self.session.get(
                    url,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=self.timeout,
                    verify=self.verify_ssl,
                )
            except requests.Timeout as e:
                raise ImageFetchError(f"timeout contacting {host}") from e
            except requests.RequestException as e:
                raise ImageFetchError(f"connection to {host} failed ({type(e).__name__})") from e
            with resp:
                if resp.status_code in REDIRECT_CODES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise ImageFetchError(f"redirect without Location from {host}")
                    url = urljoin(url, location)
                    continue
                if resp.status_code >= 400:
                    raise ImageFetchError(f"HTTP {resp.status_code} from {host}")
                return self._read_body(resp, host or "", deadline)
        raise ImageFetchError(f"too many redirects (>{MAX_REDIRECTS})")

    def _read_body(self, resp: requests.Response, host: str, deadline: float) -> bytes:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise ImageFetchError(f"download too large: {length} bytes exceeds {self.max_bytes}")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageFetchError(f"download too large: exceeds {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageFetchError(f"download from {host} too slow")
        except requests.RequestException as e:
            raise ImageFetchError(f"download from {host} interrupted ({type(e).__name__})") from e
        return bytes(buf)
