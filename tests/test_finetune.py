"""The finetune stage with the official openai client against a local OpenAI-compatible server."""
import datetime as dt
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

from tasks import finetune as finetune_stage
from touchvl.finetune import contract, providers, remote
from touchvl.params import parse_params
from touchvl.errors import StageError
from tests.jsonl_fixtures import write_dataset
from tests.openai_server import ApiFaults, ApiServer, ApiState

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789abcdefghijklmnop"
TODAY = dt.date(2026, 11, 22)


def _raw(tmp_path, base_url="http://127.0.0.1:9/v1", **finetune_params):
    return {"jsonl": {"out_dir": str(tmp_path / "jsonl")},
            "validation": {"reports_dir": str(tmp_path / "val"), "build_data_docs": False},
            "finetune": {"provider": "compatible", "base_url": base_url, "out_dir": str(tmp_path / "ft"),
                         "poll_interval_s": 0.01, "poll_max_interval_s": 0.02, "max_retries": 8, **finetune_params}}


@pytest.fixture
def files(tmp_path):
    write_dataset(tmp_path / "jsonl" / "tactile_train.jsonl", 12)
    write_dataset(tmp_path / "jsonl" / "tactile_val.jsonl", 10)
    return tmp_path


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _approve(params):
    providers.approve(params, contract.dataset_files(params), confirm=lambda: True)


def test_dry_run_writes_a_plan_and_makes_no_call(files, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    params = parse_params(_raw(files))
    plan = finetune_stage.run(params, today=TODAY)
    saved = json.loads((files / "ft/plan.json").read_text())
    assert saved == json.loads(json.dumps(plan)) and saved["submit"] is False and saved["approved"] is False
    assert saved["files"]["train"]["examples"] == 12 and len(saved["files"]["train"]["sha256"]) == 64
    assert saved["estimated_cost"]["epochs"] == 8  # auto: 100 // 12 and saved["estimated_cost"]["cost_usd"] > 0
    assert not (files / "ft/job.json").exists()


def test_the_plan_is_the_same_bytes_whatever_the_day(files, monkeypatch, caplog):
    """plan.json is a DVC output: an OpenAI countdown inside it changed dvc.lock every day (found on a fresh
    clone's `make repro`, a day after the commit). The days left go to the log only."""
    monkeypatch.delenv("OPENAI_API_KEY")
    caplog.set_level(logging.WARNING)
    raw = _raw(files)
    raw["finetune"]["provider"] = "openai"
    params = parse_params(raw)
    written = []
    for today in (dt.date(2026, 12, 2), dt.date(2026, 12, 6)):
        finetune_stage.run(params, today=today)
        written.append((files / "ft/plan.json").read_bytes())
    assert written[0] == written[1] and b"2027-01-06" in written[0] and b"days left" not in written[0]
    assert "31 days left" in caplog.text and "35 days left" in caplog.text


def test_happy_path_to_a_fine_tuned_model(files, caplog):
    caplog.set_level(logging.INFO)
    state = ApiState(KEY)
    with ApiServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        _approve(params)
        job = finetune_stage.run(params, today=TODAY)
    model = json.loads((files / "ft/model.json").read_text())
    assert job["status"] == "succeeded" and model["fine_tuned_model"].startswith("ft:gpt-4o-2024-08-06:org-test:touch:")
    assert state.created_jobs == 1 and len(state.files) == 2
    created = next(iter(state.jobs.values()))
    assert created["metadata"]["dataset_sha256"] == contract.dataset_files(params).dataset_sha256()
    assert created["validation_file"] and created["suffix"] == "touch"
    messages = [r.getMessage() for r in caplog.records if "[info]" in r.getMessage()]
    assert len(messages) == len(set(messages)) == 3  # each event logged once
    assert json.loads((files / "ft/checkpoints.json").read_text())[0]["metrics"]["valid_loss"] == 0.51
    for path in (files / "ft").iterdir():
        assert KEY not in path.read_text()
    assert KEY not in caplog.text


def test_failed_job_surfaces_the_server_error(files):
    with ApiServer(ApiState(KEY, fail_jobs=True)) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        _approve(params)
        with pytest.raises(StageError, match="failed: Training file has too few examples"):
            finetune_stage.run(params, today=TODAY)
    assert json.loads((files / "ft/job.json").read_text())["status"] == "failed"


def test_unknown_model_and_bad_key_stop_with_the_server_message(files, monkeypatch):
    with ApiServer(ApiState(KEY)) as server:
        params = parse_params(_raw(files, server.base_url, submit=True, model="gpt-9"))
        _approve(params)
        with pytest.raises(StageError, match="API error 400: .*gpt-9 is not available"):
            finetune_stage.run(params, today=TODAY)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        params = parse_params(_raw(files, server.base_url, submit=True))
        _approve(params)
        with pytest.raises(StageError, match="API error 401: .*Incorrect API key provided"):
            finetune_stage.run(params, today=TODAY)


def test_exactly_one_job_with_dropped_responses_500s_and_429s(files):
    state = ApiState(KEY, ApiFaults(error_rate=0.2, rate_limit_rate=0.1, drop_rate=0.5, seed=4))
    with ApiServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True, max_retries=12))
        _approve(params)
        job = finetune_stage.run(params, today=TODAY)
    assert job["status"] == "succeeded"
    assert state.created_jobs == 1  # the server's own count
    assert len(state.files) == 2
    assert any(status == 429 for status in state.statuses) and any(status == 500 for status in state.statuses)


