"""The production serving path the README documents: ``transformers serve`` on the merged model of a local job.

Our small stdlib server is for CPUs and tests; for production the README points at ``transformers serve`` (or
vLLM, which needs a GPU: not testable here). This test runs a real local job, starts the real ``transformers
serve`` CLI on the job's ``merged/`` folder, and checks through the official ``openai`` client that it answers an
image chat completion with exactly the greedy text and token counts our server gives: the merged folder is a
complete model (weights, processor, chat template) that a third-party server loads as it is.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tasks import finetune as finetune_stage
from tests.finetune_local_fixtures import data_url, local_raw, write_image_dataset
from tests.loopback import free_port
from touchvl.finetune import contract, providers
from touchvl.finetune.local import tiny as local_tiny
from touchvl.finetune.server import ChatModel, ModelServer
from touchvl.params import parse_params

CLI = Path(sys.executable).parent / "transformers"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    write_image_dataset(root / "jsonl/tactile_train.jsonl", 4)
    write_image_dataset(root / "jsonl/tactile_val.jsonl", 2, start=100)
    base = local_tiny.build_tiny_vlm(root / "base", local_tiny.dataset_texts(root / "jsonl/tactile_train.jsonl"))
    params = parse_params(local_raw(root, str(base), batch_size=4, epochs=3, checkpoint_every=3))
    providers.approve(params, contract.dataset_files(params), confirm=lambda: True)
    job = finetune_stage.run(params)
    model = json.loads((root / "ft/model.json").read_text())
    return Path(model["model_dir"]), job["fine_tuned_model"]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail("transformers serve did not become healthy")


@pytest.mark.skipif(not CLI.exists(), reason="the transformers CLI is not installed in this venv")
def test_transformers_serve_answers_the_merged_model_as_our_server_does(merged, tmp_path):
    model_dir, name = merged
    messages = [{"role": "system", "content": "You describe how surfaces feel to the touch."},
                {"role": "user", "content": [{"type": "text", "text": "Tactile sample 7: how does this surface feel?"},
                                             {"type": "image_url", "image_url": {"url": data_url((40, 200, 60))}}]}]
    with ModelServer(ChatModel(str(model_dir), name, "cpu")) as ours:
        client = openai.OpenAI(base_url=ours.base_url, api_key="x", max_retries=0)
        expected = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.Popen([str(CLI), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_healthy(base_url, proc)
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=8, temperature=0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert expected.choices[0].message.content  # greedy, 8 tokens: a deterministic text to compare
    assert reply.choices[0].message.content == expected.choices[0].message.content
    # the same prompt length: the image was expanded to the same 16 image tokens by the merged folder's processor
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens > 16
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
