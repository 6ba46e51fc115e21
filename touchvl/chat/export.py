"""Export an approved chat fine-tuning dataset (OpenAI chat JSONL) for people who train it themselves.

Formats (one JSON object per line; images written once, content-addressed, under ``images/``, and
referenced by paths relative to the export folder):

* ``sharegpt`` -- LLaMA-Factory's ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt",
  "value": ...}], "images": [path, ...]}`` with one ``<image>`` placeholder in ``value`` per image, in
  order; ``dataset_info.json`` registers both splits (``formatting: sharegpt``; LLaMA-Factory
  resolves the image paths against the dataset folder).
* ``trl`` -- TRL's conversational vision format: ``{"messages": [{"role", "content": [{"type":
  "text", "text"}, {"type": "image"}]}], "images": [path, ...]}`` (the ``{"type": "image"}``
  placeholders are filled, in order, from ``images``; load them with
  ``datasets.Sequence(datasets.Image())``).
* ``axolotl`` -- axolotl's multimodal ``chat_template`` format: ``{"messages": [{"role", "content":
  [{"type": "text", "text"}, {"type": "image", "path": ...}]}]}``; ``axolotl.yaml`` holds the
  dataset lines and the multimodal settings axolotl needs.

The converters are pure (an example and its image bytes in, a record out); each has a reader that
turns the record back into the same :class:`Chat` -- what the round-trip test compares.  Anything a
format cannot hold (an assistant turn with ``weight: 0``, tool calls, a literal ``<image>`` in a
ShareGPT text) stops the export with the file, line and reason rather than being dropped.
"""
from __future__ import annotations

import binascii
import hashlib
import io
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from touchvl import disk
from touchvl.chat.messages import decode_data_url, file_url_path
from touchvl.errors import StageError

FORMATS = ("sharegpt", "trl", "axolotl")
IMAGE_TOKEN = "<image>"  # LLaMA-Factory's placeholder
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
MAX_IMAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class Chat:
    """One example, format-neutral: ``turns`` of (role, segments); a segment is ("text", str) or ("image", key).

    Adjacent text parts of a message are one segment (joined with a newline): ShareGPT cannot tell
    them apart, so no format is asked to."""

    turns: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]

    @property
    def image_keys(self) -> list[str]:
        return [value for _, segments in self.turns for kind, value in segments if kind == "image"]


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def _segments(parts: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for kind, value in parts:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + "\n" + value)
        elif kind == "text" and not value:
            continue
        else:
            out.append((kind, value))
    return tuple(out)


