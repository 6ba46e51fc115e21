"""``finetune.provider: together``: Together AI's hosted fine-tuning of open vision-language models, through
the official ``together`` SDK, under the contract of :class:`touchvl.finetune.remote.Submission`.

* **Data:** the approved JSONL files as they are (OpenAI chat format, images as base64 data URLs),
  checked by the validator with Together's own rules (``target="together"``: tasks/jsonl_targets.py)
  at approval and again, on the exact bytes, before anything is uploaded.
* **Cost:** tokens as the validator counts them (o200k text + OpenAI's image formula: an estimate --
  Together counts with the model's tokenizer) x ``n_epochs`` plus validation tokens x ``n_evals``, at
  ``finetune.together.prices_per_million`` (Together's published per-token rates).  At submission
  the SDK's estimate-price endpoint is asked too (it answers only for text-only data) and a job it
  says exceeds the account's credit is not created.
* **Exactly once:** the files are uploaded under ``<dataset sha256 prefix>-<name>``; before every
  upload attempt the file list is searched for that name (the SDK's upload is three requests --
  POST /v1/files, PUT to a signed URL, POST .../preprocess -- any of which can lose its answer).
  Together jobs carry no metadata, so the job's ``suffix`` carries a tag of the dataset and the
  settings (``<finetune.suffix>-<tag>``) and a job is recognised by that suffix and its training
  file; job creation is never retried blindly (the client's retries are off for it; a lookup
  precedes each new attempt).  ``state.json`` is written before and after every remote step, so a
  rerun after kill -9 resumes the same job.  Every other call uses the SDK's own retries
  (``finetune.max_retries``: 408/409/429/5xx, connection errors; ``retry-after`` honoured).
* **Watching:** Together's states (pending, queued, running, compressing, uploading,
  cancel_requested, completed, error, user_error, cancelled) map onto ``job.json``'s
  queued / running / cancelling / succeeded / failed / cancelled, the raw one kept as
  ``provider_status``; events are logged once each; a failed job's error is its ``job_error`` event.
  On success ``model.json`` names the output model (served by Together; a fine-tuned model answers
  once it is deployed on an endpoint there) and ``checkpoints.json`` its checkpoints.

The key comes only from ``TOGETHER_API_KEY``; it is passed to the client and nowhere else.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import together
from together.lib import FileTypeError

from touchvl import disk
from touchvl.chat.validate import Summary, validate_file
from touchvl.errors import StageError
from touchvl.finetune.contract import TERMINAL, DatasetFiles
from touchvl.finetune.remote import Submission
from touchvl.params import FinetuneParams, Params, TogetherFinetuneParams

log = logging.getLogger(__name__)
for _name in ("together", "httpx"):  # request lines carry the signed upload URL: library logs stay at WARNING
    logging.getLogger(_name).setLevel(logging.WARNING)

KEY_VAR = "TOGETHER_API_KEY"
STATUS = {"pending": "queued", "queued": "queued", "running": "running", "compressing": "running", "uploading": "running",
          "cancel_requested": "cancelling", "completed": "succeeded", "error": "failed", "user_error": "failed",
          "cancelled": "cancelled"}
SUFFIX_MAX = 40  # Together's limit on the output model's suffix


def api_key() -> str:
    key = os.environ.get(KEY_VAR)
    if not key:
        raise StageError(f"finetune.provider=together needs {KEY_VAR} in the environment")
    return key


def make_client(p: FinetuneParams) -> together.Together:
    return together.Together(api_key=api_key(), base_url=p.together.base_url, max_retries=p.max_retries,
                             timeout=p.timeout_s)


def inference_url(p: FinetuneParams) -> str:
    """Together's OpenAI-compatible chat endpoint (TouchQA and evaluate use it through the ``openai`` client)."""
    return p.together.base_url.rstrip("/") + "/v1"


# -------------------------------------------------------------------------------------- plan and cost
def method(cfg: TogetherFinetuneParams) -> str:
    return "lora" if cfg.lora else "full"


