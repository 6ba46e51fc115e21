"""``finetune.provider: local``: LoRA adapters on an open vision-language model, on hardware the user owns.

The same contract as the remote providers (:mod:`tasks.finetune`): the approval gate keyed by the
dataset's sha256, ``job.json`` (queued -> running -> succeeded | failed | cancelled), events,
``cancel`` and, on success, ``model.json`` -- with our own training loop in place of the service:

* data: exactly the approved JSONL files (OpenAI chat format; ``image_url`` parts as base64 data
  URLs, ``file://`` or http(s) URLs), rendered with the processor's own chat template; the loss is on
  assistant tokens only (``weight: 0`` assistant turns excluded, as OpenAI does);
* state: per-step loss events in ``local/events.jsonl``, an atomic checkpoint (adapter, optimizer,
  scheduler, RNG, step) every ``checkpoint_every`` steps; a rerun -- after kill -9, a crash or a
  ``failed`` -- resumes from the newest complete checkpoint and says so in the events, never
  silently from zero; a cancel request is honoured between steps;
* outputs under ``<out_dir>/local/``: ``adapter/`` (peft), ``merged/`` (base + adapter merged, with
  the processor: what ``python -m tasks.finetune serve`` serves) and ``loss.csv`` (a DVC plot).

``base_model: tiny`` builds a random-weight LLaVA (tiny CLIP tower + tiny Llama + a BPE tokenizer
trained on the dataset's texts) so the whole path runs offline on CPU in minutes.  It exists to
test the path, not to answer questions.

torch, transformers and peft are imported inside the functions that need them, so ``status``,
``events`` and ``cancel`` answer instantly.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tasks import atomic
from tasks.finetune import TERMINAL, DatasetFiles, Submission, read_json
from tasks.params import FinetuneParams, LocalFinetuneParams, Params
from tasks.stage import StageError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss (torch's CrossEntropyLoss ignore_index)
# settings that change what is trained: a change starts a new job instead of resuming an old one's checkpoints
TRAINING_KEYS = ("base_model", "quantization", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                 "exclude_modules", "epochs", "max_steps", "lr", "lr_scheduler", "warmup_steps", "weight_decay",
                 "max_grad_norm", "batch_size", "grad_accum", "max_length")
TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where a local job keeps its files (all under ``<finetune.out_dir>/local``)."""

    root: Path

    checkpoints = property(lambda self: self.root / "checkpoints")
    events = property(lambda self: self.root / "events.jsonl")
    loss_csv = property(lambda self: self.root / "loss.csv")
    adapter = property(lambda self: self.root / "adapter")
    merged = property(lambda self: self.root / "merged")
    cancel_request = property(lambda self: self.root / "cancel-request.json")
    lock = property(lambda self: self.root / "trainer.lock")
    log = property(lambda self: self.root / "train.log")
    tiny = property(lambda self: self.root / "base-tiny")


def layout(p: FinetuneParams) -> Layout:
    return Layout(p.out_dir / "local")


