"""The TouchQA chat page: answerer choice, the offline answerer, every mode and provider (the official ``openai``
client against tests/openai_server.py), the page's turn function, the HTTP API through ``gradio_client`` against
the running app, ``qa ask``, and one real headless-Chromium run of the page."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
import yaml
from PIL import Image

from tasks import index
from touchvl.answering import OFFLINE_LABEL, adjective_votes, keyword_intent, offline_answer, resolve_backend
from touchvl.cli import main as touchvl_cli
from touchvl.errors import StageError
from touchvl.finetune.remote import serve_url
from touchvl.params import ParamsError, parse_params
from touchvl.qa import CLASSIFY_PROMPT
from touchvl.retrieval.index import Hit
from touchvl.ui.app import ChatState, api_answer, build_app, launch, respond
from touchvl.ui.service import (IMAGE_ONLY_QUESTION, ChatInputError, Conversation, TouchQAService, check_image,
                                image_data_url, resolve_mode)
from tests.browser import CHROMIUM_FLAGS, NO_BROWSER, chromium_path
from tests.conftest import build_indexed_pipeline
from tests.loopback import free_port
from tests.openai_server import ApiServer, ApiState

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-chat-test-0123456789abcdef"
CAPTIONS = ["rough, hard, grooved", "soft, squishy, woven", "smooth, glossy, slippery, hard", "bumpy, firm, matte"]
REPLY = "It feels rough and hard, like fired brick."
SCREENSHOT = ROOT / "artifacts" / "tests" / "chat_page.png"


def updated(params, **sections):
    """``params`` with some keys of some sections replaced (``finetune={"provider": "azure"}``)."""
    return params.model_copy(update={name: getattr(params, name).model_copy(update=values)
                                     for name, values in sections.items()})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A small real pipeline (prepare, embed, projector, index) whose captions differ by item."""
    tmp = tmp_path_factory.mktemp("chat")
    return updated(build_indexed_pipeline(tmp, CAPTIONS, 20),
                   finetune={"out_dir": tmp / "ft", "max_retries": 0, "timeout_s": 10})


@pytest.fixture(scope="module")
def offline(pipeline):
    return TouchQAService(updated(pipeline, chat={"provider": "offline"}))


@pytest.fixture
def no_keys(monkeypatch):
    for var in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "LOCAL_MODEL_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def _manifest(params) -> pd.DataFrame:
    return pd.read_csv(params.prepare.out_dir / "manifest.csv", keep_default_na=False)


def _query(params) -> tuple[str, int]:
    row = _manifest(params).query("copy == 0").iloc[0]
    return row["tac_path"], int(row["sensor_id"])


def _hit(score, caption, source=1):
    return Hit(source * 1000, score, source, caption, f"t{source}.jpg", f"r{source}.jpg")


# ----------------------------------------------------------------------------- pure functions


def test_keyword_intents_and_the_offline_answer_for_each_intent():
    assert keyword_intent("What does this feel like?") == "describe"
    assert keyword_intent("What material is this made of?") == "identify_material"
    assert keyword_intent("Is it hard or soft?") == "property"
    assert keyword_intent("How does touch compare with the photo?") == "compare"
    assert keyword_intent("Tell me a story") == "other"
    hits = [_hit(0.9, "rough, hard, grooved", 1), _hit(0.8, "rough, soft", 2), _hit(0.5, "smooth, hard", 3)]
    # by summed cosine: rough 1.7, hard 1.4, then grooved 0.9, soft 0.8, smooth 0.5
    assert [w for w, _ in adjective_votes(hits)] == ["rough", "hard", "grooved", "soft", "smooth"]
    assert offline_answer("feel?", "describe", hits) == (
        "It most likely feels rough, hard, grooved, soft and smooth, judging by the 3 most similar reference "
        "surfaces (cosine 0.90 to 0.50).")
    assert offline_answer("hard?", "property", hits).startswith("hardness: hard; roughness: rough -- ")
    assert "describe feel, not materials" in offline_answer("material?", "identify_material", hits)
    assert offline_answer("photo?", "compare", hits).startswith("By touch it most likely feels rough, hard")
    assert offline_answer("glossy?", "other", hits, text_query=True).startswith("Surfaces described that way feel")
    assert "below index.search.min_cos" in offline_answer("feel?", "describe", [])