def hyperparameters(p: FinetuneParams) -> dict:
    """What the job is created with (besides model, files and suffix)."""
    cfg = p.together
    out = {"n_epochs": cfg.n_epochs, "n_evals": cfg.n_evals, "n_checkpoints": cfg.n_checkpoints,
           "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size, "warmup_ratio": cfg.warmup_ratio,
           "max_seq_length": cfg.max_seq_length, "train_on_inputs": cfg.train_on_inputs, "train_vision": cfg.train_vision,
           "lora": cfg.lora, "random_seed": p.seed}
    if cfg.lora:
        out.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                   lora_trainable_modules=cfg.lora_trainable_modules)
    return out


def cost_estimate(train: Summary, val: Summary, cfg: TogetherFinetuneParams) -> dict:
    """Together bills tokens processed: training tokens x epochs + validation tokens x evaluations."""
    train_tokens = sum(t * c for t, c in train.tokens.items())
    val_tokens = sum(t * c for t, c in val.tokens.items())
    processed = train_tokens * cfg.n_epochs + val_tokens * cfg.n_evals
    price = cfg.prices_per_million.get(cfg.model, {}).get(method(cfg))
    return {"model": cfg.model, "method": method(cfg), "billed_tokens_per_epoch": train_tokens, "epochs": cfg.n_epochs,
            "epochs_setting": cfg.n_epochs, "validation_tokens": val_tokens, "evals": cfg.n_evals,
            "trained_tokens": processed, "price_per_million": price,
            "cost_usd": round(processed * price / 1e6, 4) if price is not None else None,
            "basis": ("tokens counted with o200k and OpenAI's image formula (Together counts with the model's own "
                      "tokenizer; the exact price is in the job after tokenization); rate from "
                      "finetune.together.prices_per_million" if price is not None else
                      f"no price for {cfg.model} ({method(cfg)}) in finetune.together.prices_per_million")}


def validation_summary(p: FinetuneParams, files: DatasetFiles, max_duplicate_fraction: float | None = 0.01) -> dict:
    """:func:`touchvl.finetune.contract.validation_summary` with Together's rules and prices, on the exact bytes."""
    cfg, out, summaries = p.together, {}, {}
    for role, path in (("train", files.train), ("val", files.val)):
        report = validate_file(path, model=cfg.model, target="together", max_duplicate_fraction=max_duplicate_fraction)
        summaries[role] = report.summary
        out[role] = {"path": str(path), "examples": report.summary.examples, "errors": len(report.errors),
                     "warnings": len(report.warnings), "first_error": report.errors[0].__dict__ if report.errors else None,
                     "images": sum(k * v for k, v in report.summary.images.items())}
    out["cost"] = cost_estimate(summaries["train"], summaries["val"], cfg)
    return out


def job_suffix(p: FinetuneParams, dataset_sha256: str) -> str:
    """``<finetune.suffix>-<tag>``: the tag (dataset + model + settings) is how a lost job creation is found again."""
    settings = json.dumps({"model": p.together.model, **hyperparameters(p)}, sort_keys=True)
    tag = hashlib.sha256(f"{dataset_sha256}:{settings}".encode()).hexdigest()[:8]
    suffix = f"{p.suffix}-{tag}" if p.suffix else tag
    if len(suffix) > SUFFIX_MAX or not re.fullmatch(r"[A-Za-z0-9._-]+", suffix):
        raise StageError(f"finetune.suffix {p.suffix!r}: with provider together it takes letters, digits, '.', '_', '-' "
                         f"and at most {SUFFIX_MAX - 9} characters (a 9-character tag is appended)")
    return suffix


