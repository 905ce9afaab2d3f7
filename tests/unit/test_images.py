"""ImageFetcher: URL kinds, SSRF guards, token scoping, size/format guards, decoding to RGB."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from asvp_backend.imaging import LocalImageLoader, decode_image, to_rgb
from asvp_backend.labelstudio.images import (
    ImageFetcher,
    ImageFetchError,
    default_resolve,
    image_value_problem,
    is_public_address,
)

TOKEN = "Token s3cr3t-ls-token"


def _png(size=(6, 4), color=(200, 10, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_with_orientation(orientation: int) -> bytes:
    img = Image.new("RGB", (20, 10), (0, 128, 255))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid PNG header that claims w x h pixels (a few bytes on the wire)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


PNG = _png()


class _Server:
    """Tiny HTTP server that records request headers per path."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []  # (host header, path, headers)
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802 (stdlib name)
                outer.seen.append((self.headers.get("Host", ""), self.path, dict(self.headers)))
                status, headers, body = outer.respond(self)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def respond(self, req: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(req.path)
        q = parse_qs(parts.query)
        if parts.path == "/redirect":
            return 302, {"Location": q["to"][0]}, b""
        protected = parts.path.startswith(("/data/", "/storage-data/")) or "/presign/" in parts.path
        if protected and req.headers.get("Authorization") != TOKEN:
            return 401, {}, b"unauthorised"
        if "/presign/" in parts.path:
            uri = base64.urlsafe_b64decode(q["fileuri"][0]).decode()
            assert uri == "s3://bucket/a.png"
            return 303, {"Location": self.url("/img.png", host="localhost") + "?X-Amz-Signature=secret"}, b""
        if parts.path == "/storage-data/uploaded/" and q.get("filepath") == ["upload/1/only-proxy.png"]:
            return 200, {"Content-Type": "image/png"}, PNG
        if parts.path == "/data/local-files/":
            return 200, {"Content-Type": "image/png"}, PNG
        if parts.path in self.routes:
            return self.routes[parts.path]
        return 404, {}, b"not found"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    s.routes.update(
        {
            "/img.png": (200, {"Content-Type": "image/png"}, PNG),
            "/data/upload/1/x.png": (200, {"Content-Type": "image/png"}, PNG),
            "/rotated.jpg": (200, {}, _jpeg_with_orientation(6)),
            "/text.txt": (200, {"Content-Type": "text/plain"}, b"hello, not an image\n"),
            "/empty": (200, {}, b""),
            "/corrupt.png": (200, {}, PNG[:16] + b"\x00garbage" * 20),
            "/truncated.jpg": (200, {}, _jpeg_with_orientation(1)[:200]),
            "/bomb.png": (200, {}, _bomb_png()),
            "/big.bin": (200, {}, b"\0" * 300_000),
        }
    )
    yield s
    s.close()


def _public_localhost(host: str) -> list[str]:
    """Pretend 'localhost' is a public host (the request still connects to the local test server)."""
    return ["93.184.216.34"] if host == "localhost" else default_resolve(host)


@pytest.fixture
def ls_fetcher(server):
    """Fetcher whose Label Studio is the test server at 127.0.0.1 (its own host is always allowed)."""
    return ImageFetcher(
        label_studio_url=server.url(""),
        auth_headers=lambda: {"Authorization": TOKEN},
        resolve=_public_localhost,
        timeout=5,
    )


# ---------------------------------------------------------------------------------------------- URL kinds


def test_plain_http_allowed_when_private_hosts_allowed(server):
    img = ImageFetcher(allow_private_hosts=True).load(server.url("/img.png"))
    assert img.mode == "RGB" and img.size == (6, 4)


def test_upload_url_goes_to_ls_with_token(server, ls_fetcher):
    img = ls_fetcher.load("/data/upload/1/x.png")
    assert img.size == (6, 4)
    host, path, headers = server.seen[-1]
    assert path == "/data/upload/1/x.png" and headers["Authorization"] == TOKEN


def test_upload_falls_back_to_storage_proxy(server, ls_fetcher):
    assert ls_fetcher.load("/data/upload/1/only-proxy.png").size == (6, 4)
    assert server.seen[-1][1] == "/storage-data/uploaded/?filepath=upload/1/only-proxy.png"


def test_local_files_read_from_document_root(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(PNG)
    (tmp_path.parent / "secret.png").write_bytes(PNG)
    f = ImageFetcher(document_root=str(tmp_path))
    assert f.load("/data/local-files/?d=images/a.png").size == (6, 4)
    assert f.load("/data/local-files/?d=images%2Fa.png").size == (6, 4)
    assert f.fetch_bytes("/data/local-files/?d=images/a.png") == PNG
    for bad in ("/data/local-files/?d=../secret.png", "/data/local-files/?d=images/../../secret.png"):
        with pytest.raises(ImageFetchError, match="escapes"):
            f.load(bad)
    with pytest.raises(ImageFetchError, match="not found"):
        f.load("/data/local-files/?d=/etc/passwd")  # absolute paths stay under the root, like LS
    with pytest.raises(ImageFetchError, match="no file path"):
        f.load("/data/local-files/")


def test_local_files_downloaded_from_ls_without_document_root(server, ls_fetcher):
    assert ls_fetcher.load("/data/local-files/?d=images/a.png").size == (6, 4)
    assert server.seen[-1][2]["Authorization"] == TOKEN


def test_relative_url_without_ls_url_fails_clearly():
    with pytest.raises(ImageFetchError, match="Label Studio URL is not configured"):
        ImageFetcher().fetch_bytes("/data/upload/1/x.png")


def test_cloud_uri_presigned_via_ls_and_token_not_forwarded(server, ls_fetcher):
    n = len(server.seen)
    img = ls_fetcher.load("s3://bucket/a.png", task_id=7)
    assert img.size == (6, 4)
    (h1, p1, hdr1), (h2, p2, hdr2) = server.seen[n:]
    assert p1.startswith("/tasks/7/presign/?fileuri=") and hdr1["Authorization"] == TOKEN
    assert h2.startswith("localhost") and "Authorization" not in hdr2


def test_cloud_uri_needs_task_id(ls_fetcher):
    for uri in ("s3://b/a.png", "gs://b/a.png", "azure-blob://c/a.png"):
        with pytest.raises(ImageFetchError, match="task id"):
            ls_fetcher.fetch_bytes(uri)


def test_data_uri():
    f = ImageFetcher()
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert f.load(uri).size == (6, 4)
    with pytest.raises(ImageFetchError, match="malformed"):
        f.fetch_bytes("data:image/png;base64")
    with pytest.raises(ImageFetchError, match="not a recognised"):
        f.load("data:text/plain,hello")
    with pytest.raises(ImageFetchError, match="too large"):
        ImageFetcher(max_bytes=100).fetch_bytes(uri + "A" * 400)


# ---------------------------------------------------------------------------------------------- SSRF + token


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:1/x.png",
        "http://10.1.2.3/x.png",
        "http://[::1]/x.png",
        "http://[::ffff:169.254.169.254]/x.png",
        "http://0.0.0.0/x.png",
    ],
)
def test_private_and_metadata_addresses_refused(url):
    with pytest.raises(ImageFetchError, match="non-public"):
        ImageFetcher().fetch_bytes(url)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "javascript:x"])
