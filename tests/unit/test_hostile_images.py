"""Hostile task data (issue 12, item 3): each trick is a skipped task with a reason that names it, never a crash
of the extraction run. tests/unit/test_images.py covers the basic guards (private addresses, schemes, header-only
bombs, redirects to 169.254.169.254); this adds the forms an attacker would try next: compressed bombs, SVG,
huge and percent-encoded data URIs, credentials and confusable hosts, decimal/octal/hex/IPv6 spellings of
127.0.0.1 and 169.254.169.254 (directly and behind a redirect), and runs them all through extraction."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib

import pytest
from PIL import Image

from asvp_backend.labelstudio.images import ImageFetcher, ImageFetchError
from tests.helpers import png_bytes
from tests.unit.test_images import _public_localhost, _Server

MAX_PIXELS = 4_000_000
MAX_BYTES = 1_000_000


def compressed_bomb(side: int = 6000) -> bytes:
    """A real PNG (valid IDAT, every row present) of side x side black pixels: 36 MB decoded, 36 KB on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * ((side + 1) * side), 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def gif_bomb() -> bytes:
    """A GIF whose screen and first frame claim 65535 x 65535 pixels."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00;"
    return screen + frame


SVG = (b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>&x;</text>'
       b'<image href="http://169.254.169.254/latest/meta-data/"/></svg>')
GOOD = png_bytes(1, size=64)
BOMB = compressed_bomb()

LOCAL_127 = ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1", "017700000001", "127.000.000.001", "0",
             "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:7f00:1]", "[::1]", "[::]", "[64:ff9b::7f00:1]"]
METADATA = ["2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518", "[::ffff:169.254.169.254]",
            "[0:0:0:0:0:ffff:a9fe:a9fe]", "[::ffff:a9fe:a9fe]", "[fe80::a9fe:a9fe]", "[2002:a9fe:a9fe::1]"]


@pytest.fixture(scope="module")
def server():
    s = _Server()
    s.routes.update({
        "/good.png": (200, {"Content-Type": "image/png"}, GOOD),
        "/bomb.png": (200, {"Content-Type": "image/png"}, BOMB),
        "/bomb.gif": (200, {"Content-Type": "image/gif"}, gif_bomb()),
        "/page.png": (200, {"Content-Type": "image/png"}, b"<html><body>login</body></html>"),
        "/truncated.png": (200, {"Content-Type": "image/png"}, GOOD[: len(GOOD) // 2]),
        "/image.svg": (200, {"Content-Type": "image/svg+xml"}, SVG),
        "/huge": (200, {"Content-Type": "image/png"}, b"\0" * (MAX_BYTES + 1)),
    })
    yield s
    s.close()


@pytest.fixture
def fetcher() -> ImageFetcher:
    """'localhost' counts as a public host here (the test server), every other name is resolved for real."""
    return ImageFetcher(resolve=_public_localhost, timeout=5, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)


def data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def hostile(server: _Server) -> list[tuple[str, str]]:
    """(url, the reason it must be skipped with) for every trick."""
    public = server.url("", host="localhost")
    cases = [
        (public + "/bomb.png", r"too large: 6000x6000"),
        (public + "/bomb.gif", r"too large"),
        (public + "/page.png", r"not a recognised image format"),
        (public + "/truncated.png", r"corrupt or truncated"),
        (public + "/image.svg", r"not a recognised image format"),
        (public + "/huge", r"download too large"),
        (data_uri("image/svg+xml", SVG), r"not a recognised image format"),
        (data_uri("image/png", BOMB), r"too large: 6000x6000"),
        ("data:image/png;base64," + "A" * (2 * MAX_BYTES), r"data URI too large"),
        ("data:image/png," + "%00" * MAX_BYTES, r"data URI too large"),
        ("data:image/png;base64,!!!!", r"empty file|not a recognised|malformed"),
        ("file:///etc/passwd", r"unsupported URL scheme 'file'"),
        ("FILE:///etc/passwd", r"unsupported URL scheme 'file'"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", r"unsupported URL scheme 'gopher'"),
        ("dict://127.0.0.1:6379/info", r"unsupported URL scheme 'dict'"),
        ("ftp://127.0.0.1/a.png", r"unsupported URL scheme 'ftp'"),
        ("jar:http://localhost/a.png!/", r"unsupported URL scheme 'jar'"),
        (public.replace("://", "://user:pass@") + "/good.png", r"credentials in URLs are not allowed"),
        (public.replace("://", "://user@") + "/good.png", r"credentials in URLs are not allowed"),
        (f"http://localhost:{server.port}@169.254.169.254/", r"credentials in URLs are not allowed"),
        (f"http://169.254.169.254\\@localhost:{server.port}/good.png", r"credentials in URLs are not allowed"),
        ("http://169.254.169.254#@localhost/good.png", r"non-public"),
        ("http://169.254.169.254?@localhost/good.png", r"non-public"),
    ]
    cases += [(f"http://{host}/latest/meta-data/", r"non-public") for host in LOCAL_127 + METADATA]
    for target in ("http://2130706433/", "http://0251.0376.0251.0376/latest/meta-data/", "http://[::ffff:7f00:1]/",
                   f"http://127.1:{server.port}/good.png", "gopher://127.0.0.1:6379/_x", "file:///etc/passwd"):
        reason = r"unsupported URL scheme" if not target.startswith("http") else r"non-public"
        cases.append((public + "/redirect?to=" + target.replace("?", "%3F"), reason))
    return cases


def test_every_trick_is_refused_with_its_reason(server, fetcher):
    for url, reason in hostile(server):
        seen = len(server.seen)
        with pytest.raises(ImageFetchError) as caught:
            fetcher.load(url, task_id=1)
        assert re.search(reason, caught.value.reason), (url[:120], caught.value.reason)
        private_hops = [path for host, path, _ in server.seen[seen:] if not host.startswith("localhost")]
        assert private_hops == [], url[:120]  # a refused private host was never asked
    assert fetcher.load(server.url("/good.png", host="localhost")).size == (64, 64)  # the guards let images in


def test_refusals_never_echo_credentials(server, fetcher):
    with pytest.raises(ImageFetchError) as caught:
        fetcher.load(f"http://user:p4ss-w0rd@localhost:{server.port}/good.png")
    assert "p4ss-w0rd" not in str(caught.value)


def test_a_bomb_under_the_pixel_cap_is_decoded_within_it():
    """The pixel cap is what bounds decoding memory: a 1000x1000 image of the same kind is an ordinary image."""
    buf = io.BytesIO()
    Image.new("L", (1000, 1000)).save(buf, "PNG")
    assert ImageFetcher(max_pixels=MAX_PIXELS).load(data_uri("image/png", buf.getvalue())).size == (1000, 1000)


def test_extraction_skips_every_trick_with_its_reason_and_keeps_the_good_images(server, fetcher, tmp_path):
    from asvp_backend.features import backbones as bb
    from asvp_backend.features.extract import extract_items, generation_info
    from asvp_backend.features.store import FeatureStore

    tiny = bb.create_backbone("test_efficientnet", weights="random", device="cpu", image_size=32)
    generation = FeatureStore(tmp_path / "features").create_generation(generation_info(tiny, 0))
    cases = hostile(server)
    good = server.url("/good.png", host="localhost")
    items = [(1, good)] + [(10 + i, url) for i, (url, _) in enumerate(cases)] + [(2, data_uri("image/png", GOOD))]
    report = extract_items(tiny, items, fetcher, generation, batch_size=16, num_workers=0, fetch_concurrency=4)
    assert report.extracted == 2 and set(report.skipped) == {10 + i for i in range(len(cases))}
    for i, (url, reason) in enumerate(cases):
        assert re.search(reason, report.skipped[10 + i]), (url[:120], report.skipped[10 + i])
    assert generation.skipped() == report.skipped  # recorded, so the status page can show why
