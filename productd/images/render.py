"""Turn a downloaded body into the stored rendition: one WebP, longest side at most 1024 px.

What is accepted: a body Pillow opens as JPEG, PNG, GIF, WebP or AVIF (what a shop's image
URL serves in practice), whatever the Content-Type said. Other formats Pillow could open
(TIFF, BMP, PSD, EPS through Ghostscript, ...) are refused as not an image: each is decoder
code facing arbitrary input and none is a web format a product photo comes in.

What is made, and why:

- WebP, lossy, quality 80: every current browser shows it, it is commonly measured 25-35%
  smaller than a JPEG of the same visual quality, and it keeps alpha (a PNG cut-out stays a
  cut-out, at a fraction of the PNG's bytes). One format keeps the store and the serving
  simple; AVIF compresses further but encodes several times slower, which the pool pays on
  every image.
- Longest side at most 1024 px, aspect kept, never upscaled: enough for a product page on a
  2x screen at 512 css px, and it bounds every stored object to about 100-200 KB.
- EXIF orientation applied (a phone's portrait photo stays upright) and the EXIF dropped
  (it may hold the GPS position of the shop's back room); animated images give their first
  frame; palette and grey images become RGB, with alpha kept only when some pixel uses it.

Decompression bombs: the pixel count is read from the header and refused above `max_pixels`
before anything is decoded; Pillow's own bomb check is a second line. For a JPEG, the decoder
is asked to scale down by 2, 4 or 8 while decoding (`draft`), which is most of the speed on a
large photo.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError, features

FORMATS = ("JPEG", "PNG", "GIF", "WEBP") + (("AVIF",) if features.check("avif") else ())
MAX_SIDE = 1024
MAX_PIXELS = 40_000_000  # 8000 x 5000: larger than any camera a shop uses; a bomb above
QUALITY = 80
METHOD = 4  # libwebp's effort 0..6: 4 is its default, 6 is ~2x slower for ~3% smaller


class RenderError(Exception):
    """The body cannot become a rendition; always permanent (the same bytes fail again)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = False
        self.retry_after = None


@dataclass(frozen=True)
class Rendition:
    data: bytes
    format: str  # "webp"
    width: int
    height: int
    source_format: str  # as Pillow names it: "JPEG", "PNG", ...
    source_width: int
    source_height: int

    @property
    def bytes(self) -> int:
        return len(self.data)

    @property
    def content_type(self) -> str:
        return "image/" + self.format


def render(body: bytes, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS, quality: int = QUALITY,
           method: int = METHOD) -> Rendition:
    try:
        image = Image.open(io.BytesIO(body), formats=FORMATS)
    except UnidentifiedImageError:
        raise RenderError("not-an-image", f"{len(body)} bytes that are not {', '.join(FORMATS)}") from None
    except Image.DecompressionBombError as exc:
        raise RenderError("too-many-pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RenderError("not-an-image", f"{type(exc).__name__}: {exc}") from None
    with image:
        source_format = image.format or "?"
        width, height = image.size
        if width < 1 or height < 1:
            raise RenderError("not-an-image", f"{width}x{height} pixels")
        if width * height > max_pixels:
            raise RenderError("too-many-pixels", f"{width}x{height} is over {max_pixels} pixels")
        try:
            return _render(image, source_format, width, height, max_side, quality, method)
        except Image.DecompressionBombError as exc:
            raise RenderError("too-many-pixels", str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
            raise RenderError("not-an-image", f"{source_format} that does not decode: {exc}") from None


def _target(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _render(image: Image.Image, source_format: str, width: int, height: int, max_side: int, quality: int,
            method: int) -> Rendition:
    if source_format == "JPEG":
        # Decode at the smallest 1/2^k scale still at least the target size (both sides).
        image.draft("RGB" if image.mode in ("RGB", "YCbCr", "CMYK") else image.mode, _target(width, height, max_side))
    image.seek(0)  # an animated image: its first frame
    image.load()
    # In place: without it exif_transpose copies every image, rotated or not (14% of a render).
    ImageOps.exif_transpose(image, in_place=True)
    frame = _web_mode(image)
    # Pillow's default for thumbnail (bicubic after a cheap box reduction, reducing_gap 2):
    # measured 45 ms a 2000x1500 photo with Lanczos, which made a worker 0.74 of Pillow alone.
    frame.thumbnail((max_side, max_side))
    out = io.BytesIO()
    frame.save(out, "WEBP", quality=quality, method=method)
    return Rendition(out.getvalue(), "webp", frame.width, frame.height, source_format, width, height)


def _web_mode(image: Image.Image) -> Image.Image:
    """RGB, or RGBA when some pixel is not opaque."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = image.convert("I")
        mode = "I"
    if mode == "I":  # 16-bit grey: scale to 8 bits rather than clip
        image = image.point(lambda v: v * (1 / 256)).convert("L")
        mode = "L"
    if mode == "F":
        image = image.convert("L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        image = image.convert("RGBA")
        if image.getchannel("A").getextrema()[0] == 255:
            image = image.convert("RGB")
    elif mode != "RGB":
        image = image.convert("RGB")
    return image