def test_other_schemes_refused(url):
    with pytest.raises(ImageFetchError, match="unsupported"):
        ImageFetcher(allow_private_hosts=True).fetch_bytes(url)


def test_redirect_from_public_host_to_private_address_refused(server, ls_fetcher):
    f = ImageFetcher(resolve=_public_localhost, timeout=5)
    assert f.load(server.url("/img.png", host="localhost")).size == (6, 4)  # 'public' host works
    for target in ("http://169.254.169.254/latest/meta-data/", server.url("/img.png")):
        n = len(server.seen)
        with pytest.raises(ImageFetchError, match="non-public"):
            f.fetch_bytes(server.url(f"/redirect?to={target}", host="localhost"))
        assert len(server.seen) == n + 1  # the private hop was never requested


def test_redirect_to_file_scheme_refused(server):
    f = ImageFetcher(allow_private_hosts=True)
    with pytest.raises(ImageFetchError, match="unsupported"):
        f.fetch_bytes(server.url("/redirect?to=file:///etc/passwd"))


def test_too_many_redirects(server):
    f = ImageFetcher(allow_private_hosts=True)
    url = server.url("/img.png")
    for _ in range(4):
        url = server.url("/redirect?to=" + url.replace("?", "%3F").replace("=", "%3D").replace("&", "%26"))
    with pytest.raises(ImageFetchError, match="too many redirects"):
        f.fetch_bytes(url)


