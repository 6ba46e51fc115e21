"""Prefect build flow over the real DVC pipeline in a throwaway git repo (one harness per session)."""
import json

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import build, stage_order
from tests.test_dvc_pipeline import make_repo, repo  # noqa: F401  (the temp git + DVC repo fixture)


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifact(key, flow_run_id=None):
    """Artifacts with this key, newest first; only those of one flow run when its id is given (the
    harness is shared by every test, so a key's history holds other tests' artifacts too)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    run_filter = ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                                    flow_run_id=run_filter),
                                     sort=ArtifactSort.CREATED_DESC)


@pytest.fixture(scope="module")
def built(tmp_path_factory, prefect_harness):
    """One full build flow run, shared: the build test asserts on it, the nightly test re-indexes its repo (a
    second full build would cost minutes of the suite)."""
    repo = make_repo(tmp_path_factory.mktemp("built") / "repo")
    state = build(str(repo), return_state=True)
    return repo, state


def test_build_runs_stages_in_dag_order_then_skips_them_and_fails_on_validation(built, tmp_path):
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    repo, first_state = built
    order = stage_order(repo)
    assert order.index("sample") < order.index("prepare") < order.index("embed") < order.index("index")
    assert order.index("upload") < order.index("jsonl") < order.index("finetune")

    first = first_state.result()
    assert [r["stage"] for r in first] == order and all(r["ran"] for r in first)
    assert _artifact("validation-prepare") and _artifact("validation-embed-table")
    run_id = first_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:  # the run graph: each stage waits for the stages it depends on
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    by_id = {r.id: r.name for r in runs}
    upstream = {r.name: {by_id[i.id] for i in r.task_inputs.get("wait_for", [])} for r in runs}
    assert upstream["prepare"] == {"sample"} and upstream["sample"] == set()
    assert "prepare" in upstream["embed"] and {"prepare", "upload"} <= upstream["jsonl"]
    assert upstream["train_projector_stage2"] >= {"train_projector_stage1"} and "index" in upstream["evaluate"]
    metrics = _artifact("build-metrics", run_id)
    assert metrics and "proj_r1" in metrics[0].data and "adj_f1" in metrics[0].data
    # every stage has its validation artifact, the table names the column each expectation checked, and no
    # artifact links to a file:// path (dead in a browser)
    for stage in order:
        assert _artifact(f"validation-{stage.replace('_', '-')}", run_id), stage
    table = json.loads(_artifact("validation-prepare-table", run_id)[0].data)
    assert {"uid", "id"} <= {row["column"] for row in table}
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        published = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert published and not any("file://" in str(a.data) for a in published)

    second_state = build(str(repo), return_state=True)
    second = second_state.result()
    assert not any(r["ran"] for r in second)
    # every stage publishes its validation even when DVC skipped it: the report describes the outputs in place
    for stage in ("sample", "embed", "index", "evaluate"):
        published = _artifact(f"validation-{stage.replace('_', '-')}", second_state.state_details.flow_run_id)
        assert published and "was up to date" in published[0].data

    # a stage DVC restores from its run-cache (a param changed and changed back) still publishes its validation
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    for seed in (1, params["jsonl"]["seed"]):
        params["jsonl"]["seed"] = seed
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        state = build(str(repo), stages=["jsonl"], return_state=True)
        (row,) = state.result()
    (repo / "params.yaml").write_text(original)
    assert row["restored"] and not row["ran"]
    published = _artifact("validation-jsonl", state.state_details.flow_run_id)
    assert published and "restored from DVC's run-cache" in published[0].data

    # a blocking validation failure: one corrupt image with no tolerance for quarantine (in a copy: the nightly
    # test goes on with the built repo)
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken, symlinks=True)
    params = yaml.safe_load((broken / "params.yaml").read_text())
    params["prepare"]["max_bad_fraction"] = 0.0
    (broken / "params.yaml").write_text(yaml.safe_dump(params))
    (broken / "data/sample/images_rgb/image_3_rgb.jpg").write_bytes(b"broken")
    state = build(str(broken), stages=["prepare"], return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="1 of 40 ids quarantined"):
        state.result()
    report = json.loads((broken / "artifacts/reports/validation/prepare.json").read_text())
    assert report["success"] is False
    latest = _artifact("validation-prepare")
    assert any("FAILED" in (a.data or "") for a in latest)


def test_the_dvc_cli_on_the_flows_build(built, tmp_path):
    """tests/test_dvc_pipeline.py's user checks on a copy of the flow-built repo: up to date for ``dvc repro``, a
    forced CLI rerun writes the flow's bytes, experiments compare (a copy: the nightly test goes on with the original)."""
    import shutil

    from tests.test_dvc_pipeline import check_dvc_cli_on_a_built_repo

    copy = tmp_path / "repo"
    shutil.copytree(built[0], copy, symlinks=True)
    check_dvc_cli_on_a_built_repo(copy)


