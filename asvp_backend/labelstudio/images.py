"""Fetch task images from every URL kind Label Studio produces, with SSRF and size guards, and decode them.

Why the guards: task data is user-controlled, so an image URL can point at cloud metadata
(169.254.169.254), at internal services, or at a decompression bomb. We only speak http(s) and data:,
resolve every hop's hostname and refuse non-public addresses (except Label Studio's own host), follow
redirects by hand so each hop is checked, stream with a byte cap, and decode with ``asvp_backend/imaging.py``
(pixel counts checked before decoding, decoding memory bounded per process). The Label Studio token is sent
only to the Label Studio origin. Residual risk: the HTTP library resolves the name again when connecting, so
a DNS-rebinding host could still swap addresses between the check and the connection.

Invariant: one image costs at most ``total_timeout`` seconds of wall-clock time on the network (connect,
TLS handshake, headers, body, every redirect), however slowly a server drips bytes, and reading a local file
is under the same clock (regular files only: a FIFO or a device is refused before it can block). Only DNS
lookups (bounded by the system resolver) and the decode itself (bounded by ``max_pixels``) are outside it,
and a decode never starts once the clock has run out.

URL kinds (docs/label-studio.md, *Image URLs*):
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
import ipaddress
import os
import posixpath
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote_to_bytes, urljoin, urlsplit

import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import HTTPResponse

from asvp_backend.imaging import (
    DEFAULT_DECODE_BUDGET_MB,
    ImageFetchError,  # re-exported: callers of the fetcher catch it from here
    decode_budget,
    decode_image,
    read_local_file,
)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
REDIRECT_CODES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_active = threading.local()  # .deadline: the _Deadline of the download running on this thread, if any


def default_resolve(host: str) -> list[str]:
    """All addresses ``host`` resolves to (IP literals resolve to themselves)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_OTHER = ipaddress.IPv6Network("64:ff9b::/32")  # includes the local-use 64:ff9b:1::/48
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d


def is_public_address(addr: str) -> bool:
    """True for globally routable unicast addresses; False for loopback, private, link-local (cloud
    metadata), CGNAT, multicast, reserved and unspecified ones.

    An IPv6 address that a translator or relay delivers to an embedded IPv4 address (IPv4-mapped, NAT64
    64:ff9b::/96, 6to4 2002::/16) is judged by that IPv4 address: 64:ff9b::7f00:1 reaches 127.0.0.1 on
    the translator. Refused outright, because the IPv4 target cannot be read reliably: local-use NAT64
    (64:ff9b:1::/48, the operator picks where the IPv4 bits go), Teredo (2001::/32) and IPv4-compatible
    ::a.b.c.d. These rules are explicit because Python's own tables for these ranges differ by version.
    """
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None or (ip in _NAT64_OTHER and ip not in _NAT64_WELL_KNOWN):
            return False
        if ip in _IPV4_COMPATIBLE:  # also :: and ::1, which are not public anyway
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that traffic to ``ip`` ends up at, for the forms where that is well defined."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def image_value_problem(value: object) -> str | None:
    """Why a task's image value cannot be fetched (a short skip reason), or None for a usable URL string.

    Task data is free-form JSON, so the field an ``<Image>`` tag names can hold anything; callers record
    this reason instead of dropping the task without a word."""
    if isinstance(value, str):
        return None if value.strip() else "image value is an empty string"
    if value is None:
        return "image value is missing (null)"
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),  # before int: bool is an int
        ((int, float), "a number"),
        ((list, tuple), "a list"),
        (dict, "an object"),
    ]
    kind = next((name for types, name in kinds if isinstance(value, types)), f"a {type(value).__name__}")
    return f"image value is {kind}, not a URL string"


def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return parts.scheme, parts.hostname.lower(), port


# ---------------------------------------------------------------------------------------------- deadline