# ------------------------------------------------------------------------------------------ tiny model
def build_tiny_vlm(out_dir: Path | str, texts: list[str], seed: int = 0, vocab_size: int = 1000) -> Path:
    """Save a random-weight LLaVA (tiny CLIP tower, tiny Llama) with a BPE tokenizer trained on ``texts``.

    Everything goes through ``save_pretrained``, so ``AutoProcessor`` / ``AutoModelForImageTextToText``
    load the folder offline like any downloaded model.  Built in a staging folder and swapped in whole.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    out_dir = Path(out_dir)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # byte-level: any text encodes (TouchQA's prompts hold words the training texts never had)
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(texts) or ["It feels smooth."], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(TINY_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # <|end|> closes every turn and is the eos: labelled with the assistant's text, so the model learns to stop
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tokenizer.chat_template = TINY_TEMPLATE
    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                # wider than the usual 0.02: with a random lm_head that small, logits stay near
                                # uniform whatever LoRA does, and the loss could not show that training works
                                initializer_range=0.2,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # num_additional_image_tokens=1: CLIP's CLS position, which the "default" strategy then drops
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                  crop_size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                               chat_template=TINY_TEMPLATE, num_additional_image_tokens=1)
    with atomic.replace_dir(out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "TINY_MODEL.md").write_text("Random weights: tests the local fine-tuning path, answers nothing.\n")
    return out_dir


def dataset_texts(path: Path) -> list[str]:
    """Every text of a chat JSONL (for the tiny model's tokenizer)."""
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                for m in json.loads(line)["messages"]:
                    c = m.get("content")
                    texts += [c] if isinstance(c, str) else [p["text"] for p in c or [] if p.get("type") == "text"]
    return texts


def base_model_path(cfg: LocalFinetuneParams, lay: Layout, files: DatasetFiles) -> str:
    if cfg.base_model != "tiny":
        return cfg.base_model
    if not (lay.tiny / "config.json").is_file():
        log.info("building the tiny random-weight model in %s (tests the path, answers nothing)", lay.tiny)
        build_tiny_vlm(lay.tiny, dataset_texts(files.train))
    return str(lay.tiny)


# ------------------------------------------------------------------------------------------- the data
@dataclass(frozen=True)
class Example:
    """One chat: messages in the processor's format (images as ``{"type": "image"}`` parts, in order)."""

    messages: list[dict]
    images: list[bytes]
    trained: tuple[int, ...]
    """Indices of the assistant messages that carry loss (all but those with ``weight: 0``)."""
    where: str


def read_image_url(url: str, where: str) -> bytes:
    """The bytes behind an ``image_url``: a base64 data URL, a ``file://`` path, or an http(s) URL."""
    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise ValueError("only base64 data URLs are supported")
            return base64.b64decode(payload, validate=True)
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme == "file":
            return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path)).read_bytes()
        if scheme in ("http", "https"):
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read()
        raise ValueError(f"unsupported URL scheme {scheme or url[:20]!r}")
    except (OSError, ValueError) as exc:
        raise StageError(f"{where}: cannot read image: {exc}") from None


def open_image(data: bytes, where: str = "image") -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise StageError(f"{where}: not a decodable image ({exc})") from None


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


def load_examples(path: Path | str) -> list[Example]:
    """Decode a chat JSONL; every image is read once here, so a bad one stops before training starts."""
    path = Path(path)
    examples = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise StageError(f"{where}: not valid JSON ({exc})") from None
            messages, images, trained = convert_messages(record.get("messages") if isinstance(record, dict) else None,
                                                         where, fetch=_checked_image)
            if not trained:
                raise StageError(f"{where}: no assistant message to learn from")
            examples.append(Example(messages, images, trained, where))
    if not examples:
        raise StageError(f"{path}: no examples")
    return examples


# ------------------------------------------------------------------------------------ encoding, labels
class Encoder:
    """An example -> model inputs with labels on the trained assistant turns only.

    Any chat template works: an assistant turn's tokens are those between the conversation rendered
    up to that turn with the generation prompt and rendered through it (tokenised by the processor
    itself, so each image counts its real number of tokens).  Spans are computed once per example.
    """

    def __init__(self, processor, image_token_id: int | None, max_length: int):
        self.processor, self.image_token_id, self.max_length = processor, image_token_id, max_length
        self._spans: dict[int, list[tuple[int, int]]] = {}
        self.skipped: set[str] = set()

    def _ids(self, messages: list[dict], images: list, generation_prompt: bool) -> list[int]:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.processor(text=[text], images=[images] if images else None, return_tensors="pt")["input_ids"][0].tolist()

    def spans(self, key: int, ex: Example, images: list, ids: list[int]) -> list[tuple[int, int]]:
        if key not in self._spans:
            spans = []
            for i in ex.trained:
                n_images = sum(p["type"] == "image" for m in ex.messages[:i + 1] for p in m["content"])
                start = _common_prefix(self._ids(ex.messages[:i], images[:n_images], True), ids)
                end = _common_prefix(self._ids(ex.messages[:i + 1], images[:n_images], False), ids)
                spans.append((start, end))
            self._spans[key] = spans
        return self._spans[key]

    def __call__(self, key: int, ex: Example) -> dict | None:
        """Tensors with a batch dimension of 1, or None when the example cannot fit ``max_length``."""
        import torch

        images = [open_image(data, ex.where) for data in ex.images]
        text = self.processor.apply_chat_template(ex.messages, tokenize=False)
        inputs = dict(self.processor(text=[text], images=[images] if images else None, return_tensors="pt"))
        ids = inputs["input_ids"][0]
        labels = torch.full_like(ids, IGNORE)
        for start, end in self.spans(key, ex, images, ids.tolist()):
            labels[start:end] = ids[start:end]
        inputs["labels"] = labels[None]
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

    def _skip(self, ex: Example, why: str) -> None:
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


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class Events:
    """Append-only JSONL of the job's events, in the shape of OpenAI's fine-tuning job events."""

    path: Path
    job_id: str
    _count: int = field(default=-1, repr=False)

    def add(self, message: str, level: str = "info", data: dict | None = None) -> None:
        if self._count < 0:
            self._count = len(read_events(self.path))
        self._count += 1
        event = {"object": "fine_tuning.job.event", "id": f"ftevent-{self._count}", "job_id": self.job_id,
                 "created_at": int(time.time()), "level": level, "message": message,
                 "type": "metrics" if data else "message", "data": data}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
        # per-step losses are on the progress bar; the log keeps the milestones
        level_fn = log.warning if level in ("warn", "error") else log.debug if data and "train_loss" in data else log.info
        level_fn("%s %s", self.job_id, message)


