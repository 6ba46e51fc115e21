"""Input images for prepare: one decode path from a file to the RGB pixels every consumer sees.

Why here and not in each consumer: embed, upload and the JSONL generator read the manifest's paths as plain
RGB files.  Everything a file can mean beyond that -- an EXIF ``Orientation`` tag, 16- or 32-bit samples,
transparency, a header claiming a billion pixels -- is settled once, in prepare: a file that needs it is
rewritten as a plain RGB JPEG under ``data/prepared/`` and the manifest points there.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps

ALPHA_MODES = ("RGBA", "LA", "P", "PA", "La", "RGBa")


class ImageRejected(Exception):
    """An image prepare must not publish; ``reason`` is the quarantine reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit set to ``prepare.max_image_pixels`` (and its warning made an error).

    PIL checks its own module-global limit (89 Mpx; warning above it, DecompressionBombError above twice it)
    inside ``Image.open``, before our header check could run: with its default an image over our limit came
    out as ``corrupt_image``, and one under ours but over PIL's could not be read at all.  Set to ours, PIL's
    check *is* ours, for the header and for every frame a plugin sizes later.  ``None`` leaves PIL's default.
    A module global: prepare decodes in one thread, and the previous value is restored.
    """
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


@contextlib.contextmanager
def open_image(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """The opened image; more than ``max_pixels`` in its header raises ``image_too_large`` before any decode."""
    with pixel_limit(max_pixels):
        try:
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected("image_too_large", f"{width}x{height} > prepare.max_image_pixels={max_pixels}")
                yield img
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{found[1]} pixels" if found else str(exc)
            raise ImageRejected("image_too_large", f"{size} > prepare.max_image_pixels={max_pixels} "
                                "(from the header, not decoded)") from None


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
