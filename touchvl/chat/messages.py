"""Images in chat messages: the one place that turns files into data URLs and image URLs back into bytes.

Used by the JSONL generators (inline ``file://`` images as base64), TouchQA (the query image and the
neighbours' photos), the local trainer (reading a dataset's images) and the model server (reading a
request's images, where only data URLs are accepted).
"""
from __future__ import annotations

import base64
import io
import urllib.parse
import urllib.request
from pathlib import Path

from touchvl.errors import StageError

MIME_BY_FORMAT = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


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
    return f"data:{mime or sniff_mime(data)};base64," + base64.b64encode(data).decode()


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
    """The bytes behind an ``image_url``: a base64 data URL, a ``file://`` path, or an http(s) URL."""
    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise ValueError("only base64 data URLs are supported")
            return base64.b64decode(payload, validate=True)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme == "file" and allow_file:
            return file_url_path(url).read_bytes()
        if scheme in ("http", "https") and allow_http:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return response.read()
        raise ValueError(f"unsupported URL scheme {scheme or url[:20]!r}")
    except (OSError, ValueError) as exc:
        raise StageError(f"{where}: cannot read image: {exc}") from None


def open_image(data: bytes, where: str = "image"):
    """Decode image bytes to an RGB PIL image, or a clear error naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise StageError(f"{where}: not a decodable image ({exc})") from None


def image_part(url: str, mode: str, detail: str) -> dict:
    """An OpenAI ``image_url`` content part; ``mode="base64"`` inlines ``file://`` images as data URLs."""
    if mode == "base64" and url.startswith("file://"):
        url = file_data_url(file_url_path(url))
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def is_public_address(host: str) -> bool:
    """True when every address ``host`` resolves to is a public one (no loopback, private, link-local,
    multicast, reserved or unspecified address): what a server may fetch on a client's behalf."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = {ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos}
    return bool(addresses) and all(a.is_global and not a.is_multicast for a in addresses)


def read_public_https(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """An https URL on a public address, at most ``max_bytes``, within ``timeout_s`` in all; no redirects
    (a redirect could point at a private address after the check)."""
    import http.client
    import time

    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise StageError(f"only https:// URLs are fetched, not {parts.scheme or url[:20]!r}")
    if not is_public_address(parts.hostname):
        raise StageError(f"{parts.hostname} is not a public address: not fetched")
    deadline = time.monotonic() + timeout_s
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout_s)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        if response.status != 200:
            raise StageError(f"https fetch answered {response.status} (redirects are not followed)")
        chunks, size = [], 0
        while chunk := response.read(1 << 16):
            size += len(chunk)
            if size > max_bytes:
                raise StageError(f"more than {max_bytes // 2**20} MB")
            if time.monotonic() > deadline:
                raise StageError(f"took longer than {timeout_s:.0f} s")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise StageError(f"https fetch failed: {exc}") from None
    finally:
        conn.close()
