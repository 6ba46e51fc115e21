"""The local trainer's data: approved chat JSONL -> processor-format examples, and labels on assistant tokens only.

Any chat template works: an assistant turn's tokens are found by rendering the conversation up to that turn
(with the generation prompt) and through it, tokenised by the processor itself, so each image counts its real
number of tokens.  ``weight: 0`` assistant turns carry no loss, as OpenAI does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from touchvl import disk
from touchvl.chat.messages import open_image, read_image_url
from touchvl.errors import StageError

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss (torch's CrossEntropyLoss ignore_index)


@dataclass(frozen=True)
class TrainingExample:
    """One chat of the local trainer's dataset: messages in the processor's format (images as ``{"type": "image"}``
    parts, in order).  Not :class:`touchvl.chat.generate.Example` (a generated line of a JSONL file)."""

    messages: list[dict]
    images: list[bytes]
    trained: tuple[int, ...]
    """Indices of the assistant messages that carry loss (all but those with ``weight: 0``)."""
    where: str


def convert_messages(messages, where: str, fetch=read_image_url) -> tuple[list[dict], list[bytes], tuple[int, ...]]:
    """OpenAI chat messages -> (processor-format messages, image bytes, trained assistant indices)."""
    if not isinstance(messages, list) or not messages:
        raise StageError(f"{where}: 'messages' must be a non-empty list")
    out, images, trained = [], [], []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise StageError(f"{at}: not an object")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise StageError(f"{at}: role {m.get('role')!r} is not supported by local training")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url" and isinstance((part.get("image_url") or {}).get("url"), str):
                    images.append(fetch(part["image_url"]["url"], f"{at}.content[{j}]"))
                    parts.append({"type": "image"})
                else:
                    raise StageError(f"{at}.content[{j}]: unsupported part {kind!r} (text and image_url only)")
        else:
            raise StageError(f"{at}: content must be a string or a list of parts")
        if role == "assistant" and m.get("weight", 1) != 0:
            trained.append(i)
        out.append({"role": role, "content": parts})
    return out, images, tuple(trained)


def _checked_image(url: str, where: str) -> bytes:
    data = read_image_url(url, where)
    open_image(data, where)
    return data


def load_examples(path: Path | str) -> list[TrainingExample]:
    """Decode a chat JSONL; every image is read once here, so a bad one stops before training starts."""
    path = Path(path)
    examples = []
    for where, record in disk.read_jsonl(path):
        messages, images, trained = convert_messages(record.get("messages") if isinstance(record, dict) else None,
                                                     where, fetch=_checked_image)
        if not trained:
            raise StageError(f"{where}: no assistant message to learn from")
        examples.append(TrainingExample(messages, images, trained, where))
    if not examples:
        raise StageError(f"{path}: no examples")
    return examples


# ------------------------------------------------------------------------------------ encoding, labels
class Encoder:
    """An example -> model inputs with labels on the trained assistant turns only.

    Any chat template works: an assistant turn's tokens are those between the conversation rendered
    up to that turn with the generation prompt and rendered through it (tokenised by the processor
    itself, so each image counts its real number of tokens).  Spans are computed once per example.

    A trained turn is meant to end with the model's end of turn, so the model learns to stop.  Most templates
    render one (Qwen2-VL's ``<|im_end|>``, SmolVLM's ``<end_of_utterance>``); a template that closes an
    assistant turn without any end-of-sequence token (LLaVA-1.5's: ``ASSISTANT: <answer> ``) would teach the
    model never to stop, so the tokenizer's eos is inserted after such a turn, and labelled, as LLaVA's own
    training did (``<answer></s>``).  ``eos_ids``: the ids that end a generation (default: the tokenizer's eos).
    """

    def __init__(self, processor, image_token_id: int | None, max_length: int, eos_ids: set[int] | None = None):
        self.processor, self.image_token_id, self.max_length = processor, image_token_id, max_length
        eos = getattr(processor, "tokenizer", processor).eos_token_id
        self.eos_id = eos
        self.eos_ids = set(eos_ids or ()) | ({eos} if eos is not None else set())
        self._spans: dict[int, list[tuple[int, int]]] = {}
        self.skipped: set[str] = set()

    def _ids(self, messages: list[dict], images: list, generation_prompt: bool) -> list[int]:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.processor(text=[text], images=[images] if images else None, return_tensors="pt")["input_ids"][0].tolist()

    def spans(self, key: int, ex: TrainingExample, images: list, ids: list[int]) -> list[tuple[int, int]]:
        if key not in self._spans:
            spans = []
            for i in ex.trained:
                n_images = sum(p["type"] == "image" for m in ex.messages[:i + 1] for p in m["content"])
                start = _common_prefix(self._ids(ex.messages[:i], images[:n_images], True), ids)
                end = _common_prefix(self._ids(ex.messages[:i + 1], images[:n_images], False), ids)
                spans.append((start, end))
            self._spans[key] = spans
        return self._spans[key]

    def __call__(self, key: int, ex: TrainingExample) -> dict | None:
        """Tensors with a batch dimension of 1, or None when the example cannot fit ``max_length``."""
        import torch

        images = [open_image(data, ex.where) for data in ex.images]
        text = self.processor.apply_chat_template(ex.messages, tokenize=False)
        inputs = dict(self.processor(text=[text], images=[images] if images else None, return_tensors="pt"))
        ids = inputs["input_ids"][0]
        labels = torch.full_like(ids, IGNORE)
        spans = self.spans(key, ex, images, ids.tolist())
        for start, end in spans:
            labels[start:end] = ids[start:end]
        inputs["labels"] = labels[None]
        missing = [end for start, end in spans if self.eos_id is not None and start < end
                   and not self.eos_ids.intersection(ids[start:end].tolist())]
        if missing:
            inputs = self._insert_eos(inputs, missing)
            ids = inputs["input_ids"][0]
        n = ids.shape[0]
        if n > self.max_length:
            if self.image_token_id is not None and bool((ids[self.max_length:] == self.image_token_id).any()):
                self._skip(ex, f"{n} tokens and an image beyond max_length {self.max_length}")
                return None
            # per-token tensors are cut together; image tensors are untouched (all image tokens are kept)
            inputs = {k: v[:, :self.max_length] if _per_token(v, n) else v for k, v in inputs.items()}
        if not bool((inputs["labels"][0, 1:] != IGNORE).any()):
            self._skip(ex, f"no assistant token within max_length {self.max_length}")
            return None
        return inputs

    def _insert_eos(self, inputs: dict, positions: list[int]) -> dict:
        """The eos token, labelled, at each of ``positions`` of every per-token tensor (attention 1, other ids 0)."""
        import torch

        n = inputs["input_ids"].shape[1]
        fill = {"input_ids": self.eos_id, "labels": self.eos_id, "attention_mask": 1}
        out = {}
        for k, v in inputs.items():
            if not _per_token(v, n):
                out[k] = v
                continue
            pieces, prev = [], 0
            for pos in positions:
                pieces += [v[:, prev:pos], torch.full((1, 1), fill.get(k, 0), dtype=v.dtype)]
                prev = pos
            out[k] = torch.cat(pieces + [v[:, prev:]], dim=1)
        return out

    def _skip(self, ex: TrainingExample, why: str) -> None:
        """Warn once per example (it comes back every epoch); the caller returns None."""
        if ex.where not in self.skipped:
            self.skipped.add(ex.where)
            log.warning("%s: skipped: %s", ex.where, why)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _per_token(value, n: int) -> bool:
    return getattr(value, "dim", lambda: 0)() == 2 and value.shape == (1, n)


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad the per-token tensors; concatenate the rest (images) along dim 0, zero-padding other dims."""
    import torch

    n = max(it["input_ids"].shape[1] for it in items)
    batch = {}
    for key in dict.fromkeys(k for it in items for k in it):
        values = [it[key] for it in items if key in it]
        if all(_per_token(v, it["input_ids"].shape[1]) for v, it in zip(values, items)) and len(values) == len(items):
            fill = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
            batch[key] = torch.stack([torch.nn.functional.pad(v[0], (0, n - v.shape[1]), value=fill) for v in values])
        else:
            shape = [max(s) for s in zip(*(v.shape[1:] for v in values))]
            batch[key] = torch.cat([torch.nn.functional.pad(
                v, [x for d in reversed(range(1, v.dim())) for x in (0, shape[d - 1] - v.shape[d])]) for v in values])
    return batch