def read_events(path: Path) -> list[dict]:
    events = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line cut by kill -9 mid-write
                events.append(json.loads(line))
    return events


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise StageError(f"finetune.local.device={name} but this machine has no {name} device")
    return name


def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device == "cuda" else "fp32"
    if precision == "fp16" and device == "cpu":
        raise StageError("finetune.local.precision=fp16 needs a GPU (use fp32 or bf16 on CPU)")
    return precision


class Trainer:
    """LoRA training of one job, checkpointed so that any step can be the last one this process runs."""

    def __init__(self, cfg: LocalFinetuneParams, seed: int, base: str, train: list[Example], val: list[Example],
                 lay: Layout, job_id: str, fingerprint: str, events: Events):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg, self.seed, self.base, self.train_set, self.val_set = cfg, seed, base, train, val
        self.lay, self.job_id, self.fingerprint, self.events = lay, job_id, fingerprint, events
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        kwargs: dict = {"dtype": self.dtype}
        if cfg.quantization == "4bit":
            kwargs.update(quantization_config=_bnb_config(self.dtype), device_map={"": self.device})
        try:
            self.processor = AutoProcessor.from_pretrained(base)
            model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
        except (OSError, ValueError) as exc:
            raise StageError(f"finetune.local.base_model {cfg.base_model!r}: cannot load ({exc})") from None
        torch.manual_seed(seed)  # LoRA's initial weights
        if cfg.quantization == "4bit":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
        try:
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                     target_modules=targets, exclude_modules=cfg.exclude_modules))
        except ValueError as exc:
            raise StageError(f"finetune.local.target_modules {targets}: {exc}") from None
        self.model = model.to(self.device) if cfg.quantization == "none" else model
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = self.model.get_base_model().config
        image_token = getattr(config, "image_token_id", None)
        self.encoder = Encoder(self.processor, image_token if image_token is not None else getattr(config, "image_token_index", None),
                               cfg.max_length)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_batches = math.ceil(len(train) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
        self.total_steps = min(cfg.epochs * self.steps_per_epoch, cfg.max_steps or math.inf)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.precision == "fp16")
        self.step, self.trained_tokens = 0, 0

    # -- data order: a pure function of (seed, epoch), so a resumed run sees the same batches
    def micro_batches(self, step: int) -> list[list[int]]:
        import torch

        epoch, group = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        bs, ga = self.cfg.batch_size, self.cfg.grad_accum
        batches = [order[k:k + bs] for k in range(0, len(order), bs)]
        return batches[group * ga:(group + 1) * ga]

    def batch(self, indices: list[int], examples: list[Example], key_offset: int = 0) -> dict | None:
        items = [it for it in (self.encoder(key_offset + i, examples[i]) for i in indices) if it is not None]
        if not items:
            return None
        return {k: v.to(self.device) for k, v in collate(items, self.pad_id).items()}

    def autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.dtype)

    def train_step(self, step: int) -> tuple[float | None, int]:
        """One optimizer step over ``grad_accum`` micro-batches; the loss is the mean over their label tokens."""
        import torch

        self.model.train()
        batches = [b for b in (self.batch(ix, self.train_set) for ix in self.micro_batches(step)) if b is not None]
        counts = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches]  # the model shifts labels by one
        total = sum(counts)
        loss_sum = 0.0
        for b, n in zip(batches, counts):
            if n == 0:
                continue
            with self.autocast():
                loss = self.model(**b).loss * (n / total)  # token-weighted across micro-batches
            self.scaler.scale(loss).backward()
            loss_sum += float(loss.detach())
        if total:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (loss_sum if total else None), total

    def evaluate(self, examples: list[Example]) -> float | None:
        import torch

        self.model.eval()
        loss_sum, total = 0.0, 0
        with torch.no_grad():
            for k in range(0, len(examples), self.cfg.batch_size):
                b = self.batch(list(range(k, min(k + self.cfg.batch_size, len(examples)))), examples, key_offset=1 << 30)
                n = 0 if b is None else int((b["labels"][:, 1:] != IGNORE).sum())
                if n:
                    with self.autocast():
                        loss_sum += float(self.model(**b).loss) * n
                    total += n
        return loss_sum / total if total else None

    # -- checkpoints: written to a temp folder, renamed into place, so a listed step-N is always complete
    def save_checkpoint(self) -> Path:
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        final = self.lay.checkpoints / f"step-{self.step}"
        tmp = self.lay.checkpoints / f".step-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()},
                  tmp / "adapter.safetensors")
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device == "cuda" else None}
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "rng": rng}, tmp / "state.pt")
        atomic.write_json(tmp / "trainer_state.json", {
            "job_id": self.job_id, "fingerprint": self.fingerprint, "step": self.step, "total_steps": self.total_steps,
            "epoch": self.step / self.steps_per_epoch, "trained_tokens": self.trained_tokens,
            "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(self.lay.checkpoints)
        for old in list_checkpoints(self.lay, self.job_id)[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        write_loss_csv(self.lay)
        return final

    def resume(self) -> Path | None:
        """Load the newest complete checkpoint of this job; None when there is none (start at step 0)."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        found = list_checkpoints(self.lay, self.job_id)
        if not found:
            return None
        ckpt = found[-1]
        meta = json.loads((ckpt / "trainer_state.json").read_text())
        set_peft_model_state_dict(self.model, {k: v.to(self.device) for k, v in load_file(ckpt / "adapter.safetensors").items()})
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and self.device == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.trained_tokens = meta["step"], meta["trained_tokens"]
        return ckpt

    def run(self, cancelled) -> str:
        """Train from ``self.step`` to the end: 'succeeded', or 'cancelled' when ``cancelled()`` turns true."""
        from tqdm.auto import tqdm

        with tqdm(total=self.total_steps, initial=self.step, desc=self.job_id, unit="step", dynamic_ncols=True) as bar:
            while self.step < self.total_steps:
                if cancelled():
                    return "cancelled"
                lr = self.scheduler.get_last_lr()[0]
                loss, tokens = self.train_step(self.step)
                self.step += 1
                self.trained_tokens += tokens
                epoch = self.step / self.steps_per_epoch
                self.events.add(f"Step {self.step}/{self.total_steps}: training loss={_fmt(loss)}", data={
                    "step": self.step, "epoch": round(epoch, 4), "train_loss": loss, "lr": lr, "tokens": tokens})
                bar.update(1)
                bar.set_postfix(loss=_fmt(loss))
                if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                    val = self.evaluate(self.val_set)
                    self.events.add(f"Epoch {math.ceil(epoch)} done at step {self.step}: validation loss={_fmt(val)}",
                                    data={"step": self.step, "epoch": round(epoch, 4), "val_loss": val})
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self.events.add(f"Checkpoint {self.save_checkpoint().name} saved")
        return "succeeded"

    def save_outputs(self) -> None:
        """The adapter, then base + adapter merged (reloaded unquantised in the base's own dtype)."""
        import gc

        from peft import PeftModel
        from transformers import AutoModelForImageTextToText

        with atomic.replace_dir(self.lay.adapter) as staging:
            self.model.save_pretrained(staging)
            self.processor.save_pretrained(staging)
        del self.model, self.optimizer
        gc.collect()
        base = AutoModelForImageTextToText.from_pretrained(self.base, dtype="auto")
        merged = PeftModel.from_pretrained(base, self.lay.adapter).merge_and_unload()
        merged.config.use_cache = True
        with atomic.replace_dir(self.lay.merged) as staging:
            merged.save_pretrained(staging)
            self.processor.save_pretrained(staging)
        write_loss_csv(self.lay)


def _bnb_config(dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise StageError("finetune.local.quantization=4bit needs bitsandbytes (pip install bitsandbytes; CUDA only)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(lay: Layout, job_id: str) -> list[Path]:
    """Complete checkpoints of ``job_id``, oldest first (a temp folder of a killed save is not listed)."""
    found = []
    for path in lay.checkpoints.glob("step-*"):
        meta = read_json(path / "trainer_state.json", {})
        if meta.get("job_id") == job_id:
            found.append((meta["step"], path))
    return [path for _, path in sorted(found)]


def loss_curve(events: list[dict]) -> list[dict]:
    """Training loss by step; a step re-run after a resume keeps its latest value."""
    by_step = {}
    for e in events:
        data = e.get("data") or {}
        if "train_loss" in data:
            by_step[data["step"]] = {"step": data["step"], "epoch": data["epoch"], "loss": data["train_loss"], "lr": data["lr"]}
    return [by_step[s] for s in sorted(by_step)]


def write_loss_csv(lay: Layout) -> None:
    rows = loss_curve(read_events(lay.events))
    atomic.write_text(lay.loss_csv, "step,epoch,loss,lr\n" + "".join(
        f"{r['step']},{r['epoch']},{'' if r['loss'] is None else r['loss']},{r['lr']}\n" for r in rows))


# ------------------------------------------------------------------------------------------ the job
def fingerprint(p: FinetuneParams, dataset_sha256: str) -> str:
    settings = {"dataset_sha256": dataset_sha256, "seed": p.seed, **p.local.model_dump(mode="json", include=set(TRAINING_KEYS))}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def hyperparameters(p: FinetuneParams) -> dict:
    return {"n_epochs": p.local.epochs, **p.local.model_dump(mode="json", include=set(TRAINING_KEYS) - {"base_model", "epochs"})}


def model_name(p: FinetuneParams, job_id: str) -> str:
    """The served name, shaped like OpenAI's ``ft:<base>:<org>:<suffix>:<id>``."""
    base = "tiny" if p.local.base_model == "tiny" else Path(p.local.base_model.rstrip("/")).name
    return f"local:{base}:{p.suffix}:{job_id.removeprefix('local-')}"


@contextlib.contextmanager
def trainer_lock(lay: Layout) -> Iterator[None]:
    """One trainer per output folder; the OS drops the lock when the process dies (kill -9 included)."""
    lay.root.mkdir(parents=True, exist_ok=True)
    with open(lay.lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise StageError(f"a local training job is already running (pid {fh.read().strip() or '?'}); "
                             f"`python -m tasks.finetune status` shows it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def trainer_alive(lay: Layout) -> bool:
    if not lay.lock.is_file():
        return False
    with open(lay.lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


class LocalSubmission(Submission):
    """A :class:`Submission` whose service is our own trainer: same gate, same ``job.json``, same ``model.json``."""

    def __init__(self, params: Params, files: DatasetFiles):
        super().__init__(params, client=None, files=files)
        self.cfg = self.p.local
        self.lay = layout(self.p)
        self.fingerprint = fingerprint(self.p, self.sha)
        self.job_id = f"local-{self.sha[:12]}-{self.fingerprint[:6]}"
        self.job_path = self.p.out_dir / "job.json"

    def job(self) -> dict:
        job = read_json(self.job_path, {})
        return job if job.get("job_id") == self.job_id else {}

    def update_job(self, **changes) -> dict:
        job = {"job_id": self.job_id, "status": "queued", "model": self.cfg.base_model, "fine_tuned_model": None,
               "created_at": int(time.time()), "finished_at": None, "trained_tokens": None, "error": None,
               "dataset_sha256": self.sha, "provider": "local", "hyperparameters": hyperparameters(self.p),
               **self.job(), **changes}
        atomic.write_json(self.job_path, job)
        return job

    def run(self, wait: bool = True) -> dict:
        self.check_gate()
        job = self.job()
        if job.get("status") == "succeeded" and (self.p.out_dir / "model.json").is_file():
            log.info("job %s already succeeded: %s", self.job_id, job["fine_tuned_model"])
            return job
        if job.get("status") == "cancelled":
            log.warning("job %s was cancelled; to train it again remove %s and %s", self.job_id, self.job_path, self.lay.checkpoints)
            return job
        if not wait:
            return self.start_in_background()
        with trainer_lock(self.lay):
            return self.train()

    def start_in_background(self) -> dict:
        """``submit --no-wait``: the same command, waiting, in a process of its own that outlives this one."""
        if trainer_alive(self.lay):
            return self.job()
        self.lay.root.mkdir(parents=True, exist_ok=True)
        job = self.update_job(status=self.job().get("status", "queued"))
        with open(self.lay.log, "ab") as out:
            subprocess.Popen([sys.executable, "-m", "tasks.finetune", "submit"], stdout=out, stderr=out,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("training in the background (log: %s); `python -m tasks.finetune status | events | cancel`", self.lay.log)
        return job

    def remove_other_jobs_state(self) -> None:
        """Checkpoints, events and a cancel request of another job (data or settings changed) go, loudly."""
        request = read_json(self.lay.cancel_request, {})
        if request and request.get("job_id") != self.job_id:
            self.lay.cancel_request.unlink()
        stale = [p for p in self.lay.checkpoints.glob("*step-*")
                 if read_json(p / "trainer_state.json", {}).get("job_id") != self.job_id]
        events = read_events(self.lay.events)
        others = {e.get("job_id") for e in events} - {self.job_id}
        if stale or others:
            log.warning("job %s (dataset or training settings changed): removing %d checkpoint(s) and the events of "
                        "job(s) %s", self.job_id, len(stale), ", ".join(sorted(map(str, others))) or "-")
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
            if others:
                self.lay.events.unlink(missing_ok=True)
                self.lay.loss_csv.unlink(missing_ok=True)

    def train(self) -> dict:
        self.remove_other_jobs_state()
        events = Events(self.lay.events, self.job_id)
        attempted = bool(read_events(self.lay.events))  # only this job's events are left
        self.update_job(status="queued", finished_at=None, error=None)
        try:
            base = base_model_path(self.cfg, self.lay, self.files)
            train, val = load_examples(self.files.train), load_examples(self.files.val)
            trainer = Trainer(self.cfg, self.p.seed, base, train, val, self.lay, self.job_id, self.fingerprint, events)
            ckpt = trainer.resume()
            if ckpt is not None:
                events.add(f"Resumed from checkpoint {ckpt.name}: steps {trainer.step + 1}..{trainer.total_steps} remain",
                           data={"resumed_from_step": trainer.step})
            elif attempted:
                events.add("An earlier attempt stopped before its first checkpoint: starting again at step 0",
                           level="warn", data={"resumed_from_step": 0})
            else:
                events.add(f"Training {len(train)} examples ({len(val)} validation) for {trainer.total_steps} steps on "
                           f"{self.cfg.base_model} ({trainer.device}, {trainer.precision})",
                           data={"total_steps": trainer.total_steps, "resumed_from_step": 0})
            self.update_job(status="running", pid=os.getpid(), total_steps=trainer.total_steps, device=trainer.device,
                            precision=trainer.precision, resumed_from_step=trainer.step)
            outcome = trainer.run(lambda: read_json(self.lay.cancel_request, {}).get("job_id") == self.job_id)
            if outcome == "cancelled":
                return self.mark_cancelled(events, trainer.step)
            trainer.save_outputs()
            name = model_name(self.p, self.job_id)
            val_loss = next((e["data"]["val_loss"] for e in reversed(read_events(self.lay.events))
                             if "val_loss" in (e.get("data") or {})), None)
            atomic.write_json(self.p.out_dir / "model.json", {
                "fine_tuned_model": name, "job_id": self.job_id, "base_model": self.cfg.base_model, "provider": "local",
                "model_dir": str(self.lay.merged), "adapter_dir": str(self.lay.adapter), "val_loss": val_loss})
            events.add(f"The job has successfully completed: {name}")
            return self.update_job(status="succeeded", fine_tuned_model=name, finished_at=int(time.time()),
                                   trained_tokens=trainer.trained_tokens, step=trainer.step)
        except Exception as exc:
            message = str(exc) if isinstance(exc, StageError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, StageError):
                log.exception("local training failed")
            events.add(f"Job failed: {message}", level="error")
            self.update_job(status="failed", finished_at=int(time.time()), error={"message": message})
            raise StageError(f"local fine-tuning job {self.job_id} failed: {message} "
                             f"(a rerun resumes from the last checkpoint)") from None

    def mark_cancelled(self, events: Events, step: int | None) -> dict:
        self.lay.cancel_request.unlink(missing_ok=True)
        events.add(f"Job cancelled at step {step}" if step is not None else "Job cancelled")
        return self.update_job(status="cancelled", finished_at=int(time.time()))


# ----------------------------------------------------------------------------------------- commands
def status(sub: LocalSubmission) -> dict:
    job = read_json(sub.job_path, {})
    if not job.get("job_id", "").startswith("local-"):
        raise StageError("no local job submitted yet (`python -m tasks.finetune submit`)")
    events = [e for e in read_events(sub.lay.events) if e.get("job_id") == job["job_id"]]
    last = next((e["data"] for e in reversed(events) if "train_loss" in (e.get("data") or {})), None)
    alive = trainer_alive(sub.lay)
    job.update(trainer_alive=alive, step=last["step"] if last else 0, train_loss=last["train_loss"] if last else None)
    if job["status"] in ("queued", "running") and not alive:
        job["note"] = "no trainer process: it was stopped (kill, crash); `python -m tasks.finetune submit` resumes"
    return job


def cancel(sub: LocalSubmission, wait_s: float = 120.0) -> dict:
    job = read_json(sub.job_path, {})
    if not job.get("job_id", "").startswith("local-"):
        raise StageError("no local job submitted yet")
    if job["status"] in TERMINAL:
        return job
    atomic.write_json(sub.lay.cancel_request, {"job_id": job["job_id"], "requested_at": int(time.time())})
    deadline = time.monotonic() + wait_s
    while trainer_alive(sub.lay) and time.monotonic() < deadline:
        job = read_json(sub.job_path, {})
        if job.get("status") in TERMINAL:
            return job
        time.sleep(0.2)
    if trainer_alive(sub.lay):
        log.warning("cancel requested; the trainer stops after its current step")
        return read_json(sub.job_path, {})
    job = read_json(sub.job_path, {})
    if job.get("status") in TERMINAL:
        return job
    # no trainer: nothing to stop, the record is the whole job
    sub.job_id = job["job_id"]
    steps = [e["data"]["step"] for e in read_events(sub.lay.events) if "train_loss" in (e.get("data") or {})]
    return sub.mark_cancelled(Events(sub.lay.events, job["job_id"]), max(steps, default=0))


def command(name: str, params: Params, files: DatasetFiles, wait: bool = True) -> None:
    """``submit``, ``status``, ``events``, ``cancel`` for ``finetune.provider: local``."""
    sub = LocalSubmission(params, files)
    if name == "submit":
        print(json.dumps(sub.run(wait=wait), indent=2))
    elif name == "status":
        print(json.dumps(status(sub), indent=2))
    elif name == "events":
        for event in read_events(sub.lay.events):
            print(f"{event['created_at']} [{event['level']}] {event['message']}")
    elif name == "cancel":
        job = cancel(sub)
        print(f"{job['job_id']}: {job['status']}")
