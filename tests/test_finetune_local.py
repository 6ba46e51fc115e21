"""``finetune.provider: local``: LoRA on the tiny random-weight VLM, the job contract, kill -9, cancel, serving."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pandas as pd
import pytest
import torch
import yaml

from tasks import finetune as finetune_stage
from tasks import index
from touchvl.finetune import contract, providers
from touchvl.finetune.local import data as local_data
from touchvl.finetune.local import job as local_job
from touchvl.finetune.local import tiny as local_tiny
from touchvl.finetune.local import trainer as local_trainer
from touchvl.finetune.local.data import IGNORE, Encoder, TrainingExample, collate, load_examples
from touchvl.finetune.local.trainer import Events, Layout, LocalTrainer
from touchvl.finetune.server import ChatModel, ModelServer
from touchvl.params import LocalFinetuneParams, parse_params
from touchvl.qa import TouchQAModel
from touchvl.errors import StageError
from tests.finetune_local_fixtures import data_url, example, local_raw, one_thread, write_image_dataset  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random-weight LLaVA, built once: every test loads it from this folder, offline."""
    corpus = write_image_dataset(tmp_path_factory.mktemp("corpus") / "c.jsonl", 12)
    return local_tiny.build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "base", local_tiny.dataset_texts(corpus))


def _project(root: Path, n_train: int = 12, n_val: int = 4) -> Path:
    write_image_dataset(root / "jsonl/tactile_train.jsonl", n_train)
    write_image_dataset(root / "jsonl/tactile_val.jsonl", n_val, start=100)
    return root


def _approve(params):
    providers.approve(params, contract.dataset_files(params), confirm=lambda: True)


def _metric_steps(events, key="train_loss"):
    return [e["data"]["step"] for e in events if key in (e.get("data") or {})]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One whole local job (gate, training, adapter, merged model): 4 examples in one batch, so a repeated batch."""
    root = _project(tmp_path_factory.mktemp("trained"), n_train=4, n_val=3)
    params = parse_params(local_raw(root, str(tiny), batch_size=4, epochs=30, checkpoint_every=10))
    _approve(params)
    job = finetune_stage.run(params)
    return root, params, job


def test_lora_on_a_repeated_batch_reduces_loss_and_the_job_succeeds(trained):
    root, _, job = trained
    loss = pd.read_csv(root / "ft/local/loss.csv")
    assert list(loss["step"]) == list(range(1, 31))
    assert loss["loss"].iloc[-3:].mean() < 0.5 * loss["loss"].iloc[:3].mean()
    # the DVC plot (dvc.yaml's top-level local_lora_loss): train loss every step, validation loss every epoch
    train_curve = pd.read_csv(root / "ft/local/plots/train_loss.tsv", sep="\t")
    val_curve = pd.read_csv(root / "ft/local/plots/val_loss.tsv", sep="\t")
    assert list(train_curve["step"]) == list(range(1, 31)) and train_curve["train_loss"].tolist() == loss["loss"].tolist()
    assert len(val_curve) >= 1 and val_curve["step"].is_monotonic_increasing and val_curve["val_loss"].gt(0).all()
    model = json.loads((root / "ft/model.json").read_text())
    assert job["status"] == "succeeded" and job["provider"] == "local" and job["trained_tokens"] > 0
    assert model["fine_tuned_model"] == job["fine_tuned_model"] and model["provider"] == "local"
    assert (Path(model["model_dir"]) / "model.safetensors").is_file()
    assert (Path(model["adapter_dir"]) / "adapter_model.safetensors").is_file()
    events = local_trainer.read_events(root / "ft/local/events.jsonl")
    assert _metric_steps(events) == list(range(1, 31)) and model["val_loss"] is not None
    assert [p.name for p in sorted((root / "ft/local/checkpoints").iterdir())] == ["checkpoint-20", "checkpoint-30"]  # keep 2


def test_every_reader_of_an_approved_file_takes_what_the_validator_passes(tmp_path):
    """One JSONL reader (touchvl.disk.read_jsonl): a file saved with a BOM and CRLF lines passes the validator, so
    the trainer, the tiny model's tokenizer corpus and the exporter read it too; a bad line names file and line."""
    from touchvl import disk
    from touchvl.chat.export import iter_openai
    from touchvl.chat.validate import validate_file

    path = write_image_dataset(tmp_path / "bom.jsonl", 3)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert validate_file(path).ok
    examples = load_examples(path)
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:2", f"{path}:3"] and examples[0].images
    assert "It feels rough and hard, like brick." in local_tiny.dataset_texts(path)
    assert len(list(iter_openai(path))) == 3
    path.write_text(path.read_text(encoding="utf-8-sig") + "\n{not json\n", encoding="utf-8")
    for read in (load_examples, local_tiny.dataset_texts, lambda p: list(iter_openai(p)), lambda p: list(disk.read_jsonl(p))):
        with pytest.raises(StageError, match=rf"{path}:5: not valid JSON"):
            read(path)
    path.write_bytes(b'{"messages": []}\n\xff\n')
    with pytest.raises(StageError, match=rf"{path}:2: not UTF-8"):
        list(disk.read_jsonl(path))


