"""Seeded mutations of a valid chat fine-tuning file, for the validator's fuzz test (tests/test_jsonl_fuzz.py).

``mutants(seed, n)`` yields ``(name, bytes)``: byte flips, truncation, deep nesting, huge integers, NaN, lone
surrogates, control characters, invalid UTF-8, bomb and broken images, wrong types, deleted keys, huge strings,
blank lines, BOMs and CRLFs in odd places, signed and private image URLs.  Deterministic for a seed.
"""
from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib

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