def test_reindex_adds_only_new_images(built):
    from PIL import Image

    from flows.reindex import reindex

    repo, _ = built
    first = reindex(str(repo))
    assert first["added"] == 80 and first["index"]["rgb"]["mode"] == "rebuild"
    sample = repo / "data/sample"
    Image.open(sample / "images_tac/image_0_tac.jpg").rotate(90).save(sample / "images_tac/image_500_tac.jpg")
    Image.open(sample / "images_rgb/image_0_rgb.jpg").rotate(90).save(sample / "images_rgb/image_500_rgb.jpg")
    with open(sample / "captions.csv", "a") as fh:
        fh.write('500,"rough, hard",0\n')
    second = reindex(str(repo))
    assert (second["added"], second["removed"], second["changed"]) == (2, 0, 0)
    assert second["index"]["rgb"]["mode"] == "incremental" and second["index"]["rgb"]["removed"] == 0
    assert second["embedded_now"] == second["index"]["rgb"]["added"] >= 1  # only the new pair (and its copies)
    assert second["retrieval_before"] is not None and _artifact("reindex-report")


def test_a_stage_waits_while_another_dvc_process_holds_the_repo(repo):  # noqa: F811
    """The nightly run must not lose the night when a build holds DVC's lock: it waits (bounded), then runs."""
    import threading

    from dvc.lock import make_lock

    from flows.pipeline import run_dvc_stage

    lock = make_lock(str(repo / ".dvc/tmp/lock"), tmp_dir=str(repo / ".dvc/tmp"))
    lock.lock()
    try:
        held = run_dvc_stage(repo, "sample", lock_wait_s=0)
        assert held.returncode != 0 and "Unable to acquire lock" in held.stderr + held.stdout
        threading.Timer(3.0, lock.unlock).start()
        waited = run_dvc_stage(repo, "sample", lock_wait_s=120, poll_s=1)
    finally:
        if lock.is_locked:
            lock.unlock()
    assert waited.returncode == 0, waited.stderr
    assert "Running stage 'sample'" in waited.stdout


# --- review flow: pause with the approval form, resume with approve / reject, or time out ---------

KEY = "sk-test-review-0123456789abcdef"


def _review_project(tmp_path, base_url):
    from touchvl.chat.prices import DEFAULT_PRICES, cost_estimate
    from touchvl.chat.report import report_dict, samples, write_reports
    from touchvl.chat.validate import validate_file
    from tests.jsonl_fixtures import write_dataset

    for name, n in (("tactile_train", 12), ("tactile_val", 10), ("rgb_tac_train", 14), ("rgb_tac_val", 10)):
        path = tmp_path / "artifacts/jsonl" / f"{name}.jsonl"
        write_dataset(path, n)
        report = validate_file(path, model="gpt-4o-2024-08-06")
        d = report_dict(report, cost_estimate(report.summary, "gpt-4o-2024-08-06", DEFAULT_PRICES, n_epochs="auto"))
        d["samples"] = samples(path)
        write_reports(d, tmp_path / "artifacts/jsonl/reports" / name)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "finetune": {"provider": "compatible", "base_url": base_url, "poll_interval_s": 0.01,
                     "poll_max_interval_s": 0.02},
        "flows": {"review_poll_s": 1}}))
    return tmp_path


def _run_review_in_background(project, **kwargs):
    import threading

    from flows.review import review

    out = {}
    thread = threading.Thread(target=lambda: out.update(state=review(str(project), return_state=True, **kwargs)))
    thread.start()
    return thread, out


def _paused_review_run(timeout=60):
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if runs:
                return runs[0]
            time.sleep(0.5)
    raise AssertionError("the review flow never paused")