def test_answerer_choice_auto_falls_back_offline_named_providers_do_not(pipeline, no_keys, monkeypatch):
    p = pipeline
    backend = resolve_backend(p)  # chat.provider auto, finetune.provider openai, no key
    assert backend.offline and backend.reason == "OPENAI_API_KEY is not set" and OFFLINE_LABEL in backend.label
    named = resolve_backend(p, "openai")  # a named provider is used, and fails naming the key when asked
    assert (named.provider, named.model) == ("openai", p.qa.base_model)
    with pytest.raises(StageError, match="needs OPENAI_API_KEY"):
        named.client()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert (resolve_backend(p).provider, resolve_backend(p).model) == ("openai", p.qa.base_model)
    assert resolve_backend(p, model="gpt-4o-mini-2024-07-18").model == "gpt-4o-mini-2024-07-18"
    assert resolve_backend(updated(p, chat={"model": "m-from-params"})).model == "m-from-params"
    assert resolve_backend(p, "offline").offline
    compatible = updated(p, finetune={"provider": "compatible"})
    assert resolve_backend(compatible).reason == "finetune.base_url is not set"
    # model.json: used for the provider it was trained with, never sent to another one
    model_json = p.finetune.out_dir / "model.json"
    model_json.parent.mkdir(parents=True, exist_ok=True)
    model_json.write_text(json.dumps({"fine_tuned_model": "ft:gpt-4o:org:touch:1", "provider": "openai"}))
    try:
        assert resolve_backend(p).model == "ft:gpt-4o:org:touch:1"
        assert resolve_backend(p, "compatible").model == p.qa.base_model
        local = updated(p, finetune={"provider": "local"})
        assert "names no locally fine-tuned model" in resolve_backend(local).reason
        with pytest.raises(StageError, match="provider local: .*model.json names no locally fine-tuned model"):
            resolve_backend(local, "local")
        model_json.write_text(json.dumps({"fine_tuned_model": "local-touch", "provider": "local", "model_dir": "m"}))
        assert (resolve_backend(local).provider, resolve_backend(local).model) == ("local", "local-touch")
    finally:
        model_json.unlink()


def test_chat_params_are_typed_and_unknown_keys_fail():
    chat = parse_params({}).chat
    assert (chat.host, chat.port, chat.provider) == ("127.0.0.1", 7860, "auto")
    with pytest.raises(ParamsError, match=r"unknown key 'chat\.prot'"):
        parse_params({"chat": {"prot": 8000}})
    with pytest.raises(ParamsError, match=r"'chat\.provider'"):
        parse_params({"chat": {"provider": "anthropic"}})
    with pytest.raises(ParamsError, match=r"'chat\.max_image_mb'"):
        parse_params({"chat": {"max_image_mb": 0}})


def test_images_are_checked_against_the_caps_and_must_decode(tmp_path):
    chat = parse_params({"chat": {"max_image_mb": 0.01, "max_image_pixels": 100 * 100}}).chat
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "ok.png")
    assert check_image(tmp_path / "ok.png", chat) == tmp_path / "ok.png"
    Image.new("RGB", (200, 200)).save(tmp_path / "wide.png")
    with pytest.raises(ChatInputError, match=r"wide.png has too many pixels \(image_too_large: 200x200 = 40000 pixels "
                                                r"> chat.max_image_pixels=10000"):
        check_image(tmp_path / "wide.png", chat)
    (tmp_path / "big.jpg").write_bytes(os.urandom(20_000))
    with pytest.raises(ChatInputError, match=r"big.jpg is 0.0191 MB, over the 0.01 MB cap \(chat.max_image_mb\)"):
        check_image(tmp_path / "big.jpg", chat)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ChatInputError, match=r"tactile image notes.jpg: not a decodable image \(corrupt_image: not an image file"):
        check_image(tmp_path / "notes.jpg", chat)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ChatInputError, match=r"RGB photo cut.jpg: not a decodable image \(corrupt_image: OSError: Truncated File Read\)"):
        check_image(tmp_path / "cut.jpg", chat, "RGB photo")


def test_modes_resolve_and_say_what_is_missing():
    assert resolve_mode("auto", "feel?", True) == "image + question"
    assert resolve_mode("auto", "", True) == "image only"
    assert resolve_mode("auto", "glossy?", False) == "text only"
    assert resolve_mode("text only", "glossy?", True) == "text only"
    with pytest.raises(ChatInputError, match="upload a tactile image or type a question"):
        resolve_mode("auto", "", False)
    with pytest.raises(ChatInputError, match="'image only' needs a tactile image"):
        resolve_mode("image only", "x", False)
    with pytest.raises(ChatInputError, match="'image \\+ question' needs a question"):
        resolve_mode("image + question", "", True)
    with pytest.raises(ChatInputError, match="mode 'sideways' is not one of"):
        resolve_mode("sideways", "x", True)


# ----------------------------------------------------------------------------- the service, offline


def test_offline_service_answers_each_mode_with_its_evidence(offline, pipeline):
    image, sensor = _query(pipeline)
    manifest = _manifest(pipeline).set_index("uid")
    reply = offline.answer("What does this feel like?", image, sensor=sensor)
    assert (reply.mode, reply.intent, reply.k, reply.provider, reply.model) == ("image + question", "describe", 3,
                                                                                 "offline", None)
    assert len(reply.evidence) == 3 and [e.rank for e in reply.evidence] == [1, 2, 3]
    assert [e.cosine for e in reply.evidence] == sorted((e.cosine for e in reply.evidence), reverse=True)
    assert len({e.source_id for e in reply.evidence}) == 3  # augmented copies count once
    for e in reply.evidence:
        assert manifest.loc[e.uid, "caption"] == e.caption and Path(e.tac_path).is_file() and Path(e.rgb_path).is_file()
    assert reply.answer == offline_answer("What does this feel like?", "describe",
                                          [Hit(e.uid, e.cosine, e.source_id, e.caption, e.tac_path, e.rgb_path)
                                           for e in reply.evidence])
    assert OFFLINE_LABEL in reply.answerer
    material = offline.answer("What material is this?", image, sensor=sensor)
    assert material.intent == "identify_material" and len(material.evidence) == pipeline.qa.k_by_intent["identify_material"]
    only = offline.answer("ignored", image, sensor=sensor, mode="image only")
    assert (only.mode, only.question, only.intent) == ("image only", IMAGE_ONLY_QUESTION, "describe")
    assert [e.uid for e in only.evidence] == [e.uid for e in reply.evidence]  # the same image, the same neighbours
    text = offline.answer("soft, squishy, woven", mode="text only")
    assert text.mode == "text only" and text.evidence[0].caption == "soft, squishy, woven"
    assert offline.answer("soft, squishy, woven", image, mode="text only").evidence == text.evidence
    assert offline.answer("glossy and slippery?").mode == "text only"  # auto without an image
    with pytest.raises(ChatInputError, match="needs a tactile image"):
        offline.answer("feel?", mode="image only")
    with pytest.raises(ChatInputError, match="sensor 7 is not one of the projector's sensors 0..1"):
        offline.answer("feel?", image, sensor=7)


