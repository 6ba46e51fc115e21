"""The TouchQA service behind the chat page and its HTTP API: modes, conversation context, streaming, evidence.

No gradio here (tasks/chat.py turns these results into components), so every behaviour is testable as plain
function calls. One :class:`TouchQAService` holds the encoder, projector and index (loaded once) and the
answering :class:`~touchvl.answering.Backend`; :meth:`TouchQAService.ask` yields :class:`Reply` objects -- the
evidence first, then the answer growing as tokens arrive, then the final reply.

Modes: ``auto`` (image + question when there is a tactile image in the conversation, image only when there is no
question, text only when there is no image), ``image + question``, ``image only`` (describe the image) and
``text only`` (the question is embedded by ImageBind's text tower and searched among the captions' text
embeddings -- ``embeddings/embeddings_text``, indexed in memory at the first text question -- so a question about a
material finds the surfaces described that way; the RGB index is for images).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import openai

from touchvl import disk, imagefile
from touchvl.answering import OFFLINE, Backend, Completion, offline_answer, resolve_backend
from touchvl.errors import StageError
from touchvl.finetune.remote import KEY_VARS, serve_url
from touchvl.params import ChatParams, Params
from touchvl.qa import STYLE, TouchQAModel
from touchvl.retrieval.index import Hit, IndexMeta, Retriever, build_index, search_params

log = logging.getLogger(__name__)

MODES = ("auto", "image + question", "image only", "text only")
IMAGE_ONLY_QUESTION = "Describe how this surface feels to the touch."
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ChatInputError(StageError):
    """Something the person asking can fix: a missing or bad image, an empty question, a wrong mode."""


@dataclass(frozen=True)
class Evidence:
    rank: int
    uid: int
    source_id: int
    cosine: float
    caption: str
    tac_path: str
    rgb_path: str

    @classmethod
    def from_hit(cls, rank: int, hit: Hit) -> "Evidence":
        return cls(rank, hit.uid, hit.source_id, round(hit.score, 4), hit.caption, hit.tac_path, hit.rgb_path)


@dataclass(frozen=True)
class Reply:
    answer: str
    mode: str  # the mode used: image + question | image only | text only
    question: str
    intent: str
    k: int
    provider: str  # a finetune provider, or "offline"
    model: str | None
    answerer: str  # who answered, in words (the offline answerer says so)
    evidence: list[Evidence]
    done: bool = True
    streamed: bool = False

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Conversation:
    """What a chat keeps between turns: the surface's images and the question/answer pairs so far."""

    tactile: str | None = None
    rgb: str | None = None
    sensor: int | None = None
    tactile_sha: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)


