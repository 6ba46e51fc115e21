"""The TouchQA chat page: ask about a tactile image in a browser (``make chat``, http://127.0.0.1:7860).

    touchvl chat [--host H] [--port N]      # or: make chat

:func:`build_app` builds the gradio Blocks from the typed ``chat`` params and a
:class:`~touchvl.ui.service.TouchQAService`; everything it shows comes from plain functions here and in
tasks/qa_service.py (:func:`respond` is the chat turn, :func:`api_answer` the HTTP API), so they are tested
without a browser. The page: a tactile image (upload, drop, paste or one of the test-split examples), an
optional RGB photo, the sensor (when the projector has sensor tokens), the mode; the chat, streaming when the
provider streams; beside it the evidence (tactile and RGB thumbnails of the retrieved neighbours, caption,
cosine, source id), the detected intent, the top-K and who answered. Errors are chat messages, never tracebacks.

HTTP API (gradio's own): ``/answer`` takes (tactile image, question, mode, sensor, RGB photo) and returns the
answer and the evidence as JSON -- see the README for a ``gradio_client`` example.
"""
from __future__ import annotations

import html
import logging
import os
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no telemetry calls

import gradio as gr  # noqa: E402

from touchvl.answering import OFFLINE_LABEL  # noqa: E402
from touchvl.errors import StageError  # noqa: E402
from touchvl.params import ChatParams  # noqa: E402
from touchvl.retrieval.gallery import thumbnail  # noqa: E402
from touchvl.ui.service import MODES, ChatInputError, Conversation, Reply, TouchQAService  # noqa: E402

log = logging.getLogger(__name__)
UNKNOWN_SENSOR = "unknown"
CSS = """
#evidence table{border-collapse:collapse;width:100%}
#evidence td,#evidence th{padding:4px 6px;vertical-align:top;font-size:13px;border-bottom:1px solid #ddd;text-align:left}
#evidence img.ev-thumb{width:72px;height:72px;object-fit:cover;border-radius:4px;display:block}
#evidence .ev-meta{margin-bottom:6px;font-size:13px}
#evidence .ev-offline{background:#fff4d6;border:1px solid #e6c36a;border-radius:4px;padding:4px 6px;margin-bottom:6px}
#evidence .ev-error{color:#a40000}
"""
# system fonts: the default theme would ask the internet for its web fonts
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def image_upload(**kwargs) -> gr.Image:
    """A gr.Image (type filepath) that hands the uploaded file over untouched.

    gr.Image opens every upload with PIL before our code runs, so an undecodable or oversized file would fail inside
    gradio with its own generic error; here the file goes to :func:`touchvl.ui.service.check_image`, whose message
    (naming the file and the cap) is shown in the chat. The preprocess step is replaced on the instance: a subclass
    would make gradio write a ``.pyi`` stub next to this file at import.
    """
    image = gr.Image(type="filepath", **kwargs)
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None:
            return gradio_preprocess(payload)  # base64 data (webcam, clipboard): gradio decodes it to a file
        return str(payload.path)

    image.preprocess = preprocess
    return image


@dataclass
class ChatState:
    """One browser session: the conversation and the messages shown."""

    conversation: Conversation = field(default_factory=Conversation)
    messages: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- what the page shows


def sensor_value(choice) -> int | None:
    if choice in (None, "", UNKNOWN_SENSOR):
        return None
    try:
        return int(choice)
    except (TypeError, ValueError):
        raise ChatInputError(f"sensor {choice!r}: a sensor id (0, 1, ...) or '{UNKNOWN_SENSOR}'") from None


