"""A local OpenAI-compatible server for the official ``openai`` client in tests.

Files (multipart upload, list, retrieve), fine-tuning jobs (validating_files -> queued -> running ->
succeeded | failed | cancelled, advanced one state per retrieve), events, checkpoints, list with
``after``/``limit``/``metadata[k]=v`` filters, cancel; models; chat completions (echo), also on Azure's
``/openai/deployments/{name}/chat/completions`` path and streamed as server-sent events
(``chat.completion.chunk`` deltas, then ``data: [DONE]``) for ``stream: true`` -- or refused with a 400 on
``param: stream``, as our local model server does, with ``streaming=False``.  Bearer-key auth (401 with
OpenAI's error body), and fault injection: 500s, 429 with ``retry-after``, latency, and responses dropped
after the state change.
"""
from __future__ import annotations

import json
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


@dataclass
class ApiFaults:
    error_rate: float = 0.0  # 500 before acting
    rate_limit_rate: float = 0.0  # 429 with retry-after before acting
    drop_rate: float = 0.0  # act, then close the connection without answering (POSTs only)
    get_drop_rate: float = 0.0  # close a GET's connection without answering (reads are idempotent: nothing acted)
    rate_limit_every: int = 0  # every Nth request is a 429 with retry-after (0: never)
    latency_s: float = 0.0
    seed: int = 0


@dataclass
class ApiState:
    api_key: str
    faults: ApiFaults = field(default_factory=ApiFaults)
    files: dict[str, dict] = field(default_factory=dict)
    file_bytes: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict] = field(default_factory=dict)
    events: dict[str, list] = field(default_factory=dict)
    fail_jobs: bool = False  # jobs end in 'failed' with an error
    models: tuple[str, ...] = ("gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18")
    created_jobs: int = 0
    handled: int = 0  # requests seen (the rate_limit_every counter)
    statuses: list[int] = field(default_factory=list)  # every status code answered
    chat_requests: list[dict] = field(default_factory=list)
    chat_reply: object = None  # optional callable(request) -> str; default echoes the last user text
    streaming: bool = True  # False: 400 on stream=true, param "stream"
    stream_delay_s: float = 0.0  # between streamed chunks
    deployments: list[str] = field(default_factory=list)  # Azure deployment names seen in chat paths
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.rng = random.Random(self.faults.seed)


STATES = ("validating_files", "queued", "running", "succeeded")


class ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "ApiServer"

    def log_message(self, *args):
        pass

    def _json(self, status: int, obj, headers: dict | None = None):
        body = json.dumps(obj).encode()
        self.server.state.statuses.append(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:12])
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None):
        self._json(status, {"error": {"message": message, "type": type_, "param": None, "code": code}}, headers)

    def _drop(self) -> bool:
        state = self.server.state
        with state.lock:
            drop = self.command == "POST" and state.rng.random() < state.faults.drop_rate
        if drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        return drop

    def _handle(self):
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if state.faults.latency_s:
            time.sleep(state.faults.latency_s)
        with state.lock:
            roll = state.rng.random()
            state.handled += 1
            nth_limited = bool(state.faults.rate_limit_every) and state.handled % state.faults.rate_limit_every == 0
            drop_get = self.command == "GET" and state.rng.random() < state.faults.get_drop_rate
        if drop_get:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if nth_limited:
            return self._error(429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded",
                               {"retry-after": "2", "retry-after-ms": "1234"})
        if roll < state.faults.error_rate:
            return self._error(500, "The server had an error while processing your request.", "server_error")
        if roll < state.faults.error_rate + state.faults.rate_limit_rate:
            return self._error(429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded",
                               {"retry-after": "0", "retry-after-ms": "10"})
        if self.headers.get("Authorization") != f"Bearer {state.api_key}" and self.headers.get("api-key") != state.api_key:
            return self._error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        parsed = urllib.parse.urlsplit(self.path)
        path = re.sub(r"^/openai", "", parsed.path)  # Azure's prefix
        path = re.sub(r"^/v1", "", path)
        query = urllib.parse.parse_qs(parsed.query)
        for pattern, method, handler in ROUTES:
            match = re.fullmatch(pattern, path)
            if match and method == self.command:
                return handler(self, state, body, query, *match.groups())
        return self._error(404, f"Unknown request URL: {self.command} {parsed.path}.", "invalid_request_error")

    do_GET = do_POST = do_DELETE = _handle

    # ------------------------------------------------------------------ routes
    def upload_file(self, state, body, query):
        msg = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        fields = {part.get_param("name", header="content-disposition"): part for part in msg.iter_parts()}
        file_part = fields.get("file")
        if file_part is None or "purpose" not in fields:
            return self._error(400, "Missing file or purpose.", "invalid_request_error")
        data = file_part.get_payload(decode=True)
        file_id = "file-" + uuid.uuid4().hex[:24]
        obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": file_part.get_filename(), "purpose": fields["purpose"].get_payload(decode=True).decode(),
               "status": "processed"}
        with state.lock:
            state.files[file_id] = obj
            state.file_bytes[file_id] = data
        if not self._drop():
            self._json(200, obj)

    def list_files(self, state, body, query):
        purpose = query.get("purpose", [None])[0]
        data = [f for f in state.files.values() if purpose in (None, f["purpose"])]
        self._json(200, {"object": "list", "data": data, "has_more": False})

    def create_job(self, state, body, query):
        req = json.loads(body or b"{}")
        if req.get("model") not in state.models:
            return self._error(400, f"Model {req.get('model')} is not available for fine-tuning or does not exist.",
                               "invalid_request_error", "model_not_available")
        if req.get("training_file") not in state.files:
            return self._error(400, f"invalid training_file: {req.get('training_file')}", "invalid_request_error", "invalid_file")
        job_id = "ftjob-" + uuid.uuid4().hex[:24]
        job = {"id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": req["model"],
               "training_file": req["training_file"], "validation_file": req.get("validation_file"),
               "status": "validating_files", "fine_tuned_model": None, "finished_at": None, "error": None,
               "hyperparameters": req.get("hyperparameters") or {"n_epochs": "auto"}, "method": req.get("method"),
               "metadata": req.get("metadata"), "seed": req.get("seed") or 0, "suffix": req.get("suffix"),
               "organization_id": "org-test", "result_files": [], "trained_tokens": None, "estimated_finish": None,
               "integrations": []}
        with state.lock:
            state.jobs[job_id] = job
            state.created_jobs += 1
            state.events[job_id] = []
        self._event(state, job_id, "Validating training file")
        if not self._drop():
            self._json(200, job)

    def _event(self, state, job_id, message, level="info", data=None):
        state.events[job_id].append({"id": "ftevent-" + uuid.uuid4().hex[:20], "object": "fine_tuning.job.event",
                                     "created_at": int(time.time()), "level": level, "message": message,
                                     "type": "metrics" if data else "message", "data": data or {}})

    def _advance(self, state, job):
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return
        nxt = STATES[STATES.index(job["status"]) + 1]
        if nxt == "succeeded" and state.fail_jobs:
            job.update(status="failed", finished_at=int(time.time()),
                       error={"code": "invalid_training_file", "message": "Training file has too few examples.", "param": "training_file"})
            self._event(state, job["id"], "Job failed: Training file has too few examples.", "error")
            return
        job["status"] = nxt
        if nxt == "running":
            self._event(state, job["id"], "Step 1/10: training loss=1.20", data={"step": 1, "train_loss": 1.2})
        if nxt == "succeeded":
            job.update(fine_tuned_model=f"ft:{job['model']}:org-test:{job.get('suffix') or 'ft'}:{job['id'][-8:]}",
                       finished_at=int(time.time()), trained_tokens=12345)
            self._event(state, job["id"], "The job has successfully completed")

    def get_job(self, state, body, query, job_id):
        job = state.jobs.get(job_id)
        if job is None:
            return self._error(404, f"Could not find fine tune: {job_id}", "invalid_request_error", "fine_tune_not_found")
        with state.lock:
            self._advance(state, job)
        self._json(200, job)

    def list_jobs(self, state, body, query):
        jobs = sorted(state.jobs.values(), key=lambda j: j["created_at"], reverse=True)
        for key, values in query.items():
            m = re.fullmatch(r"metadata\[(.+)\]", key)
            if m:
                jobs = [j for j in jobs if (j.get("metadata") or {}).get(m.group(1)) == values[0]]
        if "after" in query:
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(query["after"][0]) + 1:] if query["after"][0] in ids else []
        limit = int(query.get("limit", ["20"])[0])
        self._json(200, {"object": "list", "data": jobs[:limit], "has_more": len(jobs) > limit})

    def cancel_job(self, state, body, query, job_id):
        job = state.jobs.get(job_id)
        if job is None:
            return self._error(404, f"Could not find fine tune: {job_id}", "invalid_request_error", "fine_tune_not_found")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return self._error(400, f"Job {job_id} is already {job['status']}.", "invalid_request_error")
        job.update(status="cancelled", finished_at=int(time.time()))
        self._event(state, job_id, "Job cancelled")
        if not self._drop():
            self._json(200, job)

    def list_events(self, state, body, query, job_id):
        events = list(reversed(state.events.get(job_id, [])))  # newest first, as the API does
        limit = int(query.get("limit", ["20"])[0])
        self._json(200, {"object": "list", "data": events[:limit], "has_more": len(events) > limit})

    def list_checkpoints(self, state, body, query, job_id):
        job = state.jobs.get(job_id, {})
        data = [] if job.get("status") != "succeeded" else [{
            "id": "ftckpt-" + job_id[-8:], "object": "fine_tuning.job.checkpoint", "created_at": job["finished_at"],
            "fine_tuned_model_checkpoint": job["fine_tuned_model"] + ":ckpt-step-10", "fine_tuning_job_id": job_id,
            "step_number": 10, "metrics": {"step": 10, "train_loss": 0.42, "valid_loss": 0.51}}]
        self._json(200, {"object": "list", "data": data, "has_more": False})

    def list_models(self, state, body, query):
        models = list(state.models) + [j["fine_tuned_model"] for j in state.jobs.values() if j["fine_tuned_model"]]
        self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in models]})

    def chat(self, state, body, query):
        req = json.loads(body)
        models = set(state.models) | {j["fine_tuned_model"] for j in state.jobs.values() if j["fine_tuned_model"]}
        if req.get("model") not in models:
            return self._error(404, f"The model `{req.get('model')}` does not exist or you do not have access to it.",
                               "invalid_request_error", "model_not_found")
        if req.get("stream") and not state.streaming:
            return self._json(400, {"error": {"message": "stream=true is not supported by this server.",
                                              "type": "invalid_request_error", "param": "stream",
                                              "code": "unsupported_parameter"}})
        state.chat_requests.append(req)
        last = req["messages"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last if p.get("type") == "text")
        text = state.chat_reply(req) if state.chat_reply else f"echo: {text}"
        if req.get("stream"):
            return self._stream(state, req["model"], text)
        self._json(200, {"id": "chatcmpl-" + uuid.uuid4().hex[:12], "object": "chat.completion", "created": int(time.time()),
                         "model": req["model"], "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

    def deployment_chat(self, state, body, query, deployment):
        state.deployments.append(deployment)
        self.chat(state, body, query)

    def _stream(self, state, model: str, text: str):
        """Server-sent events as the API sends them: role first, a delta per word, the finish reason, [DONE]."""
        state.statuses.append(200)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # no Content-Length: the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:12], int(time.time())
        deltas = [{"role": "assistant", "content": ""}] + [{"content": w} for w in re.findall(r"\S+\s*", text)]
        for delta, finish in [(d, None) for d in deltas] + [({}, "stop")]:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(state.stream_delay_s)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


ROUTES = [
    (r"/files", "POST", ApiHandler.upload_file), (r"/files", "GET", ApiHandler.list_files),
    (r"/fine_tuning/jobs", "POST", ApiHandler.create_job), (r"/fine_tuning/jobs", "GET", ApiHandler.list_jobs),
    (r"/fine_tuning/jobs/([^/]+)", "GET", ApiHandler.get_job),
    (r"/fine_tuning/jobs/([^/]+)/cancel", "POST", ApiHandler.cancel_job),
    (r"/fine_tuning/jobs/([^/]+)/events", "GET", ApiHandler.list_events),
    (r"/fine_tuning/jobs/([^/]+)/checkpoints", "GET", ApiHandler.list_checkpoints),
    (r"/models", "GET", ApiHandler.list_models), (r"/chat/completions", "POST", ApiHandler.chat),
    (r"/deployments/([^/]+)/chat/completions", "POST", ApiHandler.deployment_chat),
]


class ApiServer(LoopbackServer):
    def __init__(self, state: ApiState):
        super().__init__(ApiHandler, state)

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"
