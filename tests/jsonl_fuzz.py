"""Seeded mutations of a valid chat fine-tuning file, for the validator's fuzz test (tests/test_jsonl_fuzz.py).

``mutants(seed, n)`` yields ``(name, bytes)``: byte flips, truncation, deep nesting, huge integers, NaN, lone
surrogates, control characters, invalid UTF-8, bomb and broken images, wrong types, deleted keys, huge strings,
blank lines, BOMs and CRLFs in odd places, signed and private image URLs.  Deterministic for a seed.
``jpeg_variants()``: JPEGs on which PIL's and simplejpeg's verdicts may differ.
"""
from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib

import numpy as np
from PIL import Image


def _png(size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 140, 60)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A well-formed PNG whose header claims ``width x height`` over a few hundred bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def data_url(data: bytes, mime: str = "png") -> str:
    return f"data:image/{mime};base64," + base64.b64encode(data).decode()


def seed_examples() -> list[dict]:
    """12 valid examples: text, data-URL images (PNG, JPEG), an https URL, weights, several turns."""
    system = {"role": "system", "content": "You describe how surfaces feel to the touch."}
    out = []
    for i in range(12):
        user: object = f"Sample {i}: how does a grainy, hard surface feel?"
        if i % 3 == 1:
            user = [{"type": "text", "text": f"Tactile image {i}. What does this feel like?"},
                    {"type": "image_url", "image_url": {"url": data_url(_png()), "detail": "low"}}]
        elif i % 3 == 2:
            user = [{"type": "text", "text": f"Tactile image and photo {i}."},
                    {"type": "image_url", "image_url": {"url": data_url(_jpeg(), "jpeg"), "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": f"https://bucket.example.invalid/tvl/tac/image_{i}_tac.jpg"
                                                               "?OSSAccessKeyId=AK&Expires=1&Signature=SIG", "detail": "auto"}}]
        messages = [system, {"role": "user", "content": user},
                    {"role": "assistant", "content": f"It feels grainy and hard, like sandpaper (sample {i})."}]
        if i % 4 == 3:
            messages += [{"role": "user", "content": "And its hardness?"},
                         {"role": "assistant", "content": "Hard, like stone.", "weight": 1}]
        out.append({"messages": messages})
    return out


def seed_file() -> bytes:
    return "".join(json.dumps(e) + "\n" for e in seed_examples()).encode()


# --------------------------------------------------------------------------------------------- mutators
WEIRD_VALUES = [None, True, 0, -1, 3.5, 1e308, "", " ", "x" * 50, [], {}, [None], {"type": None}, [[[]]],
                {"url": 5}, "\u202e\u0000\u001b[2J", 10 ** 40]


def _flip_bytes(rng, data):
    b = bytearray(data or b"{}")
    for _ in range(rng.randint(1, 25)):
        i = rng.randrange(len(b))
        b[i] = rng.randrange(256)
    return bytes(b)


def _truncate(rng, data):
    return data[: rng.randrange(len(data))] if data else data


