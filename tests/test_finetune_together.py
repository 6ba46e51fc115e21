"""finetune.provider: together -- the official `together` SDK over real HTTP against tests/together_server.py."""
import base64
import datetime as dt
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tasks import finetune as finetune_stage
from touchvl.errors import StageError
from touchvl.finetune import contract, providers, remote
from touchvl.finetune.together import TogetherSubmission, api_errors
from touchvl.params import parse_params
from tests.jsonl_fixtures import write_dataset
from tests.together_server import TogetherFaults, TogetherServer, TogetherState

ROOT = Path(__file__).resolve().parents[1]
KEY = "tgp_test_0123456789abcdefSECRET"
TODAY = dt.date(2026, 12, 1)
MODEL = "Qwen/Qwen3-VL-8B-Instruct"


def _raw(tmp_path, base_url="http://127.0.0.1:9", together=None, **finetune_params):
    return {"jsonl": {"out_dir": str(tmp_path / "jsonl")},
            "finetune": {"provider": "together", "out_dir": str(tmp_path / "ft"), "poll_interval_s": 0.01,
                         "poll_max_interval_s": 0.02, "max_retries": 8, **finetune_params,
                         "together": {"base_url": base_url, "retry_backoff_s": 0.01, **(together or {})}}}


def _image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 90, 60)).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_image_dataset(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [
                {"role": "system", "content": "You describe how things feel."},
                {"role": "user", "content": [{"type": "text", "text": f"Sample {i}: how does this surface feel?"},
                                             {"type": "image_url", "image_url": {"url": _image_url()}}]},
                {"role": "assistant", "content": f"It feels grainy and hard, like sandpaper (sample {i})."}]}) + "\n")


@pytest.fixture
def files(tmp_path):
    write_dataset(tmp_path / "jsonl" / "tactile_train.jsonl", 12)
    write_dataset(tmp_path / "jsonl" / "tactile_val.jsonl", 10)
    return tmp_path


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    monkeypatch.delenv("TOGETHER_BASE_URL", raising=False)


def _approve(params):
    providers.approve(params, contract.dataset_files(params), confirm=lambda: True)


def _assert_no_secret(root: Path, *texts: str) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert KEY not in path.read_text(errors="replace"), path
    for text in texts:
        assert KEY not in text


def test_plan_is_a_dry_run_with_together_prices(files, monkeypatch):
    monkeypatch.delenv("TOGETHER_API_KEY")
    state = TogetherState(KEY)
    with TogetherServer(state) as server:
        plan = finetune_stage.run(parse_params(_raw(files, server.base_url)), today=TODAY)
    assert state.requests == []  # no network call
    cost = plan["estimated_cost"]
    assert plan["provider"] == "together" and plan["model"] == MODEL and plan["hyperparameters"]["n_epochs"] == 3
    assert cost["price_per_million"] == 0.48 and cost["method"] == "lora" and cost["epochs"] == 3 and cost["evals"] == 1
    assert cost["trained_tokens"] == 3 * cost["billed_tokens_per_epoch"] + cost["validation_tokens"]
    assert cost["cost_usd"] == round(cost["trained_tokens"] * 0.48 / 1e6, 4) and plan["notice"] is None
    full = finetune_stage.run(parse_params(_raw(files, server.base_url, together={"lora": False})), today=TODAY)
    assert full["estimated_cost"]["price_per_million"] == 0.54
    unknown = finetune_stage.run(parse_params(_raw(files, together={"model": "some/NewModel-VL"})), today=TODAY)
    assert unknown["estimated_cost"]["cost_usd"] is None and "no price" in unknown["estimated_cost"]["basis"]


