"""A local Together AI fine-tuning API for the official ``together`` SDK in tests.

Written from Together's API reference and from what the SDK (together 3.1.1) actually sends:

* **Files** -- the SDK's upload is a signed-URL flow, not one multipart POST: ``POST /v1/files``
  (form fields ``purpose``, ``file_name``, ``file_type``, ``checksum`` = sha256) answers ``302`` with
  ``Location`` (a signed upload URL) and ``X-Together-File-Id``, or ``409 {"file_id": ...}`` when a
  file with that checksum and purpose is already there; the SDK ``PUT``s the bytes to the signed URL
  (no ``Authorization``: the signature in the query is the credential, as on S3; its errors are
  S3's XML) and then ``POST /v1/files/{id}/preprocess``, after which the file is listed and checked
  server-side (``processing_status`` PENDING -> COMPLETED, or INVALID_FORMAT with a
  ``validation_report``).  ``GET /v1/files``, ``GET /v1/files/{id}``.
* **Fine-tunes** -- ``GET /v1/fine-tunes/models/limits``, ``POST /v1/fine-tunes/estimate-price``
  (unavailable for multimodal data or unchecked files, as documented), ``POST /v1/fine-tunes``,
  ``GET /v1/fine-tunes`` (newest first), ``GET /v1/fine-tunes/{id}`` (the job advances one state per
  retrieve: pending -> queued -> running -> compressing -> uploading -> completed, or -> error with
  a ``job_error`` event, or cancel_requested -> cancelled), ``POST .../cancel``, ``GET .../events``
  (oldest first), ``GET .../checkpoints``; ``POST /v1/chat/completions`` (echo) for the base and
  the fine-tuned models.
* Bearer-key auth with the OpenAI-shaped error body Together returns (``{"error": {"message",
  "type", "param", "code"}}``); fault injection: 500s, 429 with ``retry-after``, latency, and
  responses dropped after the state change (POST and PUT).

``python -m tests.together_server --port 8777 --key K`` serves it standalone (for a by-hand run).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import math
import random
import re
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler

from tests.loopback import LoopbackServer

USER = "touch-tester"
STATES = ("pending", "queued", "running", "compressing", "uploading", "completed")
TERMINAL = ("completed", "error", "user_error", "cancelled")
FILE_PURPOSES = ("fine-tune", "calibration", "eval", "batch-api")


def model_limits(name: str, vision: bool = True, full: bool = True) -> dict:
    return {"model_name": name, "default_gradient_accumulation_steps": 1, "max_learning_rate": 1.0, "min_learning_rate": 1e-8,
            "max_num_checkpoints": 10, "max_num_epochs": 20, "max_num_evals": 100, "max_seq_length_sft": 32768,
            "max_seq_length_dpo": 16384, "min_max_seq_length": 512, "merge_output_lora": True, "supports_full_training": full,
            "supports_reasoning": False, "supports_tools": True, "supports_vision": vision,
            "lora_training": {"default_rank": 16, "max_rank": 64, "min_batch_size": 8, "max_batch_size": 64,
                              "max_batch_size_dpo": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "full_training": {"min_batch_size": 8, "max_batch_size": 32, "max_batch_size_dpo": 16} if full else None}


@dataclass
class TogetherFaults:
    error_rate: float = 0.0  # 500 before acting
    rate_limit_rate: float = 0.0  # 429 with retry-after before acting
    drop_rate: float = 0.0  # act, then close the connection without answering (POST and PUT)
    latency_s: float = 0.0
    retry_after_s: float = 0.02
    seed: int = 0


@dataclass
class TogetherState:
    api_key: str
    faults: TogetherFaults = field(default_factory=TogetherFaults)
    models: dict = field(default_factory=lambda: {
        "Qwen/Qwen3-VL-8B-Instruct": model_limits("Qwen/Qwen3-VL-8B-Instruct"),
        "meta-llama/Llama-4-Scout-17B-16E-Instruct-VLM": model_limits("meta-llama/Llama-4-Scout-17B-16E-Instruct-VLM", full=False),
        "Qwen/Qwen3-8B": model_limits("Qwen/Qwen3-8B", vision=False)})
    files: dict[str, dict] = field(default_factory=dict)  # uploaded and preprocessed: listed
    pending: dict[str, dict] = field(default_factory=dict)  # POST /v1/files answered, not preprocessed yet
    file_bytes: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict] = field(default_factory=dict)
    events: dict[str, list] = field(default_factory=dict)
    fail_jobs: bool = False  # jobs end in 'error' with a job_error event
    checks_before_valid: int = 1  # file retrieves answered PENDING before the server-side check finishes
    credit_limit: float = 100.0  # estimate-price's user_limit; allowed_to_proceed when the estimate fits
    price_per_million: float = 0.48
    created_jobs: int = 0
    statuses: list[int] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # "METHOD path" of each answer dropped after acting
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, headers)
    secret: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.rng = random.Random(self.faults.seed)

    def uploaded_files(self) -> list[dict]:
        return list(self.files.values())


def iso(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(ts or time.time(), dt.timezone.utc).isoformat().replace("+00:00", "Z")


def check_jsonl(data: bytes) -> tuple[bool, str | None, int, bool]:
    """The server-side check of a fine-tune file: (valid, error, lines, multimodal)."""
    lines, multimodal = 0, False
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        lines += 1
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            return False, f"Invalid JSON on line {number}", lines, multimodal
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
            return False, f"Line {number}: expected a non-empty 'messages' list (conversational format)", lines, multimodal
        previous = None
        for message in obj["messages"]:
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("system", "user", "assistant", "tool"):
                return False, f"Line {number}: invalid role {role!r}", lines, multimodal
            if role == previous:
                return False, (f"Invalid role turns on line {number} of the input file. After the optional system message, "
                               "conversation roles must alternate between user/assistant/user/assistant."), lines, multimodal
            previous = role
            if isinstance(message.get("content"), list):
                multimodal |= any(isinstance(p, dict) and p.get("type") == "image_url" for p in message["content"])
    if not lines:
        return False, "File is empty", 0, False
    return True, None, lines, multimodal


def text_tokens(data: bytes) -> int:
    return math.ceil(len(data) / 4)


class TogetherHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "TogetherServer"

    def log_message(self, *args):
        pass

    # ---------------------------------------------------------------- responses
    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.server.state.statuses.append(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", uuid.uuid4().hex)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None, headers: dict | None = None):
        self._json(status, {"error": {"message": message, "type": type_, "param": param, "code": code}}, headers)

    def _s3_error(self, status: int, code: str, message: str):
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>").encode()
        self._send(status, body, "application/xml")

    def _drop(self) -> bool:
        state = self.server.state
        with state.lock:
            drop = self.command in ("POST", "PUT") and state.rng.random() < state.faults.drop_rate
        if drop:
            state.dropped.append(f"{self.command} {urllib.parse.urlsplit(self.path).path}")
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        return drop

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        state = self.server.state
        body = self._body()
        parsed = urllib.parse.urlsplit(self.path)
        state.requests.append((self.command, parsed.path, dict(self.headers)))
        if state.faults.latency_s:
            time.sleep(state.faults.latency_s)
        with state.lock:
            roll = state.rng.random()
        upload = parsed.path.startswith("/upload/")
        if roll < state.faults.error_rate:
            if upload:
                return self._s3_error(500, "InternalError", "We encountered an internal error. Please try again.")
            return self._error(500, "Internal server error", "server_error")
        if roll < state.faults.error_rate + state.faults.rate_limit_rate and not upload:
            wait = state.faults.retry_after_s
            return self._error(429, "You have exceeded the rate limit for your plan.", "rate_limit_exceeded",
                               "rate_limit_exceeded", headers={"retry-after": str(max(1, math.ceil(wait))),
                                                               "retry-after-ms": str(int(wait * 1000))})
        query = urllib.parse.parse_qs(parsed.query)
        if upload:  # the signed URL: the signature is the credential
            return self.put_upload(state, body, query, parsed.path.rsplit("/", 1)[1])
        if self.headers.get("Authorization") != f"Bearer {state.api_key}":
            return self._error(401, "Invalid API key provided. You can find your API key at "
                                    "https://api.together.xyz/settings/api-keys.", code="invalid_api_key")
        for pattern, method, handler in ROUTES:
            match = re.fullmatch(pattern, parsed.path)
            if match and method == self.command:
                return handler(self, state, body, query, *match.groups())
        return self._error(404, f"Unknown request URL: {self.command} {parsed.path}", code="not_found")

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    # ---------------------------------------------------------------- files
    def _file_obj(self, file_id: str, meta: dict) -> dict:
        obj = {"id": file_id, "object": "file", "created_at": meta["created_at"], "filename": meta["filename"],
               "bytes": meta["bytes"], "purpose": meta["purpose"], "FileType": meta["file_type"],
               "processing_status": meta["processing_status"], "Processed": meta["processing_status"] == "COMPLETED",
               "LineCount": meta.get("lines", 0)}
        if meta.get("report"):
            obj["validation_report"] = meta["report"]
        return obj

    def create_file(self, state, body, query):
        msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        if not msg.is_multipart():
            return self._error(400, "Expected a multipart/form-data body")
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True).decode()
                  for part in msg.iter_parts()}
        missing = [k for k in ("purpose", "file_name", "checksum") if not fields.get(k)]
        if missing:
            return self._error(400, f"Missing required field(s): {', '.join(missing)}", param=missing[0])
        if fields["purpose"] not in FILE_PURPOSES:
            return self._error(400, f"Invalid purpose {fields['purpose']!r}", param="purpose")
        file_type = fields.get("file_type", "jsonl")
        if file_type not in ("jsonl", "parquet", "csv"):
            return self._error(400, f"Invalid file_type {file_type!r}", param="file_type")
        with state.lock:
            same = [i for i, f in state.files.items() if f["checksum"] == fields["checksum"] and f["purpose"] == fields["purpose"]]
            if not same:
                file_id = "file-" + str(uuid.uuid4())
                state.pending[file_id] = {"filename": fields["file_name"], "purpose": fields["purpose"], "file_type": file_type,
                                          "checksum": fields["checksum"], "created_at": int(time.time()), "bytes": 0,
                                          "processing_status": None}
        if same:
            return self._json(409, {"message": "File already exists", "file_id": same[0]})
        expires = int(time.time()) + 3600
        signature = hmac.new(state.secret, f"{file_id}:{expires}".encode(), hashlib.sha256).hexdigest()
        location = f"{self.server.origin}/upload/{file_id}?{urllib.parse.urlencode({'expires': expires, 'signature': signature})}"
        if not self._drop():
            self._send(302, b"", "text/plain", {"Location": location, "X-Together-File-Id": file_id})

    def put_upload(self, state, body, query, file_id):
        if self.command != "PUT":
            return self._s3_error(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
        if self.headers.get("Authorization"):
            return self._s3_error(400, "InvalidArgument", "Only one auth mechanism allowed; only the X-Amz-Algorithm "
                                                          "query parameter, Signature query string parameter or the "
                                                          "Authorization header should be specified")
        expires = query.get("expires", ["0"])[0]
        expected = hmac.new(state.secret, f"{file_id}:{expires}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, query.get("signature", [""])[0]):
            return self._s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match "
                                                                "the signature you provided.")
        if int(expires) < time.time():
            return self._s3_error(403, "AccessDenied", "Request has expired")
        meta = state.pending.get(file_id)
        if meta is None:
            return self._s3_error(404, "NoSuchUpload", "The specified upload does not exist.")
        if hashlib.sha256(body).hexdigest() != meta["checksum"]:
            return self._s3_error(400, "BadDigest", "The Content-SHA256 you specified did not match what we received.")
        with state.lock:
            state.file_bytes[file_id] = body
            meta["bytes"] = len(body)
        if not self._drop():
            self._send(200, b"", "text/plain", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def preprocess(self, state, body, query, file_id):
        with state.lock:
            if file_id in state.files:
                meta = state.files[file_id]
            elif file_id in state.pending and file_id in state.file_bytes:
                meta = state.pending.pop(file_id)
                meta.update(processing_status="PENDING", checks=0)
                state.files[file_id] = meta
            else:
                meta = None
        if meta is None:
            return self._error(400, f"File {file_id} has no uploaded content", param="id")
        if not self._drop():
            self._json(200, self._file_obj(file_id, meta))

    def _check_progress(self, state, file_id):
        meta = state.files[file_id]
        if meta["processing_status"] != "PENDING":
            return
        meta["checks"] += 1
        if meta["checks"] < state.checks_before_valid:
            return
        valid, error, lines, multimodal = check_jsonl(state.file_bytes[file_id])
        meta.update(processing_status="COMPLETED" if valid else "INVALID_FORMAT", lines=lines, multimodal=multimodal,
                    report={"valid": valid, "file_id": file_id, "nlines": lines, "dataset_format": "CONVERSATION",
                            "dataset_is_multimodal": multimodal, "error": error,
                            "error_type": None if valid else "INVALID_FORMAT"})

    def list_files(self, state, body, query):
        self._json(200, {"object": "list", "data": [self._file_obj(i, f) for i, f in state.files.items()]})

    def get_file(self, state, body, query, file_id):
        if file_id not in state.files:
            return self._error(404, f"File {file_id} not found", code="file_not_found")
        with state.lock:
            self._check_progress(state, file_id)
        self._json(200, self._file_obj(file_id, state.files[file_id]))

    # ---------------------------------------------------------------- fine-tunes
    def limits(self, state, body, query):
        name = query.get("model_name", [""])[0]
        if name not in state.models:
            return self._error(404, f"Model {name} is not available for fine-tuning", code="model_not_found", param="model_name")
        self._json(200, state.models[name])

    def _usable_file(self, file_id, param):
        meta = self.server.state.files.get(file_id)
        if meta is None:
            return f"{param} {file_id} not found"
        if meta["processing_status"] == "INVALID_FORMAT":
            return f"{param} {file_id} failed validation: {meta['report']['error']}"
        if meta["processing_status"] != "COMPLETED":
            return f"{param} {file_id} has not been validated yet"
        return None

    def estimate(self, state, body, query):
        req = json.loads(body or b"{}")
        train = state.files.get(req.get("training_file"))
        if train is None:
            return self._error(400, f"training_file {req.get('training_file')} not found", param="training_file")
        val = state.files.get(req.get("validation_file")) if req.get("validation_file") else None
        for meta, role in ((train, "train"), (val, "eval")):
            if meta is not None and meta["processing_status"] != "COMPLETED":
                reason = f"{role}_file_invalid" if meta["processing_status"] == "INVALID_FORMAT" else f"{role}_file_not_validated"
                return self._json(200, {"estimation_available": False, "unavailable_reason": reason})
        if train.get("multimodal") or (val and val.get("multimodal")):
            return self._json(200, {"estimation_available": False, "unavailable_reason": "multimodal_dataset"})
        train_tokens = text_tokens(state.file_bytes[req["training_file"]]) * int(req.get("n_epochs") or 1)
        eval_tokens = text_tokens(state.file_bytes[req["validation_file"]]) * int(req.get("n_evals") or 0) if val else 0
        price = round((train_tokens + eval_tokens) * state.price_per_million / 1e6, 6)
        self._json(200, {"estimation_available": True, "estimated_total_price": price, "allowed_to_proceed": price <= state.credit_limit,
                         "user_limit": state.credit_limit, "estimated_train_token_count": train_tokens,
                         "estimated_eval_token_count": eval_tokens})

    def _truncated(self, job: dict) -> dict:
        keys = ("id", "status", "created_at", "updated_at", "user_id", "model", "model_output_name", "adapter_output_name",
                "training_file", "validation_file", "n_epochs", "n_evals", "n_checkpoints", "batch_size", "learning_rate",
                "lr_scheduler", "warmup_ratio", "max_grad_norm", "weight_decay", "suffix", "training_type", "training_method",
                "random_seed", "token_count", "total_price", "started_at", "packing", "max_seq_length")
        return {k: job.get(k) for k in keys}

    def create_job(self, state, body, query):
        req = json.loads(body or b"{}")
        model = req.get("model")
        if model not in state.models:
            return self._error(400, f"Model {model} is not supported for fine-tuning", param="model", code="invalid_model")
        limits = state.models[model]
        for param in ("training_file", "validation_file"):
            if param == "training_file" or req.get(param):
                problem = self._usable_file(req.get(param), param)
                if problem:
                    return self._error(400, problem, param=param)
        if not 1 <= int(req.get("n_epochs", 1)) <= limits["max_num_epochs"]:
            return self._error(400, f"n_epochs must be between 1 and {limits['max_num_epochs']}", param="n_epochs")
        suffix = req.get("suffix")
        if suffix and (len(suffix) > 40 or not re.fullmatch(r"[A-Za-z0-9._-]+", suffix)):
            return self._error(400, "suffix must be at most 40 characters of letters, digits, '.', '_' and '-'", param="suffix")
        training_type = req.get("training_type") or {"type": "Lora", "lora_r": limits["lora_training"]["default_rank"],
                                                     "lora_alpha": 2 * limits["lora_training"]["default_rank"]}
        if training_type["type"] == "Full" and not limits["supports_full_training"]:
            return self._error(400, f"Full fine-tuning is not supported for {model}", param="training_type")
        if training_type["type"] == "Lora" and training_type.get("lora_r", 0) > limits["lora_training"]["max_rank"]:
            return self._error(400, f"lora_r must be at most {limits['lora_training']['max_rank']}", param="training_type.lora_r")
        multimodal = any(state.files[f].get("multimodal") for f in (req["training_file"], req.get("validation_file")) if f)
        if multimodal and not limits["supports_vision"]:
            return self._error(400, f"Model {model} does not support vision data", param="model")
        job_id = "ft-" + str(uuid.uuid4())
        now = iso()
        base = model.split("/")[-1]
        output = f"{USER}/{base}-{suffix}-{job_id[3:11]}" if suffix else f"{USER}/{base}-{job_id[3:11]}"
        job = {**{k: v for k, v in req.items() if k not in ("wandb_key", "hf_api_token")},
               "id": job_id, "status": "pending", "created_at": now, "updated_at": now, "user_id": USER,
               "training_type": training_type, "model_output_name": output,
               "adapter_output_name": f"{output}-adapter" if training_type["type"] == "Lora" else None,
               "token_count": None, "total_price": None, "started_at": None, "queue_depth": 0, "epochs_completed": 0,
               "param_count": 8_000_000_000, "trainingfile_numlines": state.files[req["training_file"]].get("lines"),
               "trainingfile_size": state.files[req["training_file"]]["bytes"], "progress": None}
        with state.lock:
            state.jobs[job_id] = job
            state.events[job_id] = []
            state.created_jobs += 1
            self._event(job_id, "job_pending", "Fine tune request created")
        if not self._drop():
            self._json(200, self._truncated(job))

    def _event(self, job_id, type_, message, level="info", **extra):
        self.server.state.events[job_id].append({"object": "fine-tune-event", "created_at": iso(), "level": level,
                                                 "message": message, "type": type_, "param_count": None,
                                                 "token_count": None, "wandb_url": None, "hash": uuid.uuid4().hex[:12], **extra})

    def _advance(self, state, job):
        status = job["status"]
        if status in TERMINAL:
            return
        if status == "cancel_requested":
            job.update(status="cancelled", updated_at=iso())
            self._event(job["id"], "job_stopped", "Job stopped at user request")
            return
        nxt = STATES[STATES.index(status) + 1]
        if nxt == "compressing" and state.fail_jobs:
            job.update(status="error", updated_at=iso())
            self._event(job["id"], "job_error", "Training failed: CUDA out of memory at step 3 (try a smaller batch_size)",
                        level="error")
            return
        job.update(status=nxt, updated_at=iso())
        if nxt == "queued":
            self._event(job["id"], "job_start", "Job started")
        elif nxt == "running":
            tokens = text_tokens(state.file_bytes[job["training_file"]]) * int(job.get("n_epochs") or 1)
            job.update(started_at=iso(), token_count=tokens)
            self._event(job["id"], "training_start", "Training started", token_count=tokens)
            self._event(job["id"], "epoch_complete", "Epoch completed, at step 10", step=10, total_steps=10)
        elif nxt == "compressing":
            self._event(job["id"], "model_compressing", "Compressing output model")
        elif nxt == "uploading":
            self._event(job["id"], "model_uploading", "Uploading output model")
        elif nxt == "completed":
            job.update(total_price=int(job["token_count"] * state.price_per_million / 1e6 * 1e9), epochs_completed=job.get("n_epochs"))
            self._event(job["id"], "job_complete", f"Job finished at {iso()}", model_path=f"s3://together-ft/{job['id']}")

    def get_job(self, state, body, query, job_id):
        job = state.jobs.get(job_id)
        if job is None:
            return self._error(404, f"Fine-tune job {job_id} not found", code="not_found")
        with state.lock:
            self._advance(state, job)
            events = list(state.events[job_id])
        self._json(200, {**job, "events": events})

    def list_jobs(self, state, body, query):
        jobs = sorted(state.jobs.values(), key=lambda j: j["created_at"], reverse=True)
        self._json(200, {"data": [self._truncated(j) for j in jobs]})

    def cancel_job(self, state, body, query, job_id):
        job = state.jobs.get(job_id)
        if job is None:
            return self._error(404, f"Fine-tune job {job_id} not found", code="not_found")
        with state.lock:
            if job["status"] in TERMINAL:
                return self._error(400, f"Job {job_id} cannot be cancelled: it is {job['status']}", param="id")
            if job["status"] != "cancel_requested":
                job.update(status="cancel_requested", updated_at=iso())
                self._event(job_id, "cancel_requested", "Cancel requested")
        if not self._drop():
            self._json(200, self._truncated(job))

    def list_events(self, state, body, query, job_id):
        if job_id not in state.jobs:
            return self._error(404, f"Fine-tune job {job_id} not found", code="not_found")
        self._json(200, {"data": list(state.events[job_id])})

    def list_checkpoints(self, state, body, query, job_id):
        job = state.jobs.get(job_id)
        if job is None:
            return self._error(404, f"Fine-tune job {job_id} not found", code="not_found")
        data = [] if job["status"] != "completed" else [
            {"checkpoint_type": "Final Merged", "created_at": job["updated_at"], "path": f"{job['model_output_name']}",
             "step": 10, "checkpoint": "model"},
            {"checkpoint_type": "Final Adapter", "created_at": job["updated_at"], "path": f"{job['adapter_output_name']}",
             "step": 10, "checkpoint": "adapter"}]
        self._json(200, {"data": data})

    def chat(self, state, body, query):
        req = json.loads(body or b"{}")
        served = set(state.models) | {j["model_output_name"] for j in state.jobs.values() if j["status"] == "completed"}
        if req.get("model") not in served:
            return self._error(404, f"Unable to access model {req.get('model')}. Please visit https://api.together.ai/models "
                                    "to view the list of supported models.", code="model_not_available", param="model")
        last = req["messages"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last if p.get("type") == "text")
        self._json(200, {"id": uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()), "model": req["model"],
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f"echo: {text}"}}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})


ROUTES = [
    (r"/v1/files", "POST", TogetherHandler.create_file), (r"/v1/files", "GET", TogetherHandler.list_files),
    (r"/v1/files/([^/]+)", "GET", TogetherHandler.get_file),
    (r"/v1/files/([^/]+)/preprocess", "POST", TogetherHandler.preprocess),
    (r"/v1/fine-tunes/models/limits", "GET", TogetherHandler.limits),
    (r"/v1/fine-tunes/estimate-price", "POST", TogetherHandler.estimate),
    (r"/v1/fine-tunes", "POST", TogetherHandler.create_job), (r"/v1/fine-tunes", "GET", TogetherHandler.list_jobs),
    (r"/v1/fine-tunes/([^/]+)", "GET", TogetherHandler.get_job),
    (r"/v1/fine-tunes/([^/]+)/cancel", "POST", TogetherHandler.cancel_job),
    (r"/v1/fine-tunes/([^/]+)/events", "GET", TogetherHandler.list_events),
    (r"/v1/fine-tunes/([^/]+)/checkpoints", "GET", TogetherHandler.list_checkpoints),
    (r"/v1/chat/completions", "POST", TogetherHandler.chat),
]


class TogetherServer(LoopbackServer):
    def __init__(self, state: TogetherState, port: int = 0):
        super().__init__(TogetherHandler, state, port)

    @property
    def base_url(self) -> str:
        """What finetune.together.base_url takes (the SDK adds /v1)."""
        return self.origin


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.together_server")
    ap.add_argument("--port", type=int, default=8777)
    ap.add_argument("--key", required=True)
    ap.add_argument("--fail-jobs", action="store_true")
    args = ap.parse_args()
    server = TogetherServer(TogetherState(args.key, fail_jobs=args.fail_jobs), port=args.port)
    print(f"Together test server on {server.origin}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