def test_token_only_sent_to_ls_origin(server, ls_fetcher):
    n = len(server.seen)
    ls_fetcher.load(server.url("/img.png"))  # absolute URL on the LS origin
    ls_fetcher.load(server.url("/img.png", host="localhost"))  # same machine, other origin
    ls_fetcher.load(server.url("/redirect?to=" + server.url("/img.png", host="localhost")))
    (_, _, a), (_, _, b), (_, _, c1), (_, _, c2) = server.seen[n:]
    assert a["Authorization"] == TOKEN
    assert "Authorization" not in b
    assert c1["Authorization"] == TOKEN and "Authorization" not in c2


def test_error_reasons_never_leak_secrets(server, ls_fetcher):
    with pytest.raises(ImageFetchError) as e:
        ls_fetcher.fetch_bytes(server.url("/missing.png?X-Amz-Signature=topsecret", host="localhost"))
    assert e.value.reason == "HTTP 404 from localhost"
    assert "secret" not in str(e.value) and "s3cr3t" not in str(e.value)


def test_http_errors_and_unreachable(server):
    f = ImageFetcher(allow_private_hosts=True, timeout=2)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        f.fetch_bytes(server.url("/nope"))
    with pytest.raises(ImageFetchError, match="connection"):
        f.fetch_bytes("http://127.0.0.1:1/x.png")
    with pytest.raises(ImageFetchError, match="cannot resolve"):
        ImageFetcher(resolve=lambda h: (_ for _ in ()).throw(OSError("nx"))).fetch_bytes("http://nx.invalid/")


# ---------------------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/text.txt", "not a recognised image format"),
        ("/empty", "empty file"),
        ("/corrupt.png", "corrupt|not a recognised"),
        ("/truncated.jpg", "corrupt or truncated"),
        ("/bomb.png", "too large"),
    ],
)
def test_bad_files_raise_image_fetch_error(server, path, reason):
    with pytest.raises(ImageFetchError, match=reason):
        ImageFetcher(allow_private_hosts=True).load(server.url(path))


def test_download_size_cap(server):
    with pytest.raises(ImageFetchError, match="too large"):
        ImageFetcher(allow_private_hosts=True, max_bytes=100_000).fetch_bytes(server.url("/big.bin"))


def test_max_pixels_checked_before_decoding():
    with pytest.raises(ImageFetchError, match="too large: 6x4"):
        decode_image(PNG, max_pixels=10)


# ---------------------------------------------------------------------------------------------- decoding


def test_exif_orientation_applied(server):
    img = ImageFetcher(allow_private_hosts=True).load(server.url("/rotated.jpg"))
    assert img.size == (10, 20)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16", "1"])
def test_modes_converted_to_rgb(mode):
    img = Image.new(mode, (5, 3))
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (5, 3)


def test_transparent_pixels_become_white():
    buf = io.BytesIO()
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(buf, "PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_local_image_loader(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.txt").write_text("nope")
    loader = LocalImageLoader(max_bytes=10_000)
    assert loader.load(str(tmp_path / "a.png")).size == (6, 4)
    with pytest.raises(ImageFetchError):
        loader.load(str(tmp_path / "b.txt"))
    with pytest.raises(ImageFetchError, match="too large"):
        LocalImageLoader(max_bytes=10).load(str(tmp_path / "a.png"))


def test_fetcher_is_picklable_after_use(server):
    import pickle

    f = ImageFetcher(allow_private_hosts=True)
    f.fetch_bytes(server.url("/img.png"))
    g = pickle.loads(pickle.dumps(f))
    assert g.fetch_bytes(server.url("/img.png")) == PNG


def test_is_public_address():
    assert is_public_address("93.184.216.34")
    assert is_public_address("2606:2800:220:1:248:1893:25c8:1946")
    for a in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fd00::1",
        "224.0.0.1",
        "::ffff:10.0.0.1",
        "0.0.0.0",
    ):
        assert not is_public_address(a), a