def test_a_conversation_keeps_its_images_between_turns(offline, pipeline):
    rows = _manifest(pipeline).query("copy == 0")
    first, second = rows["tac_path"].iloc[0], rows["tac_path"].iloc[1]
    conv = Conversation()
    one = offline.answer("What does this feel like?", first, rgb=rows["rgb_path"].iloc[0], conversation=conv)
    assert conv.tactile == first and conv.rgb == rows["rgb_path"].iloc[0] and len(conv.turns) == 1
    follow_up = offline.answer("And is it hard?", conversation=conv)  # no upload: the conversation's image
    assert follow_up.mode == "image + question" and follow_up.intent == "property"
    assert [e.uid for e in follow_up.evidence] == [e.uid for e in one.evidence]
    assert conv.turns == [("What does this feel like?", one.answer), ("And is it hard?", follow_up.answer)]
    offline.answer("What does this feel like?", second, conversation=conv)  # a new surface: its own photo or none
    assert conv.tactile == second and conv.rgb is None and len(conv.turns) == 3


# ----------------------------------------------------------------------------- providers on the test server


def _reply(req):
    if req["messages"][0]["content"] == CLASSIFY_PROMPT:
        return "describe"
    return REPLY


@pytest.fixture
def api(monkeypatch, no_keys):
    state = ApiState(KEY, chat_reply=_reply, models=("gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18", "local-touch"))
    with ApiServer(state) as server:
        yield server, state


def _answers(state):
    return [r for r in state.chat_requests if r["messages"][0]["content"] != CLASSIFY_PROMPT]


def _images(req):
    return [p["image_url"]["url"] for p in req["messages"][-1]["content"] if p["type"] == "image_url"]


def test_streamed_answer_carries_images_references_and_history(pipeline, api, monkeypatch):
    server, state = api
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    params = updated(pipeline, finetune={"provider": "compatible", "base_url": server.base_url})
    service = TouchQAService(params)
    rows = _manifest(params).query("copy == 0")
    conv = Conversation()
    replies = list(service.ask("What does this feel like?", conv, rows["tac_path"].iloc[0], rows["rgb_path"].iloc[0],
                               int(rows["sensor_id"].iloc[0])))
    assert replies[0].answer == "" and len(replies[0].evidence) == 3 and not replies[0].done  # evidence first
    growing = [r.answer for r in replies[1:-1]]
    assert len(growing) == len(REPLY.split()) and growing[-1].strip() == REPLY  # one update per streamed word
    assert all(b.startswith(a) for a, b in zip(growing, growing[1:]))
    final = replies[-1]
    assert final.done and final.streamed and final.answer == REPLY
    assert (final.provider, final.model) == ("compatible", params.qa.base_model) and final.answerer == \
        f"{params.qa.base_model} via compatible"
    req = _answers(state)[0]
    assert req["stream"] is True and req["model"] == params.qa.base_model
    urls = _images(req)
    assert len(urls) == 2 + 3 and all(u.startswith("data:image/jpeg;base64,") for u in urls)  # tactile, photo, 3 refs
    text = " ".join(p["text"] for p in req["messages"][-1]["content"] if p["type"] == "text")
    assert "tactile sensor (gel) image" in text and "RGB photo of the same surface" in text
    assert all(e.caption in text for e in final.evidence)
    list(service.ask("Is it hard?", conv))  # the earlier turn goes along as text, the images again
    second = _answers(state)[1]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][1]["content"] == "What does this feel like?" and second["messages"][2]["content"] == REPLY
    assert len(_images(second)) == 2 + 3


@pytest.mark.parametrize("provider", ["openai", "azure", "compatible", "local"])
def test_each_provider_answers_through_its_api(pipeline, api, monkeypatch, provider):
    server, state = api
    finetune = {"provider": provider}
    if provider == "openai":
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    elif provider == "azure":
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
        finetune["azure_endpoint"] = server.origin
    elif provider == "compatible":
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        finetune["base_url"] = server.base_url
    else:  # this time a server that refuses stream=true, as some OpenAI-compatible servers do
        monkeypatch.setenv("LOCAL_MODEL_API_KEY", KEY)
        state.streaming = False
        finetune["local"] = pipeline.finetune.local.model_copy(update={"serve_url": server.base_url})
        out = pipeline.finetune.out_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.json").write_text(json.dumps({"fine_tuned_model": "local-touch", "provider": "local",
                                                    "model_dir": str(out / "merged")}))
    try:
        service = TouchQAService(updated(pipeline, finetune=finetune))
        service.start()  # local: the server answers and serves local-touch, so nothing is started
        assert service.server is None
        image, sensor = _query(pipeline)
        reply = service.answer("What does this feel like?", image, sensor=sensor)
        second = service.answer("And now?", image, sensor=sensor)
    finally:
        (pipeline.finetune.out_dir / "model.json").unlink(missing_ok=True)
    expected_model = "local-touch" if provider == "local" else pipeline.qa.base_model
    assert (reply.answer, reply.provider, reply.model) == (REPLY, provider, expected_model)
    assert {r["model"] for r in state.chat_requests} == {expected_model}
    if provider == "azure":
        assert set(state.deployments) == {expected_model}  # /openai/deployments/<model>/chat/completions
    if provider == "local":  # refused once, answered without streaming, not asked to stream again
        assert not reply.streamed and not service.stream and state.statuses.count(400) == 1
        assert second.answer == REPLY
    else:
        assert reply.streamed and state.statuses.count(400) == 0