def test_assistant_only_labels(tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny)
    raw = example(0)["messages"] + [{"role": "user", "content": "And again?"},
                                    {"role": "assistant", "content": "Still rough.", "weight": 0},
                                    {"role": "user", "content": "Once more?"}, {"role": "assistant", "content": "Hard."}]
    messages, images, trained = local_data.convert_messages(raw, "t:1")
    assert trained == (2, 6)  # the weight-0 answer carries no loss
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    item = Encoder(processor, image_id, 512)(0, TrainingExample(messages, images, trained, "t:1"))
    ids, labels = item["input_ids"][0], item["labels"][0]
    kept = labels != IGNORE
    assert torch.equal(labels[kept], ids[kept])  # labels are the tokens themselves where kept
    decoded = [processor.tokenizer.decode(ids[s]) for s in _runs(kept)]
    assert decoded == ["It feels rough and hard, like brick.<|end|>", "Hard.<|end|>"]
    assert int((ids == image_id).sum()) == 16 and not kept[ids == image_id].any()
    short = Encoder(processor, image_id, 512)(1, TrainingExample(*local_data.convert_messages(example(1)["messages"], "t:2"), "t:2"))
    batch = collate([item, short], processor.tokenizer.pad_token_id)
    pad = batch["attention_mask"][1] == 0
    assert pad.any() and (batch["labels"][1][pad] == IGNORE).all() and batch["pixel_values"].shape[0] == 2


def _runs(mask):
    idx = mask.nonzero().flatten().tolist()
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(slice(start, a + 1))
            start = b
    return runs


def test_bad_jsonl_lines_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(example(0)) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(StageError, match=r"bad.jsonl:2: messages\[0\].content\[0\]: corrupt_image: not an image file"):
        load_examples(path)