def test_happy_path_to_a_model_name_with_images(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    write_image_dataset(tmp_path / "jsonl" / "tactile_train.jsonl", 12)
    write_image_dataset(tmp_path / "jsonl" / "tactile_val.jsonl", 10)
    state = TogetherState(KEY, checks_before_valid=3)
    with TogetherServer(state) as server:
        params = parse_params(_raw(tmp_path, server.base_url, submit=True))
        _approve(params)
        job = finetune_stage.run(params, today=TODAY)  # what the DVC stage runs with finetune.submit: true
        model = json.loads((tmp_path / "ft/model.json").read_text())
        # TouchQA / evaluate reach the model through the openai client that make_client returns
        reply = remote.make_client(params.finetune).chat.completions.create(
            model=model["fine_tuned_model"], messages=[{"role": "user", "content": "How does it feel?"}])
    assert job["status"] == "succeeded" and job["provider_status"] == "completed"
    assert model["fine_tuned_model"] == job["fine_tuned_model"] and model["fine_tuned_model"].startswith(
        "touch-tester/Qwen3-VL-8B-Instruct-touch-") and model["provider"] == "together"
    assert reply.choices[0].message.content == "echo: How does it feel?"
    assert state.created_jobs == 1 and len(state.files) == 2
    created = next(iter(state.jobs.values()))
    sha = contract.dataset_files(params).dataset_sha256()
    assert created["suffix"] == job["suffix"] and created["suffix"].startswith("touch-")
    assert created["training_type"]["type"] == "Lora" and created["multimodal_params"] == {"train_vision": False}
    assert created["random_seed"] == 0 and created["n_epochs"] == 3 and created["validation_file"]
    assert sorted(f["filename"] for f in state.files.values()) == [f"{sha[:16]}-tactile_train.jsonl", f"{sha[:16]}-tactile_val.jsonl"]
    # the uploaded bytes are exactly the approved files; the signed PUT carried no API key
    assert {state.file_bytes[i] for i in state.files} == {(tmp_path / f"jsonl/tactile_{r}.jsonl").read_bytes() for r in ("train", "val")}
    puts = [h for m, p, h in state.requests if m == "PUT"]
    assert len(puts) == 2 and not any("Authorization" in h for h in puts)
    # the server could not estimate multimodal data: recorded, not invented
    assert job["provider_estimate"] == {"estimation_available": False, "unavailable_reason": "multimodal_dataset"}
    logged = [r.getMessage() for r in caplog.records if "] " in r.getMessage() and r.name == "touchvl.finetune.together"]
    assert len(logged) == len(set(logged)) == 7  # each event logged once
    assert [c["checkpoint"] for c in json.loads((tmp_path / "ft/checkpoints.json").read_text())] == ["model", "adapter"]
    _assert_no_secret(tmp_path / "ft", caplog.text)
    assert not any("signature=" in r.getMessage() for r in caplog.records)  # signed upload URLs stay out of the logs


def test_exactly_one_job_and_two_files_under_500s_429s_and_dropped_responses(files):
    state = TogetherState(KEY, TogetherFaults(error_rate=0.15, rate_limit_rate=0.1, drop_rate=0.5, seed=3))
    with TogetherServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True, max_retries=12))
        _approve(params)
        job = finetune_stage.run(params, today=TODAY)
    assert job["status"] == "succeeded"
    assert state.created_jobs == 1 and len(state.jobs) == 1  # the server's own count
    assert len(state.files) == 2
    assert 429 in state.statuses and 500 in state.statuses
    # answers were lost after the server acted, on the job creation and on each upload step
    assert "POST /v1/fine-tunes" in state.dropped and "POST /v1/files" in state.dropped
    assert any(d.startswith("PUT /upload/") for d in state.dropped) and any(d.endswith("/preprocess") for d in state.dropped)
    # the server also estimated this text-only job; the estimate is on record
    assert job["provider_estimate"]["estimation_available"] is True