def _turn(service, question, tactile, mode="auto", state=None):
    return list(respond(service, question, tactile, None, "unknown", mode, state or ChatState()))


def _last_message(updates) -> str:
    return updates[-1][0][-1]["content"]


def test_actionable_errors_in_the_page_never_a_traceback(pipeline, api, monkeypatch, tmp_path, caplog):
    server, state = api
    image, _ = _query(pipeline)

    def check(params, tactile, expected):
        state.faults.latency_s = 1.0 if params.finetune.timeout_s < 1 else 0.0
        updates = _turn(TouchQAService(params), "What does this feel like?", tactile)
        message = _last_message(updates)
        assert message.startswith("⚠️ ") and re.search(expected, message), message
        assert updates[-1][2] == {"error": message.removeprefix("⚠️ ")} and updates[-1][4] == "What does this feel like?"
        assert "Traceback" not in json.dumps(updates[-1][:3], default=str)

    check(updated(pipeline, chat={"provider": "openai"}), image, "needs OPENAI_API_KEY in the environment")  # no key
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    compatible = {"provider": "compatible", "base_url": server.base_url}
    closed = f"http://127.0.0.1:{free_port()}/v1"
    check(updated(pipeline, finetune={**compatible, "base_url": closed}), image,
          f"compatible API at {closed}/chat/completions is unreachable \\(.*Connection refused\\)")
    check(updated(pipeline, finetune={**compatible, "timeout_s": 0.3}), image,
          "compatible API at .* did not answer in time \\(finetune.timeout_s\\)")
    check(updated(pipeline, finetune=compatible, chat={"model": "gpt-9"}), image,
          "compatible API error 404: The model `gpt-9` does not exist")
    (tmp_path / "photo.jpg").write_text("<html>not an image</html>")
    check(updated(pipeline, finetune=compatible), str(tmp_path / "photo.jpg"), "tactile image photo.jpg: not a decodable image")
    check(updated(pipeline, finetune=compatible, chat={"max_image_mb": 0.0001}), image,
          r"over the 0.0001 MB cap \(chat.max_image_mb\)")
    state.faults.latency_s = 0.0
    # the same lines when the (streamed) answer request fails after the question was classified
    for params, expected in ((updated(pipeline, finetune={**compatible, "base_url": closed}), "is unreachable"),
                             (updated(pipeline, finetune=compatible, chat={"model": "gpt-9"}), "error 404: .*gpt-9")):
        service = TouchQAService(params)
        monkeypatch.setattr(service.qa, "classify", lambda question: "describe")
        assert re.search(f"^⚠️ compatible API .*{expected}", _last_message(_turn(service, "feel?", image)))
    # a bug is one line too (its traceback goes to the server log only)
    service = TouchQAService(updated(pipeline, finetune=compatible))
    monkeypatch.setattr(service.qa, "retrieve", lambda *a, **k: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="touchvl.ui.app"):
        message = _last_message(_turn(service, "What does this feel like?", image))
    assert message == "⚠️ internal error (ZeroDivisionError: division by zero); the server log has the details"
    assert "Traceback" in caplog.text and "Traceback" not in message
    with pytest.raises(Exception, match="tactile image photo.jpg: not a decodable image"):
        api_answer(service, str(tmp_path / "photo.jpg"), "What?")


def test_the_page_turn_shows_the_images_answer_and_evidence_and_never_the_key(pipeline, api, monkeypatch, caplog):
    server, state = api
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    service = TouchQAService(updated(pipeline, finetune={"provider": "compatible", "base_url": server.base_url}))
    image, sensor = _query(pipeline)
    with caplog.at_level(logging.DEBUG):
        updates = list(respond(service, "What does this feel like?", image, None, str(sensor), "auto", ChatState()))
        messages, html_, reply, chat_state, textbox = updates[-1]
        follow = list(respond(service, "Is it hard?", image, None, str(sensor), "auto", chat_state))
    assert messages[0] == {"role": "user", "content": {"path": image, "alt_text": "tactile image"}}
    assert messages[1:] == [{"role": "user", "content": "What does this feel like?"},
                            {"role": "assistant", "content": REPLY}]
    assert textbox == "" and reply["answer"] == REPLY and len(reply["evidence"]) == 3
    assert html_.count('class="ev-thumb ev-tac"') == 3 and html_.count('class="ev-thumb ev-rgb"') == 3
    assert f"{pipeline.qa.base_model} via compatible" in html_ and "ev-offline" not in html_
    assert len(updates) >= 3  # evidence first, then streamed words
    assert [m["content"] for m in follow[-1][0][3:]] == ["Is it hard?", REPLY]  # same surface: no image again
    shown = json.dumps([u[:3] for u in updates + follow], default=str)
    assert KEY not in shown and KEY not in caplog.text