def test_review_approve_submits_exactly_once_and_streams_events(tmp_path, monkeypatch):
    from prefect.flow_runs import resume_flow_run

    from tests.openai_server import ApiServer, ApiState

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    state = ApiState(KEY)
    with ApiServer(state) as server:
        project = _review_project(tmp_path, server.base_url)
        thread, out = _run_review_in_background(project)
        paused = _paused_review_run()
        assert state.created_jobs == 0  # nothing happens before the form is answered
        (cost,) = _artifact("jsonl-cost", paused.id)
        assert {row["file"] for row in json.loads(cost.data)} == {"tactile_train", "tactile_val", "rgb_tac_train",
                                                                  "rgb_tac_val"}
        # the report itself, readable in the UI from any browser (no file:// link that opens nowhere)
        (report,) = _artifact("jsonl-report-tactile-train", paused.id)
        assert report.data.startswith("# JSONL validation") and "file://" not in report.data
        resume_flow_run(paused.id, run_input={"decision": "approve", "reviewer": "ana", "note": "quotas look right",
                                              "datasets": ["tactile"]})
        thread.join(120)
    result = out["state"].result()
    assert result["decision"] == "approve" and result["jobs"]["tactile"]["status"] == "succeeded"
    assert state.created_jobs == 1  # only the approved dataset
    approvals = json.loads((project / "artifacts/finetune/approvals.json").read_text())
    (record,) = approvals.values()
    assert record["approved_by"] == "ana" and record["note"] == "quotas look right" and record["dataset"] == "tactile"
    assert json.loads((project / "artifacts/finetune/model.json").read_text())["fine_tuned_model"].startswith("ft:")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    import time

    for _ in range(20):  # run logs reach the API in batches
        with get_client(sync_client=True) as client:
            logs = [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[paused.id])))]
        if any("successfully completed" in m for m in logs):
            break
        time.sleep(0.5)
    assert any("successfully completed" in m for m in logs)  # the job's events are in the flow run's logs
    assert not any(KEY in m for m in logs)
    (decision,) = _artifact("review-decision", paused.id)
    assert decision.data.startswith("# Approved by ana")
    assert all(KEY not in (a.data or "") for a in _artifact("review-decision") + _artifact("jsonl-cost"))


def test_review_reject_submits_nothing(tmp_path, monkeypatch):
    from prefect.flow_runs import resume_flow_run

    from tests.openai_server import ApiServer, ApiState

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    state = ApiState(KEY)
    with ApiServer(state) as server:
        project = _review_project(tmp_path, server.base_url)
        thread, out = _run_review_in_background(project)
        paused = _paused_review_run()
        resume_flow_run(paused.id, run_input={"decision": "reject", "reviewer": "bo",
                                              "note": "too many duplicate examples"})
        thread.join(120)
    final = out["state"]
    assert final.is_cancelled() and not final.is_completed()  # a rejection never looks like an approval
    assert "rejected by bo: too many duplicate examples" in final.message
    assert final.result(raise_on_failure=False)["decision"] == "reject"
    assert state.created_jobs == 0 and not state.files
    assert not (project / "artifacts/finetune/approvals.json").exists()
    (decision,) = _artifact("review-decision", paused.id)
    assert "Rejected by bo" in decision.data and "too many duplicate examples" in decision.data


def test_review_timeout_fails_and_submits_nothing(tmp_path, monkeypatch):
    from tests.openai_server import ApiServer, ApiState

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    state = ApiState(KEY)
    with ApiServer(state) as server:
        project = _review_project(tmp_path, server.base_url)
        thread, out = _run_review_in_background(project, timeout_s=2, poll_s=1)
        thread.join(120)
    assert out["state"].is_failed()
    assert state.created_jobs == 0 and not (project / "artifacts/finetune/approvals.json").exists()


# --- Dask: sharded embedding equals the single-process output -------------------------------------

