"""The image pipeline (issue 13) against a real image server on 127.0.0.1: fetch with its limits
and SSRF guard, render, the object store, the durable job queue, and the worker loop in-process
and as real worker processes (one killed with SIGKILL mid-download). No mocks: real sockets,
real Pillow, real SQLite files."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import signal
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from productd.images import jobs
from productd.images.fetch import AddressPolicy, FetchError, Limits, fetch
from productd.images.jobs import DEAD, DONE, FAILED, QUEUED, RUNNING, Backoff, JobQueue, Stored
from productd.images.objects import DirectoryStore, check_key, key_for
from productd.images.render import RenderError, render
from productd.images.settings import ImageSettings, from_settings
from productd.images.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
OPEN = Limits(max_bytes=2 * 1024 * 1024, connect_timeout=2.0, total_timeout=2.0, max_redirects=3,
              policy=AddressPolicy(allow_private=True))
DEADLINE = 30.0  # seconds a test waits for a process before failing instead of hanging


# ---- the images -------------------------------------------------------------------------

def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _photo(size: tuple[int, int]) -> Image.Image:
    w, h = size
    red = Image.linear_gradient("L").resize(size)
    green = Image.radial_gradient("L").resize(size)
    blue = Image.effect_noise(size, 40)
    return Image.merge("RGB", (red, green, blue))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny IDAT: what a
    decompression bomb looks like before its pixels are decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _images() -> dict[str, tuple[bytes, str]]:
    portrait = _photo((400, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show upright
    cutout = Image.new("RGBA", (500, 500), (0, 0, 0, 0))
    cutout.paste(_photo((250, 250)).convert("RGBA"), (125, 125))
    frames = [Image.new("P", (200, 100), i) for i in (1, 2)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    photo = _encode(_photo((1600, 1200)), "JPEG", quality=90)
    grey = Image.radial_gradient("L").resize((1500, 1100))
    palette = Image.new("P", (64, 32), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.paste(1, (0, 0, 32, 32))
    return {
        "photo.jpg": (photo, "image/jpeg"),
        "photo-as-text": (photo, "text/plain"),  # the body decides, not the Content-Type
        "portrait.jpg": (_encode(portrait, "JPEG", exif=exif), "image/jpeg"),
        "cutout.png": (_encode(cutout, "PNG"), "image/png"),
        "opaque.png": (_encode(_photo((300, 200)).convert("RGBA"), "PNG"), "image/png"),
        "anim.gif": (gif.getvalue(), "image/gif"),
        "grey16.png": (_encode(Image.linear_gradient("L").resize((64, 64)).convert("I;16"), "PNG"), "image/png"),
        "cmyk.jpg": (_encode(Image.merge("RGB", (grey, grey, grey)).convert("CMYK"), "JPEG"), "image/jpeg"),
        "grey.jpg": (_encode(grey, "JPEG"), "image/jpeg"),
        "grey-alpha.png": (_encode(Image.merge("LA", (grey, grey)), "PNG"), "image/png"),
        "palette-transparent.png": (_encode(palette, "PNG", transparency=0), "image/png"),
        "palette-transparent.gif": (_encode(palette, "GIF", transparency=0), "image/gif"),
        "photo.tiff": (_encode(_photo((64, 64)), "TIFF"), "image/tiff"),
        "text": (b"hello, this is not an image\n" * 10, "image/jpeg"),
        "truncated.jpg": (photo[: len(photo) // 3], "image/jpeg"),
        "bomb.png": (_png_bomb(30000, 30000), "image/png"),
    }


# ---- the image server -------------------------------------------------------------------

class ImageServer:
    """A threaded HTTP server on `host` serving generated images and every misbehaviour."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.images = _images()
        self.hits: collections.Counter = collections.Counter()
        self.hit_times: dict[str, list[float]] = collections.defaultdict(list)
        self.lock = threading.Lock()
        self.hang_started = threading.Event()
        self.hang_release = threading.Event()
        self.redirect_to = ""  # where /to-elsewhere points
        self.httpd = ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.images = self
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host, self.port = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.hang_release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, name: str) -> None:
        body, content_type = self.server.images.images[name]
        self._send(200, body, content_type)

    def do_GET(self) -> None:  # noqa: C901 - one branch per behaviour, in one place
        server: ImageServer = self.server.images
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        with server.lock:
            server.hits[self.path] += 1
            server.hit_times[self.path].append(time.monotonic())
            hit = server.hits[self.path]
        head, _, rest = path.lstrip("/").partition("/")
        try:
            if head == "img":
                self._image(rest)
            elif head == "status":
                self._send(int(rest))
            elif head == "flaky":  # /flaky/<n>/<image>: 500 for the first n requests, then the image
                failures, _, name = rest.partition("/")
                if hit <= int(failures):
                    self._send(500, b"try later")
                else:
                    self._image(name)
            elif head == "ratelimit":  # 429 with Retry-After once, then the image
                if hit == 1:
                    self._send(429, b"slow down", headers={"Retry-After": query.get("after", ["1"])[0]})
                else:
                    self._image(rest)
            elif head == "loop":
                self._send(302, headers={"Location": "/loop/b" if rest == "a" else "/loop/a"})
            elif head == "chain":  # /chain/<n>: n redirects, then the photo
                n = int(rest)
                if n:
                    self._send(301, headers={"Location": f"/chain/{n - 1}"})
                else:
                    self._image("photo.jpg")
            elif head == "to-elsewhere":
                self._send(302, headers={"Location": server.redirect_to})
            elif head == "huge":  # announces 50 MB
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(50 * 1024 * 1024))
                self.end_headers()
                self.wfile.write(b"\xff" * 65536)
            elif head == "endless":  # no length: streams until the client hangs up
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                for _ in range(200):  # 12.5 MB at most
                    self.wfile.write(b"\0" * 65536)
            elif head == "slow":  # headers at once, then a byte every 0.2 s
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(50):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif head == "slow-headers":  # a header dripped a byte every 0.2 s, then the image
                body, content_type = server.images["photo.jpg"]
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Drip: ")
                for _ in range(25):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
                self.wfile.write(f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            elif head == "hang":  # half the image, then wait to be released
                body, content_type = server.images[rest]
                if server.hang_release.is_set():
                    self._send(200, body, content_type)
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                server.hang_started.set()
                server.hang_release.wait(DEADLINE)
                self.wfile.write(body[len(body) // 2:])
            else:
                self._send(404, b"no such thing")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    srv = ImageServer()
    yield srv
    srv.close()


@pytest.fixture
def fresh_server():
    """A server of the test's own, whose counts of requests start at zero."""
    srv = ImageServer()
    yield srv
    srv.close()


@pytest.fixture
def private_server():
    """A second server on 127.0.0.2: another loopback address, for the guard to refuse."""
    srv = ImageServer("127.0.0.2")
    yield srv
    srv.close()


# ---- fetch ------------------------------------------------------------------------------

def test_fetch_returns_the_body_and_follows_redirects(server):
    body, _ = server.images["photo.jpg"]
    got = fetch(server.url("/img/photo.jpg"), OPEN)
    assert got.body == body and got.redirects == 0 and got.address == "127.0.0.1"
    chained = fetch(server.url("/chain/3"), OPEN)
    assert chained.body == body and chained.redirects == 3 and chained.final_url == server.url("/chain/0")


@pytest.mark.parametrize("path, reason, transient", [
    ("/status/404", "http-404", False),
    ("/status/403", "http-403", False),
    ("/status/410", "http-410", False),
    ("/status/500", "http-500", True),
    ("/status/503", "http-503", True),
    ("/status/408", "http-408", True),
    ("/loop/a", "redirect-loop", False),
    ("/chain/4", "too-many-redirects", False),  # OPEN allows 3
    ("/huge", "too-large", False),
    ("/endless", "too-large", False),
    ("/slow", "timeout", True),
    ("/slow-headers", "timeout", True),  # the total limit holds while headers drip in too
])
def test_fetch_failures_are_classified(server, path, reason, transient):
    with pytest.raises(FetchError) as caught:
        fetch(server.url(path), OPEN)
    assert (caught.value.reason, caught.value.transient) == (reason, transient), caught.value


def test_a_429_is_transient_and_carries_retry_after(server):
    with pytest.raises(FetchError) as caught:
        fetch(server.url("/ratelimit/photo.jpg?after=7"), OPEN)
    assert (caught.value.reason, caught.value.transient, caught.value.retry_after) == ("http-429", True, 7.0)


def test_bad_urls_and_closed_ports():
    free = _free_port()
    with pytest.raises(FetchError) as caught:
        fetch(f"http://127.0.0.1:{free}/x.jpg", OPEN)
    assert (caught.value.reason, caught.value.transient) == ("connection", True)
    for url in ("ftp://example.com/x.jpg", "file:///etc/passwd", "http:///x", "http://user:pw@example.com/x",
                "http://example.com:99999/x"):
        with pytest.raises(FetchError) as caught:
            fetch(url, OPEN)
        assert (caught.value.reason, caught.value.transient) == ("bad-url", False), url


def test_https_on_a_plain_http_port_fails_classified(server):
    with pytest.raises(FetchError) as caught:
        fetch(f"https://127.0.0.1:{server.port}/img/photo.jpg", OPEN)
    assert caught.value.reason in ("connection", "tls")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https image server whose certificate names `localhost` only (made by openssl)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=DEADLINE)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv = ImageServer(tls=context)
    srv.client_context = ssl.create_default_context(cafile=str(cert))
    yield srv
    srv.close()


def test_https_connects_to_the_checked_address_and_verifies_the_name(tls_server):
    body, _ = tls_server.images["photo.jpg"]
    url = f"https://localhost:{tls_server.port}/img/photo.jpg"  # the name: SNI, Host and the certificate
    got = fetch(url, OPEN, ssl_context=tls_server.client_context)
    assert got.body == body and got.address == "127.0.0.1"
    with pytest.raises(FetchError) as caught:  # the same server by address: the certificate does not name it
        fetch(f"https://127.0.0.1:{tls_server.port}/img/photo.jpg", OPEN, ssl_context=tls_server.client_context)
    assert (caught.value.reason, caught.value.transient) == ("tls", False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the SSRF guard ---------------------------------------------------------------------

@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "0.0.0.0", "224.0.0.1", "100.64.0.1", "240.0.0.1", "::1", "fe80::1",
                                     "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::", "192.0.2.1"])
def test_the_default_policy_refuses_non_public_addresses(address):
    assert AddressPolicy().refusal(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.1", "2001:4860:4860::8888"])
def test_the_default_policy_allows_public_addresses(address):
    assert AddressPolicy().refusal(address) is None


def test_the_guard_refuses_loopback_by_address_and_by_name(server):
    before = sum(server.hits.values())
    for host in ("127.0.0.1", "localhost"):  # a name is judged by what it resolves to
        with pytest.raises(FetchError) as caught:
            fetch(f"http://{host}:{server.port}/img/photo.jpg", Limits())
        assert (caught.value.reason, caught.value.transient) == ("refused-address", False)
    assert sum(server.hits.values()) == before, "a refused address was connected to"


def test_the_guard_refuses_a_private_address_reached_through_a_redirect(server, private_server):
    """The first host is allowed (allow_networks), the redirect goes to another loopback address:
    refused before any connection to it."""
    server.redirect_to = private_server.url("/img/photo.jpg")
    guarded = Limits(total_timeout=2.0, policy=AddressPolicy(allow_networks=("127.0.0.1/32",)))
    with pytest.raises(FetchError) as caught:
        fetch(server.url("/to-elsewhere"), guarded)
    assert (caught.value.reason, caught.value.transient) == ("refused-address", False)
    assert "127.0.0.2" in caught.value.detail
    assert sum(private_server.hits.values()) == 0
    # With private addresses allowed, the same redirect is followed.
    assert fetch(server.url("/to-elsewhere"), OPEN).address == "127.0.0.2"
    assert private_server.hits["/img/photo.jpg"] == 1


# ---- render -----------------------------------------------------------------------------

def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("name, size, mode", [
    ("photo.jpg", (1024, 768), "RGB"),  # bounded longest side, aspect kept
    ("photo-as-text", (1024, 768), "RGB"),
    ("portrait.jpg", (300, 400), "RGB"),  # EXIF orientation applied, never upscaled
    ("cutout.png", (500, 500), "RGBA"),  # alpha used: kept
    ("opaque.png", (300, 200), "RGB"),  # alpha unused: dropped
    ("anim.gif", (200, 100), "RGB"),  # palette, animated: the first frame
    ("grey16.png", (64, 64), "RGB"),
    ("cmyk.jpg", (1024, 751), "RGB"),
    ("grey.jpg", (1024, 751), "RGB"),
    ("grey-alpha.png", (1024, 751), "RGBA"),
    ("palette-transparent.png", (64, 32), "RGBA"),
    ("palette-transparent.gif", (64, 32), "RGBA"),
])
def test_render_makes_a_bounded_webp(server, name, size, mode):
    body = fetch(server.url(f"/img/{name}"), OPEN).body
    rendition = render(body)
    image = _decoded(rendition.data)
    assert (image.format, image.size, image.mode) == ("WEBP", size, mode)
    assert (rendition.format, (rendition.width, rendition.height), rendition.bytes) == ("webp", size,
                                                                                         len(rendition.data))
    assert getattr(image, "n_frames", 1) == 1 and "exif" not in image.info


def test_render_shrinks_a_photo():
    body, _ = _images()["photo.jpg"]
    rendition = render(body)
    assert rendition.bytes < len(body) / 2, (rendition.bytes, len(body))


@pytest.mark.parametrize("name, reason", [
    ("text", "not-an-image"),
    ("truncated.jpg", "not-an-image"),
    ("photo.tiff", "not-an-image"),  # a format Pillow reads but the pipeline does not take
    ("bomb.png", "too-many-pixels"),
])
def test_render_refuses(name, reason):
    body, _ = _images()[name]
    with pytest.raises(RenderError) as caught:
        render(body)
    assert (caught.value.reason, caught.value.transient) == (reason, False)


def test_render_bounds_pixels_before_decoding():
    body = _encode(Image.new("L", (3000, 2000)), "PNG")  # 6 MP, real pixels, ~10 KB
    with pytest.raises(RenderError) as caught:
        render(body, max_pixels=5_000_000)
    assert caught.value.reason == "too-many-pixels"
    assert render(body, max_pixels=6_000_000).width == 1024


# ---- the object store -------------------------------------------------------------------

def test_the_directory_store_is_content_addressed(tmp_path):
    store = DirectoryStore(tmp_path / "images")
    data = b"RIFF....WEBPVP8 not really"
    key = store.put(data)
    digest = hashlib.sha256(data).hexdigest()
    assert key == f"{digest}.webp" == key_for(data)
    assert store.path(key) == tmp_path / "images" / digest[:2] / digest[2:4] / key
    assert store.get(key) == data and store.size(key) == len(data) and store.exists(key) and store.verify(key)
    with store.open(key) as f:
        f.seek(4)
        assert f.read(4) == data[4:8]
    mtime = store.path(key).stat().st_mtime_ns
    assert store.put(data) == key and store.path(key).stat().st_mtime_ns == mtime  # nothing rewritten
    assert not list((tmp_path / "images").glob("*/*/.tmp-*"))
    assert not store.exists(key_for(b"other"))
    for bad in ("../../etc/passwd", digest, f"{digest}.webp/../x", f"{digest[:-1]}G.webp"):
        with pytest.raises(ValueError):
            check_key(bad)


# ---- the job queue ----------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _stored(key: str = "a" * 64 + ".webp") -> Stored:
    return Stored(key, "webp", 10, 10, 100, "b" * 64, "JPEG", 20, 20, 0.0)


def test_one_job_per_url_and_the_products_waiting_for_it(tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite3")
    a = queue.enqueue("http://x/1.jpg", "p1")
    assert queue.enqueue("http://x/1.jpg", "p2").id == a.id
    assert queue.enqueue("http://x/1.jpg", "p2").id == a.id
    assert queue.products_of(a.id) == ["p1", "p2"]
    assert a.state == QUEUED and queue.counts()[QUEUED] == 1
    mode = sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_done_is_final_and_an_url_done_is_answered_at_once(tmp_path):
    clock = Clock()
    queue = JobQueue(tmp_path / "jobs.sqlite3", clock=clock)
    queue.enqueue("http://x/1.jpg")
    job = queue.take("w1", 60)
    assert job.state == RUNNING and job.attempts == 1 and job.lease_owner == "w1"
    assert queue.take("w2", 60) is None  # nobody else gets it
    assert queue.complete(job, _stored(), 1234)
    again = queue.enqueue("http://x/1.jpg", "p9")
    assert again.state == DONE and queue.rendition(again.result_key).width == 10
    clock.now += 10_000
    assert queue.take("w2", 60) is None


def test_transient_failures_back_off_then_die_permanent_ones_die_at_once(tmp_path):
    clock = Clock()
    queue = JobQueue(tmp_path / "jobs.sqlite3", max_attempts=3, backoff=Backoff(base=10, cap=100, jitter=0.5),
                     clock=clock)
    queue.enqueue("http://x/flaky.jpg")
    queue.enqueue("http://x/gone.jpg")
    delays = []
    for attempt in (1, 2):
        job = queue.take("w", 60)
        assert (job.url, job.attempts) == ("http://x/flaky.jpg", attempt)
        assert queue.fail(job, "http-503", "503", transient=True) == FAILED
        failed = queue.get(job.id)
        delays.append(failed.next_attempt_at - clock.now)
        gone = queue.take("w", 60)  # the other job is due meanwhile
        if gone is not None:
            assert gone.url == "http://x/gone.jpg"
            assert queue.fail(gone, "http-404", "404", transient=False) == DEAD
        assert queue.take("w", 60) is None  # not due yet
        clock.now = failed.next_attempt_at
    assert 5 <= delays[0] <= 10 and 10 <= delays[1] <= 20  # 10 * 2**(n-1), jitter down to half
    job = queue.take("w", 60)
    assert job.attempts == 3
    assert queue.fail(job, "http-503", "503", transient=True) == DEAD  # attempts used up
    dead = {j.url: j for j in queue.list(DEAD)}
    assert dead["http://x/gone.jpg"].attempts == 1 and dead["http://x/gone.jpg"].last_reason == "http-404"
    assert dead["http://x/flaky.jpg"].last_error == "503 (after 3 attempts)"
    assert queue.counts() == {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0, DEAD: 2}
    revived = queue.retry(dead["http://x/gone.jpg"].id)
    assert (revived.state, revived.attempts) == (QUEUED, 0)
    assert queue.retry(revived.id) is None  # only a dead job is re-driven
    assert queue.take("w", 60).url == "http://x/gone.jpg"


def test_retry_after_is_honoured_within_the_cap():
    backoff = Backoff(base=1, cap=60, jitter=0.5)
    assert backoff.delay(1, retry_after=30, rng=lambda: 0.0) == 30
    assert backoff.delay(1, retry_after=3600, rng=lambda: 0.0) == 60
    assert backoff.delay(3, rng=lambda: 0.0) == 4 and backoff.delay(3, rng=lambda: 1.0) == 2
    assert backoff.delay(30, rng=lambda: 0.0) == 60


def test_an_expired_lease_hands_the_job_out_again_and_fences_the_old_holder(tmp_path):
    clock = Clock()
    queue = JobQueue(tmp_path / "jobs.sqlite3", max_attempts=2, clock=clock)
    queue.enqueue("http://x/1.jpg")
    first = queue.take("w1", 30)
    clock.now += 29
    assert queue.take("w2", 30) is None  # the lease holds
    clock.now += 2
    second = queue.take("w2", 30)
    assert (second.id, second.attempts, second.lease_owner, second.last_reason) == (first.id, 2, "w2",
                                                                                    "lease-expired")
    assert not queue.complete(first, _stored(), 1)  # the old holder's result is not recorded
    assert queue.fail(first, "timeout", "late", transient=True) is None
    assert not queue.extend(first, 30) and queue.extend(second, 30)
    clock.now += 31
    assert queue.take("w3", 30) is None  # no attempts left: dead, not handed out a third time
    dead = queue.get(first.id)
    assert (dead.state, dead.last_reason) == (DEAD, "worker-lost")


def test_a_take_reads_only_the_pending_jobs_through_their_index(tmp_path):
    """However many done jobs the file holds, a take finds the next due one by index, not by scan."""
    queue = JobQueue(tmp_path / "jobs.sqlite3")
    for i in range(50):
        queue.enqueue(f"http://x/{i}.jpg")
    queue.db.execute("ANALYZE")
    plan = queue.db.execute("EXPLAIN QUERY PLAN " + jobs.NEXT_DUE, {"now": 0}).fetchall()
    assert "USING INDEX jobs_pending" in " ".join(row[-1] for row in plan), plan
    assert "TEMP B-TREE" not in " ".join(row[-1] for row in plan)


TAKER = """
import sys
from productd.images.jobs import JobQueue
q = JobQueue(sys.argv[1])
taken = []
while (job := q.take(sys.argv[2], 600)) is not None:
    taken.append(job.id)
print(" ".join(map(str, taken)))
"""


def test_concurrent_workers_never_take_the_same_job(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    queue = JobQueue(path)
    for i in range(200):
        queue.enqueue(f"http://x/{i}.jpg")
    takers = [subprocess.Popen([sys.executable, "-c", TAKER, str(path), f"w{i}"], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT) for i in range(4)]
    taken = []
    for taker in takers:
        out, _ = taker.communicate(timeout=DEADLINE)
        assert taker.returncode == 0
        taken += [int(n) for n in out.split()]
    assert sorted(taken) == [job.id for job in queue.list(limit=1000)]  # every job, each once
    assert queue.counts()[RUNNING] == 200


# ---- the worker -------------------------------------------------------------------------

def _settings(data_dir: Path, **overrides) -> ImageSettings:
    values = dict(data_dir=str(data_dir), allow_private=True, total_timeout=1.5, connect_timeout=1.0,
                  max_redirects=3, max_bytes=2 * 1024 * 1024, max_attempts=4, backoff_base=0.05, backoff_max=1.0,
                  lease=5.0, idle_wait=0.05, nice=0)
    values.update(overrides)
    return ImageSettings(**values)


def _drain(worker: Worker, queue: JobQueue) -> None:
    """Run the worker until every job is done or dead."""
    end = time.monotonic() + DEADLINE
    while True:
        worker.run(until_idle=True)
        counts = queue.counts()
        if counts[QUEUED] == counts[RUNNING] == counts[FAILED] == 0:
            return
        assert time.monotonic() < end, counts
        time.sleep(0.02)


def test_every_job_ends_done_or_dead_with_the_right_reason(tmp_path, fresh_server, private_server):
    server = fresh_server
    server.redirect_to = private_server.url("/img/photo.jpg")
    settings = _settings(tmp_path, allow_private=False, allow_networks=(f"{server.host}/32",), total_timeout=1.0)
    expected = {
        "/img/photo.jpg": (DONE, None, 1),
        "/img/cutout.png": (DONE, None, 1),
        "/img/photo-as-text": (DONE, None, 1),
        "/flaky/2/anim.gif": (DONE, None, 3),
        "/ratelimit/opaque.png?after=0": (DONE, None, 2),
        "/flaky/9/portrait.jpg": (DEAD, "http-500", 4),  # attempts used up
        "/status/404": (DEAD, "http-404", 1),
        "/loop/a": (DEAD, "redirect-loop", 1),
        "/huge": (DEAD, "too-large", 1),
        "/img/text": (DEAD, "not-an-image", 1),
        "/img/bomb.png": (DEAD, "too-many-pixels", 1),
        "/to-elsewhere": (DEAD, "refused-address", 1),
        "/slow": (DEAD, "timeout", 4),
    }
    queue = JobQueue(settings.jobs_path)
    for path in expected:
        queue.enqueue(server.url(path), "p-" + path)
    outcomes = []
    worker = Worker(settings, "w1", on_outcome=lambda job, products, stored: outcomes.append((job.url, products,
                                                                                               stored)))
    _drain(worker, JobQueue(settings.jobs_path))
    for path, (state, reason, attempts) in expected.items():
        job = queue.by_url(server.url(path))
        assert (job.state, job.last_reason, job.attempts) == (state, reason, attempts), (path, job)
    assert sum(private_server.hits.values()) == 0
    # Each job told its waiting product once, when it ended.
    assert sorted(url for url, _, _ in outcomes) == sorted(server.url(p) for p in expected)
    assert all(products == ["p-" + urlsplit(url).path + (f"?{urlsplit(url).query}" if urlsplit(url).query else "")]
               for url, products, _ in outcomes)
    # Retries waited their backoff: at least base * 2**(n-1) * (1 - jitter) between requests.
    times = server.hit_times["/flaky/2/anim.gif"]
    assert len(times) == 3 and times[1] - times[0] >= 0.025 and times[2] - times[1] >= 0.05
    # The stored objects are the renditions, named by their hash.
    store = DirectoryStore(settings.images_dir)
    for path in ("/img/photo.jpg", "/img/cutout.png", "/flaky/2/anim.gif"):
        job = queue.by_url(server.url(path))
        data = store.get(job.result_key)
        assert job.result_key == hashlib.sha256(data).hexdigest() + ".webp"
        stored = queue.rendition(job.result_key)
        assert (stored.width, stored.height, stored.bytes) == (*_decoded(data).size, len(data))
        assert job.source_bytes == len(server.images[path.rsplit("/", 1)[1]][0])
    # The same bytes at two URLs: one rendition.
    photo, as_text = (queue.by_url(server.url(p)) for p in ("/img/photo.jpg", "/img/photo-as-text"))
    assert photo.result_key == as_text.result_key
    # An URL already done is not fetched again.
    hits = server.hits["/img/photo.jpg"]
    assert queue.enqueue(server.url("/img/photo.jpg"), "p-other").state == DONE
    worker.run(until_idle=True)
    assert server.hits["/img/photo.jpg"] == hits == 1


def test_a_failure_inside_the_worker_is_a_transient_attempt(tmp_path, server):
    """The store cannot write (a file where its directory goes): the attempt fails, the job is
    retried later and done once the store is fixed."""
    settings = _settings(tmp_path, backoff_base=0.01)
    body, _ = server.images["opaque.png"]
    blocker = Path(settings.images_dir) / key_for(render(body).data)[:2]
    queue = JobQueue(settings.jobs_path)
    job = queue.enqueue(server.url("/img/opaque.png?internal"))
    blocker.write_bytes(b"in the way")
    worker = Worker(settings, "w1")
    assert worker.process(queue.take("w1", 5)) == FAILED
    failed = queue.get(job.id)
    assert (failed.state, failed.last_reason) == (FAILED, "internal") and "NotADirectoryError" in failed.last_error
    blocker.unlink()
    _drain(worker, queue)
    assert (queue.get(job.id).state, queue.get(job.id).attempts) == (DONE, 2)


def _worker_process(settings: ImageSettings, name: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "productd.images.worker", "--name", name]
    for field in ("data_dir", "total_timeout", "lease", "idle_wait", "max_attempts", "backoff_base", "nice"):
        args += ["--" + field.replace("_", "-"), str(getattr(settings, field))]
    if settings.allow_private:
        args.append("--allow-private")
    return subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)


def _wait_for(what: str, check, timeout: float = DEADLINE):
    end = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def test_a_worker_killed_mid_download_loses_no_job(tmp_path, fresh_server):
    server = fresh_server
    settings = _settings(tmp_path, total_timeout=20.0, lease=1.5)
    queue = JobQueue(settings.jobs_path)
    url = server.url("/hang/photo.jpg")
    job = queue.enqueue(url, "p1")
    first = _worker_process(settings, "doomed")
    try:
        assert server.hang_started.wait(DEADLINE), "the worker never started the download"
        assert queue.get(job.id).state == RUNNING and queue.get(job.id).lease_owner == "doomed"
        first.send_signal(signal.SIGKILL)
        assert first.wait(DEADLINE) == -signal.SIGKILL
    finally:
        first.kill()
        first.communicate()
    assert queue.get(job.id).state == RUNNING  # held by a dead worker, until its lease expires
    server.hang_release.set()
    second = _worker_process(settings, "heir")
    try:
        done = _wait_for("the job to be taken again and done", lambda: (j := queue.get(job.id)).state == DONE and j)
        assert done.attempts == 2 and server.hits["/hang/photo.jpg"] == 2
        assert DirectoryStore(settings.images_dir).verify(done.result_key)
        second.send_signal(signal.SIGTERM)  # an idle worker stops at once, cleanly
        assert second.wait(DEADLINE) == 0
    finally:
        second.kill()
        _, err = second.communicate()
    assert '"message":"image downloaded"' in err and '"job_id":' in err


def test_sigterm_lets_a_busy_worker_finish_its_job(tmp_path, fresh_server):
    server = fresh_server
    settings = _settings(tmp_path, total_timeout=20.0)
    queue = JobQueue(settings.jobs_path)
    job = queue.enqueue(server.url("/hang/cutout.png"))
    worker = _worker_process(settings, "w1")
    try:
        assert server.hang_started.wait(DEADLINE), "the worker never started the download"
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the signal is in before the download can end
        server.hang_release.set()
        assert worker.wait(DEADLINE) == 0
    finally:
        worker.kill()
        worker.communicate()
    assert queue.get(job.id).state == DONE and server.hits["/hang/cutout.png"] == 1


def test_worker_processes_share_the_queue_and_fetch_each_url_once(tmp_path, fresh_server):
    server = fresh_server
    settings = _settings(tmp_path)
    queue = JobQueue(settings.jobs_path)
    paths = [f"/img/opaque.png?copy={i}" for i in range(12)]
    for path in paths:
        queue.enqueue(server.url(path))
    workers = [_worker_process(settings, f"w{i}") for i in range(2)]
    niced = _settings(tmp_path, nice=5)
    workers.append(_worker_process(niced, "niced"))
    try:
        _wait_for("every job done", lambda: queue.counts()[DONE] == len(paths))
        # Each worker yields the CPU: batch scheduling, and the niceness it was given.
        base = os.getpriority(os.PRIO_PROCESS, 0)
        _wait_for("the niced worker to lower its priority",
                  lambda: os.getpriority(os.PRIO_PROCESS, workers[2].pid) == min(19, base + 5))
        _wait_for("every worker to run SCHED_BATCH",
                  lambda: [os.sched_getscheduler(w.pid) for w in workers] == [os.SCHED_BATCH] * 3)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(DEADLINE) for w in workers]
        for w in workers:
            w.communicate()
    assert codes == [0, 0, 0]
    assert [server.hits[p] for p in paths] == [1] * len(paths)
    assert len({queue.by_url(server.url(p)).result_key for p in paths}) == 1
    assert len(list(Path(settings.images_dir).glob("*/*/*.webp"))) == 1


def test_the_job_file_lives_in_the_data_dir_and_settings_come_from_productd_settings(tmp_path):
    from productd.config import Settings

    assert jobs.path_in(tmp_path) == tmp_path / "images" / "jobs.sqlite3"
    image_settings = from_settings(Settings(data_dir=str(tmp_path)))
    assert image_settings == ImageSettings(data_dir=str(tmp_path))
    assert image_settings.images_dir == os.path.join(tmp_path, "images")
    assert image_settings.jobs_path == str(jobs.path_in(tmp_path))
    assert not image_settings.limits().policy.allow_private  # the guard is on unless asked otherwise
