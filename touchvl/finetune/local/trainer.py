"""LoRA training of one local job on ``transformers.Trainer``, checkpointed so that any step can be the last one
this process runs.

Per-step loss events in ``local/events.jsonl`` (OpenAI's job-event shape), a checkpoint (adapter, optimizer,
scheduler, RNG, data position: the library's ``checkpoint-N``) every ``checkpoint_every`` steps, exact resume from
the newest complete one of this job, and at the end the adapter plus base+adapter merged (what ``touchvl finetune
serve`` serves).  torch, transformers and peft are imported inside the functions that need them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

from touchvl import disk
from touchvl.devices import resolve_device
from touchvl.errors import StageError
from touchvl.finetune.local.data import Encoder, TrainingExample, collate
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
        if not is_main_process():  # under DDP every process trains; one writes the job's record
            return
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


def is_main_process() -> bool:
    """True except in the processes of rank > 0 that ``torchrun`` / ``accelerate launch`` start (RANK is theirs)."""
    return os.environ.get("RANK", "0") == "0"


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


class LocalTrainer:
    """LoRA training of one job on ``transformers.Trainer``: checkpoints, exact resume (optimizer, scheduler, RNG,
    data order), ``save_total_limit``, gradient accumulation, bf16/fp16, gradient checkpointing and DDP under
    ``accelerate launch`` / ``torchrun`` come from the library.  Ours: the data (examples rendered by the model's
    own chat template, assistant-only labels: :class:`Encoder`), the job's events, cancel, and which checkpoint
    belongs to which job (:class:`JobCallback`)."""

    def __init__(self, cfg: LocalFinetuneParams, seed: int, base: str, train: list[TrainingExample], val: list[TrainingExample],
                 lay: Layout, job_id: str, fingerprint: str, events: Events):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg, self.seed, self.base = cfg, seed, base
        self.lay, self.job_id, self.fingerprint, self.events = lay, job_id, fingerprint, events
        self.device = resolve_device(cfg.device, "finetune.local.device")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        kwargs: dict = {"dtype": self.dtype}
        check_hardware(cfg, self.device)
        if cfg.quantization != "none":
            kwargs.update(quantization_config=_bnb_config(cfg.quantization, self.dtype), device_map={"": _local_cuda()})
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
        model.config.use_cache = False
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
        try:
            self.model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                          lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                          exclude_modules=cfg.exclude_modules))
        except ValueError as exc:
            raise StageError(f"finetune.local.target_modules {targets}: {exc}") from None
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = self.model.get_base_model().config
        image_token = getattr(config, "image_token_id", None)
        eos = getattr(self.model.get_base_model().generation_config, "eos_token_id", None)  # what ends a generation
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.encoder = Encoder(self.processor, image_token if image_token is not None else getattr(config, "image_token_index", None),
                               cfg.max_length, eos_ids)
        # Examples that cannot fit max_length are dropped before training (named in a warning), not per batch:
        # transformers.Trainer needs every batch non-empty and the number of steps known in advance.
        self.train_set = self._fitting(train, 0, "training")
        self.val_set = self._fitting(val, VAL_KEYS, "validation")
        if not self.train_set:
            raise StageError(f"no training example fits finetune.local.max_length={cfg.max_length}")
        # under DDP each optimizer step takes batch_size examples in every process
        world = int(os.environ.get("WORLD_SIZE", "1"))
        n_batches = math.ceil(len(self.train_set) / (cfg.batch_size * world))
        self.steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
        self.total_steps = int(min(cfg.epochs * self.steps_per_epoch, cfg.max_steps or math.inf))
        self.step, self.trained_tokens, self._resume_from = 0, 0, None
        self.callback = callbacks().JobCallback(self)
        self.hf = self._hf_trainer()

    def _fitting(self, examples: list[TrainingExample], key_offset: int, what: str) -> list[tuple[int, TrainingExample]]:
        """(cache key, example) of the examples that fit max_length: each is encoded once here (its label spans
        stay cached in the encoder for training)."""
        from tqdm.auto import tqdm

        kept = [(key_offset + i, ex) for i, ex in enumerate(tqdm(examples, desc=f"checking {what} examples",
                                                                  unit="ex", leave=False, disable=len(examples) < 200))
                if self.encoder(key_offset + i, ex) is not None]
        return kept

    def _hf_trainer(self):
        from transformers import ProgressCallback, Trainer, TrainingArguments

        cfg = self.cfg
        args = TrainingArguments(
            output_dir=str(self.lay.checkpoints), seed=self.seed, data_seed=self.seed, max_steps=self.total_steps,
            per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            optim="adamw_torch", bf16=self.precision == "bf16", fp16=self.precision == "fp16",
            use_cpu=self.device == "cpu",
            # k-bit models had gradient checkpointing switched on by prepare_model_for_kbit_training
            activation_checkpointing=cfg.gradient_checkpointing and cfg.quantization == "none",
            activation_checkpointing_kwargs={"use_reentrant": False},
            logging_strategy="steps", logging_steps=1, eval_strategy="no",  # JobCallback asks for evaluations
            save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=cfg.keep_checkpoints,
            restore_callback_states_from_checkpoint=False, include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
            dataloader_pin_memory=self.device == "cuda", report_to="none", disable_tqdm=False)
        hf = Trainer(model=self.model, args=args, train_dataset=EncodedExamples(self.encoder, self.train_set),
                     eval_dataset=EncodedExamples(self.encoder, self.val_set) if self.val_set else None,
                     data_collator=self.collate, callbacks=[self.callback])
        # the library's bar also prints every log dict to stdout, which carries the stage's JSON answer
        hf.remove_callback(ProgressCallback)
        hf.add_callback(callbacks().QuietProgress)
        return hf

    def collate(self, items: list[dict]) -> dict:
        return collate(items, self.pad_id)

    def batch(self, indices: list[int], examples: list[TrainingExample], key_offset: int = 0) -> dict | None:
        """The collated batch of ``examples[indices]`` on the model's device (None when none of them fits)."""
        items = [it for it in (self.encoder(key_offset + i, examples[i]) for i in indices) if it is not None]
        if not items:
            return None
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in self.collate(items).items()}

    def resume(self) -> Path | None:
        """The newest complete checkpoint of this job, which :meth:`run` resumes from; None: start at step 0.
        Folders that are not a complete checkpoint of this job (a save cut by kill -9) are removed first."""
        complete = list_checkpoints(self.lay, self.job_id)
        for path in self.lay.checkpoints.glob("checkpoint-*") if is_main_process() else ():
            if path not in complete:
                log.warning("%s: not a complete checkpoint of job %s, removed", path, self.job_id)
                shutil.rmtree(path, ignore_errors=True)
        if not complete:
            return None
        self._resume_from = complete[-1]
        state = json.loads((self._resume_from / "trainer_state.json").read_text())
        self.step, self.trained_tokens = state["global_step"], state.get("num_input_tokens_seen", 0)
        return self._resume_from

    def run(self, cancelled) -> str:
        """Train from the resumed step to the end: 'succeeded', or 'cancelled' when ``cancelled()`` turns true."""
        if cancelled():
            return "cancelled"
        self.callback.cancelled = cancelled
        self.hf.train(resume_from_checkpoint=str(self._resume_from) if self._resume_from else None)
        self.step, self.trained_tokens = self.hf.state.global_step, self.hf.state.num_input_tokens_seen
        return "cancelled" if self.callback.stopped else "succeeded"

    def evaluate(self) -> float | None:
        """Mean validation loss (None without validation examples)."""
        return self.hf.evaluate()["eval_loss"] if self.val_set else None

    def save_outputs(self) -> None:
        """The adapter, then base + adapter merged (reloaded unquantised in the base's own dtype); the main process
        only, under DDP."""
        import gc

        from peft import PeftModel
        from transformers import AutoModelForImageTextToText

        if not self.hf.is_world_process_zero():
            return
        with disk.replace_dir(self.lay.adapter) as staging:
            self.model.save_pretrained(staging)
            self.processor.save_pretrained(staging)
        del self.model, self.hf
        gc.collect()
        base = AutoModelForImageTextToText.from_pretrained(self.base, dtype="auto")
        merged = PeftModel.from_pretrained(base, self.lay.adapter).merge_and_unload()
        merged.config.use_cache = True
        with disk.replace_dir(self.lay.merged) as staging:
            merged.save_pretrained(staging)
            self.processor.save_pretrained(staging)
        write_loss_csv(self.lay)


