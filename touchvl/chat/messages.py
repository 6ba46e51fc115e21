"""Images in chat messages: the one place that turns files into data URLs and image URLs back into bytes.

Used by the JSONL generators (inline ``file://`` images under the data folders as base64), TouchQA (the query image and the
neighbours' photos), the local trainer (reading a dataset's images) and the model server (reading a
request's images, where only data URLs are accepted).
"""
from __future__ import annotations

import base64
import stat
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from touchvl.chat.fetch import FetchError, UrlFetcher, redact_urls
from touchvl.errors import StageError

MIME_BY_FORMAT = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
MAX_INLINE_BYTES = 10 * 1024 * 1024  # what a fine-tuning service accepts per image (the validator's cap)


def sniff_mime(data: bytes) -> str:
    """The image MIME type from the file's magic bytes (JPEG when unknown: what every stage writes)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/jpeg"


def bytes_data_url(data: bytes, mime: str | None = None) -> str:
    """The one data-URL encoder: ``data:<mime>;base64,<payload>`` (the MIME type sniffed when not given)."""
    return f"data:{mime or sniff_mime(data)};base64," + base64.b64encode(data).decode()


def decode_data_url(url: str) -> bytes:
    """The one data-URL decoder: the bytes of a base64 ``data:`` URL, or ValueError saying why not."""
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ValueError("only base64 data URLs are supported")
    return base64.b64decode(payload, validate=True)  # binascii.Error is a ValueError


def jpeg_data_url(image, max_side: int | None = None, quality: int = 90) -> str:
    """A JPEG data URL of a PIL image or an image file, at most ``max_side`` pixels a side (pages, thumbnails)."""
    from PIL import Image

    from touchvl.imagefile import jpeg_bytes

    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            return jpeg_data_url(opened, max_side, quality)
    return bytes_data_url(jpeg_bytes(image, max_side, quality), "image/jpeg")


def file_data_url(path: str | Path) -> str:
    """A base64 data URL of an image file (its real MIME type), or a clear error naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StageError(f"{path}: cannot read image ({exc.strerror})") from None
    return bytes_data_url(data)


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL."""
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def read_image_url(url: str, where: str, *, allow_file: bool = True, allow_http: bool = True,
                   timeout_s: float = 60.0) -> bytes:
    """The bytes behind an ``image_url``: a base64 data URL, a ``file://`` path, or an https URL on a public
    address (``allow_http``; fetched by :class:`touchvl.chat.fetch.UrlFetcher`: no loopback or private
    addresses, redirects re-checked, ``timeout_s`` in all, at most MAX_INLINE_BYTES)."""
    try:
        if url.startswith("data:"):
            return decode_data_url(url)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme == "file" and allow_file:
            return file_url_path(url).read_bytes()
        if scheme in ("http", "https") and allow_http:
            data = UrlFetcher(deadline_s=timeout_s, max_bytes=MAX_INLINE_BYTES + 1)(url)
            if len(data) > MAX_INLINE_BYTES:
                raise ValueError(f"over {MAX_INLINE_BYTES // 2**20} MB")
            return data
        raise ValueError(f"unsupported URL scheme {scheme or url[:20]!r}")
    except (OSError, ValueError, FetchError) as exc:
        raise StageError(f"{where}: cannot read image: {redact_urls(str(exc))}") from None


def open_image(data: bytes, where: str = "image", max_pixels: int = 40_000_000,
               limit: str = "prepare.max_image_pixels"):
    """Decode image bytes to the RGB PIL image every consumer sees (touchvl.imagefile: orientation applied, deep
    samples scaled, the header's pixel count capped before decoding), or a clear error naming ``where``:
    :class:`touchvl.imagefile.ImageRejected` (a StageError) with reason ``image_too_large`` or ``corrupt_image``."""
    from touchvl import imagefile

    return imagefile.read_rgb(data, max_pixels, limit, where)


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def local_image_path(url: str, roots: Sequence[str | Path]) -> Path:
    """The file behind a ``file://`` URL, only if it is a regular file under one of ``roots`` (symlinks and
    ``..`` resolved first) and not over :data:`MAX_INLINE_BYTES`; else a clear error naming the URL.  The URLs
    come from a data file (the upload mapping), so they are not trusted to point at images."""
    shown = url if len(url) <= 200 else url[:200] + "…"
    try:
        path = file_url_path(url).resolve()
        resolved_roots = [Path(r).resolve() for r in roots]
    except (OSError, ValueError, RuntimeError) as exc:  # embedded NUL, symlink loop
        raise StageError(f"{shown}: not a usable file URL ({exc})") from None
    if urllib.parse.urlsplit(url).netloc not in ("", "localhost") or not _under(path, resolved_roots):
        allowed = ", ".join(str(r) for r in roots) or "none given"
        raise StageError(f"{shown}: outside the data folders images may be read from ({allowed})")
    try:
        info = path.stat()
    except OSError as exc:
        raise StageError(f"{shown}: cannot read image ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise StageError(f"{shown}: not a regular file")
    if info.st_size > MAX_INLINE_BYTES:
        raise StageError(f"{shown}: {info.st_size / 2**20:.1f} MB image, over the {MAX_INLINE_BYTES // 2**20} MB "
                         f"a fine-tuning service accepts")
    return path


def image_part(url: str, mode: str, detail: str, roots: Sequence[str | Path] = ()) -> dict:
    """An OpenAI ``image_url`` content part; ``mode="base64"`` inlines ``file://`` images as data URLs, read
    only from under ``roots`` (the project's data folders; none given: no file is read)."""
    if mode == "base64" and urllib.parse.urlsplit(url).scheme.lower() == "file":
        url = file_data_url(local_image_path(url, roots))
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}
