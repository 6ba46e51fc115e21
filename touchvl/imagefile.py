"""Images from outside: one decode path from a file (or bytes) to the RGB pixels every consumer sees.

Everything a file can mean beyond plain RGB -- an EXIF ``Orientation`` tag, 16- or 32-bit samples, transparency,
a header claiming a billion pixels, bytes that are no image -- is settled here, the same way for every reader:

* prepare (touchvl.data.prepare) rewrites a file that needs it as a plain RGB JPEG under ``data/prepared/``, so
  embed, upload and the JSONL generator read the manifest's paths as plain RGB files;
* a user's query image is read with :func:`read_rgb` by the query encoder (search, TouchQA, the chat page), by the
  chat page's image check and by TouchQA's data URL for the chat model (:func:`jpeg_data_url`), and a request's
  image by the model server and the local trainer: the same pixels prepare would have published, or the same
  error -- ``image_too_large`` (a header over the caller's pixel cap, checked before any pixel is decoded, whatever
  PIL's own decompression-bomb limit) or ``corrupt_image`` (not decodable to its end).
"""
from __future__ import annotations

import base64
import contextlib
import io
import math
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from touchvl.errors import StageError

Source = Union[str, Path, bytes, bytearray, memoryview]
ALPHA_MODES = ("RGBA", "LA", "P", "PA", "La", "RGBa")


class ImageRejected(StageError):
    """An image that cannot be used as it is; ``reason`` is the code (prepare's quarantine reason, the model
    server's error code): ``image_too_large``, ``corrupt_image``, ``unsupported_image`` or ``unreadable_image``."""

    def __init__(self, reason: str, detail: str, where: str | None = None):
        super().__init__(f"{where}: {reason}: {detail}" if where else f"{reason}: {detail}")
        self.reason, self.detail, self.where = reason, detail, where


_LIMIT_LOCK = threading.RLock()


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit set to ``prepare.max_image_pixels`` (and its warning made an error).

    PIL checks its own module-global limit (89 Mpx; warning above it, DecompressionBombError above twice it)
    inside ``Image.open``, before our header check could run: with its default an image over our limit came
    out as ``corrupt_image``, and one under ours but over PIL's could not be read at all.  Set to ours, PIL's
    check *is* ours for every frame a plugin sizes later (:func:`open_image` checks the header itself, naming
    its width and height).  ``None`` leaves PIL's default.
    A module global (and so is the warnings filter): the model server and the chat page decode in several
    threads, so the setting is held under one lock until the caller is done; the previous value is restored.
    """
    with _LIMIT_LOCK, warnings.catch_warnings():
        previous = Image.MAX_IMAGE_PIXELS
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open(source: Source) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    return Image.open(source)


@contextlib.contextmanager
def open_image(source: Source, max_pixels: int, limit: str = "prepare.max_image_pixels") -> Iterator[Image.Image]:
    """The opened image, nothing decoded yet; more than ``max_pixels`` in its header raises ``image_too_large``
    (``limit`` names the setting in the message), bytes no decoder recognises ``corrupt_image``, a path that
    cannot be opened ``unreadable_image``."""
    with pixel_limit(max_pixels):
        try:
            Image.MAX_IMAGE_PIXELS = None  # the header is ours to check (below, naming its size); PIL's limit
            try:  # is ours again for everything decoded after it
                opened = _open(source)
            except Image.UnidentifiedImageError:
                raise ImageRejected("corrupt_image", "not an image file (no decoder recognises it)") from None
            except OSError as exc:
                if exc.errno is None:  # a decoder's error while reading the header
                    raise ImageRejected("corrupt_image", f"{type(exc).__name__}: {exc}") from None
                raise ImageRejected("unreadable_image", f"cannot read ({exc.strerror or exc})") from None
            except (ImageRejected, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - a plugin's own error on hostile bytes
                raise ImageRejected("corrupt_image", f"{type(exc).__name__}: {exc}") from None
            finally:
                Image.MAX_IMAGE_PIXELS = max_pixels
            with opened as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected("image_too_large", f"{width}x{height} = {width * height} pixels > "
                                                           f"{limit}={max_pixels} (from the header, not decoded)")
                yield img
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{found[1]} pixels" if found else str(exc)
            raise ImageRejected("image_too_large", f"{size} > {limit}={max_pixels} (from the header, not decoded)") from None


def has_orientation(img: Image.Image) -> bool:
    """An EXIF Orientation other than 'as stored' (2..8: mirrored and/or rotated)."""
    return img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB pixels as the image is meant to be seen: EXIF orientation applied, deep samples scaled."""
    # orientation first, once: it is how the file says to display its pixels, and after this the pixels are
    # written without the tag, so nothing downstream can apply it a second time or forget it
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        # 16-bit samples: scaled by the format's own full range (0 -> 0, 65535 -> 255).  convert() would clip
        # at 255, turning anything above 255/65535 white.  Full range rather than min-max keeps brightness
        # comparable between images of one dataset (a dark contact stays dark), and a 16-bit export of an
        # 8-bit image (v * 257) comes back exactly.
        samples = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I", "F"):
        # 32-bit integers or floats have no white point (raw counts, depth in mm, 0..1 floats): min-max per
        # image.  A constant image stays constant here and is quarantined as constant_image by the caller.
        samples = np.asarray(img, dtype=np.float64)
        if not np.isfinite(samples).all():
            raise ImageRejected("unsupported_image", f"mode {img.mode} with NaN or infinite pixels")
        lo, hi = float(samples.min()), float(samples.max())
        scaled = np.zeros(samples.shape, np.uint8) if hi == lo else np.rint((samples - lo) * (255.0 / (hi - lo)))
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    try:
        if img.mode in ALPHA_MODES:
            # composite transparency on white instead of letting convert() drop alpha to black
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")
    except ValueError as exc:  # a mode PIL cannot turn into RGB
        raise ImageRejected("unsupported_image", f"mode {img.mode}: {exc}") from None


