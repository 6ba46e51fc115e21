"""The build flow: every DVC stage as a Prefect task, in the order of dvc.yaml's DAG.

Each task runs ``dvc repro --single-item <stage>``, so DVC alone decides what is stale (unchanged
stages are skipped exactly as ``dvc repro`` skips them).  After a stage, its validation report
(``artifacts/reports/validation/<stage>.json``) is published as Prefect artifacts keyed per stage
(Markdown summary + table, so history is kept); a failed stage fails the flow with the stage's own
message, after its report has been published.

    .venv/bin/python -m flows.pipeline [--repo .]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.artifacts import create_markdown_artifact, create_table_artifact


class StageFailed(RuntimeError):
    """A stage's own failure (bad data, failed validation, 4xx): deterministic, never retried."""


def stage_graph(repo: Path) -> dict[str, list[str]]:
    """Each stage with the stages it depends on, in dependency order, read from dvc.yaml through DVC's own graph."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edges point from a stage to what it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        return {stage.name: sorted(dep.name for dep in graph.successors(stage)) for stage in order}


def stage_order(repo: Path) -> list[str]:
    return list(stage_graph(repo))


CHECKED_KEYS = ("column", "column_A", "column_B", "column_list", "column_set")


def _checked(kwargs: dict) -> str:
    """What an expectation applied to: its column(s), or the table."""
    for key in CHECKED_KEYS:
        if key in kwargs:
            value = kwargs[key]
            return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return "(table)"


def publish_validation(repo: Path, stage: str, how: str) -> dict | None:
    """The stage's validation report as artifacts, whether the stage ran, was restored from DVC's run-cache or
    was up to date (its report is a cached DVC output, so it always describes the outputs in place)."""
    from touchvl.params import load_params

    path = repo / load_params(repo / "params.yaml").validation.reports_dir / f"{stage}.json"
    key = f"validation-{stage.replace('_', '-')}"
    if not path.is_file():  # e.g. pretrain_smoke: its checks fail the stage itself and write no GX report
        create_markdown_artifact(key=key, description=f"validation of stage {stage} ({how})", markdown=(
            f"# Validation: `{stage}`\n\nThis build: the stage {how}. It writes no Great Expectations report: "
            f"its checks stop the stage with a message naming what failed (see the task's logs).\n"))
        return None
    report = json.loads(path.read_text())
    rows = [{"table": r["table"], "column": _checked(r.get("kwargs") or {}), "expectation": r["expectation"],
             "severity": r["severity"], "success": r["success"], "unexpected": r.get("unexpected_count"),
             "examples": json.dumps(r.get("unexpected_examples"))[:200]} for r in report["results"]]
    verdict = "passed" if report["success"] else f"FAILED ({report['blocking_failures']} blocking)"
    failed = "\n".join(f"- `{r['table']}.{r['column']}`: {r['expectation']} — unexpected {r['unexpected']}, e.g. {r['examples']}"
                       for r in rows if not r["success"]) or "- none"
    create_markdown_artifact(key=key, description=f"validation of stage {stage} ({how})", markdown=(
        f"# Validation: `{stage}` {verdict}\n\nThis build: the stage {how}. {len(rows)} expectations, "
        f"{report['warnings']} warnings.\n\n## Not met\n{failed}\n"))
    create_table_artifact(key=f"{key}-table", table=rows, description=f"expectations of stage {stage} ({how})")
    return report


def _no_retry_on_stage_failure(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, StageFailed)


DVC_LOCKED = "Unable to acquire lock"


def run_dvc_stage(repo: Path, stage: str, lock_wait_s: float, poll_s: float = 10.0, log=None) -> subprocess.CompletedProcess:
    """``dvc repro --single-item <stage>``; while another DVC process (a build, a user) holds the repo's lock,
    wait and try again, for at most ``lock_wait_s``.  (DVC's own ``--wait-for-lock`` waits forever: a nightly
    run must give up, say why, and leave the night's next run to try again.)"""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    deadline = time.monotonic() + lock_wait_s
    while True:
        proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "--single-item", stage],
                              cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode == 0 or DVC_LOCKED not in proc.stderr + proc.stdout or time.monotonic() >= deadline:
            return proc
        if log:
            log.warning("stage %s: the DVC repo is locked by another process; waiting (up to %.0f s more)", stage,
                        deadline - time.monotonic())
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_no_retry_on_stage_failure, task_run_name="{stage}")
def reproduce_stage(repo: Path, stage: str, lock_wait_s: float = 3600.0) -> dict:
    logger = get_run_logger()
    proc = run_dvc_stage(repo, stage, lock_wait_s, log=logger)
    restored = f"Stage '{stage}' is cached - skipping run, checking out outputs" in proc.stdout
    ran = f"Running stage '{stage}'" in proc.stdout
    how = "failed" if proc.returncode else "ran" if ran else "was restored from DVC's run-cache" if restored else "was up to date"
    report = publish_validation(repo, stage, how)
    if proc.returncode:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-15:]
        raise StageFailed(f"stage {stage} failed:\n" + "\n".join(tail))
    logger.info("stage %s: %s", stage, how)
    return {"stage": stage, "ran": ran, "restored": restored,
            "validation_success": report["success"] if report else None}


def publish_metrics(repo: Path) -> list[dict]:
    """One table of the build's headline metrics (``dvc metrics show``'s numbers, flattened)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        shown = dvc_repo.metrics.show()
    rows = []
    for path, entry in sorted((shown.get("", shown.get("workspace", {})).get("data") or {}).items()):
        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append({"file": path, "metric": prefix, "value": value})

        walk("", (entry or {}).get("data"))
    if rows:
        create_table_artifact(key="build-metrics", table=rows, description="the headline metrics of this build")
    return rows


# one stage at a time: DVC holds one lock per repo, and the stages share the machine's cores
@flow(name="build", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def build(repo: str = ".", stages: list[str] | None = None, lock_wait_s: float | None = None) -> list[dict]:
    """Reproduce the pipeline stage by stage (all of dvc.yaml unless ``stages`` names some); a stage waits up to
    ``lock_wait_s`` (default ``flows.lock_wait_s``) while another DVC process holds the repo."""
    from touchvl.params import load_params

    root = Path(repo).resolve()
    wait = lock_wait_s if lock_wait_s is not None else load_params(root / "params.yaml").flows.lock_wait_s
    futures = {}
    for stage, upstream in stage_graph(root).items():
        if stages and stage not in stages:
            continue
        # wait_for: the run graph shows DVC's DAG (a stage starts only after the stages it depends on)
        futures[stage] = reproduce_stage.submit(root, stage, wait, wait_for=[futures[u] for u in upstream if u in futures])
    results = [future.result() for future in futures.values()]
    publish_metrics(root)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline")
    ap.add_argument("--repo", default=".")
    args = ap.parse_args()
    for row in build(args.repo):
        print(row)


if __name__ == "__main__":
    main()
