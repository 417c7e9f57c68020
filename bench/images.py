"""The image pipeline (issue 13), briefly.

    python -m bench.images      # BENCH_SECONDS (default 5) per load phase, BENCH_IMAGES (default 48)

Prints JSON with three measurements:

1. One image worker's images/s (productd.images.worker.Worker in this process: download from a
   local server, hash, render, store, record the job) against Pillow alone on the same bodies in
   one process (open, `thumbnail` to 1024 px, save WebP quality 80): the ceiling. Target >= 0.8.
2. The front end with the pool busy: single-id GET and one-event POST req/s of a live
   `productd serve` (its default `--image-workers`) with the pool idle, then while the pool works
   through catalogue products' images. Target: each loses at most 15%.
3. Bytes saved over the mixed set of phase 1 (JPEG photos, PNG cut-outs with alpha, GIFs):
   source bytes against stored bytes.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageDraw

from bench import live
from productd.images.jobs import JobQueue
from productd.images.settings import ImageSettings
from productd.images.worker import Worker

BUSY_IMAGES = 240  # enough work for the pool to stay busy through both loads of phase 2


def photo(seed: int, width: int = 2000, height: int = 1500) -> bytes:
    """A photo-like JPEG: gradients, shapes and sensor noise, different for every seed."""
    rng = random.Random(seed)
    base = Image.merge("RGB", [Image.linear_gradient("L").rotate(rng.randrange(360)).resize((width, height))
                               for _ in range(3)])
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(50, 400)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.effect_noise((width, height), 18).convert("RGB")
    out = io.BytesIO()
    Image.blend(base, noise, 0.12).save(out, "JPEG", quality=90)
    return out.getvalue()


def cutout(seed: int, side: int = 1200) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.randrange(side), rng.randrange(side), rng.randrange(80, 300)
        draw.rectangle((x - r, y - r, x + r, y + r), fill=(*[rng.randrange(256) for _ in range(3)], 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def gif(seed: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(photo(seed, 800, 600))).convert("P", palette=Image.Palette.ADAPTIVE).save(out, "GIF")
    return out.getvalue()


def mixed(count: int, offset: int = 0) -> list[bytes]:
    """`count` images: 4 photos for every PNG cut-out and GIF."""
    makers = [photo, photo, photo, photo, cutout, gif]
    return [makers[i % len(makers)](offset + i) for i in range(count)]


class ImageServer:
    """Serves the images of `sets` ({prefix: bodies}) as /img/<prefix>-<n> from memory on
    127.0.0.1, in a process of its own (forked): serving in a thread of this process would take
    the worker's GIL and bill the pipeline for the server's work."""

    def __init__(self, sets: dict[str, list[bytes]]) -> None:
        self.bodies = {f"/img/{prefix}-{i}": body for prefix, bodies in sets.items() for i, body in enumerate(bodies)}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805 - the handler's self
                body = self.bodies.get(handler.path)
                handler.send_response(200 if body is not None else 404)
                handler.send_header("Content-Length", str(len(body or b"")))
                handler.end_headers()
                handler.wfile.write(body or b"")

            def log_message(handler, *args):  # noqa: N805
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{httpd.server_port}"
        self.pid = os.fork()
        if self.pid == 0:
            try:
                httpd.serve_forever()
            finally:
                os._exit(0)
        httpd.server_close()

    def urls(self, prefix: str, count: int) -> list[str]:
        return [f"{self.base}/img/{prefix}-{i}" for i in range(count)]

    def close(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def pillow_alone(bodies: list[bytes]) -> float:
    """Images/s of Pillow alone: open, thumbnail to 1024 px, WebP quality 80."""
    started = time.perf_counter()
    for body in bodies:
        with Image.open(io.BytesIO(body)) as image:
            image.thumbnail((1024, 1024))
            image.save(io.BytesIO(), "WEBP", quality=80)
    return len(bodies) / (time.perf_counter() - started)


def one_worker(urls: list[str], data_dir: str) -> float:
    settings = ImageSettings(data_dir=data_dir, allow_private=True)
    os.makedirs(settings.images_dir, exist_ok=True)
    queue = JobQueue(settings.jobs_path)
    for url in urls:
        queue.enqueue(url)
    queue.close()
    worker = Worker(settings, name="bench")
    started = time.perf_counter()
    worker.run(until_idle=True)
    seconds = time.perf_counter() - started
    worker.close()
    return len(urls) / seconds


def stored_bytes(data_dir: str) -> int:
    total = 0
    for root, _, files in os.walk(os.path.join(data_dir, "images")):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".webp"))
    return total


def throughput(server: ImageServer, bodies: list[bytes]) -> dict:
    count = len(bodies)
    urls = server.urls("mixed", count)
    ceilings, workers = [], []
    with tempfile.TemporaryDirectory(prefix="bench-images-") as first, \
            tempfile.TemporaryDirectory(prefix="bench-images-") as second:
        for data_dir in (first, second):  # ceiling, worker, ceiling, worker: drift hits both
            ceilings.append(pillow_alone(bodies))
            workers.append(one_worker(urls, data_dir))
        out = stored_bytes(first)
    ceiling, worker = sum(ceilings) / 2, sum(workers) / 2
    source = sum(len(b) for b in bodies)
    return {
        "images": count,
        "pillow_alone_images_per_s": round(ceiling, 2),
        "one_worker_images_per_s": round(worker, 2),
        "ratio": round(worker / ceiling, 3),
        "bytes_in": source,
        "bytes_stored": out,
        "stored_over_in": round(out / source, 4),
    }


def queued(port: int) -> int:
    """Jobs not ended yet (queued, running or failed waiting for a retry), up to 100."""
    left = 0
    for state in ("queued", "running", "failed"):
        status, _, body = live.request("GET", port, f"/admin/image-jobs?state={state}&limit=100")
        if status == 200:
            left += len(json.loads(body)["jobs"])
    return left


def front_end(server: ImageServer, seconds: float) -> dict:
    urls = server.urls("busy", BUSY_IMAGES)
    productd = live.productd_server(extra=["--image-allow-private"])
    productd.start()
    try:
        live.preload(productd)
        solo = {load: live.run_load(productd, load, seconds=seconds).rps for load in ("get", "post_single")}
        for k in range(0, len(urls), 10):  # products of 10 images each: the pool's work
            body = json.dumps({"product_id": f"img-bench-{k}", "user_id": "bench", "name": "bench",
                               "images": urls[k:k + 10]}).encode()
            status, _, text = live.request("POST", productd.port, "/products", body,
                                           {"Content-Type": "application/json"})
            assert status == 201, (status, text)
        time.sleep(1.0)  # the pool has started
        busy = {load: live.run_load(productd, load, seconds=seconds).rps for load in ("get", "post_single")}
        left = queued(productd.port)
    finally:
        productd.stop()
    return {
        "solo_rps": {k: round(v) for k, v in solo.items()},
        "busy_rps": {k: round(v) for k, v in busy.items()},
        "busy_over_solo": {k: round(busy[k] / solo[k], 3) for k in solo},
        "jobs_left_after_the_busy_loads": left,  # > 0: the pool was busy all along
    }


def main() -> int:
    seconds = live.bench_seconds()
    bodies = mixed(live.env_int("BENCH_IMAGES", 48))
    server = ImageServer({"mixed": bodies, "busy": [photo(10_000 + i, 1600, 1200) for i in range(BUSY_IMAGES)]})
    try:
        result = {"throughput": throughput(server, bodies), "front_end": front_end(server, seconds),
                  "loadavg": live.loadavg()}
    finally:
        server.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
