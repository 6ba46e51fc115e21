"""Validator for OpenAI chat fine-tuning JSONL, images included.

Streams the file line by line in constant memory: histograms for the summary and an 8 MiB Bloom
filter for duplicate detection (a second pass, only when the filter flags candidates, finds the
line each duplicate repeats), accepts UTF-8 with BOM and CRLF line endings, and reports errors and
warnings as ``{line, code, message}`` with 1-based line numbers.  Token counts: text by
:class:`TokenCounter` (see its docstring for exactness), images by OpenAI's published formula using
the real image size when it is known (decoded data URLs; fetched URLs with ``check_urls``).

Speed (bench/jsonl.py): lines are parsed by orjson (Python's json for what orjson refuses, see
:func:`parse_line_exact`), each distinct text is tokenized once and each distinct data-URL payload decoded once
(bounded LRUs): the same findings as parsing, tokenizing and decoding every line, in bounded memory.  A line in
the common shape (:func:`plain_example`: only strings in it, nothing wrong with it) skips the scans for what
orjson and json read differently and goes through one specialised pass; anything else -- and any line with a
finding -- goes through the general checker, whose findings these are.  A data-URL JPEG is decoded by
simplejpeg (libjpeg-turbo, strict, 1/8 scale: every entropy-coded byte read) once :func:`plain_jpeg_size` has
walked its markers as PIL's parser does; PIL reads whatever simplejpeg refuses or that walk doubts, and
decides.  Duplicates: a Bloom filter over xxh3_128 digests of the sorted-key serialisation, candidates
confirmed by blake2b in a second pass.  ``validate_file(fast=False)`` is the general checker and PIL for
everything (the tests check both give the same report); ``workers=N`` validates chunks in forked processes and
merges them into the same report.  Measured figures: README, Benchmarks.
"""
from __future__ import annotations

import binascii
import hashlib
import io
import json
import math
import re
import struct
import warnings
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import orjson
import pybase64
# xxhash: the duplicate filter's 128-bit digest of each example, ~20x faster than blake2b on a 1.5 KB line; a
# candidate duplicate is confirmed by blake2b in the second pass (duplicate_findings), so a crafted xxh3
# collision cannot make a line a duplicate of another.
import xxhash
from PIL import Image

from touchvl.chat.fetch import UrlFetcher, redact_urls
from touchvl.chat.targets import CHECKS as TARGET_CHECKS
from touchvl.chat.jpegcheck import jpeg_decodes

ALLOWED_ROLES = {"system", "user", "assistant", "tool"}
ALLOWED_MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "refusal", "function_call"}
PART_TYPES = {"text", "image_url"}
IMAGE_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
MAX_IMAGES = 10
MAX_IMAGE_BYTES = 10 * 1024 * 1024
DATA_URL = re.compile(r"^data:image/(?P<fmt>[a-zA-Z0-9.+-]+);base64,")  # the payload is what follows the match
IMAGE_KEY_CHARS = 4096
IMAGE_CACHE_ENTRIES = 1024  # outcomes of distinct data-URL payloads remembered per file (least recently used dropped)
SHORT_ANSWER_WORDS = 3
MIN_EXAMPLES = 10
MAX_IMAGE_PIXELS = 40_000_000  # a header above this is image_too_large (prepare.max_image_pixels' default), whatever PIL's own bomb limit
MAX_DEPTH = 64  # a chat example nests about 6 levels; deeper is hostile and would exhaust the stack of whatever reads it
DEFAULT_MAX_DUPLICATE_FRACTION = 0.01  # jsonl.max_duplicate_fraction's default
MAX_MESSAGE_CHARS = 500  # a finding quotes at most this much of the file

# Training context per model (tokens); an example longer than this is truncated by the service.
MODEL_CONTEXT = {"gpt-4o-2024-08-06": 65_536, "gpt-4o-mini-2024-07-18": 65_536, "gpt-4.1-2025-04-14": 65_536,
                 "gpt-4.1-mini-2025-04-14": 65_536}
DEFAULT_CONTEXT = 65_536


class TokenCounter:
    """Text tokens of GPT-4o's ``o200k_base``, exactly: quicktok's bundled copy (offline; its ids are
    byte-identical to tiktoken's, checked by ``bench/tokens.py``), else tiktoken's when quicktok is
    not installed (tiktoken downloads the encoding on first use).  Without either, an estimate of
    one token per 4 UTF-8 bytes (``exact`` is False; its measured error is in the README)."""

    def __init__(self):
        self._encode, self.source = None, "estimate: 1 token per 4 UTF-8 bytes"
        self._len = None
        try:
            import quicktok

            tokenizer = quicktok.get_encoding("o200k_base")
            self._encode, self.source = tokenizer.encode, "quicktok o200k_base"
            self._len = tokenizer.count  # == len(encode(text)) without building the ids, when encode does not raise
        except Exception:  # not installed: try tiktoken, which needs its encoding file from the network
            try:
                import tiktoken

                encoding = tiktoken.get_encoding("o200k_base")
                self._encode, self.source = (lambda t: encoding.encode(t, disallowed_special=())), "tiktoken o200k_base"
            except Exception:
                pass
        self.exact = self._encode is not None
        self._cache: OrderedDict[str | bytes, int] = OrderedDict()

    CACHE_ENTRIES = 4096  # distinct texts remembered (least recently used dropped): system prompts, questions
    CACHE_KEY_CHARS = 256  # a longer text is remembered by its 16-byte blake2b digest, not by itself
    UNCACHED_CHARS = 64  # quicktok counts a text this short (~0.5 us) faster than a cache miss costs: not cached

    def count(self, text: str) -> int:
        """Tokens of ``text``; each distinct text is encoded once while it stays among the CACHE_ENTRIES most
        recently counted (a system prompt or a templated question repeats on every line) -- with quicktok,
        a text of at most UNCACHED_CHARS is counted every time (the same count: only the time differs)."""
        if self._encode is None:
            return estimate_tokens(text)
        if self._len is not None and len(text) <= self.UNCACHED_CHARS and "<|" not in text:
            return self._len(text)
        cache = self._cache
        key = text if len(text) <= self.CACHE_KEY_CHARS else \
            hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        n = cache.get(key)
        if n is None:
            # encode raises on a special token's text ("<|endoftext|>"), as it always has; count would not
            n = cache[key] = self._len(text) if self._len is not None and "<|" not in text else len(self._encode(text))
            if len(cache) > self.CACHE_ENTRIES:
                cache.popitem(last=False)  # the least recently used
        else:
            cache.move_to_end(key)  # the most recently used
        return n


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / 4)