def is_published_as_stored(img: Image.Image) -> bool:
    """A plain RGB JPEG without an orientation to apply: what prepare publishes unchanged (its pixels are the
    file's); anything else it rewrites from :func:`to_rgb`."""
    return img.format == "JPEG" and img.mode == "RGB" and not has_orientation(img)


@dataclass(frozen=True)
class Decoded:
    rgb: Image.Image  # 8-bit RGB, orientation applied, deep samples scaled
    mode: str  # the stored mode (I;16, F, RGBA, ...)
    as_stored: bool  # :func:`is_published_as_stored`: the file's bytes already carry exactly these pixels


def decode_open(img: Image.Image) -> Decoded:
    """Decode an image from :func:`open_image` to its end; a decoder's failure on it is ``corrupt_image``."""
    try:
        img.load()  # a truncated or corrupt file fails here, not later inside a consumer
        return Decoded(to_rgb(img), img.mode, is_published_as_stored(img))
    except (ImageRejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises on hostile bytes, the image is bad
        raise ImageRejected("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def decode(source: Source, max_pixels: int, limit: str = "max_image_pixels", where: str | None = None) -> Decoded:
    """:func:`open_image` then :func:`decode_open`; an :class:`ImageRejected` names ``where`` when given."""
    try:
        with open_image(source, max_pixels, limit) as img:
            return decode_open(img)
    except ImageRejected as exc:
        if where is None:
            raise
        raise ImageRejected(exc.reason, exc.detail, where) from None


def read_rgb(source: Source, max_pixels: int, limit: str = "max_image_pixels", where: str | None = None) -> Image.Image:
    """The RGB pixels of an image file or its bytes, exactly as prepare would publish them; or
    :class:`ImageRejected` (``image_too_large``, ``corrupt_image``, ``unsupported_image``, ``unreadable_image``)."""
    return decode(source, max_pixels, limit, where).rgb


def jpeg_data_url(source: str | Path, max_pixels: int, limit: str = "max_image_pixels", where: str | None = None,
                  max_side: int | None = None, quality: int = 90) -> str:
    """A data URL of the pixels :func:`read_rgb` gives: the file's own bytes when prepare would publish it as
    stored and it fits ``max_side``; otherwise those pixels (thumbnailed to ``max_side``) as a JPEG.  So a chat
    model is shown what the encoder embedded -- a 16-bit or EXIF-rotated upload as prepare would have turned it."""
    decoded = decode(source, max_pixels, limit, where)
    if decoded.as_stored and (max_side is None or max(decoded.rgb.size) <= max_side):
        data = Path(source).read_bytes()
    else:
        data = jpeg_bytes(decoded.rgb, max_side, quality)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def jpeg_bytes(img: Image.Image, max_side: int | None = None, quality: int = 90) -> bytes:
    """``img`` as RGB JPEG bytes, thumbnailed to at most ``max_side`` pixels a side (the caller's image is unchanged)."""
    img = img.convert("RGB")  # a copy, even of an RGB image
    if max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pixel_std(img: Image.Image) -> float:
    """The largest per-channel standard deviation of an 8-bit image: 0.0 exactly when every pixel is the same.

    From the histogram, two-pass: no float copy of the pixels, and exact for a constant image (ImageStat's
    one-pass formula can come out slightly negative or non-zero there on large images).
    """
    levels = np.arange(256, dtype=np.float64)
    hist = np.asarray(img.histogram(), dtype=np.float64).reshape(-1, 256)
    worst = 0.0
    for band in hist:
        n = band.sum()
        mean = (band * levels).sum() / n
        worst = max(worst, math.sqrt((band * (levels - mean) ** 2).sum() / n))
    return worst


def file_std(path: str | Path, max_pixels: int | None = None) -> float:
    """:func:`pixel_std` of an image file as stored (NaN when missing, -1.0 when unreadable)."""
    path = Path(path)
    if not path.is_file():
        return float("nan")  # the files-exist expectation reports it
    try:
        with pixel_limit(max_pixels), Image.open(path) as img:
            return pixel_std(img.convert("RGB"))
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - any decode failure of a published file is a validation failure
        return -1.0
