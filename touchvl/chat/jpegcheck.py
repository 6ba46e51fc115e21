"""A JPEG's verdict without PIL, when it is certain to be PIL's: the JSONL validator's fast path for images.

:func:`plain_jpeg_size` walks the markers as PIL's parser (PIL.JpegImagePlugin) does and answers only for the
plain JPEGs it reads without a doubt; :func:`jpeg_decodes` then decodes the scan with simplejpeg (libjpeg-turbo,
strict, 1/8 scale: every entropy-coded byte is read). Anything else is for PIL to decide
(touchvl.chat.validate.pil_image_header); the tests compare both paths on crafted, fuzzed and swept JPEGs.
"""
from __future__ import annotations

from PIL import Image

# simplejpeg: libjpeg-turbo from C, for the JPEGs of a file -- one call decodes a data URL's JPEG at 1/8 scale
# (every entropy-coded byte read) in ~8 us where PIL's open + draft + load takes ~40-60 us, most of it PIL's
# Python-level marker parsing (see plain_jpeg_size: what PIL would refuse still goes to PIL).
import simplejpeg


_PIL_JPEG_APP_PREFIXES = {0xE0: b"JFIF", 0xEE: b"Adobe"}  # PIL reads 2 bytes at offset 5 of these: 7 bytes needed
_PIL_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman): the JPEGs one meets
_PIL_SKIPPED = (0xC4, 0xDD, 0xFE)  # DHT, DRI, COM: PIL reads their length and skips them


_JPEG_HEADS: dict[bytes, tuple[int, int] | None] = {}  # plain_jpeg_size's walks, by the bytes they read
_JPEG_HEAD_CHARS, _JPEG_HEAD_ENTRIES = 4096, 256  # at most 1 MiB of remembered heads
# the last head walked or looked up, with its answer.  The first one is no head: what starts with it has 0xFF
# padding after the first marker, which the walk answers None too (PIL decides)
_LAST_HEAD: tuple[bytes, tuple[int, int] | None] = (b"\xff\xd8\xff" * 2, None)


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG whose markers PIL's parser (PIL.JpegImagePlugin) reads without an error and
    as a plain JPEG (mode L or RGB, not MPO), walking them as it does up to the start of scan; None for
    anything else, or anything in doubt: a marker other than APPn/DQT/DHT/DRI/COM/SOF0-2, padding or bytes
    between markers, EXIF (PIL parses it), a Photoshop or MPF block, a short JFIF/Adobe/ICC block or DQT
    table (PIL raises on those), two frames, a frame of other than 8 bits or 1/3 components, a zero size.

    The JPEGs of one encoder share their head (tables, and the size when it is the same): a walk that ended
    at the first start-of-scan marker in the data read only the bytes up to it, so the same head walks the
    same way and is looked up instead (the scan's length, which the walk checks against the data's, is checked).
    The head looked up last is tried first, by comparing the data's start with it: no search, copy or hash."""
    global _LAST_HEAD
    last_head, last_size = _LAST_HEAD
    if data.startswith(last_head):  # the same first start-of-scan marker, at len(last_head) - 4
        sos = len(last_head) - 4
        length = data[sos + 2] << 8 | data[sos + 3]
        return last_size if length >= 2 and sos + 2 + length <= len(data) else None
    sos = data.find(b"\xff\xda")
    if 0 < sos <= _JPEG_HEAD_CHARS and sos + 4 <= len(data):
        head = data[:sos + 4]
        size = _JPEG_HEADS.get(head, False)
        if size is not False:
            _LAST_HEAD = head, size
            length = data[sos + 2] << 8 | data[sos + 3]
            return size if length >= 2 and sos + 2 + length <= len(data) else None
    size, at = _walk_jpeg(data)
    if at == sos and at > 0 and sos <= _JPEG_HEAD_CHARS:  # the walk ended at that scan marker: remember it
        if len(_JPEG_HEADS) >= _JPEG_HEAD_ENTRIES:
            _JPEG_HEADS.clear()
        _JPEG_HEADS[data[:sos + 4]] = size
        _LAST_HEAD = data[:sos + 4], size
    return size


def _walk_jpeg(data: bytes) -> tuple[tuple[int, int] | None, int]:
    """(:func:`plain_jpeg_size`'s answer, the position of the start-of-scan marker it ended at, else -1)."""
    if data[:3] != b"\xff\xd8\xff":  # PIL's JPEG _accept
        return None, -1
    end, pos, size = len(data), 2, None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None, -1
        marker, length = data[pos + 1], data[pos + 2] << 8 | data[pos + 3]
        start, nxt = pos + 4, pos + 2 + length  # the segment's payload: data[start:nxt]
        if length < 2 or nxt > end:
            return None, -1
        if marker == 0xDA:  # start of scan: PIL's parse ends here
            return size, pos
        if 0xE0 <= marker <= 0xEF:
            prefix = _PIL_JPEG_APP_PREFIXES.get(marker)
            if prefix is not None:
                if length - 2 < 7 and data.startswith(prefix, start, nxt):
                    return None, -1
            elif marker == 0xE1:
                if data.startswith(b"Exif\0\0", start, nxt):
                    return None, -1
            elif marker == 0xE2:
                if data.startswith(b"MPF\0", start, nxt) or (length - 2 < 14 and data.startswith(b"ICC_PROFILE\0", start, nxt)):
                    return None, -1
            elif marker == 0xED and data.startswith(b"Photoshop 3.0\x00", start, nxt):
                return None, -1
        elif marker == 0xDB:  # tables of 1 + 64 bytes (8-bit) or 1 + 128 (16-bit): PIL raises on a short one
            q = start
            while q < nxt:
                q += 65 if data[q] < 16 else 129
            if q != nxt:
                return None, -1
        elif marker in _PIL_SOF:
            if size is not None or length < 8 or (length - 8) % 3 or data[start] != 8 or data[start + 5] not in (1, 3):
                return None, -1
            height, width = data[start + 1] << 8 | data[start + 2], data[start + 3] << 8 | data[start + 4]
            if not (width and height):
                return None, -1
            size = (width, height)
        elif marker not in _PIL_SKIPPED:
            return None, -1
        pos = nxt
    return None, -1


def jpeg_decodes(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) when PIL's :func:`touchvl.chat.validate.pil_image_header` would read ``data`` as a JPEG of that size, known
    without PIL: :func:`plain_jpeg_size` (PIL's parse), not over ``max_pixels`` nor PIL's bomb limit (those
    go to PIL for its exact finding), and simplejpeg decodes it at 1/8 scale in strict mode -- libjpeg-turbo
    reads every entropy-coded byte and any warning (premature end of data, corrupt data) is an error, where
    PIL's own libjpeg decode is lenient about warnings.  None: ask PIL."""
    size = plain_jpeg_size(data)
    if size is None:
        return None
    pixels = size[0] * size[1]
    if pixels > max_pixels or (Image.MAX_IMAGE_PIXELS is not None and pixels > 2 * Image.MAX_IMAGE_PIXELS):
        return None
    try:  # GRAY: the chroma planes are entropy-decoded (checked) but not upsampled or colour-converted
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, strict=True)
    except Exception:  # noqa: BLE001 -- whatever simplejpeg refuses, PIL decides
        return None
    return size