def test_adapter_and_checkpoint_round_trips_reproduce_logits(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    root = _project(tmp_path, n_train=4, n_val=2)
    cfg = parse_params(local_raw(root, str(tiny), batch_size=2, epochs=2, checkpoint_every=2)).finetune.local  # 4 steps
    train = load_examples(root / "jsonl/tactile_train.jsonl")

    def trainer(folder: str) -> LocalTrainer:
        lay = Layout(tmp_path / folder)
        return LocalTrainer(cfg, 0, str(tiny), train, train[:2], lay, "job", "fp", Events(lay.events, "job"))

    t = trainer("whole")
    assert t.total_steps == 4 and t.run(lambda: False) == "succeeded" and t.step == 4
    assert [p.name for p in local_trainer.list_checkpoints(t.lay, "job")] == ["checkpoint-2", "checkpoint-4"]
    assert local_trainer.list_checkpoints(t.lay, "another-job") == []
    batch = t.batch([0, 1], train)
    t.model.eval()
    with torch.no_grad():
        logits = t.model(**batch).logits
    t.model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForImageTextToText.from_pretrained(tiny)
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, logits, atol=1e-3)  # training changed the model
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)
        assert torch.allclose(loaded.merge_and_unload()(**batch).logits, logits, atol=1e-4)
    # a trainer resumed from step 2 (a copy of that checkpoint, as a killed run leaves it, and a save that
    # kill -9 cut short) continues exactly: the same losses at steps 3 and 4 and the same final weights
    cut = trainer("cut")
    shutil.copytree(t.lay.checkpoints / "checkpoint-2", cut.lay.checkpoints / "checkpoint-2")
    (cut.lay.checkpoints / "checkpoint-3").mkdir()  # no trainer_state.json: incomplete
    (cut.lay.checkpoints / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"cut")
    assert cut.resume().name == "checkpoint-2" and cut.step == 2
    assert not (cut.lay.checkpoints / "checkpoint-3").exists()
    assert cut.run(lambda: False) == "succeeded" and cut.step == 4
    losses = {lay: {e["data"]["step"]: e["data"]["train_loss"] for e in local_trainer.read_events(lay.events)
                    if "train_loss" in (e.get("data") or {})} for lay in (t.lay, cut.lay)}
    assert sorted(losses[cut.lay]) == [3, 4]
    for step in (3, 4):
        assert losses[cut.lay][step] == pytest.approx(losses[t.lay][step], rel=1e-5)
    cut.model.eval()
    with torch.no_grad():
        assert torch.allclose(cut.model(**batch).logits, logits, atol=1e-5)
    assert cut.trained_tokens == t.trained_tokens > 0


def test_unapproved_or_changed_data_is_refused_and_nothing_trains(tiny, tmp_path):
    root = _project(tmp_path, n_train=4, n_val=2)
    params = parse_params(local_raw(root, str(tiny)))
    with pytest.raises(StageError, match="is not approved"):
        finetune_stage.run(params)
    _approve(params)
    with open(root / "jsonl/tactile_train.jsonl", "a") as fh:  # changed after approval
        fh.write(json.dumps(example(99)) + "\n")
    with pytest.raises(StageError, match="is not approved"):
        finetune_stage.run(params)
    assert not (root / "ft/job.json").exists() and not (root / "ft/local").exists()