def image_tokens(width: int | None, height: int | None, detail: str = "auto") -> int:
    """OpenAI's vision cost: low detail 85; high (and auto): fit in 2048x2048, shortest side to 768,
    then 170 per 512-px tile + 85.  Unknown size is costed as a 1024x1024 image."""
    if detail == "low":
        return 85
    width, height = width or 1024, height or 1024
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 170 * math.ceil(width / 512) * math.ceil(height / 512) + 85


@dataclass(frozen=True)
class Finding:
    line: int
    code: str
    message: str


@dataclass
class Summary:
    examples: int = 0
    valid_examples: int = 0
    messages: Counter = field(default_factory=Counter)  # messages per example -> count
    images: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)  # tokens per example -> count (bounded by distinct lengths)
    image_tokens: int = 0
    text_tokens_exact: bool = False
    text_tokens_source: str = ""
    duplicates: int = 0  # examples that repeat an earlier line
    max_duplicate_fraction: float | None = None

    @property
    def duplicate_fraction(self) -> float:
        return self.duplicates / self.examples if self.examples else 0.0

    def token_stats(self) -> dict:
        n = sum(self.tokens.values())
        if not n:
            return {"total": 0}
        total = sum(t * c for t, c in self.tokens.items())

        def quantile(q: float) -> int:
            seen = 0
            for t in sorted(self.tokens):
                seen += self.tokens[t]
                if seen > q * (n - 1):
                    return t
            return max(self.tokens)

        return {"total": total, "min": min(self.tokens), "max": max(self.tokens), "mean": round(total / n, 1),
                "p50": quantile(0.5), "p95": quantile(0.95)}


@dataclass
class Report:
    path: str
    model: str
    target: str = "openai"
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)

    @property
    def ok(self) -> bool:
        return not self.errors


Fetch = Callable[[str], bytes]


def fetch_url(url: str, timeout: float = 15.0) -> bytes:
    """At most MAX_IMAGE_BYTES + 1 bytes of an https URL on a public address, within ``timeout`` seconds in all
    (:class:`touchvl.chat.fetch.UrlFetcher`: no loopback or private addresses, redirects checked too)."""
    return UrlFetcher(deadline_s=timeout, max_bytes=MAX_IMAGE_BYTES + 1)(url)


class ImageTooLarge(Exception):
    pass


def image_header(data: bytes, fast: bool = True) -> tuple[str, tuple[int, int]]:
    """(format, size) of image bytes, whose pixels are decoded: :class:`ImageTooLarge` when the header claims
    more than MAX_IMAGE_PIXELS (PIL's DecompressionBombError included; checked before any pixel is decoded),
    ValueError when the image cannot be read to its end (any exception of a decoder on hostile bytes means
    "not a readable image"). A header alone is not enough: a JPEG cut to 30 % of its bytes has a valid header.
    JPEGs decode at 1/8 scale (``draft``: libjpeg skips the inverse DCT's full resolution but still reads every
    entropy-coded byte, so truncation fails) -- a full decode would cost 8-60x more.

    The verdict is PIL's.  ``fast``: a JPEG that :func:`jpeg_decodes` (simplejpeg, strict) is PIL's too and
    is answered without PIL; anything else -- PNG, WEBP, a JPEG simplejpeg refuses or whose markers are
    unusual -- goes to PIL, which decides (a corrupt scan is a libjpeg warning: simplejpeg refuses it, PIL
    reads it, as before)."""
    if fast:
        size = jpeg_decodes(data, MAX_IMAGE_PIXELS)
        if size is not None:
            return "JPEG", size
    return pil_image_header(data)