def image_bytes(url: str, where: str, fetch: Callable[[str], bytes] | None = None) -> bytes:
    """The bytes behind an ``image_url``: a base64 data URL, a ``file://`` path or (fetched) an http(s) URL."""
    try:
        if url.startswith("data:"):
            data = decode_data_url(url)
        elif urllib.parse.urlsplit(url).scheme == "file":
            data = file_url_path(url).read_bytes()
        elif urllib.parse.urlsplit(url).scheme in ("http", "https"):
            if fetch is None:
                raise ValueError("remote image URL; pass --fetch-images to download it")
            data = fetch(url)
        else:
            raise ValueError(f"unsupported image URL {url[:30]!r}")
    except (OSError, ValueError, binascii.Error) as exc:
        raise StageError(f"{where}: cannot read image: {exc}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise StageError(f"{where}: image of {len(data) / 2**20:.1f} MB > 10 MB")
    return data


def parse_openai(obj: dict, where: str, fetch=None) -> tuple[Chat, dict[str, bytes]]:
    """An OpenAI chat example -> (Chat, image bytes by key)."""
    images: dict[str, bytes] = {}
    turns = []
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise StageError(f"{where}: no 'messages' list")
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in SHAREGPT_ROLES:
            raise StageError(f"{at}: role {role!r} cannot be exported (system, user and assistant turns only)")
        if message.get("tool_calls") or message.get("function_call"):
            raise StageError(f"{at}: tool calls cannot be exported")
        if message.get("weight", 1) != 1:
            raise StageError(f"{at}: weight {message['weight']!r}: an untrained assistant turn cannot be expressed in "
                             "sharegpt, trl or axolotl files; remove it or its weight")
        content = message.get("content")
        parts: list[tuple[str, str]] = []
        for j, part in enumerate([{"type": "text", "text": content}] if isinstance(content, str) else content or []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(("text", part["text"]))
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                data = image_bytes(str(url), f"{at}.content[{j}]", fetch)
                images[image_key(data)] = data
                parts.append(("image", image_key(data)))
            else:
                raise StageError(f"{at}.content[{j}]: part of type {kind!r} cannot be exported")
        turns.append((role, _segments(parts)))
    return Chat(tuple(turns)), images


# ------------------------------------------------------------------------------- converters (pure)
def to_sharegpt(chat: Chat, paths: dict[str, str], where: str = "") -> dict:
    conversations = []
    for role, segments in chat.turns:
        for kind, value in segments:
            if kind == "text" and IMAGE_TOKEN in value:
                raise StageError(f"{where}: the text holds {IMAGE_TOKEN!r}, LLaMA-Factory's image placeholder")
        value = "".join(IMAGE_TOKEN if kind == "image" else value for kind, value in segments)
        conversations.append({"from": SHAREGPT_ROLES[role], "value": value})
    return {"conversations": conversations, "images": [paths[k] for k in chat.image_keys]}


def from_sharegpt(record: dict, key_of: Callable[[str], str]) -> Chat:
    roles = {v: k for k, v in SHAREGPT_ROLES.items()}
    images = iter(record.get("images", []))
    turns = []
    for turn in record["conversations"]:
        pieces = turn["value"].split(IMAGE_TOKEN)
        parts: list[tuple[str, str]] = []
        for n, text in enumerate(pieces):
            if n:
                parts.append(("image", key_of(next(images))))
            parts.append(("text", text))
        turns.append((roles[turn["from"]], _segments(parts)))
    if next(images, None) is not None:
        raise ValueError("more images than <image> placeholders")
    return Chat(tuple(turns))


def to_trl(chat: Chat, paths: dict[str, str], where: str = "") -> dict:
    messages = [{"role": role, "content": [{"type": "image"} if kind == "image" else {"type": "text", "text": value}
                                           for kind, value in segments]} for role, segments in chat.turns]
    return {"messages": messages, "images": [paths[k] for k in chat.image_keys]}


def from_trl(record: dict, key_of: Callable[[str], str]) -> Chat:
    images = iter(record.get("images", []))
    turns = tuple((m["role"], _segments([("image", key_of(next(images))) if p["type"] == "image" else ("text", p["text"])
                                         for p in m["content"]])) for m in record["messages"])
    if next(images, None) is not None:
        raise ValueError("more images than image placeholders")
    return Chat(turns)


def to_axolotl(chat: Chat, paths: dict[str, str], where: str = "") -> dict:
    return {"messages": [{"role": role, "content": [{"type": "image", "path": paths[value]} if kind == "image"
                                                    else {"type": "text", "text": value} for kind, value in segments]}
                         for role, segments in chat.turns]}


def from_axolotl(record: dict, key_of: Callable[[str], str]) -> Chat:
    return Chat(tuple((m["role"], _segments([("image", key_of(p["path"])) if p["type"] == "image" else ("text", p["text"])
                                             for p in m["content"]])) for m in record["messages"]))


WRITERS = {"sharegpt": to_sharegpt, "trl": to_trl, "axolotl": to_axolotl}
READERS = {"sharegpt": from_sharegpt, "trl": from_trl, "axolotl": from_axolotl}


# --------------------------------------------------------------------------------------------- files
def iter_openai(path: Path, fetch=None) -> Iterator[tuple[Chat, dict[str, bytes]]]:
    for where, obj in disk.read_jsonl(path):
        yield parse_openai(obj, where, fetch)


def image_name(data: bytes) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError) as exc:
        raise StageError(f"image {image_key(data)}: not a readable image ({type(exc).__name__})") from None
    return f"images/{image_key(data)}.{EXTENSIONS.get(fmt, 'bin')}"


def config_files(fmt: str, names: dict[str, str]) -> dict[str, str]:
    """The few lines each tool needs to find the files (written next to them)."""
    if fmt == "sharegpt":
        info = {f"touch_{split}": {"file_name": name, "formatting": "sharegpt",
                                   "columns": {"messages": "conversations", "images": "images"},
                                   "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                            "assistant_tag": "gpt", "system_tag": "system"}} for split, name in names.items()}
        return {"dataset_info.json": json.dumps(info, indent=2) + "\n"}
    if fmt == "axolotl":
        entry = "  - path: {}\n    ds_type: json\n    type: chat_template\n    field_messages: messages\n"
        lines = ["# merge into your axolotl config; run axolotl from this folder (image paths are relative to it)",
                 "processor_type: AutoProcessor", "skip_prepare_dataset: true", "remove_unused_columns: false",
                 "sample_packing: false", "datasets:"] + [entry.format(names["train"]).rstrip("\n")] * ("train" in names)
        if "val" in names:
            lines += ["test_datasets:", entry.format(names["val"]) + "    split: train"]
        return {"axolotl.yaml": "\n".join(lines) + "\n"}
    files = ", ".join(f"'{'validation' if split == 'val' else split}': '{name}'" for split, name in names.items())
    return {"README.txt": (
        "TRL conversational vision format. Load with (from this folder):\n"
        "  from datasets import load_dataset, Image, Sequence\n"
        f"  ds = load_dataset('json', data_files={{{files}}})\n"
        "  ds = ds.cast_column('images', Sequence(Image()))\n"
        "then SFTTrainer(model, train_dataset=ds['train'], eval_dataset=ds['validation'], processing_class=processor).\n")}


def export_dataset(sources: dict[str, Path], fmt: str, out_dir: Path, provenance: dict, fetch=None) -> dict:
    """Write ``sources`` ({split: OpenAI chat JSONL}) to ``out_dir`` in ``fmt``; returns the manifest.

    Built in a staging folder and swapped in whole; an existing ``out_dir`` that is not an earlier
    export is refused rather than replaced."""
    if fmt not in FORMATS:
        raise StageError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "export.json").is_file():
        raise StageError(f"{out_dir}: exists and is not an earlier export (no export.json); choose an empty folder")
    names = {split: f"{provenance.get('dataset', 'dataset')}_{split}.jsonl" for split in sources}
    counts: dict[str, dict] = {}
    with disk.replace_dir(out_dir) as staging:
        (staging / "images").mkdir()
        written: dict[str, str] = {}
        for split, path in sources.items():
            examples = 0
            with open(staging / names[split], "w", encoding="utf-8") as out:
                for chat, images in iter_openai(path, fetch):
                    for key, data in images.items():
                        if key not in written:
                            written[key] = image_name(data)
                            (staging / written[key]).write_bytes(data)
                    record = WRITERS[fmt](chat, written, where=f"{path}:{examples + 1}")
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    examples += 1
            counts[split] = {"file": names[split], "examples": examples, "source": str(path)}
        for name, text in config_files(fmt, names).items():
            (staging / name).write_text(text, encoding="utf-8")
        manifest = {"format": fmt, **provenance, "splits": counts, "images": len(written)}
        (staging / "export.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_export(out_dir: Path, split: str) -> list[tuple[Chat, dict[str, bytes]]]:
    """An export read back: each record's Chat with the bytes of its images (keys recomputed from the files)."""
    manifest = json.loads((out_dir / "export.json").read_text())
    reader = READERS[manifest["format"]]
    out = []
    for _where, record in disk.read_jsonl(out_dir / manifest["splits"][split]["file"]):
        seen: dict[str, bytes] = {}

        def key_of(rel: str) -> str:
            data = (out_dir / rel).read_bytes()
            seen[image_key(data)] = data
            return image_key(data)

        out.append((reader(record, key_of), seen))
    return out