def test_failed_job_surfaces_its_error_event(files):
    with TogetherServer(TogetherState(KEY, fail_jobs=True)) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        _approve(params)
        with pytest.raises(StageError, match="failed: Training failed: CUDA out of memory"):
            finetune_stage.run(params, today=TODAY)
    job = json.loads((files / "ft/job.json").read_text())
    assert job["status"] == "failed" and job["provider_status"] == "error" and "out of memory" in job["error"]["message"]
    assert not (files / "ft/model.json").exists()


def test_rejected_file_bad_key_unknown_model_and_missing_key(files, monkeypatch):
    state = TogetherState(KEY)
    with TogetherServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True, together={"model": "nobody/NoSuchModel"}))
        _approve(params)
        with pytest.raises(StageError, match="together API error 404: Model nobody/NoSuchModel is not available"):
            finetune_stage.run(params, today=TODAY)
        # a model that only does LoRA, asked for full fine-tuning: stopped before anything is created
        params = parse_params(_raw(files, server.base_url, submit=True,
                                   together={"model": "meta-llama/Llama-4-Scout-17B-16E-Instruct-VLM", "lora": False}))
        _approve(params)
        with pytest.raises(StageError, match="supports only LoRA"):
            finetune_stage.run(params, today=TODAY)
        monkeypatch.setenv("TOGETHER_API_KEY", "wrong-key")
        params = parse_params(_raw(files, server.base_url, submit=True, suffix="other"))
        with pytest.raises(StageError, match=r"together API error 401: Invalid API key provided.*check TOGETHER_API_KEY"):
            finetune_stage.run(params, today=TODAY)
        monkeypatch.delenv("TOGETHER_API_KEY")
        with pytest.raises(StageError, match="needs TOGETHER_API_KEY"):
            finetune_stage.run(params, today=TODAY)
    assert state.created_jobs == 0


def test_server_side_check_failure_is_reported_with_its_message(files):
    # consecutive user turns: our validator (together target) refuses it at approval already ...
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "It feels smooth and hard."}]}
    with open(files / "jsonl/tactile_train.jsonl", "a") as fh:
        fh.write(json.dumps(bad) + "\n")
    params = parse_params(_raw(files, submit=True))
    with pytest.raises(StageError, match="validation errors"):
        _approve(params)
    # ... and if such a file reaches Together anyway, the server's own verdict stops the job
    state = TogetherState(KEY)
    with TogetherServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        sub = TogetherSubmission(params, contract.dataset_files(params))
        with pytest.raises(StageError, match="Together rejected the uploaded file .* Invalid role turns on line 13"):
            with api_errors():
                file_id = sub.upload("train", sub.files.train)
                sub.wait_checked(file_id, sub.files.train)
    assert state.created_jobs == 0


def test_unapproved_or_changed_files_are_refused(files):
    state = TogetherState(KEY)
    with TogetherServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        with pytest.raises(StageError, match="is not approved"):
            finetune_stage.run(params, today=TODAY)
        _approve(params)
        with open(files / "jsonl/tactile_val.jsonl", "a") as fh:
            fh.write(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "It is smooth."}]}) + "\n")
        with pytest.raises(StageError, match="is not approved"):
            finetune_stage.run(params, today=TODAY)
    assert state.requests == []


def test_over_the_credit_limit_nothing_is_created(files):
    state = TogetherState(KEY, credit_limit=0.0)
    with TogetherServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        _approve(params)
        with pytest.raises(StageError, match="over the account's credit limit"):
            finetune_stage.run(params, today=TODAY)
    assert state.created_jobs == 0


def test_status_events_and_cancel(files, capsys):
    state = TogetherState(KEY)
    with TogetherServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        _approve(params)
        sub = providers.submission(params, contract.dataset_files(params))
        assert type(sub) is TogetherSubmission
        first = sub.run(wait=False)
        assert first["status"] == "queued" and first["fine_tuned_model"] is None
        def again():  # each CLI command builds its submission afresh from the saved state
            return providers.submission(params, contract.dataset_files(params))

        assert any("[info] Fine tune request created" in line for line in again().event_lines())
        cancelled = again().cancel()
        assert (cancelled["status"], cancelled["provider_status"]) == ("cancelling", "cancel_requested")
        status = again().status()
        assert status["status"] == "cancelled" and status["provider_status"] == "cancelled"
        with pytest.raises(StageError, match="together API error 400: .*cannot be cancelled: it is cancelled"):
            again().cancel()
        job = next(iter(state.jobs.values()))
        assert job["status"] == "cancelled" and [e["type"] for e in state.events[job["id"]]][-2:] == ["cancel_requested", "job_stopped"]
    assert not (files / "ft/model.json").exists()