def _deep(rng, data):
    depth = rng.choice([63, 64, 65, 100, 900, 999, 1000, 1001, 5000, 200_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    inner = opener * depth + "1" + closer * depth
    line = rng.choice(['{"messages": %s}', '{"messages": [{"role": "user", "content": %s}]}', '%s',
                       '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}, '
                       '{"role": "assistant", "content": "a b c d"}]}'])
    return _insert_line(rng, data, (line % inner).encode())


def _huge_int(rng, data):
    digits = rng.choice([4300, 4301, 5000, 100_000])
    value = rng.choice(["9" * digits, "-" + "1" * digits, "1e" + "9" * 50, "1" + "0" * digits + ".5"])
    line = '{"messages": [{"role": "user", "content": "hi", "weight": %s}, {"role": "assistant", "content": "fine then ok"}]}'
    return _insert_line(rng, data, (line % value).encode())


def _nan(rng, data):
    value = rng.choice(["NaN", "Infinity", "-Infinity"])
    return _insert_line(rng, data, ('{"messages": [{"role": "assistant", "content": "a b c", "weight": %s}]}' % value).encode())


def _surrogate(rng, data):
    s = rng.choice(["\\ud800", "\\udfff", "x\\udbff", "\\ud83d", "\\ude00\\ud83d", "\\ud83d\\ude00"])
    where = rng.choice(['{"messages": [{"role": "user", "content": "caf%s"}, {"role": "assistant", "content": "a b c d"}]}',
                        '{"messages": [{"role": "%s", "content": "x"}]}',
                        '{"messages": [{"role": "user", "content": "x", "%s": 1}]}',
                        '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://h/%s.png?Signature=S"}}]}]}',
                        '{"%s": []}'])
    return _insert_line(rng, data, (where % s).encode())


def _bad_image(rng, data):
    png = _png()
    payload = rng.choice([
        data_url(bomb_png()), data_url(bomb_png(7000, 7000)), data_url(bomb_png(1, 2 ** 31 - 1)), data_url(bomb_png(0, 0)),
        data_url(png[: rng.randrange(8, len(png))]), data_url(_flip_bytes(rng, png)), data_url(_jpeg()[:40], "jpeg"),
        data_url(png, "jpeg"), data_url(b"GIF89a" + b"\0" * 20, "gif"), data_url(b"BM" + b"\xff" * 60),
        data_url(b"II*\0" + b"\xff" * 60), "data:image/png;base64,@@@@", "data:image/png;base64," + "A" * 5,
        "data:image/;base64,", "data:image/png," + "x" * 10, "https://127.0.0.1:1/x.png",
        "http://169.254.169.254/latest/meta-data/iam.png", "https://[::1]/a.jpg?Signature=S", "file:///etc/passwd",
        "ftp://h/x.jpg", "https://h/x.tiff", " https://h/x.jpg", "HTTPS://H/X.JPG"])
    example = seed_examples()[1]
    example["messages"][1]["content"][1]["image_url"]["url"] = payload
    return _insert_line(rng, data, json.dumps(example).encode())


def _parsed_line(rng, data):
    """(lines, index, object) of a random line that parses as a JSON object, or None."""
    lines = data.split(b"\n")
    order = list(range(len(lines)))
    rng.shuffle(order)
    for i in order:
        try:
            obj = json.loads(lines[i])
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return lines, i, obj
    return None


def _wrong_type(rng, data):
    found = _parsed_line(rng, data) or _parsed_line(rng, seed_file())
    lines, i, obj = found
    container, key = _random_slot(rng, obj)
    if container is not None:
        container[key] = rng.choice(WEIRD_VALUES)
    lines[i] = json.dumps(obj).encode()
    return b"\n".join(lines)


def _delete_key(rng, data):
    found = _parsed_line(rng, data) or _parsed_line(rng, seed_file())
    lines, i, obj = found
    container, key = _random_slot(rng, obj)
    if container is not None:
        container.pop(key) if isinstance(container, list) else container.pop(key, None)
    lines[i] = json.dumps(obj).encode()
    return b"\n".join(lines)


def _random_slot(rng, obj):
    """A random (container, key) inside ``obj``."""
    slots = []
    stack = [obj]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            slots.append((node, k))
            stack.append(v)
    return rng.choice(slots) if slots else (None, None)


def _layout(rng, data):
    lines = data.split(b"\n")[:-1] or [b"{}"]
    choice = rng.randrange(8)
    if choice == 0:
        lines.insert(rng.randrange(len(lines)), b"")
    elif choice == 1:
        lines = [l + b"\r" for l in lines]
    elif choice == 2:
        lines.insert(rng.randrange(1, len(lines)), b"\xef\xbb\xbf" + lines[0])
    elif choice == 3:
        lines = lines + lines[: rng.randrange(1, len(lines))]  # duplicates
    elif choice == 4:
        lines = [b"\x00" * rng.randrange(1, 100)] + lines
    elif choice == 5:
        lines = [b" \t "] * rng.randrange(1, 5)
    elif choice == 6:
        lines.insert(rng.randrange(len(lines)), bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    else:
        return b""
    return b"\n".join(lines) + rng.choice([b"\n", b"", b"\r\n"])


def _garbage_text(rng, data):
    text = rng.choice(["\u0000", "\u001b]0;pwned\u0007", "\u202e", "\ufeff", "\uffff", "\U0010ffff", "é" * 1000,
                       "word " * 100_000, "|" * 50, "<script>alert(1)</script>", "`" * 10, "\n\r"])
    example = seed_examples()[0]
    slot = rng.choice(["system", "user", "assistant", "role"])
    if slot == "role":
        example["messages"][1]["role"] = text
    else:
        example["messages"][{"system": 0, "user": 1, "assistant": 2}[slot]]["content"] = text
    return _insert_line(rng, data, json.dumps(example, ensure_ascii=rng.random() < 0.5).encode())


def _invalid_utf8(rng, data):
    bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82"])
    i = rng.randrange(len(data) + 1)
    return data[:i] + bad + data[i:]


def _insert_line(rng, data, line: bytes) -> bytes:
    lines = data.split(b"\n")[:-1]
    lines.insert(rng.randrange(len(lines) + 1), line)
    return b"\n".join(lines) + b"\n"


def _save(img, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _segment(marker: int, payload: bytes) -> bytes:
    """A JPEG marker segment: 0xFF, the marker, the big-endian length (itself included), the payload."""
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def jpeg_variants() -> dict[str, bytes]:
    """JPEGs (and a PNG) that PIL and simplejpeg read alike, or not: progressive, grey, 4:4:4, restart markers, ICC,
    EXIF, CMYK, MPO; truncated, without EOI, with corrupt scans; and segments crafted where PIL's marker parser
    differs from libjpeg's (short JFIF/Adobe/ICC blocks, padding, TEM, short DQT, 12-bit, two layers, SOF3/SOF9).
    ``{name: bytes}``, deterministic (tests/test_jsonl_validate.py compares the fast paths with PIL on them)."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype="uint8"))
    base = _save(noise)
    exif = Image.Exif()
    exif[0x010F] = "touchvl"  # Make
    out = {"baseline": base, "progressive": _save(noise, progressive=True), "gray": _save(noise.convert("L")),
           "444": _save(noise, subsampling=0), "restarts": _save(noise, restart_marker_blocks=2),
           "icc": _save(noise, icc_profile=b"\0" * 300), "exif": _save(noise, exif=exif), "comment": _save(noise, comment=b"hi"),
           "cmyk": _save(noise.convert("CMYK")), "mpo": _save(noise, "MPO", save_all=True, append_images=[noise.rotate(90)]),
           "png_bytes": _save(noise, "PNG"), "truncated_30": base[:int(len(base) * .3)], "truncated_95": base[:int(len(base) * .95)],
           "no_eoi": base[:-2], "trailing_bytes": base + b"trailing"}
    sos = base.rfind(b"\xff\xda")
    for k in range(4):
        data = bytearray(base)
        for p in np.random.default_rng(k).integers(sos + 20, len(base) - 10, 3):
            data[p] ^= 0x5A
        out[f"corrupt_scan_{k}"] = bytes(data)
    head, tail = base[:2], base[2:]  # SOI | the rest: segments inserted right after SOI
    for name, seg in {"short_jfif": _segment(0xE0, b"JFIF\0"), "short_adobe": _segment(0xEE, b"Adobe\0"),
                      "short_icc": _segment(0xE2, b"ICC_PROFILE\0\x01"), "mpf_junk": _segment(0xE2, b"MPF\0junk"),
                      "photoshop_cut": _segment(0xED, b"Photoshop 3.0\x008BIM\x04"), "exif_junk": _segment(0xE1, b"Exif\0\0junk"),
                      "app15": _segment(0xEF, b"anything"), "padding": b"\xff" + _segment(0xFE, b"c"), "junk_byte": b"\x00" + _segment(0xFE, b"c"),
                      "tem_marker": b"\xff\x01", "short_dqt": _segment(0xDB, b"\x00" + bytes(10)), "dqt16": _segment(0xDB, b"\x10" + bytes(128)),
                      "bad_length": b"\xff\xfe\x00\x01", "eoi_first": b"\xff\xd9", "sof_first": _segment(0xC0, b"\x08\x00\x10\x00\x10\x01\x01\x11\x00"),
                      "dht_empty": _segment(0xC4, b""), "dri": _segment(0xDD, b"\x00\x04")}.items():
        out[name] = head + seg + tail
    sof = base.find(b"\xff\xc0")  # +1 the marker, +4 the precision, +5/+6 the height, +9 the components
    for name, (offset, value) in {"12_bit": (4, 12), "zero_height": (5, 0), "two_layers": (9, 2), "sof3": (1, 0xC3),
                                  "sof9": (1, 0xC9)}.items():
        data = bytearray(base)
        data[sof + offset] = value
        if name == "zero_height":
            data[sof + 6] = 0
        out[name] = bytes(data)
    return out


MUTATORS = [_flip_bytes, _truncate, _deep, _huge_int, _nan, _surrogate, _bad_image, _wrong_type, _delete_key,
            _layout, _garbage_text, _invalid_utf8]


def mutants(seed: int, n: int):
    """``n`` mutated files: each mutator in turn, with 0-2 more picked at random stacked on it; deterministic."""
    rng = random.Random(seed)
    base = seed_file()
    for i in range(n):
        stack = [MUTATORS[i % len(MUTATORS)]] + [rng.choice(MUTATORS) for _ in range((i // len(MUTATORS)) % 3)]
        data = base
        for mutate in stack:
            data = mutate(rng, data)
        yield f"{i:03d}_{'+'.join(m.__name__.strip('_') for m in stack)}", data