# ----------------------------------------------------------------------------- the running app


@pytest.fixture(scope="module")
def app_url(offline):
    app = build_app(offline.chat, offline)
    _, url, _ = launch(app, offline.chat, "127.0.0.1", free_port(), block=False)
    yield url
    app.close()


def _assert_evidence_json(reply: dict, params, direct) -> None:
    """The reply's evidence as JSON: what the service gives directly, each neighbour's caption and source id the
    manifest's, cosines ranked best first."""
    manifest = _manifest(params).set_index("uid")
    assert reply["evidence"] == direct.to_json()["evidence"] and len(reply["evidence"]) == reply["k"]
    assert [e["rank"] for e in reply["evidence"]] == list(range(1, reply["k"] + 1))
    assert [e["cosine"] for e in reply["evidence"]] == sorted((e["cosine"] for e in reply["evidence"]), reverse=True)
    for e in reply["evidence"]:
        assert (e["caption"], e["source_id"]) == (manifest.loc[e["uid"], "caption"], manifest.loc[e["uid"], "source_id"])
        assert isinstance(e["cosine"], float) and -1.0 <= e["cosine"] <= 1.0


def test_http_api_through_gradio_client(app_url, pipeline):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    assert "/answer" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    image, sensor = _query(pipeline)
    reply = client.predict(handle_file(image), "What does this feel like?", "auto", str(sensor), None, api_name="/answer")
    assert (reply["mode"], reply["intent"], reply["k"], reply["provider"]) == ("image + question", "describe", 3, "offline")
    assert len(reply["evidence"]) == 3 and set(reply["evidence"][0]) == {"rank", "uid", "source_id", "cosine", "caption",
                                                                      "tac_path", "rgb_path"}
    assert reply["answer"].startswith("It most likely feels") and OFFLINE_LABEL in reply["answerer"]
    offline_service = TouchQAService(updated(pipeline, chat={"provider": "offline"}))
    _assert_evidence_json(reply, pipeline, offline_service.answer("What does this feel like?", image, sensor=sensor))
    photo = _manifest(pipeline).query("copy == 0")["rgb_path"].iloc[0]  # the RGB photo of the same surface
    with_photo = client.predict(handle_file(image), "Is it hard or soft?", "image + question", str(sensor),
                                handle_file(photo), api_name="/answer")
    assert (with_photo["mode"], with_photo["intent"], with_photo["k"], with_photo["provider"], with_photo["model"]) == (
        "image + question", "property", 3, "offline", None)
    assert with_photo["answer"].startswith("hardness: ")
    _assert_evidence_json(with_photo, pipeline, offline_service.answer("Is it hard or soft?", image, rgb=photo, sensor=sensor))
    only = client.predict(handle_file(image), "", "image only", str(sensor), None, api_name="/answer")
    assert (only["mode"], only["question"], only["intent"], only["k"]) == ("image only", IMAGE_ONLY_QUESTION, "describe", 3)
    assert only["evidence"] == reply["evidence"]  # the same image, the same neighbours
    text = client.predict(None, "soft, squishy, woven", "text only", "unknown", None, api_name="/answer")
    assert text["mode"] == "text only" and text["evidence"][0]["caption"] == "soft, squishy, woven"
    bad = Path(pipeline.finetune.out_dir.parent / "bad.jpg")
    bad.write_text("nope")
    with pytest.raises(Exception, match="tactile image bad.jpg: not a decodable image"):
        client.predict(handle_file(str(bad)), "What?", "auto", "unknown", None, api_name="/answer")
    with pytest.raises(Exception, match="needs a tactile image"):
        client.predict(None, "What?", "image only", "unknown", None, api_name="/answer")
    assert not (ROOT / "tasks" / "chat.pyi").exists()  # gradio writes stubs for component subclasses: none here
    with pytest.raises(Exception, match="RGB photo bad.jpg: not a decodable image"):  # the photo is checked too
        client.predict(handle_file(image), "What?", "auto", "unknown", handle_file(str(bad)), api_name="/answer")


def test_http_api_with_the_compatible_provider_through_gradio_client(pipeline, api, monkeypatch):
    """The README's gradio_client call against the running app answering through an OpenAI-compatible server."""
    from gradio_client import Client, handle_file

    server, state = api
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    params = updated(pipeline, finetune={"provider": "compatible", "base_url": server.base_url})
    service = TouchQAService(params)
    app = build_app(params.chat, service)
    _, url, _ = launch(app, params.chat, "127.0.0.1", free_port(), block=False)
    try:
        row = _manifest(pipeline).query("copy == 0").iloc[0]
        reply = Client(url, verbose=False).predict(handle_file(row["tac_path"]), "What does this feel like?", "auto",
                                                   str(row["sensor_id"]), handle_file(row["rgb_path"]),
                                                   api_name="/answer")
    finally:
        app.close()
    assert (reply["answer"], reply["provider"], reply["model"], reply["answerer"]) == (
        REPLY, "compatible", params.qa.base_model, f"{params.qa.base_model} via compatible")
    assert (reply["mode"], reply["intent"], reply["k"], reply["done"]) == ("image + question", "describe", 3, True)
    offline_service = TouchQAService(updated(pipeline, chat={"provider": "offline"}))
    _assert_evidence_json(reply, pipeline, offline_service.answer("What does this feel like?", row["tac_path"],
                                                                  sensor=int(row["sensor_id"])))
    asked = _answers(state)[-1]
    urls = _images(asked)  # the tactile image, the RGB photo, then the K references' photos
    assert len(urls) == 2 + 3 and urls[1] == image_data_url(row["rgb_path"], params.chat.max_image_pixels)
    assert all(e["caption"] in json.dumps(asked) for e in reply["evidence"])