def test_kill_9_mid_training_then_rerun_resumes_from_the_last_checkpoint(tiny, tmp_path):
    root = _project(tmp_path, n_train=12, n_val=2)
    raw = local_raw(root, str(tiny), batch_size=1, epochs=6, checkpoint_every=5)  # 72 steps
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    _approve(params)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    events_path = root / "ft/local/events.jsonl"
    sub = local_job.LocalSubmission(params, contract.dataset_files(params))
    lay = local_job.layout(params.finetune)
    with open(tmp_path / "first.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.finetune", "submit"], cwd=root, env=env, stdout=out, stderr=out)
        deadline = time.time() + 120
        while time.time() < deadline and not local_trainer.list_checkpoints(lay, sub.job_id) and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = local_trainer.read_events(events_path)
    killed_at = max(_metric_steps(before))
    assert 5 <= killed_at < 72, (tmp_path / "first.log").read_text()[-2000:]
    stale = local_job.status(sub)
    assert stale["status"] == "running" and not stale["trainer_alive"] and "resumes" in stale["note"]
    checkpoint = int(local_trainer.list_checkpoints(lay, sub.job_id)[-1].name.split("-")[1])
    rerun = subprocess.run([sys.executable, "-m", "tasks.finetune", "submit"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["status"] == "succeeded" and (root / "ft/model.json").is_file()
    after = local_trainer.read_events(events_path)[len(before):]
    resumed = [e for e in after if "resumed_from_step" in (e.get("data") or {})]
    assert resumed[0]["data"]["resumed_from_step"] == checkpoint and f"from checkpoint-{checkpoint}:" in resumed[0]["message"]
    assert _metric_steps(after) == list(range(checkpoint + 1, 73))  # continues; no step from 0
    # the steps trained twice (after the checkpoint, before the kill) give the same loss: an exact resume
    first = {e["data"]["step"]: e["data"]["train_loss"] for e in before if "train_loss" in (e.get("data") or {})}
    again = {e["data"]["step"]: e["data"]["train_loss"] for e in after if "train_loss" in (e.get("data") or {})}
    for step in set(first) & set(again):
        assert again[step] == pytest.approx(first[step], rel=1e-4)
    assert f"Resumed from checkpoint-{checkpoint}" in rerun.stderr


def test_cancel_stops_the_trainer_and_records_it(tiny, tmp_path):
    root = _project(tmp_path, n_train=4, n_val=2)
    params = parse_params(local_raw(root, str(tiny), batch_size=1, epochs=200, checkpoint_every=1000))
    _approve(params)
    files = contract.dataset_files(params)
    result = {}
    worker = threading.Thread(target=lambda: result.update(job=finetune_stage.run(params)))
    worker.start()
    events_path = root / "ft/local/events.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not _metric_steps(local_trainer.read_events(events_path)):
        time.sleep(0.05)
    job = local_job.cancel(local_job.LocalSubmission(params, files))
    worker.join(60)
    assert job["status"] == "cancelled" and result["job"]["status"] == "cancelled"
    assert json.loads((root / "ft/job.json").read_text())["status"] == "cancelled"
    assert not (root / "ft/model.json").exists()
    events = local_trainer.read_events(events_path)
    assert events[-1]["message"].startswith("Job cancelled at step") and max(_metric_steps(events)) < 800
    assert finetune_stage.run(params)["status"] == "cancelled"  # a rerun does not train a cancelled job again
    assert local_trainer.read_events(events_path) == events


def test_changed_settings_start_a_new_job_instead_of_resuming_another_ones_checkpoint(tiny, tmp_path):
    root = _project(tmp_path, n_train=4, n_val=2)
    first = parse_params(local_raw(root, str(tiny), max_steps=2, checkpoint_every=1))
    _approve(first)
    job_a = finetune_stage.run(first)
    second = parse_params(local_raw(root, str(tiny), max_steps=2, checkpoint_every=1, lr=1e-3))
    # as `submit --no-wait` does: job.json names the new job before its trainer starts
    local_job.LocalSubmission(second, contract.dataset_files(second)).update_job(status="queued")
    job_b = finetune_stage.run(second)
    assert job_a["job_id"] != job_b["job_id"] and job_b["status"] == "succeeded"
    events = local_trainer.read_events(root / "ft/local/events.jsonl")
    assert {e["job_id"] for e in events} == {job_b["job_id"]} and _metric_steps(events) == [1, 2]
    assert events[0]["message"].startswith("Training 4 examples")
    owners = [local_trainer.checkpoint_job(p)[0] for p in (root / "ft/local/checkpoints").iterdir()]
    assert owners and set(owners) == {job_b["job_id"]}


def test_ddp_with_torchrun_on_cpu_trains_each_example_once_per_epoch_and_writes_one_record(tmp_path):
    """Two processes (gloo on CPU, as on GPUs with NCCL): the tiny base is built once (main process first), each
    step takes a batch in each process, one process writes job.json, the events and model.json."""
    from transformers import AutoProcessor

    root = _project(tmp_path, n_train=8, n_val=2)
    raw = local_raw(root, "tiny", batch_size=2, epochs=2, checkpoint_every=2)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "dvc.yaml").write_text("stages: {}\n")
    params = parse_params(raw)
    _approve(params)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--local-ranks-filter", "0",
                          "-m", "touchvl", "finetune", "submit"], cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    job = json.loads((root / "ft/job.json").read_text())
    assert job["status"] == "succeeded" and json.loads(run.stdout)["job_id"] == job["job_id"]
    assert job["total_steps"] == job["step"] == 4  # 8 examples / (2 per process x 2 processes) x 2 epochs
    events = local_trainer.read_events(root / "ft/local/events.jsonl")
    assert _metric_steps(events) == [1, 2, 3, 4] and _metric_steps(events, "val_loss") == [2, 4]  # written once
    assert len({e["id"] for e in events}) == len(events)
    assert (Path(json.loads((root / "ft/model.json").read_text())["model_dir"]) / "model.safetensors").is_file()
    # every example trained once per epoch across the two processes: the tokens seen are the dataset's, twice
    processor = AutoProcessor.from_pretrained(root / "ft/local/base-tiny")
    encoder = Encoder(processor, processor.tokenizer.convert_tokens_to_ids("<image>"), 256)
    per_epoch = sum(int(encoder(i, ex)["attention_mask"].sum())
                    for i, ex in enumerate(load_examples(root / "jsonl/tactile_train.jsonl")))
    assert job["trained_tokens"] == 2 * per_epoch


