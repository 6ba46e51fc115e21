"""An OpenAI-compatible chat endpoint for the locally fine-tuned model (``finetune.provider: local``).

    touchvl finetune serve [--port N]      # or: make serve-model

Serves the merged model named in ``artifacts/finetune/model.json`` on 127.0.0.1, so TouchQA and the
evaluate stage reach it through the same ``openai`` client, only with another base URL:

* ``GET /v1/models``, ``GET /v1/models/{id}``;
* ``POST /v1/chat/completions``: system/user/assistant messages, content as a string or text and
  ``image_url`` parts (base64 data URLs; https URLs when ``serve_https_images``), ``max_tokens`` /
  ``max_completion_tokens``, ``temperature`` (0: greedy), ``top_p``, ``seed``, ``stop``; the reply is a
  ``chat.completion`` with ``usage``, or with ``stream: true`` server-sent ``chat.completion.chunk`` events
  as the tokens are generated, then ``data: [DONE]`` (``stream_options.include_usage`` adds the usage chunk);
* errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): 400 for a bad
  request, 401 for a wrong key (only when started with ``LOCAL_MODEL_API_KEY`` set), 404 for an
  unknown model or path.

Safe by default (:class:`ServerLimits`): it binds 127.0.0.1; images come only as ``data:`` URLs (``https:``
only when allowed, from public addresses; never ``file:`` or any other scheme, whatever its case or padding, so
the server reads no local file and is no oracle of which exist); request bodies and images are capped (413 /
400; an image whose header claims more than ``serve_max_image_pixels`` is 400 ``image_too_large``, not decoded);
POSTs must be ``application/json`` (415: a web page's form or ``text/plain`` post cannot reach the model); a Host
or Origin naming another host is refused (403: no DNS rebinding, no cross-site requests); a missing or malformed
``Content-Length`` is 411 / 400; idle and slow connections are dropped after ``serve_timeout_s``;
with ``LOCAL_MODEL_API_KEY`` set every request needs ``Authorization: Bearer <key>``.

Why not ``transformers serve``: it needs the ``serving`` extras and a model id per request; this
stdlib server is ~200 lines, answers with the error semantics the client expects, and is tested.
One request generates at a time (a lock): the model is one, the machine is the user's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from touchvl import disk, imagefile
from touchvl.chat.messages import read_image_url
from touchvl.devices import resolve_device
from touchvl.errors import StageError
from touchvl.finetune.local.data import convert_messages
from touchvl.finetune.remote import KEY_VARS, serve_url
from touchvl.params import FinetuneParams

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]
    images: list  # RGB PIL images, decoded once while the request was checked (touchvl.imagefile)
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 25_000_000
    timeout_s: float = 30.0
    https_images: bool = False
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, p: FinetuneParams) -> "ServerLimits":
        c = p.local
        return cls(int(c.serve_max_body_mb * 2**20), int(c.serve_max_image_mb * 2**20), c.serve_max_image_pixels,
                   c.serve_timeout_s, c.serve_https_images, tuple(c.serve_allowed_hosts))


def image_fetcher(limits: ServerLimits):
    """The only way a request's image URL is read: ``data:`` (size-capped before decoding), ``https:`` when
    allowed (public addresses, capped, timed out); every other scheme is refused without touching anything.
    Returns the decoded RGB image (touchvl.imagefile): a header over ``max_image_pixels`` is a 400
    ``image_too_large`` before any pixel is decoded, bytes that do not decode a 400 ``invalid_image_url``."""
    from touchvl.chat.fetch import FetchError, UrlFetcher, redact_urls

    def fetch(url: str, where: str) -> bytes:
        param = where.replace("request: ", "")
        text = url.strip() if isinstance(url, str) else ""
        scheme = text.split(":", 1)[0].lower() if ":" in text else ""
        if scheme == "data":
            payload = text.partition(",")[2]
            if len(payload) * 3 // 4 > limits.max_image_bytes:
                raise ApiError(400, f"The image is larger than this server accepts ({limits.max_image_bytes // 2**20} MB).",
                               param, "image_too_large")
        elif scheme == "https" and limits.https_images:  # public addresses only, redirects re-checked, one deadline
            try:
                data = UrlFetcher(deadline_s=limits.timeout_s, max_bytes=limits.max_image_bytes + 1)(text)
            except FetchError as exc:
                raise ApiError(400, f"{where}: {redact_urls(str(exc))}", param, "invalid_image_url") from None
            if len(data) > limits.max_image_bytes:
                raise ApiError(400, f"The image is larger than this server accepts ({limits.max_image_bytes // 2**20} MB).",
                               param, "image_too_large")
            return _decoded(data, where, param, limits)
        else:  # file:, FILE:, " file:", http:, ftp:, a bare path...: refused before anything is read
            accepted = "data: or https:" if limits.https_images else "data:"
            raise ApiError(400, f"image URLs must be {accepted} URLs (send the image as a base64 data URL).", param,
                           "invalid_image_url")
        try:
            data = read_image_url(text, where, allow_file=False, allow_http=False)
        except StageError as exc:
            raise ApiError(400, str(exc), param, "invalid_image_url") from None
        return _decoded(data, where, param, limits)

    return fetch


def _decoded(data: bytes, where: str, param: str, limits: ServerLimits):
    try:
        return imagefile.read_rgb(data, limits.max_image_pixels, "finetune.local.serve_max_image_pixels")
    except imagefile.ImageRejected as exc:
        if exc.reason == "image_too_large":
            raise ApiError(400, f"The image has more pixels than this server accepts ({exc.detail}).", param,
                           "image_too_large") from None
        raise ApiError(400, f"{where}: not a decodable image ({exc.reason}: {exc.detail})", param,
                       "invalid_image_url") from None


def parse_chat_request(body: bytes, limits: ServerLimits | None = None) -> ChatRequest:
    """Validate a chat completion request the way the API does: 400 naming the offending parameter."""
    try:
        req = json.loads(body or b"null")
    except ValueError:
        raise ApiError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(req, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    for key in ("model", "messages"):
        if key not in req:
            raise ApiError(400, f"Missing required parameter: '{key}'.", key, "missing_required_parameter")
    if not isinstance(req["model"], str):
        raise ApiError(400, "Invalid type for 'model': expected a string.", "model", "invalid_type")
    if not isinstance(req.get("stream", False), bool):
        raise ApiError(400, f"Invalid 'stream': {req['stream']!r}; expected a boolean.", "stream", "invalid_type")
    if req.get("n", 1) != 1:
        raise ApiError(400, "Only n=1 is supported by this server.", "n", "unsupported_value")

    try:
        messages, images, _ = convert_messages(req["messages"], "request", fetch=image_fetcher(limits or ServerLimits()))
    except StageError as exc:
        raise ApiError(400, str(exc).replace("request: ", ""), "messages", "invalid_value") from None
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ApiError(400, f"Invalid 'max_tokens': {max_tokens!r}; expected an integer >= 1.", "max_tokens", "invalid_value")
    temperature, top_p = req.get("temperature", 1.0), req.get("top_p", 1.0)
    for name, value, hi in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
        if not isinstance(value, (int, float)) or not 0 <= value <= hi:
            raise ApiError(400, f"Invalid '{name}': {value!r}; expected a number in [0, {hi}].", name, "invalid_value")
    stop = req.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    return ChatRequest(req["model"], messages, images, max_tokens, float(temperature), float(top_p), req.get("seed"), stop,
                       bool(req.get("stream")), include_usage)


class ChatModel:
    """The served model: processor + model loaded once; ``complete`` turns a request into text and usage."""

    def __init__(self, model_dir: Path | str, name: str, device: str = "auto", default_max_tokens: int = 256):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name, self.default_max_tokens = name, default_max_tokens
        self.device = resolve_device(device, "finetune.local.device")
        try:
            self.processor = AutoProcessor.from_pretrained(model_dir)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model_dir, dtype=torch.float32 if self.device == "cpu" else "auto").to(self.device).eval()
        except OSError as exc:
            raise StageError(f"{model_dir}: cannot load the model to serve ({exc})") from None
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.context = getattr(text_config, "max_position_embeddings", None)
        self.lock = threading.Lock()
        self.created = int(time.time())

    def _prepare(self, req: ChatRequest) -> tuple[dict, int, dict]:
        """Model inputs, prompt length and generate() arguments; a 400 when the prompt does not fit."""
        images = list(req.images)
        prompt = self.processor.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=[images] if images else None, return_tensors="pt").to(self.device)
        n_prompt = int(inputs["input_ids"].shape[1])
        max_new = req.max_tokens or self.default_max_tokens
        if self.context is not None:
            if n_prompt >= self.context:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                                    f"messages resulted in {n_prompt} tokens.", "messages", "context_length_exceeded")
            max_new = min(max_new, self.context - n_prompt)
        tok = self.processor.tokenizer
        sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p} if req.temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return inputs, n_prompt, dict(max_new_tokens=max_new, pad_token_id=tok.pad_token_id or tok.eos_token_id, **sampling)

    def _finish_reason(self, new: list[int]) -> str:
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        return "stop" if new and new[-1] in eos else "length"

    def complete(self, req: ChatRequest) -> dict:
        import torch

        inputs, n_prompt, generate_args = self._prepare(req)
        with self.lock, torch.inference_mode():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            out = self.model.generate(**inputs, **generate_args)
        new = out[0, n_prompt:].tolist()
        finish = self._finish_reason(new)
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        for s in req.stop:
            if s and s in text:
                text, finish = text[:text.index(s)], "stop"
        return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(new), "total_tokens": n_prompt + len(new)}}

    def stream(self, req: ChatRequest) -> Iterator[dict]:
        """``chat.completion.chunk`` objects as tokens are generated (the same text as :meth:`complete`).

        Errors a request can cause (context length) are raised here, before the first chunk, while the caller can
        still answer with a status code. Text that could begin a ``stop`` string is held back until it cannot; a
        stop string, or the generator being closed (the client went away), ends the generation.
        """
        inputs, n_prompt, generate_args = self._prepare(req)
        return self._chunks(req, inputs, n_prompt, generate_args)

    def _chunks(self, req: ChatRequest, inputs: dict, n_prompt: int, generate_args: dict) -> Iterator[dict]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        halt = threading.Event()

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def generate():
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(**inputs, **generate_args, streamer=streamer,
                                                        stopping_criteria=StoppingCriteriaList([Halt()]))
            except BaseException as exc:  # re-raised in the handler thread; the streamer must end all the same
                result["error"] = exc
                streamer.end()

        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        hold = max((len(s) for s in req.stop if s), default=1) - 1
        with self.lock:
            if req.seed is not None:
                torch.manual_seed(req.seed)
            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            try:
                yield chunk({"role": "assistant", "content": ""})
                text, sent, stopped = "", 0, False
                for piece in streamer:
                    text += piece
                    cut = min((text.index(s) for s in req.stop if s and s in text), default=None)
                    if cut is not None:
                        text, stopped = text[:cut], True
                        halt.set()
                    safe = len(text) if stopped else max(sent, len(text) - hold)
                    if safe > sent:
                        yield chunk({"content": text[sent:safe]})
                        sent = safe
                    if stopped:
                        break
                worker.join()
                if "error" in result:
                    raise result["error"]
                if sent < len(text):
                    yield chunk({"content": text[sent:]})
                new = result["out"][0, n_prompt:].tolist()
                yield chunk({}, "stop" if stopped else self._finish_reason(new))
                if req.include_usage:
                    yield {**chunk({}), "choices": [], "usage": {
                        "prompt_tokens": n_prompt, "completion_tokens": len(new), "total_tokens": n_prompt + len(new)}}
            finally:  # a stop string or a closed connection: end the generation before releasing the model
                halt.set()  # (the streamer's queue is unbounded: generate() never blocks on it)
                worker.join()

    def model_object(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "local"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    server: ModelServer

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def setup(self) -> None:
        self.timeout = self.server.limits.timeout_s  # socket timeout: idle keep-alive and trickling clients end
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def _send(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:16])
        self.end_headers()
        self.wfile.write(body)

    def _send_events(self, chunks: Iterator[dict]) -> None:
        """Server-sent events, one ``data:`` line per chunk, then ``[DONE]``; the connection then closes."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # no Content-Length: the stream ends with the connection
        self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:16])
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client closed the connection: closing the generator stops the generation
            log.info("stream closed by the client")
        except Exception as exc:  # the status line is sent: the error goes into the stream, as the API does
            log.exception("streamed request failed")
            body = ApiError(500, f"The server had an error processing your request: {exc}", type_="server_error").body()
            with contextlib.suppress(OSError):
                self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
        finally:
            chunks.close()

    def _read_body(self) -> bytes:
        """The body, read only when its declared length is sane; the whole read has one deadline."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.command == "POST":
                raise ApiError(411, "A Content-Length header is required.", code="length_required")
            return b""
        if not raw.strip().isdigit():
            raise ApiError(400, f"Invalid Content-Length header: {raw[:40]!r}.", code="invalid_content_length")
        length = int(raw)
        if length > self.server.limits.max_body_bytes:
            raise ApiError(413, f"The request body is larger than this server accepts "
                                f"({self.server.limits.max_body_bytes // 2**20} MB).", code="request_too_large")
        deadline = time.monotonic() + self.server.limits.timeout_s
        chunks, left = [], length
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError("request body too slow")
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                raise ApiError(400, "The request body ended before its Content-Length.", code="invalid_content_length")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _check_origin(self) -> None:
        """Only requests addressed to this server by a name it answers to, and never from another site."""
        allowed = self.server.allowed_hosts
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in allowed:
            raise ApiError(403, f"Host {host or '(none)'!r} is not served here.", code="forbidden_host")
        origin = self.headers.get("Origin")
        if origin is not None:
            netloc = origin.strip().lower().split("://", 1)[-1].rstrip("/")
            if netloc not in allowed:
                raise ApiError(403, "Cross-origin requests are not accepted.", code="forbidden_origin")
        if (self.headers.get("Sec-Fetch-Site") or "").lower() == "cross-site":
            raise ApiError(403, "Cross-site requests are not accepted.", code="forbidden_origin")
        if self.command == "POST":
            ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                raise ApiError(415, f"Content-Type must be application/json, not {ctype or '(none)'!r}.",
                               code="unsupported_media_type")

    def _handle(self) -> None:
        try:
            self._check_origin()
            body = self._read_body()
        except ApiError as exc:
            self.close_connection = True  # an unread or refused body must not be taken for the next request
            self._send(exc.status, exc.body())
            return
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        try:
            reply = self._route(body)
            if isinstance(reply, dict):
                self._send(200, reply)
            else:
                self._send_events(reply)
        except ApiError as exc:
            self._send(exc.status, exc.body())
        except Exception as exc:  # a bug must not kill the server; the client gets a 500 with the reason
            log.exception("request %s %s failed", self.command, self.path)
            self._send(500, ApiError(500, f"The server had an error processing your request: {exc}",
                                     type_="server_error").body())

    do_GET = do_POST = do_DELETE = _handle

    def _route(self, body: bytes) -> dict | Iterator[dict]:
        model = self.server.model
        key = self.server.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models" and self.command == "GET":
            return {"object": "list", "data": [model.model_object()]}
        if path.startswith("/v1/models/") and self.command == "GET":
            if path.removeprefix("/v1/models/") != model.name:
                raise self._unknown_model(path.removeprefix("/v1/models/"))
            return model.model_object()
        if path == "/v1/chat/completions" and self.command == "POST":
            req = parse_chat_request(body, self.server.limits)
            if req.model != model.name:
                raise self._unknown_model(req.model)
            if req.stream:
                log.info("chat.completion (streamed): %d image(s)", len(req.images))
                return model.stream(req)
            reply = model.complete(req)
            log.info("chat.completion: %d image(s), %d prompt + %d completion tokens", len(req.images),
                     reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"])
            return reply
        raise ApiError(404, f"Unknown request URL: {self.command} {path}.", code="unknown_url")

    def _unknown_model(self, name: str) -> ApiError:
        return ApiError(404, f"The model `{name}` does not exist or you do not have access to it "
                             f"(this server serves `{self.server.model.name}`).", "model", "model_not_found")


class ModelServer(ThreadingHTTPServer):
    """The endpoint; as a context manager it serves from a background thread (tests, notebooks)."""

    # close() ends every connection and joins its thread: no thread that ran torch outlives the server
    daemon_threads = False
    block_on_close = True

    def __init__(self, model: ChatModel, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 limits: ServerLimits | None = None):
        super().__init__((host, port), Handler)
        self.model, self.api_key = model, api_key
        self.limits = limits or ServerLimits()
        bound = self.server_address[1]
        names = {"127.0.0.1", "localhost", "[::1]", host.lower(), *(h.lower() for h in self.limits.allowed_hosts)}
        self.allowed_hosts = {f"{n}:{bound}" for n in names} | ({*names} if bound == 80 else set())
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()

    def close(self) -> None:
        """Stop accepting, end the open keep-alive connections, wait for their threads."""
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.server_close()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ModelServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.close()


def serve_finetuned(p: FinetuneParams, host: str | None = None, port: int | None = None) -> None:
    """Serve model.json's merged local model until interrupted."""
    info = disk.read_json(p.out_dir / "model.json", {})
    if info.get("provider") != "local" or not info.get("model_dir"):
        raise StageError(f"{p.out_dir / 'model.json'}: no locally fine-tuned model "
                         f"(set finetune.provider: local, approve, then `touchvl finetune submit`)")
    model = ChatModel(info["model_dir"], info["fine_tuned_model"], p.local.device, p.local.serve_max_tokens)
    try:
        server = ModelServer(model, host or p.local.serve_host, port or p.local.serve_port,
                             api_key=os.environ.get(KEY_VARS["local"]), limits=ServerLimits.from_params(p))
    except OSError as exc:
        raise StageError(f"cannot listen on {host or p.local.serve_host}:{port or p.local.serve_port}: {exc.strerror}") from None
    log.info("serving %s at %s (the client's base URL: finetune.local.serve_url, now %s); Ctrl-C stops",
             model.name, server.base_url, serve_url(p))
    signal.signal(signal.SIGTERM, _interrupt)  # kill / docker stop end it like Ctrl-C: connections closed, threads joined
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