def evidence_html(reply: Reply | None, error: str | None = None) -> str:
    if reply is None:
        body = f'<div class="ev-meta ev-error">{html.escape(error)}</div>' if error else \
            '<div class="ev-meta">Ask a question: the retrieved reference surfaces appear here.</div>'
        return f'<div id="evidence-body">{body}</div>'
    who = html.escape(reply.answerer)
    meta = (f'<div class="ev-meta">intent <b class="ev-intent">{html.escape(reply.intent)}</b> · '
            f'top-<b class="ev-k">{reply.k}</b> · mode {html.escape(reply.mode)}'
            + (f' · <span class="ev-model">{who}</span>' if reply.provider != "offline" else "") + "</div>")
    if reply.provider == "offline":
        meta += f'<div class="ev-offline">{who}</div>'
    rows = "".join(
        f'<tr class="ev-row"><td>#{e.rank}</td>'
        f'<td><img class="ev-thumb ev-tac" src="{thumbnail(e.tac_path, 96)}" alt="tactile, uid {e.uid}"></td>'
        f'<td><img class="ev-thumb ev-rgb" src="{thumbnail(e.rgb_path, 96)}" alt="RGB, uid {e.uid}"></td>'
        f'<td>{html.escape(e.caption)}</td><td>{e.cosine:.3f}</td><td>{e.source_id}</td></tr>'
        for e in reply.evidence)
    table = ('<table><tr><th></th><th>tactile</th><th>RGB</th><th>caption</th><th>cosine</th><th>source id</th></tr>'
             f"{rows}</table>") if rows else '<div class="ev-meta">No reference surface above index.search.min_cos.</div>'
    error_line = f'<div class="ev-meta ev-error">{html.escape(error)}</div>' if error else ""
    return f'<div id="evidence-body">{meta}{error_line}{table}</div>'


def answer_message(reply: Reply) -> str:
    if reply.provider == "offline":
        return f"*{OFFLINE_LABEL.capitalize()}.*\n\n{reply.answer}"
    return reply.answer or "…"


def respond(service: TouchQAService, question: str, tactile: str | None, rgb: str | None, sensor, mode: str,
            state: ChatState):
    """One chat turn, as successive page updates: (messages, evidence HTML, evidence JSON, state, textbox)."""
    state = replace(state, messages=list(state.messages))
    conv = state.conversation
    shown_question = (question or "").strip()
    asked = {"role": "user", "content": shown_question or "(describe this surface)"}
    uploads = []  # shown once the service has accepted them (a file that does not decode is not displayed)
    if tactile and tactile != conv.tactile:
        uploads.append({"role": "user", "content": {"path": tactile, "alt_text": "tactile image"}})
    if rgb and rgb != conv.rgb:
        uploads.append({"role": "user", "content": {"path": rgb, "alt_text": "RGB photo"}})
    last: Reply | None = None
    try:
        for reply in service.ask(shown_question, conv, tactile, rgb, sensor_value(sensor), mode):
            if last is None:
                state.messages += uploads + [asked, {"role": "assistant", "content": answer_message(reply)}]
                ev = evidence_html(reply)
            state.messages[-1] = {"role": "assistant", "content": answer_message(reply)}
            last = reply
            yield state.messages, ev, reply.to_json(), state, ""
    except StageError as exc:  # bad image, no key, unreachable server, unknown model: say what to do
        error = str(exc)
    except Exception as exc:  # a bug: logged with its traceback on the server, one line in the page
        log.exception("chat turn failed")
        error = f"internal error ({type(exc).__name__}: {exc}); the server log has the details"
    else:
        return
    message = {"role": "assistant", "content": f"⚠️ {error}"}
    if last is None:
        state.messages += [asked, message]
    else:
        state.messages[-1] = message
    yield state.messages, evidence_html(last, error), {"error": error}, state, question


def api_answer(service: TouchQAService, tactile: str | None, question: str, mode: str = "auto", sensor=None,
               rgb: str | None = None) -> dict:
    """The HTTP API: one question, the answer with its evidence as JSON; errors as gradio errors (their text)."""
    try:
        return service.answer(question or "", tactile, rgb, sensor_value(sensor), mode or "auto").to_json()
    except StageError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception as exc:
        log.exception("api answer failed")
        raise gr.Error(f"internal error ({type(exc).__name__}: {exc})", print_exception=False) from None


# ----------------------------------------------------------------------------- the page