def test_cancel_without_a_live_trainer_marks_the_job_at_once(tmp_path):
    root = _project(tmp_path, n_train=4, n_val=2)
    params = parse_params(local_raw(root, "tiny"))
    _approve(params)
    sub = local_job.LocalSubmission(params, contract.dataset_files(params))
    sub.update_job(status="running")  # what a trainer killed before its first step leaves behind
    job = local_job.cancel(sub, wait_s=5)
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert local_trainer.read_events(root / "ft/local/events.jsonl")[-1]["message"] == "Job cancelled at step 0"
    assert not (root / "ft/local/cancel-request.json").exists()


@pytest.fixture(scope="module")
def server(trained):
    _, _, job = trained
    model = json.loads((trained[0] / "ft/model.json").read_text())
    with ModelServer(ChatModel(model["model_dir"], job["fine_tuned_model"], "cpu")) as srv:
        yield srv


def test_served_model_answers_a_chat_completion_with_an_image(server, trained):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    name = trained[2]["fine_tuned_model"]
    assert [m.id for m in client.models.list()] == [name]
    reply = client.chat.completions.create(model=name, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "You describe how surfaces feel to the touch."},
        {"role": "user", "content": [{"type": "text", "text": "Tactile sample 7: how does this surface feel?"},
                                     {"type": "image_url", "image_url": {"url": data_url((40, 200, 60))}}]}])
    assert reply.object == "chat.completion" and reply.model == name
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content.startswith("It feels")
    assert reply.usage.prompt_tokens > 16 and 1 <= reply.usage.completion_tokens <= 8
    with pytest.raises(openai.NotFoundError, match="gpt-9` does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="not a decodable image") as bad:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert bad.value.body["param"] == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=name, max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(server.base_url + "/nope")
    assert missing.value.code == 404 and json.loads(missing.value.read())["error"]["code"] == "unknown_url"


def test_served_model_streams_the_same_text_as_it_completes(server, trained):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    name = trained[2]["fine_tuned_model"]
    request = dict(model=name, max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Tactile sample 3: how does this surface feel?"},
                                     {"type": "image_url", "image_url": {"url": data_url((200, 40, 40))}}]}])
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content  # token by token, same text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    stop = whole.choices[0].message.content.split()[1]
    stopped = client.chat.completions.create(**request, stop=[stop])
    streamed = list(client.chat.completions.create(**request, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == stopped.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "stop" and stop not in stopped.choices[0].message.content
    with client.chat.completions.create(**{**request, "max_tokens": 200}, stream=True) as early:
        next(iter(early))  # the client goes away mid-stream: generation ends and the model is free again
    assert client.chat.completions.create(**request).choices[0].message.content == whole.choices[0].message.content


def test_touchqa_runs_end_to_end_against_the_served_local_model(built, server, trained, caplog):
    caplog.set_level(logging.INFO, logger="touchvl.finetune.server")
    index.run(built)
    params = built.model_copy(update={"finetune": parse_params({"finetune": {
        "provider": "local", "out_dir": str(trained[0] / "ft"), "local": {"serve_url": server.base_url}}}).finetune})
    manifest = pd.read_csv(params.prepare.out_dir / "manifest.csv")
    answer = TouchQAModel(params).answer(manifest["tac_path"][0], "What does this feel like?", sensor_id=0)
    assert answer.model == trained[2]["fine_tuned_model"] and isinstance(answer.text, str)
    assert len(answer.evidence) == params.qa.k_by_intent[answer.intent]
    served = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chat.completion")]
    assert len(served) == 2 and f"{1 + len(answer.evidence)} image(s)" in served[1]  # classify, then answer


# --- the model server is safe to run: no local files, capped, same-origin, timed out --------------------


def _raw_request(server, method="POST", path="/v1/chat/completions", body=b"", headers=None, host=None):
    import http.client

    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host or f"127.0.0.1:{port}")
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.endheaders(body or None)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, (json.loads(payload) if payload.startswith(b"{") else payload)


def test_served_model_refuses_every_image_scheme_but_data_and_reads_no_file(server, trained, tmp_path):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    name = trained[2]["fine_tuned_model"]
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not really")
    messages = []
    for url in (f"file://{secret}", f"FILE://{secret}", f"  file://{secret}", f"File:{secret}", str(secret),
                f"file://{tmp_path / 'missing.png'}", "http://127.0.0.1:9/x.png", "https://example.com/x.png",
                "ftp://example.com/x.png", "jar:file:///etc/passwd!/x"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}])
        assert refused.value.body["code"] == "invalid_image_url"
        messages.append(refused.value.body["message"])
    assert len(set(messages)) == 1  # an existing and a missing file get the same answer: no existence oracle