class _Deadline:
    """One image's wall-clock budget across connects, TLS handshakes, headers, bodies and redirects.

    Why a watchdog and not only socket timeouts: a socket timeout bounds each read, and a server that sends
    one byte just inside it never trips it. While ``armed``, a timer shuts down every socket the download
    opened (registered by ``_WatchedConnection``) the moment the budget runs out, so a blocked read returns
    at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._fired = False

    @property
    def reason(self) -> str:
        return f"timed out after {self.seconds:g}s"

    def left(self) -> float:
        return self.expires - time.monotonic()

    def expired(self) -> bool:
        return self._fired or self.left() <= 0

    def check(self) -> None:
        if self.expired():
            raise ImageFetchError(self.reason)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self.check()
        timer = threading.Timer(self.left(), self._fire)
        timer.daemon = True
        outer = getattr(_active, "deadline", None)
        _active.deadline = self
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            _active.deadline = outer
            with self._lock:
                for twin in self._sockets:
                    twin.close()
                self._sockets.clear()

    def watch(self, sock: socket.socket) -> None:
        """Keep a duplicate of ``sock``'s descriptor: shutting the duplicate down ends reads on the original,
        plain or TLS (even mid-handshake), without touching objects that the HTTP library owns."""
        twin = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        with self._lock:
            if not self._fired:
                self._sockets.append(twin)
                return
        _shutdown(twin)
        twin.close()

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            for twin in self._sockets:
                _shutdown(twin)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer or the HTTP library
        sock.shutdown(socket.SHUT_RDWR)


def _watch_socket(sock: socket.socket | None) -> None:
    deadline = getattr(_active, "deadline", None)
    if deadline is not None and sock is not None:
        with contextlib.suppress(OSError):  # a closed socket, or no descriptor left: per-read timeouts remain
            deadline.watch(sock)


class _WatchedConnection(HTTPConnection):
    """Registers its socket with the calling thread's deadline when it is opened (before any TLS
    handshake) and before each response is read (a kept-alive socket was opened for an earlier image)."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch_socket(sock)
        return sock

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]  # same signature as urllib3's
        _watch_socket(self.sock)
        return super().getresponse()


