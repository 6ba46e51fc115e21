"""Smoke test of `make ui`: a real `prefect server` on a free loopback port, the deployments served to it."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_make_ui_serves_the_deployments_with_the_nightly_schedule(tmp_path):
    port = _free_port()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"flows": {"reindex_cron": "30 3 * * *"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # the scheduler service normally wakes every 60 s; the test wants its first pass soon
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT),
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--start-server", "--port", str(port),
                             "--repo", str(tmp_path)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        found = []
        while time.monotonic() < deadline and len(found) < 3:
            assert proc.poll() is None, proc.stdout.read()
            try:
                found = _post(f"{api}/deployments/filter", {})
            except OSError:
                pass
            time.sleep(1)
        by_name = {d["name"]: d for d in found}
        assert set(by_name) == {"build", "review", "nightly"}, found
        flows = {f["id"]: f["name"] for f in _post(f"{api}/flows/filter", {})}
        assert {flows[d["flow_id"]] for d in found} == {"build", "review", "reindex"}
        assert all(d["parameters"]["repo"] == str(tmp_path) for d in found)
        (schedule,) = by_name["nightly"]["schedules"]
        assert schedule["schedule"]["cron"] == "30 3 * * *" and schedule["active"]
        assert not by_name["build"]["schedules"] and not by_name["review"]["schedules"]
        # the server's scheduler really creates the upcoming nightly runs, at 03:30 UTC
        nightly_filter = {"deployments": {"id": {"any_": [by_name["nightly"]["id"]]}},
                          "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
        upcoming = []
        while time.monotonic() < deadline and not upcoming:
            assert proc.poll() is None, proc.stdout.read()
            try:
                upcoming = _post(f"{api}/flow_runs/filter", nightly_filter)
            except OSError:  # a busy server may time out one request
                pass
            time.sleep(1)
        assert upcoming, "the scheduler created no runs for the nightly deployment"
        assert all(r["expected_start_time"][11:16] == "03:30" for r in upcoming)
        # the server listens on loopback only
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