VAL_KEYS = 1 << 30  # the encoder's cache keys of validation examples start here (training's at 0)


class EncodedExamples:
    """A map-style dataset: index -> the encoded example (tensors with a batch dimension of 1)."""

    def __init__(self, encoder: Encoder, items: list[tuple[int, TrainingExample]]):
        self.encoder, self.items = encoder, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        key, ex = self.items[i]
        return self.encoder(key, ex)


@functools.cache
def callbacks() -> types.SimpleNamespace:
    """JobCallback and QuietProgress, built on first use: they subclass transformers' classes, whose import pulls
    torch in, and ``status`` / ``events`` / ``cancel`` import this module without training anything."""
    from transformers import ProgressCallback, TrainerCallback
    from transformers.trainer_callback import ExportableState

    class JobCallback(TrainerCallback, ExportableState):
        """Our events, cancel and evaluation points on the library's loop.  Its state (job id, fingerprint) is
        written into each checkpoint's ``trainer_state.json`` -- the file transformers writes last -- so a
        checkpoint is known complete and known to be this job's (``list_checkpoints``)."""

        def __init__(self, owner: LocalTrainer | None = None):
            self.owner, self.cancelled, self.stopped, self._tokens = owner, (lambda: False), False, None

        def state(self) -> dict:
            return {"args": {}, "attributes": {"job_id": self.owner.job_id, "fingerprint": self.owner.fingerprint}}

        def on_train_begin(self, args, state, control, **kwargs):
            self._tokens = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            o, step = self.owner, state.global_step
            o.step = step
            if o.val_set and (step % o.steps_per_epoch == 0 or step == state.max_steps):
                control.should_evaluate = True  # each epoch's end, and the last step
            if step == state.max_steps:
                control.should_save = True
            if self.cancelled():
                self.stopped = control.should_training_stop = True
                control.should_save = control.should_evaluate = False
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" not in (logs or {}) or not state.is_world_process_zero:
                return
            o, step = self.owner, state.global_step
            tokens = state.num_input_tokens_seen - (self._tokens or 0)
            self._tokens = state.num_input_tokens_seen
            o.events.add(f"Step {step}/{state.max_steps}: training loss={_fmt(logs['loss'])}", data={
                "step": step, "epoch": round(step / o.steps_per_epoch, 4), "train_loss": logs["loss"],
                "lr": logs.get("learning_rate"), "tokens": tokens})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not state.is_world_process_zero or "eval_loss" not in (metrics or {}):
                return
            o, step = self.owner, state.global_step
            epoch = step / o.steps_per_epoch
            o.events.add(f"Epoch {math.ceil(epoch)} done at step {step}: validation loss={_fmt(metrics['eval_loss'])}",
                         data={"step": step, "epoch": round(epoch, 4), "val_loss": metrics["eval_loss"]})

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.owner.events.add(f"Checkpoint checkpoint-{state.global_step} saved")
                write_loss_csv(self.owner.lay)

    class QuietProgress(ProgressCallback):
        """The library's progress bar without its per-step print of the log dict (our events carry it)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=_fmt(logs["loss"]), refresh=False)

    return types.SimpleNamespace(JobCallback=JobCallback, QuietProgress=QuietProgress)


def _local_cuda() -> int:
    """This process's GPU: its LOCAL_RANK under torchrun / accelerate launch (one GPU per process), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


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


def checkpoint_job(path: Path) -> tuple[str | None, int | None]:
    """(job id, step) of a complete checkpoint folder; (None, None) for anything else (a save cut by kill -9 has
    no readable ``trainer_state.json``: transformers writes that file last)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        return state["stateful_callbacks"]["JobCallback"]["attributes"]["job_id"], int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def list_checkpoints(lay: Layout, job_id: str) -> list[Path]:
    """Complete checkpoints of ``job_id``, oldest first."""
    found = []
    for path in lay.checkpoints.glob("checkpoint-*"):
        owner, step = checkpoint_job(path)
        if owner == job_id:
            found.append((step, path))
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
