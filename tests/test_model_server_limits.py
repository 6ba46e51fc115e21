"""The model server's input limits over real HTTP, with a stand-in model (the request checks run before any
generation, so no trained model is needed): the image pixel cap (``finetune.local.serve_max_image_pixels``) and the
API key (``LOCAL_MODEL_API_KEY``)."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from touchvl.finetune.server import ModelServer, ServerLimits
from touchvl.params import ParamsError, parse_params
from tests.test_imagefile import png_header

ROOT = Path(__file__).resolve().parents[1]


class StubModel:
    """What ModelServer needs of a model; the reply says what images reached it."""

    name = "ft:stub"
    created = 0

    def model_object(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "local"}

    def complete(self, req) -> dict:
        seen = [(img.mode, img.size, round(float(np.asarray(img).mean()), 1)) for img in req.images]
        return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(seen)},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client, url: str):
    return client.chat.completions.create(model=StubModel.name, messages=[{"role": "user", "content": [
        {"type": "text", "text": "feel?"}, {"type": "image_url", "image_url": {"url": url}}]}])


def test_the_image_pixel_cap_is_a_param_answered_400_image_too_large(tmp_path):
    params = parse_params({"finetune": {"local": {"serve_max_image_pixels": 5000}}})
    limits = ServerLimits.from_params(params.finetune)
    assert limits.max_image_pixels == 5000 and ServerLimits.from_params(parse_params({}).finetune).max_image_pixels == 25_000_000
    with pytest.raises(ParamsError, match=r"finetune\.local\.serve_max_image_pixels"):
        parse_params({"finetune": {"local": {"serve_max_image_pixels": 0}}})
    with ModelServer(StubModel(), limits=limits) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        # 64 x 64 = 4096 pixels: under the cap, decoded the way every consumer decodes (16-bit scaled, not white)
        ramp = np.rint(np.tile(np.linspace(0, 65535, 64), (64, 1))).astype(np.uint16)
        seen = json.loads(_ask(client, _png_url(Image.fromarray(ramp))).choices[0].message.content)
        assert seen == [["RGB", [64, 64], pytest.approx(127.5, abs=1)]]
        # 100 x 100 = 10,000 pixels: over it, refused before decoding
        with pytest.raises(openai.BadRequestError) as large:
            _ask(client, _png_url(Image.new("RGB", (100, 100), (10, 20, 30))))
        error = large.value.body
        assert (large.value.status_code, error["code"], error["param"]) == (400, "image_too_large", "messages[0].content[1]")
        assert "100x100 = 10000 pixels > finetune.local.serve_max_image_pixels=5000" in error["message"]
        # a decompression bomb's header (10,000 x 10,000 claimed in a few bytes): the same answer, whatever PIL's limit
        with pytest.raises(openai.BadRequestError) as bomb:
            _ask(client, "data:image/png;base64," + base64.b64encode(png_header(tmp_path / "b.png", 10_000, 10_000)
                                                                     .read_bytes()).decode())
        assert bomb.value.body["code"] == "image_too_large"
        with pytest.raises(openai.BadRequestError) as corrupt:
            _ask(client, "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode())
        assert corrupt.value.body["code"] == "invalid_image_url" and "corrupt_image" in corrupt.value.body["message"]


SERVE_WITH_STUB = r"""
import sys
from touchvl.finetune import server
from tests.test_model_server_limits import StubModel
server.ChatModel = lambda *args, **kwargs: StubModel()  # the real CLI and server, a stand-in model
from touchvl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:  # not listening yet
        return 0


def test_local_model_api_key_is_required_on_every_request_and_never_logged(tmp_path):
    """`touchvl finetune serve` with LOCAL_MODEL_API_KEY set: 401 without the key or with another, 200 with it,
    for listing and chat alike; the key appears nowhere in what the server prints, even with --verbose."""
    key = "sk-local-" + "7f3a9c" * 6
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft/model.json").write_text(json.dumps({"provider": "local", "model_dir": str(tmp_path / "merged"),
                                                        "fine_tuned_model": StubModel.name}))
    (tmp_path / "params.yaml").write_text(json.dumps({"finetune": {"provider": "local", "out_dir": str(tmp_path / "ft")}}))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOCAL_MODEL_API_KEY": key}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_STUB, "-C", str(tmp_path), "--verbose", "finetune", "serve",
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while _status(base + "/models", key) != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        assert _status(base + "/models") == 401
        assert _status(base + "/models", "sk-wrong") == 401
        assert _status(base + f"/models/{StubModel.name}", key[:-1]) == 401
        with pytest.raises(openai.AuthenticationError) as refused:
            _ask(openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0), _png_url(Image.new("RGB", (8, 8))))
        assert refused.value.body["code"] == "invalid_api_key" and key not in str(refused.value.body)
        reply = _ask(openai.OpenAI(base_url=base, api_key=key, max_retries=0), _png_url(Image.new("RGB", (8, 8))))
        assert json.loads(reply.choices[0].message.content) == [["RGB", [8, 8], 0.0]]
    finally:
        proc.send_signal(signal.SIGTERM)  # the server ends like Ctrl-C
        output, _ = proc.communicate(timeout=30)
    assert f"serving {StubModel.name}" in output and "chat.completion" in output  # it did log, at DEBUG too
    assert key not in output and key[:12] not in output