def epoch(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return int(value.timestamp())
    with contextlib.suppress(TypeError, ValueError):
        return int(dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp())
    return None


def retryable(exc: Exception) -> bool:
    """Worth another attempt (after a lookup): no answer, a 5xx or a 429 -- including the SDK's upload steps,
    which raise plain ``APIStatusError`` whatever the status, and its PUT to the signed URL, which goes through
    httpx directly (its transport errors are not wrapped)."""
    if isinstance(exc, (together.APIConnectionError, httpx.TransportError)):
        return True
    return isinstance(exc, together.APIStatusError) and (exc.status_code >= 500 or exc.status_code == 429)


def error_message(exc: together.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, str):
        with contextlib.suppress(ValueError):
            body = json.loads(body)
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else inner or body.get("message")
        if message:
            return str(message)
    return exc.message


@contextlib.contextmanager
def api_errors():
    """4xx (bad key, unknown model, invalid parameter) stop with the server's own message, never a traceback."""
    try:
        yield
    except together.APIStatusError as exc:
        hint = f" (check {KEY_VAR})" if exc.status_code == 401 else ""
        raise StageError(f"together API error {exc.status_code}: {error_message(exc)}{hint}") from None
    except together.APIConnectionError as exc:
        raise StageError(f"together API unreachable ({type(exc).__name__}: {exc}); a rerun resumes") from None


# ------------------------------------------------------------------------------------------ submission
class TogetherSubmission(Submission):
    """Upload the two files, create the job once, poll it to a terminal state."""

    def __init__(self, params: Params, files: DatasetFiles, client: together.Together | None = None, sleep=time.sleep):
        super().__init__(params, client or make_client(params.finetune), files, sleep)
        self.cfg = self.p.together
        self.suffix = job_suffix(self.p, self.sha)
        # the same dataset with the same provider and settings resumes; anything else starts afresh
        if self.state.get("provider") != "together" or self.state.get("suffix") != self.suffix:
            self.state = {"dataset_sha256": self.sha, "provider": "together", "suffix": self.suffix, "files": {},
                          "seen_events": []}

    # ------------------------------------------------------------------ helpers
    def backoff(self, attempt: int, exc: Exception) -> None:
        wait = None
        if isinstance(exc, together.RateLimitError) or getattr(exc, "status_code", None) == 429:
            headers = exc.response.headers
            with contextlib.suppress(TypeError, ValueError):
                wait = float(headers.get("retry-after-ms")) / 1000
            if wait is None:
                with contextlib.suppress(TypeError, ValueError):
                    wait = float(headers.get("retry-after"))
        self.sleep(min(wait if wait is not None else self.cfg.retry_backoff_s * 2**attempt, 30.0))

    def staged(self, path: Path, name: str) -> Path:
        """The file under the name it is uploaded as (the SDK names the upload after the path): a symlink."""
        link = self.p.out_dir / "together" / "upload" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(path.resolve())
        except OSError:  # no symlinks on this filesystem: a copy of the bytes just validated
            shutil.copyfile(path, link)
        return link

    # ------------------------------------------------------------------ upload
    def find_file(self, name: str, size: int) -> str | None:
        for f in self.client.files.list().data:
            if f.filename == name and f.purpose == "fine-tune" and f.bytes == size and f.processing_status != "FAILED":
                return f.id
        return None

    def upload(self, role: str, path: Path) -> str:
        if role in self.state["files"]:
            return self.state["files"][role]
        name = f"{self.sha[:16]}-{path.name}"
        size = path.stat().st_size
        staged = self.staged(path, name)
        for attempt in range(self.p.max_retries + 1):
            file_id = self.find_file(name, size)
            if file_id:
                break
            try:
                file_id = self.client.with_options(max_retries=0).files.upload(staged, purpose="fine-tune", check=True).id
                break
            except FileTypeError as exc:
                raise StageError(f"{path}: the together SDK's file check refused it: {exc}") from None
            except (together.APIConnectionError, together.APIStatusError, httpx.TransportError) as exc:
                if not retryable(exc):
                    raise
                log.warning("upload of %s: %s; checking whether it arrived (attempt %d)", name, type(exc).__name__, attempt + 1)
                self.backoff(attempt, exc)
        else:
            raise StageError(f"could not upload {path} after {self.p.max_retries + 1} attempts")
        self.state["files"][role] = file_id
        self.save()
        return file_id

    def wait_checked(self, file_id: str, path: Path) -> dict:
        """Together checks an upload server-side; a job can only use a file that passed."""
        deadline = time.monotonic() + self.cfg.file_check_timeout_s
        interval = self.p.poll_interval_s
        while True:
            f = self.client.files.retrieve(file_id)
            report = f.validation_report
            if f.processing_status in (None, "COMPLETED"):
                return {"status": f.processing_status, "multimodal": getattr(report, "dataset_is_multimodal", None)}
            if f.processing_status in ("FAILED", "INVALID_FORMAT"):
                raise StageError(f"{path}: Together rejected the uploaded file {file_id} ({f.processing_status}): "
                                 f"{getattr(report, 'error', None) or 'no detail given'}")
            if time.monotonic() > deadline:
                raise StageError(f"{path}: Together's check of {file_id} is still {f.processing_status} after "
                                 f"{self.cfg.file_check_timeout_s:.0f} s (finetune.together.file_check_timeout_s); "
                                 "a rerun keeps waiting")
            self.sleep(interval)
            interval = min(interval * 1.5, self.p.poll_max_interval_s)

    # ------------------------------------------------------------------ job
    def check_limits(self, limits, images: int) -> None:
        cfg = self.cfg
        if images and not limits.supports_vision:
            raise StageError(f"finetune.together.model {cfg.model} does not take images ({images} in the training file)")
        if not cfg.lora and not limits.supports_full_training:
            raise StageError(f"finetune.together.lora: false, but {cfg.model} supports only LoRA fine-tuning")
        if cfg.n_epochs > limits.max_num_epochs:
            raise StageError(f"finetune.together.n_epochs {cfg.n_epochs} > {limits.max_num_epochs}, {cfg.model}'s maximum")
        if cfg.lora and cfg.lora_r and cfg.lora_r > limits.lora_training.max_rank:
            raise StageError(f"finetune.together.lora_r {cfg.lora_r} > {limits.lora_training.max_rank}, {cfg.model}'s maximum")

    def estimate(self, train_id: str, val_id: str) -> dict:
        cfg = self.cfg
        training_type = {"type": "Full"} if not cfg.lora else {
            "type": "Lora", "lora_r": cfg.lora_r or 0, "lora_alpha": int(cfg.lora_alpha or 2 * (cfg.lora_r or 0)),
            "lora_dropout": cfg.lora_dropout, "lora_trainable_modules": cfg.lora_trainable_modules}
        if cfg.lora and not cfg.lora_r:
            training_type = None  # the model's default rank: let the server pick, as the job will
        kwargs = {"training_type": training_type} if training_type else {}
        estimate = self.client.fine_tuning.estimate_price(
            training_file=train_id, validation_file=val_id, model=cfg.model, n_epochs=cfg.n_epochs, n_evals=cfg.n_evals,
            training_method={"method": "sft", "train_on_inputs": cfg.train_on_inputs}, **kwargs).model_dump()
        if estimate.get("estimation_available") and estimate.get("allowed_to_proceed") is False:
            raise StageError(f"Together estimates ${estimate.get('estimated_total_price')} for this job, over the account's "
                             f"credit limit (${estimate.get('user_limit')}): nothing was created")
        return estimate

    def find_job(self, train_id: str) -> str | None:
        for job in self.client.fine_tuning.list().data:
            if (job.training_file == train_id and job.suffix == self.suffix and job.model == self.cfg.model
                    and job.status not in ("cancelled", "cancel_requested")):
                return job.id
        return None

    def create_job(self) -> str:
        if self.state.get("job_id"):
            return self.state["job_id"]
        train_id = self.upload("train", self.files.train)
        val_id = self.upload("val", self.files.val)
        for file_id, path in ((train_id, self.files.train), (val_id, self.files.val)):
            self.wait_checked(file_id, path)
        limits = self.client.fine_tuning.model_limits(model_name=self.cfg.model)
        self.check_limits(limits, self.checked["train"]["images"])
        self.state["provider_estimate"] = self.estimate(train_id, val_id)
        self.state["status"] = "creating"
        self.save()
        cfg = self.cfg
        settings = hyperparameters(self.p)
        lora = {k: settings[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_trainable_modules") if k in settings}
        # creation is not idempotent: no blind client retry; after any failure, look before trying again
        for attempt in range(self.p.max_retries + 1):
            job_id = self.find_job(train_id)
            if job_id:
                log.info("resuming existing Together job %s for this dataset", job_id)
                break
            try:
                job = self.client.with_options(max_retries=0).fine_tuning.create(
                    training_file=train_id, validation_file=val_id, model=cfg.model, suffix=self.suffix,
                    n_epochs=cfg.n_epochs, n_evals=cfg.n_evals, n_checkpoints=cfg.n_checkpoints,
                    batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
                    max_seq_length=cfg.max_seq_length, train_on_inputs=cfg.train_on_inputs, train_vision=cfg.train_vision,
                    random_seed=self.p.seed, lora=cfg.lora, model_limits=limits, **lora)
                job_id = job.id
                break
            except ValueError as exc:  # the SDK's own parameter checks against the model's limits
                raise StageError(f"finetune.together: {exc}") from None
            except (together.APIConnectionError, together.APIStatusError) as exc:
                if not retryable(exc):
                    raise
                log.warning("job creation: %s; checking whether the job exists (attempt %d)", type(exc).__name__, attempt + 1)
                self.backoff(attempt, exc)
        else:
            raise StageError(f"could not create the Together fine-tuning job after {self.p.max_retries + 1} attempts")
        self.state.update(job_id=job_id, status="created", created_at=time.time())
        self.save()
        return job_id

    @staticmethod
    def event_key(event) -> str:
        raw = f"{event.created_at}|{event.type}|{event.message}|{getattr(event, 'step', None)}"
        return hashlib.sha1(raw.encode()).hexdigest()[:16]

    def events(self, job_id: str) -> list:
        return list(self.client.fine_tuning.list_events(job_id).data)  # oldest first

    def new_events(self, job_id: str) -> list:
        seen = set(self.state["seen_events"])
        fresh = [e for e in self.events(job_id) if self.event_key(e) not in seen]
        for event in fresh:
            log.info("job %s [%s] %s", job_id, event.level, event.message)
        self.state["seen_events"] += [self.event_key(e) for e in fresh]
        return fresh

    def failure(self, job_id: str) -> str:
        errors = [e.message for e in self.events(job_id) if e.type == "job_error" or e.level == "error"]
        return errors[-1] if errors else "no error event"

    def retrieve(self, job_id: str):
        return self.client.fine_tuning.retrieve(job_id)

    def job_status(self, job) -> str:
        return STATUS.get(job.status, job.status)

    def transient(self, exc: Exception) -> bool:
        return retryable(exc)

    def list_checkpoints(self, job_id: str) -> list[dict]:
        return [c.model_dump(mode="json") for c in self.client.fine_tuning.list_checkpoints(job_id).data]

    def write_job(self, job) -> None:
        status = STATUS.get(job.status, job.status)
        output = getattr(job, "x_model_output_name", None) or getattr(job, "output_name", None)
        disk.write_json(self.p.out_dir / "job.json", {
            "job_id": job.id, "status": status, "provider_status": job.status, "model": job.model,
            "fine_tuned_model": output if status == "succeeded" else None, "output_name": output,
            "adapter_output_name": getattr(job, "adapter_output_name", None),
            "created_at": epoch(job.created_at), "finished_at": epoch(job.updated_at) if status in TERMINAL else None,
            "trained_tokens": job.token_count, "error": {"message": self.failure(job.id)} if status == "failed" else None,
            "suffix": job.suffix if getattr(job, "suffix", None) else self.suffix, "dataset_sha256": self.sha,
            "provider": "together", "provider_estimate": self.state.get("provider_estimate")})

    def finish(self, job, checkpoints: list[dict] | None) -> dict:
        record = disk.read_json(self.p.out_dir / "job.json", {})
        if record["status"] == "succeeded":
            disk.write_json(self.p.out_dir / "checkpoints.json", checkpoints or [])
            disk.write_json(self.p.out_dir / "model.json", {
                "fine_tuned_model": record["fine_tuned_model"], "adapter": record["adapter_output_name"],
                "job_id": job.id, "base_model": job.model, "provider": "together", "base_url": inference_url(self.p)})
        elif record["status"] == "failed":
            raise StageError(f"fine-tuning job {job.id} failed: {record['error']['message']}")
        return record

    def run(self, wait: bool = True) -> dict:
        self.check_gate()
        with api_errors():
            self.create_job()
            return self.poll(wait)

    def checked_files(self) -> dict:
        return validation_summary(self.p, self.files, self.params.jsonl.max_duplicate_fraction)

    # -- the commands of an existing job (``touchvl finetune status | events | cancel``)
    def status(self) -> dict:
        self._job_id()
        with api_errors():
            return self.poll(wait=False)

    def event_lines(self) -> list[str]:
        job_id = self._job_id()
        with api_errors():
            return [f"{e.created_at} [{e.level}] {e.message}" for e in self.events(job_id)]

    def cancel(self) -> dict:
        job_id = self._job_id()
        with api_errors():
            job = self.client.fine_tuning.cancel(job_id)
        self.state["status"] = job.status
        self.save()
        self.write_job(job)
        return disk.read_json(self.p.out_dir / "job.json", {})