def pil_image_header(data: bytes) -> tuple[str, tuple[int, int]]:
    """:func:`image_header` by PIL alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, "Corrupt EXIF data": the finding says it
        try:
            with Image.open(io.BytesIO(data), formats=("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageTooLarge(f"{width}x{height} pixels > {MAX_IMAGE_PIXELS:,}")
                fmt, size = img.format, img.size
                if fmt == "JPEG":
                    img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()  # raises on truncated or corrupt data (ImageFile.LOAD_TRUNCATED_IMAGES is False)
                return fmt, size
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"over PIL's decompression-bomb limit ({exc})"[:200]) from None
        except ImageTooLarge:
            raise
        except Exception as exc:  # noqa: BLE001 -- see the docstring
            raise ValueError(type(exc).__name__) from None


def image_outcome(data: bytes, declared: str | None, fast: bool = True) -> tuple[str | None, object]:
    """``(None, (width, height))`` for image bytes the service takes, else ``(code, message)``: over 10 MB, not
    decodable to its end (:func:`image_header`), too many pixels, a format other than JPEG/PNG/WEBP, or not
    the ``declared`` one."""
    if len(data) > MAX_IMAGE_BYTES:
        return "image_too_large", f"{len(data) / 2**20:.1f} MB > 10 MB"
    try:
        actual, size = image_header(data, fast)
    except ImageTooLarge as exc:
        return "image_too_large", str(exc)
    except ValueError as exc:
        return "image_data_corrupt", f"not a readable image ({exc})"
    if actual not in IMAGE_FORMATS.values():
        return "image_format_unsupported", f"{actual}; only JPEG, PNG and WEBP are accepted"
    if declared and actual != declared:
        return "image_data_corrupt", f"declared {declared} but the data is {actual}"
    return None, size


def base64_payload(payload: str) -> bytes | None:
    """The bytes of a data URL's base64 payload, or None when it does not decode: binascii's strict verdict
    (``a2b_base64(strict_mode=True)``; non-ASCII text does not decode), reached through pybase64 first.

    pybase64 (SIMD) decodes 4-10x faster than binascii -- for a photo's data URL of 100 kB+ that is most of
    an image's cost -- but its ``validate`` is stricter (it refuses padding after a complete quantum, which
    binascii takes), so where it refuses, binascii decides: what it accepts binascii accepts, to the same
    bytes (tests/test_jsonl_validate.py fuzzes both)."""
    try:
        return pybase64.b64decode(payload, validate=True)
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        pass
    try:
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def data_url_outcome(payload: str, declared: str, fast: bool = True) -> tuple[str | None, object]:
    """:func:`image_outcome` of a data URL's base64 payload (which must decode)."""
    data = base64_payload(payload)
    if data is None:
        return "image_data_corrupt", "base64 payload does not decode"
    if fast and declared == "JPEG" and len(data) <= MAX_IMAGE_BYTES:
        # image_outcome's own fast path, without its calls in between: a JPEG declared as one that
        # jpeg_decodes is accepted at its size; anything else goes to PIL through image_outcome
        size = jpeg_decodes(data, MAX_IMAGE_PIXELS)
        return (None, size) if size is not None else image_outcome(data, declared, False)
    return image_outcome(data, declared, fast)


class ImageOutcomes:
    """:func:`data_url_outcome`, once per distinct payload among the IMAGE_CACHE_ENTRIES most recently seen
    (keyed by the declared format and the payload itself, or its 16-byte blake2b digest when it is over
    IMAGE_KEY_CHARS: at most 1024 x 4 KB of keys are held): every line still gets the
    finding of its own bytes -- the same bytes decode the same way -- but an image that repeats across
    lines (one photo, several questions) is decoded once."""

    def __init__(self, entries: int = IMAGE_CACHE_ENTRIES, fast: bool = True):
        self.entries, self.cache, self.fast = entries, OrderedDict(), fast
        self.decoded = self.hits = 0
        # the URL data_url answered last, and its outcome: the next line often repeats it (several questions
        # about one photo), and comparing two strings is cheaper than hashing a fresh one (~0.4 us a KB)
        self.last_url: str | None = None
        self.last_outcome: tuple = ()

    def __call__(self, payload: str, declared: str) -> tuple[str | None, object]:
        key = (declared, payload if len(payload) <= IMAGE_KEY_CHARS else
               hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=16).digest())
        cache = self.cache
        outcome = cache.get(key)
        if outcome is None:
            outcome = cache[key] = data_url_outcome(payload, declared, self.fast)
            self.decoded += 1
            if len(cache) > self.entries:
                cache.popitem(last=False)  # the least recently used
        else:
            cache.move_to_end(key)  # the most recently used
            self.hits += 1
        return outcome

    def data_url(self, url: str, start: int, declared: str) -> tuple[str | None, object]:
        """``self(url[start:], declared)`` for a data URL whose payload starts at ``start`` and whose prefix
        declares ``declared``, keyed by the URL itself (which names both: no slice of the payload on a hit)."""
        if url == self.last_url:  # already the most recently used: nothing to move
            self.hits += 1
            return self.last_outcome
        if len(url) - start > IMAGE_KEY_CHARS:
            return self(url[start:], declared)
        cache = self.cache
        outcome = cache.get(url)  # a str: never equal to the (declared, payload) keys of __call__
        if outcome is None:
            outcome = cache[url] = data_url_outcome(url[start:], declared, self.fast)
            self.decoded += 1
            if len(cache) > self.entries:
                cache.popitem(last=False)
        else:
            cache.move_to_end(url)
            self.hits += 1
        self.last_url, self.last_outcome = url, outcome
        return outcome


class _ExampleChecker:
    def __init__(self, line: int, counter: TokenCounter, check_urls: bool, fetch: Fetch,
                 images: Callable[[str, str], tuple] = data_url_outcome):
        self.line, self.counter, self.check_urls, self.fetch, self.data_url = line, counter, check_urls, fetch, images
        self.errors: list[Finding] = []
        self.images = 0
        self.image_tokens = 0

    def error(self, code: str, message: str) -> None:
        self.errors.append(Finding(self.line, code, message))

    def image(self, where: str, part: dict) -> None:
        self.images += 1
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        detail = spec.get("detail", "auto") if isinstance(spec, dict) else "auto"
        if not isinstance(url, str) or not url:
            self.error("image_url_invalid", f"{where}: image_url.url must be a non-empty string")
            return
        if detail not in ("auto", "low", "high"):
            self.error("image_url_invalid", f"{where}: detail {detail!r} is not auto, low or high")
        match = DATA_URL.match(url)
        if match:
            fmt = match["fmt"].lower()
            if fmt not in IMAGE_FORMATS:
                self.error("image_format_unsupported", f"{where}: image/{fmt}; only JPEG, PNG and WEBP are accepted")
                return
            self._outcome(where, self.data_url(url[match.end():], IMAGE_FORMATS[fmt]), detail)
        elif url.startswith(("http://", "https://")):
            suffix = Path(url.split("?", 1)[0]).suffix.lower().lstrip(".")
            if suffix and suffix not in IMAGE_FORMATS:
                self.error("image_format_unsupported", f"{where}: .{suffix} URL; only JPEG, PNG and WEBP are accepted")
                return
            if not self.check_urls:
                self.image_tokens += image_tokens(None, None, detail)
                return
            try:
                data = self.fetch(url)
            except Exception as exc:  # any network failure is the same finding for the user
                self.error("image_unreachable", f"{where}: {url} could not be fetched ({type(exc).__name__}: {exc})")
                return
            self._outcome(where, image_outcome(data, None, getattr(self.data_url, "fast", True)), detail)
        else:
            self.error("image_url_invalid", f"{where}: url must be https://… or a data:image/…;base64 URL, got {url[:40]!r}")

    def _outcome(self, where: str, outcome: tuple[str | None, object], detail: str) -> None:
        code, value = outcome
        if code is None:
            self.image_tokens += image_tokens(*value, detail)
        else:
            self.error(code, f"{where}: {value}")