def test_real_browser_upload_ask_and_see_the_answer_and_evidence(app_url, pipeline, offline):
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip(NO_BROWSER)
    from playwright.sync_api import expect, sync_playwright

    image = _manifest(pipeline).query("copy == 0 and split == 'test'")["tac_path"].iloc[0]
    examples = offline.examples()
    with sync_playwright() as pw:
        # Playwright gives every launch a fresh temporary profile (its own --user-data-dir)
        browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            foreign: list[str] = []  # offline: the page may ask nothing of a host but ours (no CDN, no analytics)

            def only_loopback(route):
                if urlsplit(route.request.url).hostname == "127.0.0.1":
                    route.continue_()
                else:
                    foreign.append(route.request.url)
                    route.abort()

            page.route("**/*", only_loopback)
            page.on("websocket", lambda ws: foreign.append(ws.url) if urlsplit(ws.url).hostname != "127.0.0.1" else None)
            page.goto(app_url)
            expect(page.get_by_text("offline retrieval answerer").first).to_be_visible(timeout=30_000)
            expect(page.locator("#sensor")).to_be_visible()  # the projector has sensor tokens
            page.locator("#tactile input[type=file]").set_input_files(image)
            expect(page.locator("#tactile img").first).to_be_visible(timeout=15_000)
            photo = _manifest(pipeline).query("tac_path == @image")["rgb_path"].iloc[0]
            page.get_by_text("RGB photo (optional)").click()  # open the accordion
            page.locator("#rgb input[type=file]").set_input_files(photo)
            expect(page.locator("#rgb img").first).to_be_visible(timeout=15_000)
            page.locator("#question textarea").fill("What does this feel like?")
            page.locator("#question textarea").press("Enter")
            expect(page.locator("#chatbot").get_by_text("It most likely feels")).to_be_visible(timeout=30_000)
            expect(page.locator("#chatbot img")).to_have_count(2, timeout=10_000)  # the tactile image and the photo
            thumbs = page.locator("#evidence img.ev-thumb")
            expect(thumbs).to_have_count(2 * 3, timeout=10_000)  # K = 3 for a describe question: tactile + RGB each
            assert page.locator("#evidence .ev-intent").inner_text() == "describe"
            assert page.locator("#evidence .ev-k").inner_text() == "3"
            expect(page.locator("#evidence .ev-offline")).to_contain_text("offline retrieval answerer")
            for i in range(thumbs.count()):  # really decoded images, not broken links
                assert thumbs.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            # a new conversation from a one-click example (it sets the image and its sensor), image-only mode
            page.locator("#clear").click()
            expect(page.locator("#evidence img.ev-thumb")).to_have_count(0)
            page.locator("#examples tbody tr").first.click()
            expect(page.locator("#sensor input")).to_have_value(str(examples[0][1]))
            page.get_by_label("image only").check()
            page.locator("#question textarea").press("Enter")
            expect(page.locator("#chatbot").get_by_text("It most likely feels")).to_be_visible(timeout=30_000)
            expect(thumbs).to_have_count(2 * 3, timeout=10_000)
            assert page.locator("#evidence .ev-meta").first.inner_text().endswith("mode image only")
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
    assert foreign == [], f"the page asked hosts other than 127.0.0.1: {foreign}"


# ----------------------------------------------------------------------------- qa ask


def _ask(monkeypatch, capsys, *args) -> str:
    assert touchvl_cli(["-C", ".", "ask", *args]) == 0
    return capsys.readouterr().out


def test_qa_ask_prints_the_answer_with_its_evidence(pipeline, api, monkeypatch, capsys, tmp_path):
    server, _ = api
    raw = updated(pipeline, finetune={"base_url": server.base_url}).model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    image, sensor = _query(pipeline)
    out = _ask(monkeypatch, capsys, image, "What does this feel like?", "--sensor", str(sensor))
    lines = out.splitlines()
    assert lines[0].startswith("It most likely feels")
    assert lines[2] == f"answerer: {OFFLINE_LABEL} (OPENAI_API_KEY is not set)"  # no key: auto -> offline
    assert lines[3] == "intent: describe; top-3 evidence (cosine, source id, caption, images):"
    assert lines[4].startswith("  1. ") and " source " in lines[4] and Path(lines[5].split()[0]).is_file()
    assert "(offline asked for)" in _ask(monkeypatch, capsys, image, "feel?", "--offline")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = _ask(monkeypatch, capsys, image, "feel?", "--provider", "compatible", "--model", "gpt-4o-mini-2024-07-18",
               "--json")
    reply = json.loads(out)
    assert (reply["text"], reply["provider"], reply["model"]) == (REPLY, "compatible", "gpt-4o-mini-2024-07-18")
    assert reply["answerer"] == "gpt-4o-mini-2024-07-18 via compatible" and len(reply["evidence"]) == 3
    assert KEY not in out