class _WatchedHTTPSConnection(_WatchedConnection, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


# ---------------------------------------------------------------------------------------------- fetcher


@dataclass
class ImageFetcher:
    """Turns a task's image URL into bytes or an RGB image. Picklable (DataLoader workers) and safe to
    share between threads (each thread gets its own HTTP session)."""

    label_studio_url: str | None = None
    auth_headers: Callable[[], dict[str, str]] | None = None  # sent ONLY to the LS origin
    document_root: str | None = None  # LOCAL_FILES_DOCUMENT_ROOT
    allow_private_hosts: bool = False  # LS's own host is always allowed
    timeout: float = 10.0  # connect and per-read timeout
    max_bytes: int = 50 * 2**20
    max_pixels: int = 64_000_000
    resolve: Callable[[str], list[str]] = default_resolve
    verify_ssl: bool = True
    total_timeout: float | None = None  # wall-clock budget per image; None: max(3 * timeout, timeout + 5)
    decode_budget_mb: float = DEFAULT_DECODE_BUDGET_MB  # DECODE_BUDGET_MB: this process's, see DecodeBudget
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_local"]  # sessions hold sockets; each worker process opens its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # -- public --------------------------------------------------------------------------------------------

    def load(self, url: str, task_id: int | None = None) -> Image.Image:
        """RGB, EXIF-transposed image for ``url``; raises ImageFetchError with a short reason."""
        return cast(Image.Image, self.load_prepared(url, task_id))

    def load_prepared(
        self, url: str, task_id: int | None = None, then: Callable[[Image.Image], Any] | None = None
    ) -> Any:
        """``then(image)`` for ``url``, run while the image's room in the decode budget is still held (the
        full-size image never outlives its reservation); the image itself when ``then`` is None."""
        deadline = self._deadline()
        data = self._fetch(url, task_id, deadline)
        deadline.check()  # decoding cannot be interrupted: never start it once the budget is spent
        return decode_image(data, self.max_pixels, decode_budget(self.decode_budget_mb), then)

    def fetch_bytes(self, url: str, task_id: int | None = None) -> bytes:
        return self._fetch(url, task_id, self._deadline())

    @property
    def deadline_seconds(self) -> float:
        """The wall-clock budget of one image (``total_timeout``, or its default from ``timeout``)."""
        return self.total_timeout if self.total_timeout is not None else max(self.timeout * 3, self.timeout + 5)

    def _deadline(self) -> _Deadline:
        return _Deadline(self.deadline_seconds)

    def _fetch(self, url: str, task_id: int | None, deadline: _Deadline) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("empty image URL")
        url = url.strip()
        lower = url.lower()
        if lower.startswith("data:"):
            return self._data_uri(url)
        scheme = lower.split(":", 1)[0] if ":" in lower.split("/", 1)[0] else ""
        if scheme in CLOUD_SCHEMES:
            return self._presigned(url, task_id, deadline)
        if self._is_local_files(url):
            if self.document_root:
                return read_local_file(self._local_path(url), self.max_bytes, deadline)
            return self._download(self._ls_url(url), deadline)
        if url.startswith("/data/upload/"):
            return self._upload(url, deadline)
        if url.startswith("/"):
            return self._download(self._ls_url(url), deadline)
        if scheme in ("http", "https"):
            return self._download(url, deadline)
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

    def _upload(self, url: str, deadline: _Deadline) -> bytes:
        try:
            return self._download(self._ls_url(url), deadline)
        except ImageFetchError as first:
            if not first.reason.startswith("HTTP 4"):
                raise
            # Label Studio with cloud-backed default storage serves uploads through the storage proxy.
            filepath = url.lstrip("/").removeprefix("data/")
            try:
                return self._download(self._ls_url(f"/storage-data/uploaded/?filepath={filepath}"), deadline)
            except ImageFetchError as second:
                if second.reason == deadline.reason:
                    raise
                raise first from None

    def _presigned(self, url: str, task_id: int | None, deadline: _Deadline) -> bytes:
        if task_id is None:
            raise ImageFetchError("cloud storage URL needs a task id for Label Studio's presign endpoint")
        fileuri = base64.urlsafe_b64encode(url.encode()).decode()
        return self._download(self._ls_url(f"/tasks/{int(task_id)}/presign/?fileuri={fileuri}"), deadline)

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
        """This thread's session: requests does not promise thread safety, and a kept-alive socket that
        a deadline shut down must not be handed to another thread's download."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies from env: they would bypass our host checks
            for prefix in ("http://", "https://"):
                session.mount(prefix, _WatchedAdapter())
            self._local.session = session
        return session

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

    def _download(self, url: str, deadline: _Deadline) -> bytes:
        """GET ``url`` following redirects by hand (each hop's host is checked) within ``deadline``."""
        try:
            with deadline.armed():
                data = self._follow_redirects(url, deadline)
        except ImageFetchError as e:
            # A read cut short by the watchdog surfaces as a connection error or a truncated body.
            if deadline.expired():
                raise ImageFetchError(deadline.reason) from e
            raise
        deadline.check()
        return data

    def _follow_redirects(self, url: str, deadline: _Deadline) -> bytes:
        for _hop in range(MAX_REDIRECTS + 1):
            self._check_host(url)
            host = urlsplit(url).hostname
            headers = {"Accept": "image/*,*/*;q=0.5"}
            if self.auth_headers is not None and self._is_ls(url):
                headers.update(self.auth_headers())
            deadline.check()
            per_read = min(self.timeout, deadline.left())
            try:
                resp = self.session.get(
                    url,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=(per_read, per_read),
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
                return self._read_body(resp, host or "")
        raise ImageFetchError(f"too many redirects (>{MAX_REDIRECTS})")

    def _read_body(self, resp: requests.Response, host: str) -> bytes:
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise ImageFetchError(f"download too large: {length} bytes exceeds {self.max_bytes}")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageFetchError(f"download too large: exceeds {self.max_bytes} bytes")
        except requests.RequestException as e:
            raise ImageFetchError(f"download from {host} interrupted ({type(e).__name__})") from e
        return bytes(buf)