def check_image(path: str | Path, chat: ChatParams, role: str = "tactile image") -> Path:
    """The file as it may be used: within the byte and pixel caps and decodable (touchvl.imagefile, the decode every
    consumer uses); otherwise a ChatInputError naming the code (``image_too_large``, ``corrupt_image``)."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ChatInputError(f"{role} {name}: cannot be read ({exc.strerror})") from None
    if size > chat.max_image_mb * 2**20:
        raise ChatInputError(f"{role} {name} is {size / 2**20:.3g} MB, over the {chat.max_image_mb:g} MB cap "
                             f"(chat.max_image_mb); upload a smaller image")
    try:
        imagefile.decode(path, chat.max_image_pixels, "chat.max_image_pixels")
    except imagefile.ImageRejected as exc:
        raise ChatInputError(image_problem(exc, f"{role} {name}")) from None
    return path


def image_problem(exc: imagefile.ImageRejected, what: str) -> str:
    """One line for a person: what is wrong with the image (its code included) and what to do."""
    if exc.reason == "image_too_large":
        return f"{what} has too many pixels (image_too_large: {exc.detail}); upload a smaller image"
    if exc.reason == "unreadable_image":
        return f"{what}: cannot be read ({exc.detail})"
    return f"{what}: not a decodable image ({exc.reason}: {exc.detail}); upload a JPEG, PNG or WEBP file"


def image_data_url(path: str | Path, max_pixels: int, max_side: int = 512) -> str:
    """A JPEG data URL of the image as the encoder sees it (touchvl.imagefile), at most ``max_side`` pixels a side."""
    try:
        return imagefile.jpeg_data_url(path, max_pixels, "chat.max_image_pixels", max_side=max_side)
    except imagefile.ImageRejected as exc:
        raise ChatInputError(image_problem(exc, f"image {Path(path).name}")) from None


def resolve_mode(mode: str, question: str, has_image: bool) -> str:
    if mode not in MODES:
        raise ChatInputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        if has_image:
            return "image + question" if question else "image only"
        if question:
            return "text only"
        raise ChatInputError("upload a tactile image or type a question")
    if mode in ("image + question", "image only") and not has_image:
        raise ChatInputError(f"mode '{mode}' needs a tactile image: upload one (or pick an example)")
    if mode in ("image + question", "text only") and not question:
        raise ChatInputError(f"mode '{mode}' needs a question")
    return mode


def chat_messages(question: str, intent: str, mode: str, hits: list[Hit], tactile: str | None, rgb: str | None,
                  history: list[tuple[str, str]], max_pixels: int = ChatParams().max_image_pixels) -> list[dict]:
    """The conversation for the chat model: earlier turns as text, this turn with the images and references."""
    if mode == "text only":
        system = ("You are a tactile perception assistant. No tactile image is given: ground your answer in the "
                  "reference surfaces retrieved for the question's words and their captions. ")
        intro = f"Question: {question}\nThe references below were retrieved for the words of the question."
    else:
        system = ("You are a tactile perception assistant. Ground your answer in the tactile image and the reference "
                  "surfaces with similar touch. ")
        intro = f"Question: {question}\nThe first image is a tactile sensor (gel) image of the surface."
    parts: list[dict] = [{"type": "text", "text": intro}]
    if mode != "text only":
        parts.append({"type": "image_url", "image_url": {"url": image_data_url(tactile, max_pixels), "detail": "low"}})
        if rgb:
            parts += [{"type": "text", "text": "The next image is an RGB photo of the same surface."},
                      {"type": "image_url", "image_url": {"url": image_data_url(rgb, max_pixels), "detail": "low"}}]
    for rank, hit in enumerate(hits, start=1):
        parts += [{"type": "text", "text": f"Reference {rank} (similarity {hit.score:.2f}) feels: {hit.caption}"},
                  {"type": "image_url", "image_url": {"url": image_data_url(hit.rgb_path, max_pixels, 256), "detail": "low"}}]
    messages = [{"role": "system", "content": system + STYLE[intent]}]
    for asked, answered in history:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return messages + [{"role": "user", "content": parts}]


def text_retriever(params: Params, catalog) -> Retriever:
    """Flat index over the captions' text embeddings (same encoder as the queries, checked by the retriever)."""
    vectors, ids = disk.read_vectors(params.embed.out_dir / "embeddings_text")
    fingerprint = disk.read_meta(params.embed.out_dir)["fingerprint"]
    meta = IndexMeta("text", "raw", ("raw",), vectors.shape[1], len(ids), fingerprint, None, "flat")
    return Retriever(build_index(vectors, ids, "flat"), meta, catalog.reset_index(drop=True))


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class TouchQAService:
    def __init__(self, params: Params, backend: Backend | None = None, client: openai.OpenAI | None = None,
                 root: Path | str = "."):
        """``root``: the project folder (params.yaml) a local model server is started in."""
        self.params, self.chat, self.root = params, params.chat, Path(root)
        self.backend_error: str | None = None
        if backend is None:
            try:
                backend = resolve_backend(params)
            except StageError as exc:  # shown in the page; retrieval still works
                self.backend_error = str(exc)
                backend = Backend(OFFLINE, None, params.finetune, "the configured provider cannot answer")
        self.backend = backend
        self.qa = TouchQAModel(params, client=client, backend=backend)
        projector = self.qa.encoder.projector
        self.num_sensors = projector.cfg.num_sensors if projector is not None else 0
        self.stream = self.chat.stream
        self.server: subprocess.Popen | None = None
        self._text_retriever: Retriever | None = None

    # ------------------------------------------------------------------ page furniture

    @property
    def uses_sensor_tokens(self) -> bool:
        return self.num_sensors > 0

    def examples(self) -> list[tuple[str, int]]:
        """(tactile image, sensor id) of the first ``chat.examples`` test-split originals."""
        catalog = self.qa.retriever.catalog
        test = disk.evaluation_rows(catalog).sort_index()
        return [(str(row.tac_path), int(row.sensor_id)) for row in test.head(self.chat.examples).itertuples()]

    def status(self) -> str:
        if self.backend_error:
            return f"answerer unavailable: {self.backend_error}"
        return self.backend.label

    # ------------------------------------------------------------------ the local model server

    def start(self) -> None:
        """provider local: make sure the fine-tuned model's server answers, starting it here if needed."""
        if self.backend.provider != "local" or self.backend_error:
            return
        url = serve_url(self.backend.finetune)
        if self._probe(url):
            return
        parts = urlsplit(url)
        if not self.chat.start_local_server:
            raise StageError(f"the local model server at {url} is not running: start it with `make serve-model` "
                             f"(or set chat.start_local_server: true)")
        if parts.hostname not in LOOPBACK:
            raise StageError(f"the local model server at {url} is not reachable, and the page starts one only on "
                             f"this machine (finetune.local.serve_url points at {parts.hostname})")
        log_path = self.backend.finetune.out_dir / "local" / "serve.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "touchvl", "-C", str(Path(self.root).resolve()), "finetune", "serve",
               "--host", parts.hostname, "--port", str(parts.port or 80)]
        log.warning("the local model server at %s is not running: starting `%s` (log: %s)", url, " ".join(cmd[1:]), log_path)
        with open(log_path, "ab") as out:
            # the package this page runs is the one the server imports (an installed touchvl may be another copy)
            self.server = subprocess.Popen(cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        atexit.register(self.stop)
        try:
            self._wait_ready(url, log_path)
        except BaseException:  # a timeout, a wrong model served, Ctrl-C while waiting: no server left behind
            self.stop()
            raise
        log.warning("local model server ready at %s", url)

    def _wait_ready(self, url: str, log_path: Path) -> None:
        deadline = time.monotonic() + self.chat.local_start_timeout_s
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise StageError(f"the local model server exited at start: {tail[0]} (log: {log_path})")
            if self._probe(url):
                return
            time.sleep(0.5)
        raise StageError(f"the local model server did not answer within {self.chat.local_start_timeout_s:g} s "
                         f"(chat.local_start_timeout_s; log: {log_path})")

    def _probe(self, url: str) -> bool:
        """True when the server answers and serves our model; False when nothing listens."""
        headers = {}
        if os.environ.get(KEY_VARS["local"]):
            headers["Authorization"] = f"Bearer {os.environ[KEY_VARS['local']]}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/models", headers=headers),
                                        timeout=2) as resp:
                served = [m["id"] for m in json.loads(resp.read()).get("data", [])]
        except urllib.error.HTTPError as exc:
            raise StageError(f"the model server at {url} answered {exc.code} to GET /models") from None
        except (urllib.error.URLError, OSError, ValueError):
            return False
        if self.backend.model not in served:
            raise StageError(f"the server at {url} serves {', '.join(served) or 'no model'}, not {self.backend.model}: "
                             f"stop it and restart with `make serve-model`")
        return True

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
        self.server = None

    # ------------------------------------------------------------------ answering

    def ask(self, question: str, conversation: Conversation, tactile: str | None = None, rgb: str | None = None,
            sensor: int | None = None, mode: str = "auto", k: int | None = None) -> Iterator[Reply]:
        """Replies for one turn: evidence first (empty answer), then the growing answer, then the final reply.

        ``tactile`` / ``rgb``: this turn's uploads (None keeps the conversation's). A new tactile image is a new
        surface: its RGB photo is replaced too. The conversation is updated only when the answer is complete.
        """
        if self.backend_error:
            raise StageError(self.backend_error)
        question = (question or "").strip()
        if tactile:
            tactile = str(check_image(tactile, self.chat, "tactile image"))
        if rgb:
            rgb = str(check_image(rgb, self.chat, "RGB photo"))
        new_surface = bool(tactile) and _sha256(tactile) != conversation.tactile_sha
        context_tactile = tactile or conversation.tactile
        context_rgb = rgb or (None if new_surface else conversation.rgb)
        used = resolve_mode(mode, question, bool(context_tactile))
        if sensor is not None and self.uses_sensor_tokens and not -1 <= sensor < self.num_sensors:
            raise ChatInputError(f"sensor {sensor} is not one of the projector's sensors 0..{self.num_sensors - 1}")
        if used == "image only":
            question, intent = IMAGE_ONLY_QUESTION, "describe"
        else:
            intent = self.qa.classify(question)
        k = k or self.params.qa.k_by_intent.get(intent, 3)
        if used == "text only":
            if self._text_retriever is None:
                self._text_retriever = text_retriever(self.params, self.qa.retriever.catalog)
            vector, space = self.qa.encoder.text(question)
            hits = self._text_retriever.search(vector, space, search_params(self.params.index, k))[0]
        else:
            hits = self.qa.retrieve(context_tactile, sensor, k)
        reply = Reply("", used, question, intent, k, self.backend.provider, self.backend.model, self.backend.label,
                      [Evidence.from_hit(rank, h) for rank, h in enumerate(hits, start=1)], done=False)
        yield reply
        if self.backend.offline:
            text = offline_answer(question, intent, hits, text_query=used == "text only")
            streamed = False
        else:
            history = conversation.turns[-self.chat.history_turns:] if self.chat.history_turns else []
            messages = chat_messages(question, intent, used, hits, context_tactile if used != "text only" else None,
                                     context_rgb if used != "text only" else None, history,
                                     self.chat.max_image_pixels)
            completion = Completion(self.backend, self.qa.client, messages, self.params.qa.max_tokens,
                                    self.params.qa.temperature, stream=self.stream)
            text = ""
            for piece in completion:
                text += piece
                yield replace(reply, answer=text)
            if completion.refused_stream:
                self.stream = False  # this server does not stream: do not ask it again
            text, streamed = text.strip(), completion.streamed
        if tactile:
            conversation.tactile, conversation.tactile_sha = tactile, _sha256(tactile)
        conversation.rgb, conversation.sensor = context_rgb, sensor
        conversation.turns.append((question, text))
        yield replace(reply, answer=text, done=True, streamed=streamed)

    def answer(self, question: str, tactile: str | None = None, rgb: str | None = None, sensor: int | None = None,
               mode: str = "auto", k: int | None = None, conversation: Conversation | None = None) -> Reply:
        """One turn, the final reply only (the HTTP API and scripts)."""
        reply = None
        for reply in self.ask(question, conversation or Conversation(), tactile, rgb, sensor, mode, k):
            pass
        return reply