def test_qa_ask_says_one_line_for_an_unreachable_or_silent_server_and_for_a_bomb_image(pipeline, tmp_path):
    """`touchvl ask` and its alias `python -m tasks.qa ask`, as a user runs them: a refused connection, a server that
    never answers (finetune.timeout_s) and a decompression bomb's header each end in one line on stderr, exit 1,
    no traceback; the bomb is image_too_large before any request is made."""
    import socket
    import subprocess
    import sys

    from tests.test_imagefile import png_header

    closed = f"http://127.0.0.1:{free_port()}/v1"
    silent = socket.socket()  # listens (the connection is accepted by the kernel) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    image, sensor = _query(pipeline)
    bomb = str(png_header(tmp_path / "bomb.png", 10_000, 10_000))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": KEY}

    def ask(base_url: str, *argv: str, modules=("touchvl",)) -> list[subprocess.CompletedProcess]:
        raw = updated(pipeline, finetune={"base_url": base_url, "timeout_s": 1.0, "max_retries": 0}).model_dump(mode="json")
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # what marks a project folder
        return [subprocess.run([sys.executable, "-m", module, "ask", *argv], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=120) for module in modules]

    try:
        # the alias once (the same code path: tests/test_cli.py compares the two); each case once through touchvl
        cases = [(ask(closed, image, "feel?", "--provider", "compatible", "--sensor", str(sensor),
                      modules=("touchvl", "tasks.qa")),
                  rf"^touchvl ask failed: compatible API at {closed}/chat/completions is unreachable \(.*Connection refused"),
                 (ask(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", image, "feel?", "--provider", "compatible"),
                  r"^touchvl ask failed: compatible API at .* did not answer in time \(finetune.timeout_s\)"),
                 (ask(closed, bomb, "feel?", "--provider", "compatible"),
                  r"^touchvl ask failed: tactile image .*bomb.png: image_too_large: 10000x10000 = 100000000 pixels > "
                  r"prepare.max_image_pixels=40000000")]
    finally:
        silent.close()
    for runs, expected in cases:
        for proc in runs:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
            assert len(lines) == 1 and re.search(expected, lines[0]), proc.stderr
            assert KEY not in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------- provider local: the page starts the server


@pytest.fixture(scope="module")
def local_finetune(tmp_path_factory):
    """A real (tiny) local fine-tune: (params.yaml's raw dict, its folder, the job); model.json names the merged model."""
    from tasks import finetune as finetune_stage
    from touchvl.finetune import contract, providers
    from touchvl.finetune.local import tiny as local_tiny
    from tests.finetune_local_fixtures import local_raw, write_image_dataset

    tmp = tmp_path_factory.mktemp("local")
    corpus = write_image_dataset(tmp / "jsonl/tactile_train.jsonl", 4)
    write_image_dataset(tmp / "jsonl/tactile_val.jsonl", 2, start=100)
    tiny = local_tiny.build_tiny_vlm(tmp / "base", local_tiny.dataset_texts(corpus))
    raw = local_raw(tmp, str(tiny), max_steps=2, checkpoint_every=10, serve_port=free_port())
    local = parse_params(raw)
    providers.approve(local, contract.dataset_files(local), confirm=lambda: True)
    job = finetune_stage.run(local)
    assert job["status"] == "succeeded"
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))  # what `touchvl finetune serve` reads
    return raw, tmp, job


def test_the_page_starts_the_local_fine_tuned_models_server_and_it_answers(pipeline, local_finetune, monkeypatch,
                                                                           no_keys):
    raw, tmp_path, job = local_finetune
    local = parse_params(raw)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = pipeline.model_copy(update={"finetune": local.finetune})
    service = TouchQAService(params, root=tmp_path)  # chat.provider auto: finetune.provider local, model.json local
    assert (service.backend.provider, service.backend.model) == ("local", job["fine_tuned_model"])
    service.start()
    try:
        assert service.server is not None and service.server.poll() is None  # nothing listened: started here
        again = TouchQAService(params, root=tmp_path)
        again.start()
        assert again.server is None  # running now: a second page starts nothing
        image, sensor = _query(pipeline)
        reply = service.answer("What does this feel like?", image, sensor=sensor)
    finally:
        service.stop()
    assert service.server is None
    assert (reply.provider, reply.model, reply.streamed) == ("local", job["fine_tuned_model"], True)
    assert isinstance(reply.answer, str) and len(reply.evidence) == params.qa.k_by_intent[reply.intent]
    served = (local.finetune.out_dir / "local/serve.log").read_text()
    # the answer came from the served model, streamed
    assert f"chat.completion (streamed): {1 + len(reply.evidence)} image(s)" in served


# ----------------------------------------------------------------------------- `touchvl chat`, a real process


def _chat_project(folder: Path, pipeline, finetune: dict) -> int:
    """A project folder whose params.yaml is the pipeline's, with ``finetune`` and a free chat port: the port."""
    port = free_port()
    raw = pipeline.model_dump(mode="json")
    raw["finetune"], raw["chat"] = finetune, {**raw["chat"], "port": port}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return port


