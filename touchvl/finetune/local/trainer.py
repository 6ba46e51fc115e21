"""LoRA training of one local job, checkpointed so that any step can be the last one this process runs.

Per-step loss events in ``local/events.jsonl`` (OpenAI's job-event shape), an atomic checkpoint (adapter,
optimizer, scheduler, RNG, step) every ``checkpoint_every`` steps, exact resume from the newest complete one,
and at the end the adapter plus base+adapter merged (what ``touchvl finetune serve`` serves).
torch, transformers and peft are imported inside the functions that need them.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from touchvl import disk
from touchvl.devices import resolve_device
from touchvl.errors import StageError
from touchvl.finetune.local.data import IGNORE, Encoder, Example, collate
from touchvl.params import LocalFinetuneParams

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where a local job keeps its files (all under ``<finetune.out_dir>/local``)."""

    root: Path

    checkpoints = property(lambda self: self.root / "checkpoints")
    events = property(lambda self: self.root / "events.jsonl")
    loss_csv = property(lambda self: self.root / "loss.csv")
    plots = property(lambda self: self.root / "plots")  # train_loss.tsv, val_loss.tsv: DVC plots (dvc.yaml)
    adapter = property(lambda self: self.root / "adapter")
    merged = property(lambda self: self.root / "merged")
    cancel_request = property(lambda self: self.root / "cancel-request.json")
    lock = property(lambda self: self.root / "trainer.lock")
    log = property(lambda self: self.root / "train.log")
    tiny = property(lambda self: self.root / "base-tiny")


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
        self.device = resolve_device(cfg.device, "finetune.local.device")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        kwargs: dict = {"dtype": self.dtype}
        check_hardware(cfg, self.device)
        if cfg.quantization != "none":
            kwargs.update(quantization_config=_bnb_config(cfg.quantization, self.dtype), device_map={"": self.device})
        if cfg.device_map == "auto":
            kwargs["device_map"] = "auto"
        try:
            self.processor = AutoProcessor.from_pretrained(base)
            model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
        except (OSError, ValueError) as exc:
            raise StageError(f"finetune.local.base_model {cfg.base_model!r}: cannot load ({exc})") from None
        torch.manual_seed(seed)  # LoRA's initial weights
        if cfg.quantization != "none":
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
        # quantized or device_map-placed models are already where accelerate put them
        self.model = model.to(self.device) if cfg.quantization == "none" and cfg.device_map == "none" else model
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = self.model.get_base_model().config
        image_token = getattr(config, "image_token_id", None)
        eos = getattr(self.model.get_base_model().generation_config, "eos_token_id", None)  # what ends a generation
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.encoder = Encoder(self.processor, image_token if image_token is not None else getattr(config, "image_token_index", None),
                               cfg.max_length, eos_ids)
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
        disk.write_json(tmp / "trainer_state.json", {
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

        with disk.replace_dir(self.lay.adapter) as staging:
            self.model.save_pretrained(staging)
            self.processor.save_pretrained(staging)
        del self.model, self.optimizer
        gc.collect()
        base = AutoModelForImageTextToText.from_pretrained(self.base, dtype="auto")
        merged = PeftModel.from_pretrained(base, self.lay.adapter).merge_and_unload()
        merged.config.use_cache = True
        with disk.replace_dir(self.lay.merged) as staging:
            merged.save_pretrained(staging)
            self.processor.save_pretrained(staging)
        write_loss_csv(self.lay)


def check_hardware(cfg: LocalFinetuneParams, device: str) -> None:
    """Refuse, before loading anything, settings this device cannot run (bitsandbytes' k-bit kernels are CUDA only)."""
    if cfg.quantization != "none" and device != "cuda":
        raise StageError(f"finetune.local.quantization={cfg.quantization}: bitsandbytes QLoRA needs a CUDA GPU, "
                         f"this job runs on {device} (set finetune.local.quantization: none)")
    if cfg.device_map == "auto" and device != "cuda":
        raise StageError(f"finetune.local.device_map=auto: spreads a model over CUDA GPUs, this job runs on {device} "
                         "(set finetune.local.device_map: none)")


def _bnb_config(quantization: str, dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise StageError(f"finetune.local.quantization={quantization} needs bitsandbytes "
                         "(pip install -r requirements.txt; CUDA only)") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
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
        meta = disk.read_json(path / "trainer_state.json", {})
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


def val_loss_curve(events: list[dict]) -> list[dict]:
    """Validation loss at each epoch's end, by step (latest value after a resume)."""
    by_step = {}
    for e in events:
        data = e.get("data") or {}
        if data.get("val_loss") is not None:
            by_step[data["step"]] = {"step": data["step"], "epoch": data["epoch"], "val_loss": data["val_loss"]}
    return [by_step[s] for s in sorted(by_step)]


def write_loss_csv(lay: Layout) -> None:
    """loss.csv (every column), and the two curves as dvclive-style TSVs that dvc.yaml declares as one plot (two
    files, not one CSV with blanks: validation runs once per epoch, and a blank cell would plot as zero)."""
    events = read_events(lay.events)
    rows = loss_curve(events)
    disk.write_text(lay.loss_csv, "step,epoch,loss,lr\n" + "".join(
        f"{r['step']},{r['epoch']},{'' if r['loss'] is None else r['loss']},{r['lr']}\n" for r in rows))
    disk.write_text(lay.plots / "train_loss.tsv", "step\ttrain_loss\n" + "".join(
        f"{r['step']}\t{r['loss']}\n" for r in rows if r["loss"] is not None))
    disk.write_text(lay.plots / "val_loss.tsv", "step\tval_loss\n" + "".join(
        f"{r['step']}\t{r['val_loss']}\n" for r in val_loss_curve(events)))
