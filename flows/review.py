"""The review flow: a person reads the JSONL report and approves (or rejects) before anything is
uploaded or paid for.

1. The validation report of every fine-tuning file (``artifacts/jsonl/reports/<name>/``) becomes
   Prefect artifacts: its Markdown, a cost table across files and a link to the HTML report.
2. The flow pauses with a typed form (:class:`ReviewDecision`: approve or reject, reviewer, note,
   datasets).  In the UI it is the paused run's *Resume* button.
3. approve → the approval is recorded for the exact bytes (``touchvl.finetune.contract.approve``: the files are
   re-validated, keyed by their sha256), the upload stage runs through DVC when the storage backend
   is remote, and each dataset is submitted through its provider's submission (exactly once,
   resumable); the job's events are streamed into this flow's logs.
   reject → nothing is approved or submitted; the note is kept as the ``review-decision`` artifact.
   no answer within ``flows.review_timeout_s`` → the run fails, nothing submitted.

    .venv/bin/python -m flows.review [--repo .]      # or the `review` deployment of `make ui`
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, pause_flow_run
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.states import Cancelled
from pydantic import Field

from flows.pipeline import reproduce_stage
from touchvl.errors import StageError
from touchvl.finetune import contract
from touchvl.finetune.providers import approve, submission
from touchvl.params import Params, load_params

DATASETS = ("tactile", "rgb_tac")


class ReviewDecision(RunInput):
    """The approval form shown when the paused run is resumed."""

    decision: Literal["approve", "reject"] = Field(description="approve: record the approval and submit; reject: stop")
    reviewer: str = Field(description="who reviewed the report (kept with the approval)")
    note: str = Field("", description="why; kept with the approval or the rejection")
    datasets: list[Literal["tactile", "rgb_tac"]] = Field(
        default_factory=lambda: ["tactile"], description="which fine-tuning sets to approve and submit")


def _for_dataset(params: Params, dataset: str) -> Params:
    return params.model_copy(update={"finetune": params.finetune.model_copy(update={"dataset": dataset})})


def publish_review(params: Params) -> list[dict]:
    """Report artifacts for every file of every dataset; returns the cost table rows."""
    rows = []
    for dataset in DATASETS:
        for split in ("train", "val"):
            name = f"{dataset}_{split}"
            folder = params.jsonl.out_dir / "reports" / name
            if not (folder / "report.json").is_file():
                continue
            report = json.loads((folder / "report.json").read_text())
            s = report["summary"]
            rows.append({"file": name, "examples": s["examples"], "errors": s["error_count"],
                         "warnings": s["warning_count"], "tokens_per_epoch": s["cost"]["billed_tokens_per_epoch"],
                         "epochs": s["cost"]["epochs"], "trained_tokens": s["cost"]["trained_tokens"],
                         "cost_usd": s["cost"]["cost_usd"], "model": report["model"]})
            key = f"jsonl-report-{name.replace('_', '-')}"
            # the report's content itself, readable in the UI from any browser (a file:// link opens nowhere but
            # on the machine that ran the flow); report.html with the sample images stays beside the files
            create_markdown_artifact(key=key, markdown=(folder / "report.md").read_text()[:50_000],
                                     description=f"validation report of {name}.jsonl ({folder / 'report.html'})")
    if not rows:
        raise StageError(f"no JSONL reports under {params.jsonl.out_dir / 'reports'}: run the build flow (or `dvc repro jsonl`) first")
    create_table_artifact(key="jsonl-cost", table=rows, description="fine-tuning cost estimate per file")
    return rows


class _ForwardToRunLogger(logging.Handler):
    """Job events are logged by touchvl.finetune; this puts them into the flow run's logs too."""

    def __init__(self, run_logger):
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def _job_events_in_run_logs(run_logger):
    """Remote job events (touchvl.finetune.remote) and local training steps (touchvl.finetune.local.job) reach the run's logs."""
    forward = _ForwardToRunLogger(run_logger)
    sources = [logging.getLogger("touchvl.finetune")]
    levels = [source.level for source in sources]
    for source in sources:
        source.setLevel(logging.INFO)
        source.addHandler(forward)
    try:
        yield
    finally:
        for source, level in zip(sources, levels):
            source.removeHandler(forward)
            source.setLevel(level)