def _touchvl_chat(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    for var in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "LOCAL_MODEL_API_KEY", "OPENAI_BASE_URL"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "touchvl", "-C", str(folder), "chat"], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_touchvl_chat_binds_loopback_and_sigterm_stops_it_and_the_model_server_it_started(pipeline, local_finetune,
                                                                                          tmp_path):
    import psutil

    raw, _, job = local_finetune
    port = _chat_project(tmp_path, pipeline, raw["finetune"])  # finetune.provider: local, chat.provider: auto
    model_url = serve_url(parse_params(raw).finetune)
    assert not _answers_http(model_url + "/models")  # no model server yet: the page must start one
    proc = _touchvl_chat(tmp_path)
    try:
        # bounded only so that a hang fails instead of blocking the suite (not a timing assertion)
        for _ in range(1200):
            if proc.poll() is not None or _answers_http(f"http://127.0.0.1:{port}/"):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1]
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]  # loopback only, the params port
        servers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "serve" in c.cmdline()]
        assert len(servers) == 1 and "finetune" in servers[0].cmdline()  # the page started the model server
        with urllib.request.urlopen(model_url + "/models", timeout=5) as resp:
            assert job["fine_tuned_model"] in resp.read().decode()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    gone, alive = psutil.wait_procs(servers, timeout=1)
    assert not alive  # stopped (and reaped) by the page on its way out
    assert not _answers_http(model_url + "/models") and not _answers_http(f"http://127.0.0.1:{port}/")


def test_a_sigterm_while_gradio_is_still_starting_is_the_same_clean_stop(pipeline, tmp_path, monkeypatch):
    """SIGTERM can land after gradio's server answers but before its wait (block_thread) takes Ctrl-C/SIGTERM over
    (a loaded machine widens that window; CI's fresh clone hit it: exit 130, "interrupted"). serve() then closes the
    page itself and returns as on any SIGTERM; the handler it replaced is back."""
    from touchvl.ui import app as app_module

    port = free_port()
    params = updated(pipeline, chat={"provider": "offline", "port": port})
    real_launch = app_module.launch
    started = []

    def launch_then_sigterm(app, chat, host=None, port=None, **kwargs):
        real_launch(app, chat, host, port, block=False)  # the server thread answers ...
        started.append(_answers_http(f"http://127.0.0.1:{chat.port}/"))
        os.kill(os.getpid(), signal.SIGTERM)  # ... and the signal comes before any wait
        time.sleep(30)  # the handler raises here
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(app_module, "launch", launch_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    app_module.serve(params, root=tmp_path)  # returns: no KeyboardInterrupt out of it
    assert started == [True] and not _answers_http(f"http://127.0.0.1:{port}/")
    assert signal.getsignal(signal.SIGTERM) is before


def test_touchvl_chat_says_in_one_line_when_the_local_model_server_cannot_start(pipeline, tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "model.json").write_text(json.dumps({"fine_tuned_model": "local-touch", "provider": "local",
                                                "model_dir": str(tmp_path / "deleted-model")}))
    finetune = {"provider": "local", "out_dir": str(out), "local": {"serve_port": free_port(), "device": "cpu"}}
    port = _chat_project(tmp_path / "project", pipeline, finetune)
    proc = _touchvl_chat(tmp_path / "project")
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"touchvl chat failed: the local model server exited at start: .*deleted-model.*"
                        r"cannot load the model to serve .*\(log: .*serve\.log\)", last), last
    assert not _answers_http(f"http://127.0.0.1:{port}/")


def test_real_browser_hides_the_sensor_picker_when_the_projector_has_no_sensor_tokens(pipeline, tmp_path):
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no headless Chromium: `apt-get install chromium` and `pip install playwright` (.ci/run does both)")
    from playwright.sync_api import expect, sync_playwright
    from tasks import train_projector

    # the same embeddings, a projector trained without sensor tokens (projector.num_sensors: 0), its own index
    params = updated(pipeline, chat={"provider": "offline"},
                     projector={"num_sensors": 0, "out_dir": tmp_path / "proj", "projected_dir": tmp_path / "projected",
                                "metrics": tmp_path / "m/projector.json", "history_dir": tmp_path / "m",
                                "headline": tmp_path / "m/retrieval.json"},
                     index={"out_dir": tmp_path / "index", "metrics": tmp_path / "m/index.json",
                            "build_report": tmp_path / "index/build.json", "gallery": tmp_path / "gallery.html"})
    train_projector.run_stage1(params)
    train_projector.run_stage2(params)
    index.run(params)
    service = TouchQAService(params)
    assert not service.uses_sensor_tokens
    app = build_app(params.chat, service)
    _, url, _ = launch(app, params.chat, "127.0.0.1", free_port(), block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                expect(page.locator("#tactile")).to_be_visible(timeout=30_000)
                expect(page.locator("#sensor")).to_be_hidden()
                page.locator("#tactile input[type=file]").set_input_files(_query(pipeline)[0])
                expect(page.locator("#tactile img").first).to_be_visible(timeout=15_000)
                page.locator("#question textarea").fill("What does this feel like?")
                page.locator("#question textarea").press("Enter")
                expect(page.locator("#evidence img.ev-thumb")).to_have_count(2 * 3, timeout=30_000)
            finally:
                browser.close()
    finally:
        app.close()
