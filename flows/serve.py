"""Serve the project's deployments to a local Prefect server: ``make ui``.

    .venv/bin/python -m flows.serve --start-server   # what `make ui` runs: server on 127.0.0.1 + deployments
    .venv/bin/python -m flows.serve                  # deployments only, to the server in $PREFECT_API_URL

Deployments (all with ``repo`` = this project):

* ``build/build``     -- the whole DVC pipeline, on demand;
* ``review/review``   -- the JSONL review and approval form, on demand;
* ``reindex/nightly`` -- the re-index flow on the cron ``flows.reindex_cron`` (default ``0 2 * * *``).

With ``--start-server`` a ``prefect server start`` is launched on ``flows.server_host:server_port``
(127.0.0.1 by default: the UI is not exposed to the network), with its database under
``.prefect/`` in the project, and stopped again when this process ends (Ctrl-C).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from touchvl.params import Params, load_params


def deployments(repo: Path, params: Params) -> list:
    from prefect.client.schemas.schedules import CronSchedule

    from flows.pipeline import build
    from flows.reindex import reindex
    from flows.review import review

    where = {"repo": str(repo)}
    return [
        build.to_deployment(name="build", parameters=where, tags=["tvl"],
                            description="Reproduce the DVC pipeline stage by stage (unchanged stages are skipped)."),
        review.to_deployment(name="review", parameters=where, tags=["tvl"],
                             description="Publish the JSONL report and cost, wait for approval, then fine-tune."),
        reindex.to_deployment(name="nightly", parameters=where, tags=["tvl"],
                              schedule=CronSchedule(cron=params.flows.reindex_cron, timezone=params.flows.timezone),
                              description="Re-index new, changed and deleted images."),
    ]


def wait_healthy(api_url: str, timeout_s: float = 120.0, server: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"prefect server exited with status {server.returncode}; see its output above")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"prefect server at {api_url} did not become healthy in {timeout_s:.0f} s")


@contextlib.contextmanager
def local_server(host: str, port: int, home: Path):
    """A `prefect server start` child process on host:port; yields its API URL."""
    api_url = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api_url}
    home.mkdir(parents=True, exist_ok=True)
    prefect_cli = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen([str(prefect_cli), "server", "start", "--host", host, "--port", str(port)], env=env)
    try:
        wait_healthy(api_url, server=server)
        print(f"Prefect UI: http://{host}:{port}", flush=True)
        yield api_url
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)
        if server.poll() is None:
            server.kill()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.serve")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--start-server", action="store_true", help="also run a local Prefect server (make ui)")
    ap.add_argument("--port", type=int, default=None, help="server port (default flows.server_port)")
    args = ap.parse_args(argv)
    repo = Path(args.repo).resolve()
    params = load_params(repo / "params.yaml")
    with contextlib.ExitStack() as stack:
        if args.start_server:
            api_url = stack.enter_context(local_server(params.flows.server_host, args.port or params.flows.server_port,
                                                       repo / ".prefect"))
            # set before prefect is imported, so the served runs report to this server
            os.environ["PREFECT_API_URL"] = api_url
        from prefect import serve

        serve(*deployments(repo, params))


if __name__ == "__main__":
    main()