def test_dask_sharded_embedding_equals_single_process(tmp_path, dataset):
    import numpy as np

    from touchvl.imagebind.sharded import shard_rows
    from tasks import embed, prepare
    from touchvl.disk import read_vectors
    from touchvl.params import parse_params

    rows = [(i, f"t{i}", f"r{i}") for i in range(11)]
    pieces = shard_rows(rows, 3, 4)
    assert [len(p) for p in pieces] == [4, 4, 3] and sum(pieces, []) == rows  # whole batches, order kept

    def params(name, **extra):
        return parse_params({
            "data": {"root": str(dataset)},
            "prepare": {"out_dir": str(tmp_path / "prepared"), "quarantine_csv": str(tmp_path / "q.csv"),
                        "augment": {"copies": 1}},
            "embed": {"random_weights": True, "out_dir": str(tmp_path / name), "cache_dir": str(tmp_path / name / "cache"),
                      "summary": str(tmp_path / name / "summary.json"), "num_workers": 0,
                      **extra},
            "validation": {"reports_dir": str(tmp_path / "val"), "build_data_docs": False}})

    prepare.run(params("local"))
    single = embed.run(params("local"))
    sharded = embed.run(params("dask", runner="dask", dask_workers=2, shards=3))
    assert sharded.embedded_now == single.embedded_now >= 30  # separate caches: both embed all
    for modality in ("tac", "rgb", "text"):
        a, ids_a = read_vectors(tmp_path / "local" / f"embeddings_{modality}")
        b, ids_b = read_vectors(tmp_path / "dask" / f"embeddings_{modality}")
        assert np.array_equal(ids_a, ids_b) and np.array_equal(a, b)


def test_dask_on_a_separately_started_scheduler_and_two_workers(tmp_path, dataset):
    """The way a user's cluster runs: `dask scheduler` and two `dask worker` processes, embed.dask_address set.
    The workers import touchvl from the installed package and read the images from the shared filesystem."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    from tasks import embed, prepare
    from touchvl.disk import read_vectors
    from touchvl.params import parse_params

    dask_cli = str(Path(sys.executable).parent / "dask")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or "", "OMP_NUM_THREADS": "1"}
    scheduler_file = tmp_path / "scheduler.json"
    logs = open(tmp_path / "cluster.log", "wb")
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], env=env, stdout=logs, stderr=logs,
                              cwd=tmp_path, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        procs += [subprocess.Popen([dask_cli, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                    "--no-dashboard", "--name", f"w{i}"], env=env, stdout=logs, stderr=logs,
                                   cwd=tmp_path, start_new_session=True) for i in range(2)]
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            address = client.scheduler.address

            def params(name, **extra):
                return parse_params({
                    "data": {"root": str(dataset)},
                    "prepare": {"out_dir": str(tmp_path / "prepared"), "quarantine_csv": str(tmp_path / "q.csv"),
                                "augment": {"copies": 1}},
                    "embed": {"random_weights": True, "out_dir": str(tmp_path / name), "cache_dir": str(tmp_path / name / "cache"),
                              "summary": str(tmp_path / name / "summary.json"), "num_workers": 0, **extra},
                    "validation": {"reports_dir": str(tmp_path / "val"), "build_data_docs": False}})

            prepare.run(params("local"))
            single = embed.run(params("local"))
            sharded = embed.run(params("cluster", runner="dask", dask_address=address, shards=4))
            # every worker built the encoder once and embedded shards (the work really left this process)
            built = client.run(lambda: __import__("touchvl.imagebind.sharded", fromlist=["x"])._worker_encoder.cache_info().currsize)
        assert sorted(built.values()) == [1, 1], built
        assert sharded.embedded_now == single.embedded_now >= 30
        for modality in ("tac", "rgb", "text"):
            a, ids_a = read_vectors(tmp_path / "local" / f"embeddings_{modality}")
            b, ids_b = read_vectors(tmp_path / "cluster" / f"embeddings_{modality}")
            assert np.array_equal(ids_a, ids_b) and np.array_equal(a, b)
    finally:
        for proc in reversed(procs):
            with __import__("contextlib").suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
        logs.close()


def test_decoding_workers_outlive_a_process_that_ran_prefect(dataset):
    """A process that has run a Prefect flow holds Prefect's log and event services in its threading-atexit
    hooks. Forked decoding workers inherited them, all exited with code 1, and the DataLoader raised after the
    last batch (the embed stage on a Prefect-Dask worker, a flow that embeds in-process)."""
    from prefect import flow

    from touchvl.imagebind.embedding import pair_loader
    from touchvl.imagebind.preprocess import preprocess_image

    @flow
    def ping() -> int:
        return 1

    assert ping() == 1
    rows = [(i, str(dataset / f"images_tac/image_{i}_tac.jpg"), str(dataset / f"images_rgb/image_{i}_rgb.jpg"))
            for i in range(6)]
    seen, errors = [], []
    for uids, pixels, failed in pair_loader(rows, preprocess_image, batch_size=2, num_workers=2):
        seen += uids
        errors += failed
        assert pixels.shape == (2 * len(uids), 3, 224, 224)
    assert seen == list(range(6)) and errors == []