def check_example(obj, line: int, counter: TokenCounter, check_urls: bool, fetch: Fetch, context: int,
                  images: Callable[[str, str], tuple] = data_url_outcome):
    """Errors of one decoded line, plus (messages, images, tokens, roles: {role: count}, assistant words) for the
    summary.
    ``images``: the outcome of a data URL's payload (:func:`data_url_outcome`, or an :class:`ImageOutcomes`)."""
    c = _ExampleChecker(line, counter, check_urls, fetch, images)
    if not isinstance(obj, dict):
        c.error("data_type", f"each line must be a JSON object, got {type(obj).__name__}")
        return c.errors, None
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        c.error("missing_messages_list", "'messages' must be a non-empty list")
        return c.errors, None
    tokens, roles, assistant_words = 3, {}, []
    count, role_tokens = counter.count, _role_tokens(counter)
    for i, message in enumerate(messages):  # the location ("messages[i]") is written only into a finding
        if not isinstance(message, dict):
            c.error("data_type", f"messages[{i}] must be an object")
            continue
        has_role, has_content = "role" in message, "content" in message
        if not has_role:
            c.error("message_missing_key", f"messages[{i}] has no 'role'")
        if not has_content and not message.get("tool_calls"):
            c.error("message_missing_key", f"messages[{i}] has no 'content'")
        if not ALLOWED_MESSAGE_KEYS.issuperset(message):
            for key in sorted(set(message) - ALLOWED_MESSAGE_KEYS):
                c.error("message_unrecognized_key", f"messages[{i}] has unrecognized key '{key}'")
        role = message.get("role")
        role = role if isinstance(role, str) or role is None else repr(role)
        if has_role and role not in ALLOWED_ROLES:
            c.error("unrecognized_role", f"messages[{i}] role {role!r} is not one of {sorted(ALLOWED_ROLES)}")
        roles[role] = roles.get(role, 0) + 1
        n = role_tokens.get(role)
        tokens += 3 + (n if n is not None else count(str(role)))
        content = message.get("content")
        if isinstance(content, str):
            if not content or content.isspace():
                c.error("missing_content", f"messages[{i}] content is empty")
            else:
                tokens += count(content)
                if role == "assistant":
                    assistant_words.append(len(content.split()))
        elif isinstance(content, list) and content:
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in PART_TYPES:
                    c.error("unknown_part_type", f"messages[{i}].content[{j}] type {kind!r} is not 'text' or 'image_url'")
                elif kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str) or not text or text.isspace():
                        c.error("missing_content", f"messages[{i}].content[{j}] text is empty")
                    else:
                        tokens += count(text)
                        if role == "assistant":
                            assistant_words.append(len(text.split()))
                elif role != "user":
                    c.images += 1
                    c.error("image_in_non_user_message",
                            f"messages[{i}].content[{j}]: images are only allowed in user messages, not {role!r}")
                else:
                    c.image(f"messages[{i}].content[{j}]", part)
        elif has_content:
            if content is None or isinstance(content, list):  # None or []
                c.error("missing_content", f"messages[{i}] content is empty")
            else:
                c.error("data_type", f"messages[{i}] content must be a string or a list of parts")
    if c.images > MAX_IMAGES:
        c.error("too_many_images", f"{c.images} images > {MAX_IMAGES} per example")
    if not roles.get("assistant"):
        c.error("example_missing_assistant_message", "no assistant message: nothing to learn from this example")
    total = tokens + c.image_tokens
    if total > context:
        c.error("too_many_tokens", f"{total} tokens > the model's {context}-token training context")
    return c.errors, (len(messages), c.images, total, c.image_tokens, roles, assistant_words)


def _role_tokens(counter: TokenCounter) -> dict[str, int]:
    """Tokens of each allowed role's name, counted once per counter."""
    cached = counter.__dict__.get("_role_tokens")
    if cached is None:
        cached = counter.__dict__["_role_tokens"] = {role: counter.count(role) for role in ALLOWED_ROLES}
    return cached