def test_served_model_caps_bodies_and_images_and_checks_the_request_shape(server, trained):
    from touchvl.finetune.server import ModelServer, ServerLimits

    name = trained[2]["fine_tuned_model"]
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]}).encode()
    json_type = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    assert _raw_request(server, body=body, headers={**json_type, "Content-Type": "text/plain"})[0] == 415
    assert _raw_request(server, body=body, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                    "Content-Length": str(len(body))})[0] == 415
    assert _raw_request(server, body=b"", headers={"Content-Type": "application/json"})[0] == 411
    assert _raw_request(server, body=body, headers={**json_type, "Content-Length": "-5"})[0] == 400
    assert _raw_request(server, body=body, headers={**json_type, "Content-Length": "12abc"})[0] == 400
    assert _raw_request(server, body=body, headers=json_type, host="evil.example:80")[0] == 403  # DNS rebinding
    assert _raw_request(server, body=body, headers={**json_type, "Origin": "https://evil.example"})[0] == 403
    assert _raw_request(server, "GET", "/v1/models", headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    ok, reply = _raw_request(server, "GET", "/v1/models", headers={"Origin": f"http://localhost:{server.server_address[1]}"})
    assert ok == 200 and reply["data"][0]["id"] == name
    small = ServerLimits(max_body_bytes=2000, max_image_bytes=500, timeout_s=1.0)
    with ModelServer(server.model, limits=small, api_key="k-local-secret") as tight:
        big = b'{"model": "' + b"x" * 5000 + b'"}'
        status, err = _raw_request(tight, body=big, headers={"Content-Type": "application/json", "Content-Length": str(len(big)),
                                                            "Authorization": "Bearer k-local-secret"})
        assert status == 413 and err["error"]["code"] == "request_too_large"
        assert _raw_request(tight, "GET", "/v1/models")[0] == 401  # the key is checked on every request
        client = openai.OpenAI(base_url=tight.base_url, api_key="k-local-secret", max_retries=0)
        with pytest.raises(openai.BadRequestError) as large:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1200}}]}])
        assert large.value.body["code"] == "image_too_large"
        import socket
        import time

        slow = socket.create_connection(tight.server_address, timeout=10)  # a client that never finishes its headers
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        assert slow.recv(1024) == b""  # the server hangs up after its timeout
        assert time.monotonic() - start < 8
        slow.close()


@pytest.mark.parametrize("setting", [{"quantization": "4bit"}, {"quantization": "8bit"}, {"device_map": "auto"}])
def test_qlora_and_device_map_on_cpu_are_refused_naming_the_param(setting):
    # bitsandbytes' k-bit kernels and accelerate's multi-GPU placement are CUDA only: a clear error, before any load
    cfg = LocalFinetuneParams(device="cpu", **setting)
    name, value = next(iter(setting.items()))
    with pytest.raises(StageError, match=rf"finetune\.local\.{name}={value}: .*runs on cpu"):
        local_trainer.check_hardware(cfg, "cpu")