@pytest.mark.parametrize(
    "addr",
    [
        # NAT64 well-known prefix: the translator delivers to the embedded IPv4 address
        "64:ff9b::7f00:1",  # 127.0.0.1
        "64:ff9b::a00:1",  # 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # 169.254.169.254
        # NAT64 local-use prefix: refused whatever it embeds (the operator decides where the IPv4 bits go)
        "64:ff9b:1::7f00:1",
        "64:ff9b:1::a00:1",
        "64:ff9b:1::a9fe:a9fe",
        "64:ff9b:1::808:808",
        # 6to4: a relay delivers to the embedded IPv4 address
        "2002:7f00:1::",
        "2002:a00:1::1",
        "2002:a9fe:a9fe::",
        # Teredo: refused whatever it embeds
        "2001:0:a9fe:a9fe:0:f227:80ff:fffe",  # server 169.254.169.254, client 127.0.0.1 (obfuscated)
        "2001:0:808:808:0:f227:f5ff:fffe",  # server 8.8.8.8, client 10.0.0.1
        "2001:0:808:808:0:f227:f7f7:f7f7",  # server 8.8.8.8, client 8.8.8.8
        # IPv4-compatible (deprecated)
        "::7f00:1",
        "::808:808",
    ],
)
def test_ipv6_forms_embedding_ipv4_are_judged_by_it(addr):
    assert not is_public_address(addr)


@pytest.mark.parametrize("addr", ["64:ff9b::808:808", "2002:808:808::", "2002:808:808:1::1", "::ffff:8.8.8.8"])
def test_ipv6_forms_embedding_a_public_ipv4_stay_public(addr):
    """DNS64 networks reach every IPv4-only image host through 64:ff9b::/96; refusing it would break them."""
    assert is_public_address(addr)


def test_nat64_address_refused_by_fetcher():
    with pytest.raises(ImageFetchError, match="non-public"):
        ImageFetcher().fetch_bytes("http://[64:ff9b::a9fe:a9fe]/latest/meta-data/")


@pytest.mark.parametrize(
    "value, reason",
    [
        ("/data/upload/1/x.png", None),
        ("  ", "image value is an empty string"),
        (None, "image value is missing (null)"),
        (3, "image value is a number, not a URL string"),
        (2.5, "image value is a number, not a URL string"),
        (True, "image value is a boolean, not a URL string"),
        (["a.png", "b.png"], "image value is a list, not a URL string"),
        ({"url": "a.png"}, "image value is an object, not a URL string"),
        (b"a.png", "image value is a bytes, not a URL string"),
    ],
)
def test_image_value_problem(value, reason):
    assert image_value_problem(value) == reason


# ---------------------------------------------------------------------------------------------- high bit depth


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_16_bit_gradient_keeps_its_shape():
    ramp = np.repeat(np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :], 3, axis=0)
    out = decode_image(_encoded(Image.fromarray(ramp), "PNG"))
    grey = np.asarray(out)[1, :, 0].astype(int)
    assert out.mode == "RGB" and (np.asarray(out)[..., 0] == np.asarray(out)[..., 2]).all()
    assert np.abs(grey - np.arange(256)).max() <= 1 and (np.diff(grey) >= 0).all()


def test_big_endian_16_bit_is_scaled_like_native():
    values = np.array([[0, 1000, 30000, 60000]], dtype=np.uint16)
    native = decode_image(_encoded(Image.fromarray(values), "TIFF"))
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big)), np.asarray(native))


def test_float_image_scaled_from_zero_and_non_finite_pixels_are_dark():
    values = np.array([[0.0, 0.25, 0.5, 1.0, np.nan, np.inf, -np.inf]], dtype=np.float32)
    grey = np.asarray(decode_image(_encoded(Image.fromarray(values), "TIFF")))[0, :, 0]
    assert grey.tolist() == [0, 63, 127, 255, 0, 0, 0]
    negative = np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)
    assert np.asarray(decode_image(_encoded(Image.fromarray(negative), "TIFF")))[0, :, 0].tolist() == [0, 127, 255]
    all_nan = np.full((2, 2), np.nan, dtype=np.float32)
    assert np.asarray(decode_image(_encoded(Image.fromarray(all_nan), "TIFF"))).max() == 0