def iter_lines(path: Path) -> Iterable[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield number, raw.rstrip(b"\r\n")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")  # Python's json reads NaN and Infinity; JSON (and the service) does not


_DIGITS_TO_ZERO = bytes(48 if 48 <= b <= 57 else 120 for b in range(256))  # digits -> b"0", anything else -> b"x"
_LONG_DIGITS = b"0" * 19  # an integer of 19+ digits may be beyond 64 bits: orjson would read it as a float


def parse_line_exact(raw: bytes):
    """``(value, via_json)``: the JSON value of one line, or ValueError saying why not.  orjson reads it (3x
    faster than json); Python's json reads it instead -- with json's verdict and message -- when orjson refuses
    it (so an invalid line's message is the one json gives) or when it holds 19 consecutive digits (orjson
    reads an integer beyond 64 bits as a float; json keeps it exact).  ``via_json`` is True then."""
    try:
        value = orjson.loads(raw)
    except ValueError:  # orjson.JSONDecodeError: json says why (or reads what orjson does not: \ud800, 1e400)
        return _parse_line_json(raw), True
    if _LONG_DIGITS in raw.translate(_DIGITS_TO_ZERO):
        return _parse_line_json(raw), True
    return value, False


def parse_line(raw: bytes):
    """The JSON value of one line, or ValueError saying why not -- never another exception: not UTF-8, bad JSON,
    NaN/Infinity, an integer over Python's 4,300-digit limit, nesting deeper than the parser's stack."""
    return parse_line_exact(raw)[0]


def _parse_line_json(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, int digits limit
        raise ValueError(str(exc)[:200]) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def structure_problem(obj, raw: bytes) -> tuple[str, str] | None:
    """``(code, message)`` when a parsed line is hostile in shape: nested deeper than MAX_DEPTH, or a string with
    a lone UTF-16 surrogate (valid JSON, not valid Unicode: it cannot be encoded, tokenized or written out).
    Iterative: no recursion, whatever the depth."""
    surrogates = b"\\" in raw and b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None  # only \uD800-\uDFFF escapes make them
    if not surrogates and raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:  # cannot nest deeper: no walk needed
        return None
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return "nesting_too_deep", f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif surrogates and isinstance(value, str) and _LONE_SURROGATE.search(value):
            return "invalid_unicode", "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode"
    return None


def printable(text: str) -> str:
    """``text`` safe to print and write: control characters and lone surrogates as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def clean_findings(findings: list[Finding]) -> list[Finding]:
    """Findings as they may be shown: URL query strings (signatures) and credentials redacted, no control
    characters or lone surrogates, at most MAX_MESSAGE_CHARS of quoted data."""
    out = []
    for f in findings:
        message = f.message
        if "://" in message or len(message) > MAX_MESSAGE_CHARS or not message.isprintable():
            message = printable(redact_urls(message))
            message = message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "…"
            f = replace(f, message=message)
        out.append(f)
    return out


def canonical_bytes(obj, via_json: bool = False) -> bytes:
    """The bytes naming a JSON value -- two lines that are the same value (whatever their key order or
    whitespace) have the same bytes: orjson's sorted-key serialisation, or json's (prefixed, so the two never
    meet) for what orjson cannot write or would write as another value: integers beyond 64 bits, lone
    surrogates, deep nesting (it raises), infinities (it writes null; only json's parser makes them)."""
    if not (via_json and _has_non_finite(obj)):
        try:
            return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass
    return b"json:" + json.dumps(obj, sort_keys=True).encode()


def example_digest(obj, via_json: bool = False) -> bytes:
    """16 bytes naming a JSON value: blake2b of :func:`canonical_bytes` (what the second pass compares)."""
    return hashlib.blake2b(canonical_bytes(obj, via_json), digest_size=16).digest()


def filter_digest(obj, via_json: bool = False) -> bytes:
    """16 bytes for the duplicate filter: xxh3_128 of :func:`canonical_bytes` (the same value, the same
    digest; a collision -- chance or crafted -- only makes a candidate, which the second pass's blake2b
    :func:`example_digest` then weeds out)."""
    return xxhash.xxh3_128_digest(canonical_bytes(obj, via_json))


def _has_non_finite(obj) -> bool:
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, float) and not math.isfinite(value):
            return True
    return False


class DigestFilter:
    """Bloom filter over 16-byte digests: 2**26 bits (8 MiB), 4 probes -- a false positive rate
    below 1e-9 at 50k examples and 1e-4 at 1M; false positives are weeded out by the second pass."""

    BITS = 1 << 26

    def __init__(self):
        self.bits = bytearray(self.BITS // 8)

    def check_and_add(self, digest: bytes) -> bool:
        """Whether all 4 probes (the digest's four 32-bit little-endian words, mod BITS) were set; sets them."""
        bits, mask = self.bits, self.BITS - 1  # BITS divides 2**32: word & mask == word % BITS
        present = True
        for word in _WORDS.unpack(digest):
            bit = word & mask
            byte, bitmask = bit >> 3, 1 << (bit & 7)
            if not bits[byte] & bitmask:
                present = False
                bits[byte] |= bitmask
        return present

    def check_and_add_many(self, digests: bytes) -> list[int]:
        """:meth:`check_and_add` of each 16-byte digest of ``digests`` in turn, at once: the indexes of those
        whose 4 probes were all set -- before this call, or by an earlier digest of it -- in order.

        Why not the loop: ~2 us a digest of Python (a tenth of the validator's time per line); numpy does a
        block of 4,096 in ~1 ms.  The same answers (tests/test_jsonl_validate.py compares both on a filter
        small enough that nearly everything collides)."""
        import numpy as np

        n = len(digests) // 16
        if not n:
            return []
        view = np.frombuffer(self.bits, dtype=np.uint8)  # the bytearray itself: writes go to the filter
        probes = (np.frombuffer(digests, dtype="<u4").reshape(n, 4) & np.uint32(self.BITS - 1)).astype(np.int64)
        byte, bitmask = probes >> 3, np.left_shift(1, probes & 7).astype(np.uint8)
        set_before = (view[byte] & bitmask) != 0
        # a probe an earlier digest of this call set: the first digest (row) holding that bit, before this one
        _, first, inverse = np.unique(probes.ravel(), return_index=True, return_inverse=True)
        set_before |= (first // 4)[inverse].reshape(n, 4) < np.arange(n)[:, None]
        np.bitwise_or.at(view, byte.ravel(), bitmask.ravel())
        return np.flatnonzero(set_before.all(axis=1)).tolist()


_WORDS = struct.Struct("<4I")
_FILTER_BLOCK = 4096  # digests checked at once: 64 kB held and ~1 MB of numpy temporaries, whatever the file's length


def duplicate_findings(path: Path, candidates: list[tuple[int, bytes]]) -> list[Finding]:
    """Second pass, only when the first flagged candidates ``(line, filter_digest)``: a candidate repeats the
    first earlier line with the same :func:`example_digest` (blake2b, computed only for the lines whose
    filter digest is a candidate's)."""
    if not candidates:
        return []
    wanted = {digest for _, digest in candidates}
    lines = {line for line, _ in candidates}
    first: dict[bytes, int] = {}  # example_digest -> its first line
    exact: dict[int, bytes] = {}  # candidate line -> its example_digest
    for number, raw in iter_lines(path):
        try:
            data = canonical_bytes(*parse_line_exact(raw))
        except (ValueError, RecursionError):  # not an example the first pass counted
            continue
        if xxhash.xxh3_128_digest(data) not in wanted:
            continue
        digest = hashlib.blake2b(data, digest_size=16).digest()
        first.setdefault(digest, number)
        if number in lines:
            exact[number] = digest
    return [Finding(line, "duplicate_example", f"same example as line {first[exact[line]]}")
            for line, _ in candidates if line in exact and first[exact[line]] != line]


_DETAILS = ("auto", "low", "high")


def plain_example(obj: dict, counter: TokenCounter, role_tokens: dict[str, int], images: ImageOutcomes,
                  context: int):
    """The summary stats of :func:`check_example` -- ``(messages, images, tokens, image tokens, roles,
    assistant words)``, computed the same way (the words of each assistant text counted up to
    SHORT_ANSWER_WORDS: all the short-answer warning asks) -- for a parsed line in the common shape that
    check_example finds nothing wrong with; None for anything else, and the general path (the digit scan, json
    where it applies, :func:`structure_problem`, check_example) then decides.  The common shape:
    ``{"messages": [...]}`` and nothing else; each message exactly ``role`` (an allowed one) and ``content``
    (a non-blank string, or a non-empty list of parts); each part exactly ``type`` + ``text`` (a non-blank
    string) or, in a user message, ``type`` + ``image_url`` = ``{"url": a data URL of JPEG/PNG/WEBP whose
    image is readable, "detail": auto/low/high (optional)}``; at most MAX_IMAGES images, an assistant
    message, within ``context`` tokens.  Every value in it is a string: no number that orjson would read
    otherwise than json (the digit scan), no depth over MAX_DEPTH and no lone surrogate (orjson refuses
    those) -- what the general path checks first cannot apply."""
    if len(obj) != 1:
        return None
    messages = obj.get("messages")
    if type(messages) is not list or not messages:
        return None
    count = counter.count
    quick = counter._len if counter._encode is not None else None  # TokenCounter.count's uncached case, inlined
    short = counter.UNCACHED_CHARS
    tokens, roles, words, n_images, img_tokens = 3, {}, [], 0, 0
    for message in messages:
        if type(message) is not dict or len(message) != 2:
            return None
        role, content = message.get("role"), message.get("content")
        n = role_tokens.get(role) if type(role) is str else None
        if n is None or content is None:
            return None
        roles[role] = roles.get(role, 0) + 1
        tokens += 3 + n
        if type(content) is str:
            if not content or content.isspace():
                return None
            tokens += quick(content) if quick is not None and len(content) <= short and "<|" not in content \
                else count(content)
            if role == "assistant":
                words.append(len(content.split(None, SHORT_ANSWER_WORDS - 1)))
        elif type(content) is list and content:
            for part in content:
                if type(part) is not dict or len(part) != 2:
                    return None
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if type(text) is not str or not text or text.isspace():
                        return None
                    tokens += quick(text) if quick is not None and len(text) <= short and "<|" not in text \
                        else count(text)
                    if role == "assistant":
                        words.append(len(text.split(None, SHORT_ANSWER_WORDS - 1)))
                elif kind == "image_url" and role == "user":
                    spec = part.get("image_url")
                    if type(spec) is not dict:
                        return None
                    url, detail = spec.get("url"), spec.get("detail", "auto")
                    if type(url) is not str or type(detail) is not str or detail not in _DETAILS or \
                            len(spec) != 1 + ("detail" in spec):
                        return None
                    if url.startswith("data:image/jpeg;base64,"):  # what DATA_URL matches, the common case
                        code, size = images.data_url(url, 23, "JPEG")
                    else:
                        match = DATA_URL.match(url)
                        fmt = IMAGE_FORMATS.get(match["fmt"].lower()) if match else None
                        if fmt is None:
                            return None
                        code, size = images.data_url(url, match.end(), fmt)
                    if code is not None:
                        return None
                    n_images += 1
                    img_tokens += image_tokens(*size, detail)
                else:
                    return None
        else:
            return None
    total = tokens + img_tokens
    if n_images > MAX_IMAGES or not roles.get("assistant") or total > context:
        return None
    return len(messages), n_images, total, img_tokens, roles, words


def _general_line(raw: bytes, number: int, counter: TokenCounter, check_urls: bool, fetch: Fetch, context: int,
                  images: Callable[[str, str], tuple], extra_checks) -> tuple[list[Finding], tuple | None, bytes | None]:
    """(errors, stats or None, filter digest or None) of one non-blank line, by the general checker."""
    try:
        obj, via_json = parse_line_exact(raw)
    except ValueError as exc:
        return [Finding(number, "invalid_json", f"not valid JSON: {exc}")], None, None
    problem = structure_problem(obj, raw)
    if problem:
        return [Finding(number, *problem)], None, None
    try:
        errors, stats = check_example(obj, number, counter, check_urls, fetch, context, images)
        if isinstance(obj, dict):
            extra = extra_checks(obj)
            if extra:
                errors += [Finding(number, code, message) for code, message in extra]
    except (TypeError, AttributeError, KeyError, ValueError) as exc:  # a shape no rule above anticipated
        return [Finding(number, "data_type", f"unexpected structure ({type(exc).__name__}: {exc})")], None, None
    return errors, stats, (filter_digest(obj, via_json) if stats is not None else None)


@dataclass
class _Scan:
    """What one pass over a file's lines (all of them, or one chunk of a parallel run) found, before the
    duplicates: findings in line order, histograms, the filter's candidates (a whole file), and examples' lines
    and filter digests -- a whole file's last block not yet filtered, or a chunk's all (the parent runs the
    one filter over them in line order)."""
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    examples: int = 0
    valid: int = 0
    image_tokens: int = 0
    messages: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    last_content: int = 0  # the last non-blank line (0: none)
    trailing_blank: list[int] = field(default_factory=list)  # blank lines after it: inside the file if more follows
    candidates: list[tuple[int, bytes]] = field(default_factory=list)
    lines: array = field(default_factory=lambda: array("Q"))
    digests: bytearray = field(default_factory=bytearray)


def _limited(fh, size: int):
    """The lines of ``fh`` from where it is, until ``size`` bytes are read (a chunk ends at a line's end)."""
    for raw in fh:
        yield raw
        size -= len(raw)
        if size <= 0:
            return


def _scan(path: Path, counter: TokenCounter, check_urls: bool, fetch: Fetch, context: int, extra_checks, fast: bool,
          chunk: tuple[int, int, int] | None = None) -> _Scan:
    """The first pass over ``path``, or over ``chunk`` = (byte offset, byte length, number of the line before it)."""
    out = _Scan()
    errors_out, warnings_out, candidates = out.errors, out.warnings, out.candidates
    whole = chunk is None
    seen = DigestFilter() if whole else None  # a chunk's digests go to the parent's one filter
    # a whole file's digests go to the filter a block at a time (DigestFilter.check_and_add_many); a chunk
    # keeps all of its own for the parent
    lines_out, digests_out = out.lines.append, out.digests.extend
    images = ImageOutcomes(fast=fast)
    role_tokens = _role_tokens(counter)
    loads, dumps, sort_keys, xxh3 = orjson.loads, orjson.dumps, orjson.OPT_SORT_KEYS, xxhash.xxh3_128_digest
    n_messages_hist, n_images_hist, tokens_hist = out.messages, out.images, out.tokens
    no_extra = TARGET_CHECKS["openai"]  # OpenAI's own rules add nothing: not called on the fast path
    examples = valid = image_tokens_total = last_content = 0
    number = 0 if whole else chunk[2]
    pending_blank: list[int] = []
    with open(path, "rb") as fh:  # iter_lines, inlined: the line with its line ending until it is needed
        if not whole:
            fh.seek(chunk[0])
        for raw in (fh if whole else _limited(fh, chunk[1])):
            number += 1
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.isspace() or not raw:  # what bytes.strip() would leave empty, line ending or not
                pending_blank.append(number)
                continue
            if pending_blank:
                errors_out += [Finding(n, "blank_line", "blank line inside the file") for n in pending_blank]
                pending_blank = []
            last_content = number
            examples += 1
            stats = None
            if fast:
                try:
                    obj = loads(raw)  # orjson skips the trailing line ending as JSON whitespace
                except ValueError:
                    obj = None
                if type(obj) is dict:
                    try:
                        stats = plain_example(obj, counter, role_tokens, images, context)
                    except Exception:  # noqa: BLE001 -- e.g. a special token's text: the general path says what
                        stats = None
            if stats is not None:
                extra = extra_checks(obj) if extra_checks is not no_extra else None
                errors = [Finding(number, code, message) for code, message in extra] if extra else None
                digest = xxh3(dumps(obj, option=sort_keys))  # filter_digest(obj): all strings, orjson writes it
            else:
                errors, stats, digest = _general_line(raw.rstrip(b"\r\n"), number, counter, check_urls, fetch,
                                                      context, images, extra_checks)
            if errors:
                errors_out += errors
            if stats is None:
                continue
            n_messages, n_images, tokens, img_tokens, roles, assistant_words = stats
            n_messages_hist[n_messages] = n_messages_hist.get(n_messages, 0) + 1
            n_images_hist[n_images] = n_images_hist.get(n_images, 0) + 1
            tokens_hist[tokens] = tokens_hist.get(tokens, 0) + 1
            image_tokens_total += img_tokens
            if not errors:
                valid += 1
            if "system" not in roles:
                warnings_out.append(Finding(number, "no_system_message", "no system message"))
            if "user" not in roles:
                warnings_out.append(Finding(number, "no_user_message", "no user message"))
            if assistant_words and max(assistant_words) < SHORT_ANSWER_WORDS:
                warnings_out.append(Finding(number, "short_assistant_message",
                                            f"assistant answer has fewer than {SHORT_ANSWER_WORDS} words"))
            lines_out(number)
            digests_out(digest)
            if whole and len(out.lines) == _FILTER_BLOCK:
                _filter_block(seen, out, candidates)
    if whole:
        _filter_block(seen, out, candidates)
    out.examples, out.valid, out.image_tokens, out.last_content = examples, valid, image_tokens_total, last_content
    out.trailing_blank = pending_blank
    return out


def _filter_block(seen: DigestFilter, scan: _Scan, candidates: list[tuple[int, bytes]]) -> None:
    """Run ``scan``'s pending (line, digest) pairs through the filter in line order, append the candidates,
    and empty them."""
    digests = bytes(scan.digests)
    for i in seen.check_and_add_many(digests):
        candidates.append((scan.lines[i], digests[16 * i:16 * i + 16]))
    del scan.lines[:]
    del scan.digests[:]


def _chunks(path: Path, n: int) -> list[tuple[int, int, int]]:
    """``n`` (byte offset, byte length, number of the line before it) cutting ``path`` at line ends, in about
    equal sizes (an empty one left out); the line numbers by counting newlines, 1 MiB at a time."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as fh:
        for i in range(1, n):
            target = size * i // n
            if target <= bounds[-1]:
                continue
            fh.seek(target - 1)
            fh.readline()  # to the start of the line after the one holding byte target - 1
            if bounds[-1] < fh.tell() < size:
                bounds.append(fh.tell())
        bounds.append(size)
        out, newlines, offset = [], 0, 0
        fh.seek(0)
        for start, end in zip(bounds, bounds[1:]):
            while offset < start:
                block = fh.read(min(1 << 20, start - offset))
                newlines += block.count(b"\n")
                offset += len(block)
            out.append((start, end - start, newlines))
    return out


_PARALLEL: tuple = ()  # what a forked worker of validate_file reads: (path, counter, check_urls, fetch, context, extra_checks, fast)


def _scan_chunk(chunk: tuple[int, int, int]) -> _Scan:
    return _scan(*_PARALLEL, chunk=chunk)


def _scan_parallel(path: Path, workers: int, *args) -> _Scan:
    """:func:`_scan` of the whole file from ``workers`` forked processes, one chunk each, merged: the findings
    in line order (blank lines at a chunk's end are inside the file when a later chunk has content), the
    histograms, and one duplicate filter run over every chunk's digests in line order -- what one pass finds."""
    global _PARALLEL
    import concurrent.futures
    import multiprocessing

    chunks = _chunks(path, workers)
    if len(chunks) < 2:
        return _scan(path, *args)
    _PARALLEL = (path, *args)
    try:
        with concurrent.futures.ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_scan_chunk, chunks))
    finally:
        _PARALLEL = ()
    out, seen = _Scan(), DigestFilter()
    pending: list[int] = []
    for part in parts:
        if part.last_content:
            out.errors += [Finding(n, "blank_line", "blank line inside the file") for n in pending]
            pending = []
            out.last_content = part.last_content
        out.errors += part.errors
        pending += part.trailing_blank
        out.warnings += part.warnings
        out.examples += part.examples
        out.valid += part.valid
        out.image_tokens += part.image_tokens
        for hist, more in ((out.messages, part.messages), (out.images, part.images), (out.tokens, part.tokens)):
            for key, n in more.items():
                hist[key] = hist.get(key, 0) + n
        _filter_block(seen, part, out.candidates)
    out.trailing_blank = pending
    return out


def validate_file(path: Path, model: str = "gpt-4o-2024-08-06", check_urls: bool = False,
                  fetch: Fetch = fetch_url, counter: TokenCounter | None = None, target: str = "openai",
                  max_duplicate_fraction: float | None = DEFAULT_MAX_DUPLICATE_FRACTION, fast: bool = True,
                  workers: int = 1) -> Report:
    """The findings and summary of one file.  Raises only OSError (the file cannot be read): every content
    problem is a finding.  More repeated examples than ``max_duplicate_fraction`` of the file is an error
    (``too_many_duplicates``; None: no limit).  ``target``: the service's own rules on top of OpenAI's
    (touchvl/chat/targets.py).  ``fast`` (the default): a line in the common shape goes through
    :func:`plain_example` and a JPEG through simplejpeg (:func:`image_header`); False: every line through
    the general checker and every image through PIL -- the same findings and summary, slower (the tests
    compare the two).  ``workers`` > 1: the first pass in that many forked processes, one chunk of the file
    each, merged into the same report as one process makes (tested); the parent keeps every example's
    16-byte digest until the merge (memory grows with the file, unlike one process).  Where the platform
    cannot fork, one process."""
    import multiprocessing

    counter = counter or TokenCounter()
    extra_checks = TARGET_CHECKS[target]
    report = Report(str(path), model, target)
    summary = report.summary
    summary.text_tokens_exact = counter.exact
    summary.text_tokens_source = counter.source
    context = MODEL_CONTEXT.get(model, DEFAULT_CONTEXT)
    _role_tokens(counter)  # counted once, before any fork
    args = (counter, check_urls, fetch, context, extra_checks, fast)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        scan = _scan_parallel(path, workers, *args)
    else:
        scan = _scan(path, *args)
    report.errors += scan.errors
    report.warnings += scan.warnings
    summary.examples, summary.valid_examples, summary.image_tokens = scan.examples, scan.valid, scan.image_tokens
    summary.messages.update(scan.messages)
    summary.images.update(scan.images)
    summary.tokens.update(scan.tokens)
    report.warnings += duplicate_findings(path, scan.candidates)
    if scan.last_content == 0:
        report.errors.append(Finding(1, "empty_file", "the file has no examples"))
    elif report.summary.examples < MIN_EXAMPLES:
        report.warnings.append(Finding(0, "few_examples", f"{report.summary.examples} examples; at least {MIN_EXAMPLES} are required to train"))
    report.errors += duplicate_rate(report, max_duplicate_fraction)
    report.errors, report.warnings = clean_findings(report.errors), clean_findings(report.warnings)
    return report


def duplicate_rate(report: Report, max_fraction: float | None) -> list[Finding]:
    """Record the duplicate count in the summary; an error when it is over ``max_fraction`` of the examples."""
    s = report.summary
    s.duplicates = sum(f.code == "duplicate_example" for f in report.warnings)
    s.max_duplicate_fraction = max_fraction
    if max_fraction is None or s.duplicate_fraction <= max_fraction:
        return []
    return [Finding(0, "too_many_duplicates", f"{s.duplicates} of {s.examples} examples ({s.duplicate_fraction:.1%}) "
                                              f"repeat an earlier line; at most {max_fraction:.1%} may "
                                              f"(jsonl.max_duplicate_fraction)")]