def test_polling_rides_out_500s_429s_and_dropped_connections_until_the_job_ends(files):
    """30% 500s, dropped GETs and a 429 every 5th request, with the client's own retries off: the poller waits
    each fault out (honouring retry-after) instead of giving up, and exactly one job exists."""
    state = ApiState(KEY, ApiFaults(seed=7))
    with ApiServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True, max_retries=0))
        _approve(params)
        sub = remote.Submission(params, remote.make_client(params.finetune), contract.dataset_files(params))
        sub.check_gate()
        sub.create_job()  # faults start once the job exists: polling is what is tested
        state.faults.error_rate, state.faults.get_drop_rate, state.faults.rate_limit_every = 0.3, 0.3, 5
        slept = []
        sub.sleep = slept.append
        job = sub.poll(wait=True)
    assert job["status"] == "succeeded" and state.created_jobs == 1
    assert 500 in state.statuses and 429 in state.statuses and len(slept) > 4
    assert 1.234 in slept  # the 429's retry-after-ms (1234) was the wait, above the 0.02 s backoff cap


def test_polling_ends_on_a_4xx_and_on_the_deadline_with_a_clear_error(files):
    with ApiServer(ApiState(KEY)) as server:
        params = parse_params(_raw(files, server.base_url, submit=True, max_retries=0, poll_timeout_s=0.5))
        _approve(params)
        sub = remote.Submission(params, remote.make_client(params.finetune), contract.dataset_files(params))
        sub.check_gate()
        sub.create_job()
        sub.sleep = lambda s: None
        server.state.faults.error_rate = 1.0  # the provider is down for good: the deadline ends it, not a traceback
        with pytest.raises(StageError, match=r"gave up polling job .*finetune.poll_timeout_s=0.*a rerun resumes"):
            sub.poll(wait=True)
        server.state.faults.error_rate = 0.0
        sub.state["job_id"] = "ftjob-does-not-exist"
        with pytest.raises(StageError, match="API error 404"):
            with remote.api_errors("compatible"):
                sub.poll(wait=True)


def test_unapproved_or_invalid_files_are_refused(files):
    with ApiServer(ApiState(KEY)) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        with pytest.raises(StageError, match="is not approved"):
            finetune_stage.run(params, today=TODAY)
        _approve(params)
        with open(files / "jsonl/tactile_train.jsonl", "a") as fh:  # changed after approval
            fh.write('{"messages": []}\n')
        with pytest.raises(StageError, match="is not approved"):
            finetune_stage.run(params, today=TODAY)
        with pytest.raises(StageError, match="validation errors"):
            _approve(params)