def submit(params: Params, dataset: str) -> dict:
    ds_params = _for_dataset(params, dataset)
    files = contract.dataset_files(ds_params)
    notice = contract.provider_notice(ds_params.finetune.provider, dt.date.today())
    if notice:
        get_run_logger().warning(notice)
    return submission(ds_params, files).run(wait=True)


@flow(name="review", log_prints=True)
def review(repo: str = ".", timeout_s: int | None = None, poll_s: int | None = None) -> dict:
    """Publish the JSONL review report, wait for the approval form, then submit (or stop)."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    with contextlib.chdir(root):  # params paths are relative to the project, as for `dvc repro`
        params = load_params()
        rows = publish_review(params)
        total = sum(r["cost_usd"] for r in rows if r["file"].endswith("_train"))
        cost = (f"training files ~${total:.2f} in all at {params.jsonl.model} prices" if params.finetune.provider != "local"
                else f"provider local: trained on this machine, no API cost (~${total:.2f} at {params.jsonl.model} prices)")
        if params.finetune.provider == "together":  # the reports price OpenAI's model; Together's rates differ
            cost = (f"provider together: the reports say ~${total:.2f} at {params.jsonl.model} prices; Together's own "
                    f"estimate for {params.finetune.together.model} is in artifacts/finetune/plan.json (dvc repro finetune)")
        logger.info("review the reports (artifacts jsonl-report-*, jsonl-cost); %s", cost)
        form = ReviewDecision.with_initial_data(
            description=(f"Read the artifacts `jsonl-report-*` and `jsonl-cost` ({cost}), "
                         "then approve or reject."), datasets=[params.finetune.dataset])
        try:
            decision = pause_flow_run(wait_for_input=form, key="review",
                                      timeout=timeout_s or params.flows.review_timeout_s,
                                      poll_interval=poll_s or params.flows.review_poll_s)
        except FlowPauseTimeout:
            create_markdown_artifact(key="review-decision", markdown="# Review timed out\n\nNothing was approved or submitted.")
            raise
        summary = {"decision": decision.decision, "reviewer": decision.reviewer, "note": decision.note,
                   "datasets": decision.datasets, "jobs": {}}
        if decision.decision == "reject":
            create_markdown_artifact(key="review-decision", markdown=(
                f"# Rejected by {decision.reviewer}\n\n{decision.note or '(no note)'}\n\nNothing was submitted."))
            logger.warning("rejected by %s: %s", decision.reviewer, decision.note or "(no note)")
            # not Completed: a rejection must not look like an approval in the run list
            return Cancelled(message=f"rejected by {decision.reviewer}: {decision.note or '(no note)'}; nothing submitted",
                             data=summary)
        for dataset in decision.datasets:
            record = approve(_for_dataset(params, dataset), contract.dataset_files(_for_dataset(params, dataset)),
                                      confirm=lambda: True, reviewer=decision.reviewer, note=decision.note)
            logger.info("approved %s (%s) ~$%s", dataset, record["files"], record["estimated_cost_usd"])
        if params.upload.backend != "local":
            reproduce_stage(root, "upload")  # images reach the bucket only after approval (skipped if up to date)
        with _job_events_in_run_logs(logger):
            for dataset in decision.datasets:
                job = submit(params, dataset)
                summary["jobs"][dataset] = {"job_id": job.get("job_id"), "status": job.get("status"),
                                            "fine_tuned_model": job.get("fine_tuned_model")}
        create_markdown_artifact(key="review-decision", markdown="\n".join(
            [f"# Approved by {decision.reviewer}", "", decision.note or "(no note)", ""]
            + [f"- `{d}`: job {j['job_id']} {j['status']} → {j['fine_tuned_model']}" for d, j in summary["jobs"].items()]))
        return summary


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.review")
    ap.add_argument("--repo", default=".")
    print(json.dumps(review(ap.parse_args().repo), indent=2))


if __name__ == "__main__":
    main()
