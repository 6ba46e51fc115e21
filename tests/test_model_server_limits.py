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
