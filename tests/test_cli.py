"""The `touchvl` commands a user types, run as real processes in a built project, and their `python -m tasks.*`
aliases: what they print is checked against the project's own data (the manifest, the index, the job server)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from touchvl import disk
from touchvl.retrieval.index import Retriever, load_index, search_params
from touchvl.retrieval.query import QueryEncoder
from tests.conftest import build_indexed_pipeline
from tests.jsonl_fixtures import write_dataset
from tests.openai_server import ApiServer, ApiState

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789abcdefghijklmnop"
CAPTIONS = ["hard, smooth, glossy", "soft, fuzzy, warm", "rough, grainy, matte", "bumpy, ridged, firm"]


def run(folder: Path, *argv: str, module: str = "touchvl", env: dict | None = None) -> subprocess.CompletedProcess:
    """``touchvl -C folder ARGV`` (or ``python -m MODULE ARGV`` in ``folder``) with no API key but ``env``'s."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "LOCAL_MODEL_API_KEY", "OPENAI_BASE_URL")}
    env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = ["-m", "touchvl", "-C", str(folder), *argv] if module == "touchvl" else ["-m", module, *argv]
    return subprocess.run([sys.executable, *cmd], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder (params.yaml + dvc.yaml) over a small built pipeline: prepare .. index."""
    tmp = tmp_path_factory.mktemp("cli")
    params = build_indexed_pipeline(tmp, CAPTIONS, 16)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    (tmp / "dvc.yaml").write_text("stages: {}\n")
    return tmp, params


def _hits(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_search_by_text_and_image_prints_the_indexs_hits_and_the_alias_prints_the_same(project):
    folder, params = project
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    retriever = Retriever(*load_index(params.index.out_dir, "rgb"), manifest)
    encoder = QueryEncoder(params)
    row = manifest.query("copy == 0").iloc[3]
    for query in (["--text", "glossy, smooth"], ["--image", row["tac_path"], "--sensor", str(row["sensor_id"])]):
        shown = run(folder, "search", *query, "-k", "3")
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        hits = _hits(shown.stdout)
        vector, space = (encoder.text(query[1]) if query[0] == "--text"
                         else encoder.tactile(query[1], int(query[3])))
        expected = retriever.search(vector, space, search_params(params.index, 3))[0]
        assert [h["uid"] for h in hits] == [h.uid for h in expected] and len(hits) == 3
        assert np.allclose([h["score"] for h in hits], [h.score for h in expected], atol=1e-5)
        captions = dict(zip(manifest["uid"], manifest["caption"]))
        assert all(h["caption"] == captions[h["uid"]] for h in hits)  # each hit's own caption, by uid
        alias = run(folder, "search", *query, "-k", "3", module="tasks.index")
        assert alias.returncode == 0 and alias.stdout == shown.stdout, alias.stderr


def test_search_errors_are_one_line(project, tmp_path):
    folder, _ = project
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    errors = []
    for argv in (["search", "--image", str(tmp_path / "bad.jpg")], ["search", "--index", "nope", "--text", "soft"]):
        shown = run(folder, *argv)
        assert shown.returncode != 0 and "Traceback" not in shown.stderr, shown.stderr
        assert len(shown.stderr.strip().splitlines()) == 1, shown.stderr
        errors.append(shown.stderr)
    assert "corrupt_image" in errors[0] and "bad.jpg" in errors[0]
    assert "nope" in errors[1]


def test_ask_offline_answers_with_evidence_from_the_manifest_and_the_alias_agrees(project):
    folder, params = project
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    row = manifest.query("copy == 0").iloc[0]
    argv = [row["tac_path"], "What does this feel like?", "--sensor", str(row["sensor_id"]), "--offline", "--json"]
    shown = run(folder, "ask", *argv)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    result = json.loads(shown.stdout)
    assert result["provider"] == "offline" and result["answerer"].startswith("offline retrieval answerer")
    captions = dict(zip(manifest["uid"], manifest["caption"]))
    evidence = result["evidence"]
    assert len(evidence) == 3 and all(e["caption"] == captions[e["uid"]] for e in evidence)
    assert [e["score"] for e in evidence] == sorted((e["score"] for e in evidence), reverse=True)
    # composed from the evidence: every adjective it names is one of the neighbours' (tied words in caption order)
    named = {w for e in evidence for w in e["caption"].split(", ")}
    assert result["text"].startswith("It most likely feels ") and any(w in result["text"] for w in named)
    # the same answer in every process (Python's string hashing differs per process: no set order leaks out)
    for seed in ("1", "2"):  # with the first run's random seed: three processes, three string-hash orders
        again = run(folder, "ask", *argv, module="tasks.qa", env={"PYTHONHASHSEED": seed})
        assert json.loads(again.stdout) == result, (again.stdout, again.stderr)
    text = run(folder, "ask", *argv[:-1])  # the readable form: the answer and the evidence's captions
    assert text.returncode == 0 and result["text"] in text.stdout
    assert all(e["caption"] in text.stdout for e in evidence)
    refused = run(folder, "ask", *argv[:-1], "--provider", "openai")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr


def test_finetune_plan_approve_submit_status_events_list_cancel_through_the_cli(tmp_path):
    """The job's life from the command line against the local OpenAI-compatible server: one job, its status and
    events as the server reports them, this project's job in `list`, cancelled by `cancel`; the key never printed."""
    write_dataset(tmp_path / "jsonl" / "tactile_train.jsonl", 12)
    write_dataset(tmp_path / "jsonl" / "tactile_val.jsonl", 10)
    state = ApiState(KEY)
    env = {"OPENAI_API_KEY": KEY}
    with ApiServer(state) as server:
        raw = {"jsonl": {"out_dir": str(tmp_path / "jsonl")},
               "validation": {"reports_dir": str(tmp_path / "val"), "build_data_docs": False},
               "finetune": {"provider": "compatible", "base_url": server.base_url, "out_dir": str(tmp_path / "ft"),
                            "submit": True, "poll_interval_s": 0.01, "poll_max_interval_s": 0.02}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        (tmp_path / "dvc.yaml").write_text("stages: {}\n")
        steps = {"plan": ["plan"], "unapproved": ["submit", "--no-wait"], "approve": ["approve", "--yes", "--reviewer", "ana"],
                 "submit": ["submit", "--no-wait"], "status": ["status"], "events": ["events"], "list": ["list"],
                 "cancel": ["cancel"], "cancelled": ["status"]}
        out = {name: run(tmp_path, "finetune", *argv, env=env) for name, argv in steps.items()}
        printed = "".join(p.stdout + p.stderr for p in out.values())
    assert KEY not in printed and "Traceback" not in printed
    plan = json.loads(out["plan"].stdout)
    assert plan["approved"] is False and plan["files"]["train"]["examples"] == 12
    assert out["unapproved"].returncode != 0 and "not approved" in out["unapproved"].stderr
    assert out["approve"].returncode == 0, out["approve"].stderr
    submitted = json.loads(out["submit"].stdout)
    (job_id,) = state.jobs
    assert submitted["job_id"] == job_id and state.created_jobs == 1
    assert json.loads(out["status"].stdout)["job_id"] == job_id
    assert out["events"].returncode == 0 and out["events"].stdout.strip()
    listed = out["list"].stdout
    assert json.loads(listed[:listed.index("\n}") + 2])["this_project"]["job_id"] == job_id and job_id in listed
    assert out["cancel"].stdout.strip() == f"{job_id}: cancelled" and state.jobs[job_id]["status"] == "cancelled"
    assert json.loads(out["cancelled"].stdout)["status"] == "cancelled"
