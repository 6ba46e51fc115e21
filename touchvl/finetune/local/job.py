"""``finetune.provider: local``: LoRA adapters on an open vision-language model, on hardware the user owns.

The same contract as the remote providers (:mod:`tasks.finetune`): the approval gate keyed by the
dataset's sha256, ``job.json`` (queued -> running -> succeeded | failed | cancelled), events,
``cancel`` and, on success, ``model.json`` -- with ``transformers.Trainer`` (:mod:`.trainer`) in place of
the service:

* data: exactly the approved JSONL files (OpenAI chat format; ``image_url`` parts as base64 data
  URLs, ``file://`` or http(s) URLs), rendered with the processor's own chat template; the loss is on
  assistant tokens only (``weight: 0`` assistant turns excluded, as OpenAI does);
* state: per-step loss events in ``local/events.jsonl``, a checkpoint (adapter, optimizer, scheduler,
  RNG, data position) every ``checkpoint_every`` steps; a rerun -- after kill -9, a crash or a
  ``failed`` -- resumes from the newest complete checkpoint and says so in the events, never
  silently from zero; a cancel request is honoured between steps;
* outputs under ``<out_dir>/local/``: ``adapter/`` (peft), ``merged/`` (base + adapter merged, with
  the processor: what ``touchvl finetune serve`` serves) and ``loss.csv`` (a DVC plot).

``base_model: tiny`` builds a random-weight LLaVA (tiny CLIP tower + tiny Llama + a BPE tokenizer
trained on the dataset's texts) so the whole path runs offline on CPU in minutes.  It exists to
test the path, not to answer questions.

torch, transformers and peft are imported inside the functions that need them, so ``status``,
``events`` and ``cancel`` answer instantly.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from touchvl import disk
from touchvl.errors import StageError
from touchvl.finetune.contract import TERMINAL, TRAINING_KEYS, DatasetFiles, local_hyperparameters
from touchvl.finetune.local.data import load_examples
from touchvl.finetune.local.tiny import build_tiny_vlm, dataset_texts
from touchvl.finetune.local.trainer import Events, Layout, LocalTrainer, checkpoint_job, is_main_process, read_events
from touchvl.finetune.remote import Submission
from touchvl.params import FinetuneParams, LocalFinetuneParams, Params

log = logging.getLogger(__name__)


def layout(p: FinetuneParams) -> Layout:
    return Layout(p.out_dir / "local")


def base_model_path(cfg: LocalFinetuneParams, lay: Layout, files: DatasetFiles) -> str:
    if cfg.base_model != "tiny":
        return cfg.base_model
    if not (lay.tiny / "config.json").is_file():
        log.info("building the tiny random-weight model in %s (tests the path, answers nothing)", lay.tiny)
        build_tiny_vlm(lay.tiny, dataset_texts(files.train))
    return str(lay.tiny)


@contextlib.contextmanager
def _main_process_first(cfg: LocalFinetuneParams) -> Iterator[None]:
    """Under DDP, the main process runs the block first and the others wait for it (accelerate's barrier; on CPU
    accelerate forms the gloo group only when told ``cpu=True``, as transformers.Trainer's ``use_cpu`` does)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from accelerate import PartialState

    from touchvl.devices import resolve_device

    with PartialState(cpu=resolve_device(cfg.device, "finetune.local.device") == "cpu").main_process_first():
        yield


def fingerprint(p: FinetuneParams, dataset_sha256: str) -> str:
    settings = {"dataset_sha256": dataset_sha256, "seed": p.seed, **p.local.model_dump(mode="json", include=set(TRAINING_KEYS))}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


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
                             f"`touchvl finetune status` shows it") from None
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
        job = disk.read_json(self.job_path, {})
        return job if job.get("job_id") == self.job_id else {}

    def update_job(self, **changes) -> dict:
        job = {"job_id": self.job_id, "status": "queued", "model": self.cfg.base_model, "fine_tuned_model": None,
               "created_at": int(time.time()), "finished_at": None, "trained_tokens": None, "error": None,
               "dataset_sha256": self.sha, "provider": "local", "hyperparameters": local_hyperparameters(self.p),
               **self.job(), **changes}
        if is_main_process():
            disk.write_json(self.job_path, job)
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
        # under DDP (torchrun / accelerate launch) the main process holds the lock for all of them
        with trainer_lock(self.lay) if is_main_process() else contextlib.nullcontext():
            return self.train()

    def start_in_background(self) -> dict:
        """``submit --no-wait``: the same command, waiting, in a process of its own that outlives this one."""
        if trainer_alive(self.lay):
            return self.job()
        self.lay.root.mkdir(parents=True, exist_ok=True)
        job = self.update_job(status=self.job().get("status", "queued"))
        with open(self.lay.log, "ab") as out:
            subprocess.Popen([sys.executable, "-m", "touchvl", "finetune", "submit"], stdout=out, stderr=out,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("training in the background (log: %s); `touchvl finetune status | events | cancel`", self.lay.log)
        return job

    def remove_other_jobs_state(self) -> None:
        """Checkpoints, events and a cancel request of another job (data or settings changed) go, loudly."""
        request = disk.read_json(self.lay.cancel_request, {})
        if request and request.get("job_id") != self.job_id:
            self.lay.cancel_request.unlink()
        # (a folder of no job, a save cut by kill -9, is LocalTrainer.resume's to remove)
        stale = [p for p in self.lay.checkpoints.glob("checkpoint-*") if checkpoint_job(p)[0] not in (None, self.job_id)]
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
        if is_main_process():
            self.remove_other_jobs_state()
        events = Events(self.lay.events, self.job_id)
        attempted = bool(read_events(self.lay.events))  # only this job's events are left
        self.update_job(status="queued", finished_at=None, error=None)
        try:
            with _main_process_first(self.cfg):  # the tiny base model is built once, by the main process
                base = base_model_path(self.cfg, self.lay, self.files)
            train, val = load_examples(self.files.train), load_examples(self.files.val)
            trainer = LocalTrainer(self.cfg, self.p.seed, base, train, val, self.lay, self.job_id, self.fingerprint, events)
            ckpt = trainer.resume()
            if ckpt is not None:
                events.add(f"Resumed from {ckpt.name}: steps {trainer.step + 1}..{trainer.total_steps} remain",
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
            outcome = trainer.run(lambda: disk.read_json(self.lay.cancel_request, {}).get("job_id") == self.job_id)
            if outcome == "cancelled":
                return self.mark_cancelled(events, trainer.step)
            trainer.save_outputs()
            name = model_name(self.p, self.job_id)
            val_loss = next((e["data"]["val_loss"] for e in reversed(read_events(self.lay.events))
                             if "val_loss" in (e.get("data") or {})), None)
            if not is_main_process():
                return self.job()
            disk.write_json(self.p.out_dir / "model.json", {
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

    # -- the commands of an existing job, as the remote Submission has them
    def status(self) -> dict:
        return status(self)

    def event_lines(self) -> list[str]:
        return [f"{e['created_at']} [{e['level']}] {e['message']}" for e in read_events(self.lay.events)]

    def cancel(self) -> dict:
        return cancel(self)

    def mark_cancelled(self, events: Events, step: int | None) -> dict:
        self.lay.cancel_request.unlink(missing_ok=True)
        events.add(f"Job cancelled at step {step}" if step is not None else "Job cancelled")
        return self.update_job(status="cancelled", finished_at=int(time.time()))


# ----------------------------------------------------------------------------------------- commands
def status(sub: LocalSubmission) -> dict:
    job = disk.read_json(sub.job_path, {})
    if not job.get("job_id", "").startswith("local-"):
        raise StageError("no local job submitted yet (`touchvl finetune submit`)")
    events = [e for e in read_events(sub.lay.events) if e.get("job_id") == job["job_id"]]
    last = next((e["data"] for e in reversed(events) if "train_loss" in (e.get("data") or {})), None)
    alive = trainer_alive(sub.lay)
    job.update(trainer_alive=alive, step=last["step"] if last else 0, train_loss=last["train_loss"] if last else None)
    if job["status"] in ("queued", "running") and not alive:
        job["note"] = "no trainer process: it was stopped (kill, crash); `touchvl finetune submit` resumes"
    return job


def cancel(sub: LocalSubmission, wait_s: float = 120.0) -> dict:
    job = disk.read_json(sub.job_path, {})
    if not job.get("job_id", "").startswith("local-"):
        raise StageError("no local job submitted yet")
    if job["status"] in TERMINAL:
        return job
    disk.write_json(sub.lay.cancel_request, {"job_id": job["job_id"], "requested_at": int(time.time())})
    deadline = time.monotonic() + wait_s
    while trainer_alive(sub.lay) and time.monotonic() < deadline:
        job = disk.read_json(sub.job_path, {})
        if job.get("status") in TERMINAL:
            return job
        time.sleep(0.2)
    if trainer_alive(sub.lay):
        log.warning("cancel requested; the trainer stops after its current step")
        return disk.read_json(sub.job_path, {})
    job = disk.read_json(sub.job_path, {})
    if job.get("status") in TERMINAL:
        return job
    # no trainer: nothing to stop, the record is the whole job
    sub.job_id = job["job_id"]
    steps = [e["data"]["step"] for e in read_events(sub.lay.events) if "train_loss" in (e.get("data") or {})]
    return sub.mark_cancelled(Events(sub.lay.events, job["job_id"]), max(steps, default=0))