def build_app(chat: ChatParams, service: TouchQAService) -> gr.Blocks:
    sensors = [UNKNOWN_SENSOR] + [str(i) for i in range(service.num_sensors)]
    examples = service.examples()
    with gr.Blocks(title="TouchQA") as app:
        gr.Markdown("## TouchQA — ask how a surface feels\n"
                    f"Answerer: **{html.escape(service.status())}**")
        state = gr.State(ChatState())
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                tactile = image_upload(label="Tactile image", sources=["upload", "clipboard"],
                                      elem_id="tactile", height=220)
                with gr.Accordion("RGB photo (optional)", open=False):
                    rgb = image_upload(label="RGB photo", sources=["upload", "clipboard"],
                                      elem_id="rgb", height=180)
                sensor = gr.Dropdown(sensors, value=UNKNOWN_SENSOR, label="Sensor", elem_id="sensor",
                                     visible=service.uses_sensor_tokens,
                                     info="the projector has per-sensor tokens: pick the sensor that took the image")
                mode = gr.Radio(list(MODES), value="auto", label="Mode", elem_id="mode")
                if examples:
                    gr.Examples([[path, str(s) if service.uses_sensor_tokens else UNKNOWN_SENSOR] for path, s in examples],
                                inputs=[tactile, sensor], label="Examples (test split): click one", examples_per_page=8,
                                elem_id="examples")
            with gr.Column(scale=2, min_width=360):
                chatbot = gr.Chatbot(label="TouchQA", elem_id="chatbot", height=460, feedback_options=None)
                question = gr.Textbox(placeholder="What does this feel like?", show_label=False, elem_id="question",
                                      submit_btn=True)
                clear = gr.Button("New conversation", elem_id="clear", size="sm")
            with gr.Column(scale=2, min_width=360):
                gr.Markdown("### Evidence")
                evidence = gr.HTML(evidence_html(None), elem_id="evidence")
                with gr.Accordion("Reply as JSON", open=False):
                    reply_json = gr.JSON(elem_id="reply-json")

        def turn(q, t, r, s, m, st):
            yield from respond(service, q, t, r, s, m, st)

        question.submit(turn, [question, tactile, rgb, sensor, mode, state],
                        [chatbot, evidence, reply_json, state, question], api_visibility="private")
        clear.click(lambda: ([], evidence_html(None), None, ChatState(), ""), None,
                    [chatbot, evidence, reply_json, state, question], api_visibility="private")

        # the HTTP API for scripts: hidden inputs, JSON out
        with gr.Row(visible=False):
            api_tactile = image_upload(label="tactile image")
            api_question = gr.Textbox(label="question")
            api_mode = gr.Textbox(value="auto", label=f"mode: {' | '.join(MODES)}")
            api_sensor = gr.Textbox(value=UNKNOWN_SENSOR, label="sensor id or 'unknown'")
            api_rgb = image_upload(label="RGB photo (optional)")
            api_out = gr.JSON(label="answer and evidence")
            api_button = gr.Button()
        api_button.click(lambda t, q, m, s, r: api_answer(service, t, q, m, s, r),
                         [api_tactile, api_question, api_mode, api_sensor, api_rgb], api_out, api_name="answer")
    return app


def launch(app: gr.Blocks, chat: ChatParams, host: str | None = None, port: int | None = None,
           block: bool = True, allowed_paths: list[str] | None = None):
    return app.queue(default_concurrency_limit=2).launch(
        server_name=host or chat.host, server_port=port or chat.port, prevent_thread_lock=not block,
        share=False, ssr_mode=False, quiet=not block, max_file_size=int(chat.max_image_mb * 2**20),
        allowed_paths=allowed_paths, theme=THEME, css=CSS, footer_links=["api"])


def serve(params, host: str | None = None, port: int | None = None, root: Path | str = ".") -> None:
    """Serve the page until interrupted (``touchvl chat``; SIGTERM ends it like Ctrl-C).

    Whatever ends it -- Ctrl-C, SIGTERM, a port in use, a model server that fails its start, a bug -- a model
    server started here is stopped and the SIGTERM handler that was there before is put back.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks, one line each
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt  # what gradio's wait (block_thread) ends on, as on Ctrl-C

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    service = None
    try:
        service = TouchQAService(params, root=Path(root))
        service.start()  # provider local: the model server, started here if it is not running
        log.info("answerer: %s", service.status())
        app = build_app(params.chat, service)
        try:
            launch(app, params.chat, host, port)  # returns on Ctrl-C / SIGTERM once gradio waits
        except OSError as exc:
            raise StageError(f"cannot listen on {host or params.chat.host}:{port or params.chat.port}: {exc}") from None
        except KeyboardInterrupt:
            # arrived while gradio was still starting (its server may already answer, before its wait took over):
            # close it; a SIGTERM is then the same clean stop as once it waits (exit 0), a Ctrl-C says "interrupted"
            app.close()
            if not terminated:
                raise
    finally:
        if service is not None:
            service.stop()
        signal.signal(signal.SIGTERM, previous)