def test_kill_9_mid_poll_then_rerun_resumes_the_same_job(files):
    state = TogetherState(KEY)
    with TogetherServer(state) as server:
        raw = _raw(files, server.base_url, submit=True, poll_interval_s=60, poll_max_interval_s=60)
        (files / "params.yaml").write_text(yaml.safe_dump(raw))
        params = parse_params(raw)
        _approve(params)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "tasks.finetune", "submit"], cwd=files, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        state_file = files / "ft/state.json"
        deadline = time.time() + 60
        while time.time() < deadline and "job_id" not in (json.loads(state_file.read_text()) if state_file.exists() else {}):
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        _, killed_err = proc.communicate()
        job_id = json.loads(state_file.read_text())["job_id"]
        assert state.jobs[job_id]["status"] not in ("completed",)  # killed while the job was still running
        raw["finetune"].update(poll_interval_s=0.01, poll_max_interval_s=0.02)
        (files / "params.yaml").write_text(yaml.safe_dump(raw))
        rerun = subprocess.run([sys.executable, "-m", "tasks.finetune", "submit"], cwd=files, env=env,
                               capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        out = json.loads(rerun.stdout)
        assert out["job_id"] == job_id and out["status"] == "succeeded" and state.created_jobs == 1 and len(state.files) == 2
        _assert_no_secret(files / "ft", rerun.stderr, rerun.stdout, killed_err.decode())
        assert "Traceback" not in rerun.stderr


def test_changed_settings_make_a_new_job_same_settings_resume(files):
    state = TogetherState(KEY)
    with TogetherServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        _approve(params)
        first = finetune_stage.run(params, today=TODAY)
        again = finetune_stage.run(params, today=TODAY)  # nothing new: the same job, read back
        assert again["job_id"] == first["job_id"] and state.created_jobs == 1
        (files / "ft/state.json").unlink()  # even without the state file the job is found by its suffix
        assert finetune_stage.run(params, today=TODAY)["job_id"] == first["job_id"] and state.created_jobs == 1
        params = parse_params(_raw(files, server.base_url, submit=True, together={"n_epochs": 2}))
        second = finetune_stage.run(params, today=TODAY)
    assert second["job_id"] != first["job_id"] and second["suffix"] != first["suffix"]
    assert state.created_jobs == 2 and len(state.files) == 2  # the same files, found by name, not uploaded again


def test_too_long_suffix_fails_before_any_call(files):
    params = parse_params(_raw(files, submit=True, suffix="x" * 35))
    _approve(params)
    with pytest.raises(StageError, match="finetune.suffix"):
        finetune_stage.run(params, today=TODAY)


def test_cli_submit_subprocess_prints_the_model_and_no_secret(files):
    state = TogetherState(KEY)
    with TogetherServer(state) as server:
        raw = _raw(files, server.base_url, submit=True)
        (files / "params.yaml").write_text(yaml.safe_dump(raw))
        _approve(parse_params(raw))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        stage = subprocess.run([sys.executable, "-m", "tasks.finetune"], cwd=files, env=env, capture_output=True,
                               text=True, timeout=120)
    assert stage.returncode == 0, stage.stderr
    assert json.loads((files / "ft/model.json").read_text())["fine_tuned_model"].startswith("touch-tester/")
    _assert_no_secret(files / "ft", stage.stdout, stage.stderr)