def test_cancel(files):
    state = ApiState(KEY)
    with ApiServer(state) as server:
        params = parse_params(_raw(files, server.base_url, submit=True))
        _approve(params)
        submission = remote.Submission(params, remote.make_client(params.finetune), contract.dataset_files(params))
        submission.run(wait=False)
        submission.cancel()
    assert json.loads((files / "ft/job.json").read_text())["status"] == "cancelled"
    assert next(iter(state.jobs.values()))["status"] == "cancelled"


def test_kill_9_mid_poll_then_rerun_resumes_the_same_job(files):
    state = ApiState(KEY)
    with ApiServer(state) as server:
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
        proc.wait()
        job_id = json.loads(state_file.read_text())["job_id"]
        raw["finetune"].update(poll_interval_s=0.01, poll_max_interval_s=0.02)
        (files / "params.yaml").write_text(yaml.safe_dump(raw))
        rerun = subprocess.run([sys.executable, "-m", "tasks.finetune", "submit"], cwd=files, env=env,
                               capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads(rerun.stdout)["job_id"] == job_id and state.created_jobs == 1
        assert KEY not in rerun.stderr + rerun.stdout


def test_openai_wind_down_warns_then_refuses():
    assert "days left" in contract.provider_notice("openai", dt.date(2026, 11, 22))
    with pytest.raises(StageError, match="azure .* or compatible"):
        contract.provider_notice("openai", dt.date(2027, 1, 6))
    assert contract.provider_notice("azure", dt.date(2027, 6, 1)) is None


def test_every_entry_point_picks_the_providers_submission(files):
    """The stage, the CLI and the review flow all submit through providers.submission()."""
    from touchvl.finetune.local.job import LocalSubmission

    hosted = providers.submission(parse_params(_raw(files)), contract.dataset_files(parse_params(_raw(files))))
    local_params = parse_params(_raw(files, provider="local"))
    local = providers.submission(local_params, contract.dataset_files(local_params))
    assert type(hosted) is remote.Submission and type(local) is LocalSubmission


def test_validation_flags_a_job_and_model_of_another_dataset(files):
    """model.json of an older dataset would be served by TouchQA as if trained on this one: reported in a dry run,
    an error when submitting."""
    from touchvl.checks import run_validation

    params = parse_params(_raw(files))
    dataset = contract.dataset_files(params)
    the_plan = providers.plan(params, dataset, dt.date(2026, 12, 1))
    ok = run_validation("finetune", contract.validation_tables(the_plan, dataset, None, None), params.validation)
    assert ok.success and not ok.warnings
    old_job = {"job_id": "ftjob-old", "dataset_sha256": "0" * 64, "provider": "compatible", "status": "succeeded"}
    old_model = {"job_id": "ftjob-old", "fine_tuned_model": "ft:old", "provider": "compatible"}
    dry = run_validation("finetune", contract.validation_tables(the_plan, dataset, old_job, old_model), params.validation)
    assert dry.success and [w.kwargs["column"] for w in dry.warnings] == ["job_dataset_matches_plan"]
    strict = run_validation("finetune", contract.validation_tables({**the_plan, "submit": True}, dataset, old_job, old_model),
                            params.validation)
    assert [f.kwargs["column"] for f in strict.blocking_failures] == ["job_dataset_matches_plan"]
    mismatched = {**old_model, "job_id": "ftjob-other"}
    bad = run_validation("finetune", contract.validation_tables({**the_plan, "submit": True}, dataset,
                                                                {**old_job, "dataset_sha256": dataset.dataset_sha256()},
                                                                mismatched), params.validation)
    assert [f.kwargs["column"] for f in bad.blocking_failures] == ["model_job_matches_job"]
    (files / "jsonl" / "tactile_train.jsonl").write_text((files / "jsonl" / "tactile_train.jsonl").read_text() + "\n")
    changed = run_validation("finetune", contract.validation_tables(the_plan, dataset, None, None), params.validation)
    assert [f.kwargs["column"] for f in changed.blocking_failures] == ["sha_matches_files"]
