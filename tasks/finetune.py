"""``finetune``: plan, approve, submit and watch a fine-tuning job -- exactly once, resumable.

    python -m tasks.finetune                 # the DVC stage: plan.json (submit: false) or submit (submit: true)
    python -m tasks.finetune approve [--yes] # print the validation summary and cost, record the approval
    python -m tasks.finetune submit [--no-wait]
    python -m tasks.finetune status | events | cancel
    python -m tasks.finetune serve [--port N]  # provider local: the merged model on an OpenAI-compatible endpoint

State (``artifacts/finetune/state.json``) is written before and after every remote step.  Files and
jobs carry the dataset's sha256 (file names, job metadata), so a response lost after the server
acted is recovered by looking the object up instead of creating a second one, and a rerun after
kill -9 resumes polling the same job.  Retries of 429/5xx/timeouts are the ``openai`` client's own.
``provider: local`` trains LoRA adapters on this machine under the same contract (tasks/finetune_local.py).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from tasks import atomic
from tasks.jsonl import TRAINING_PRICES
from tasks.jsonl_validate import cost_estimate, validate_file
from tasks.params import FinetuneParams, Params, load_params
from tasks.stage import StageError, run_main

log = logging.getLogger(__name__)
OPENAI_SHUTDOWN = dt.date(2027, 1, 6)  # OpenAI accepts no new fine-tuning jobs from this day
TERMINAL = ("succeeded", "failed", "cancelled")
KEY_VARS = {"openai": "OPENAI_API_KEY", "compatible": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY",
            "local": "LOCAL_MODEL_API_KEY"}  # local: optional, only if the local server was started with one


@dataclass(frozen=True)
class DatasetFiles:
    train: Path
    val: Path

    @property
    def sha256(self) -> dict[str, str]:
        return {"train": atomic.sha256_file(self.train), "val": atomic.sha256_file(self.val)}

    def dataset_sha256(self) -> str:
        shas = self.sha256
        return hashlib.sha256(f"{shas['train']}:{shas['val']}".encode()).hexdigest()


def dataset_files(params: Params) -> DatasetFiles:
    d = params.finetune.dataset
    files = DatasetFiles(params.jsonl.out_dir / f"{d}_train.jsonl", params.jsonl.out_dir / f"{d}_val.jsonl")
    for path in (files.train, files.val):
        if not path.is_file():
            raise StageError(f"{path}: not found (run `dvc repro jsonl`)")
    return files


def provider_notice(provider: str, today: dt.date) -> str | None:
    """OpenAI's wind-down: warn before the cut-off, refuse from it."""
    if provider != "openai":
        return None
    if today >= OPENAI_SHUTDOWN:
        raise StageError(f"OpenAI accepts no new fine-tuning jobs since {OPENAI_SHUTDOWN}. Use finetune.provider: "
                         f"azure (Azure OpenAI) or compatible (an OpenAI-compatible endpoint), or local LoRA training.")
    return (f"OpenAI stops accepting new fine-tuning jobs on {OPENAI_SHUTDOWN} ({(OPENAI_SHUTDOWN - today).days} days left); "
            f"finetune.provider: azure or compatible keep working after that.")


def serve_url(p: FinetuneParams) -> str:
    return p.local.serve_url or f"http://{p.local.serve_host}:{p.local.serve_port}/v1"


def make_client(p: FinetuneParams) -> openai.OpenAI:
    if p.provider == "local":  # the served local model: TouchQA and evaluate use it through the same client
        return openai.OpenAI(base_url=serve_url(p), api_key=os.environ.get(KEY_VARS["local"]) or "local",
                             max_retries=p.max_retries, timeout=p.timeout_s)
    key_var = KEY_VARS[p.provider]
    key = os.environ.get(key_var)
    if not key:
        raise StageError(f"finetune.provider={p.provider} needs {key_var} in the environment")
    common = dict(api_key=key, max_retries=p.max_retries, timeout=p.timeout_s)
    if p.provider == "azure":
        if not p.azure_endpoint:
            raise StageError("finetune.provider=azure needs finetune.azure_endpoint")
        return openai.AzureOpenAI(azure_endpoint=p.azure_endpoint, api_version=p.azure_api_version, **common)
    if p.provider == "compatible":
        if not p.base_url:
            raise StageError("finetune.provider=compatible needs finetune.base_url")
        return openai.OpenAI(base_url=p.base_url, **common)
    return openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL") or None, **common)


def validation_summary(files: DatasetFiles, model: str, n_epochs) -> dict:
    """Re-validate the exact bytes that would be uploaded (never trust a report of another version)."""
    out = {}
    for role, path in (("train", files.train), ("val", files.val)):
        report = validate_file(path, model=model)
        out[role] = {"path": str(path), "examples": report.summary.examples, "errors": len(report.errors),
                     "warnings": len(report.warnings), "first_error": report.errors[0].__dict__ if report.errors else None}
        if role == "train":
            out["cost"] = cost_estimate(report.summary, model, TRAINING_PRICES, n_epochs=n_epochs)
    return out


def hyperparameters(p: FinetuneParams) -> dict:
    if p.provider == "local":
        from tasks.finetune_local import hyperparameters as local_hyperparameters

        return local_hyperparameters(p)
    return {"n_epochs": p.n_epochs}


def trained_model(p: FinetuneParams) -> str:
    return p.local.base_model if p.provider == "local" else p.model


def epochs_setting(p: FinetuneParams):
    return p.local.epochs if p.provider == "local" else p.n_epochs


def plan(params: Params, files: DatasetFiles, today: dt.date) -> dict:
    p = params.finetune
    shas = files.sha256
    approvals = read_json(p.out_dir / "approvals.json", {})
    checked = validation_summary(files, p.model, epochs_setting(p))
    if p.provider == "local":  # trained here: tokens as the validator counts them, no price
        checked["cost"].update(model=p.local.base_model, price_per_million=None, cost_usd=0.0)
    return {"provider": p.provider, "model": trained_model(p), "suffix": p.suffix, "seed": p.seed,
            "hyperparameters": hyperparameters(p), "dataset_sha256": files.dataset_sha256(),
            "files": {role: {"path": str(getattr(files, role)), "sha256": shas[role], "examples": checked[role]["examples"],
                             "errors": checked[role]["errors"]} for role in ("train", "val")},
            "estimated_cost": checked["cost"], "approved": files.dataset_sha256() in approvals,
            "notice": provider_notice(p.provider, today), "submit": p.submit}


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def approve(params: Params, files: DatasetFiles, confirm, reviewer: str | None = None, note: str = "") -> dict:
    p = params.finetune
    checked = validation_summary(files, p.model, epochs_setting(p))
    cost = checked["cost"]
    print(f"dataset {p.dataset}: train {checked['train']['examples']} examples ({checked['train']['errors']} errors, "
          f"{checked['train']['warnings']} warnings), val {checked['val']['examples']} examples ({checked['val']['errors']} errors)")
    if p.provider == "local":
        print(f"local training on {p.local.base_model}: ~{cost['trained_tokens']:,} tokens ({cost['epochs']} epochs), no API cost")
    else:
        print(f"estimated cost: {cost['trained_tokens']:,} trained tokens ({cost['epochs']} epochs) ~ ${cost['cost_usd']} on {p.model}")
    if checked["train"]["errors"] or checked["val"]["errors"]:
        raise StageError("the files have validation errors; fix them before approving "
                         f"(first: {checked['train']['first_error'] or checked['val']['first_error']})")
    if not confirm():
        raise StageError("not approved")
    record = {"dataset": p.dataset, "files": files.sha256, "model": trained_model(p), "estimated_cost_usd": cost["cost_usd"],
              "approved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "approved_by": reviewer or os.environ.get("USER", "unknown"), "note": note}
    approvals = read_json(p.out_dir / "approvals.json", {})
    approvals[files.dataset_sha256()] = record
    atomic.write_json(p.out_dir / "approvals.json", approvals)
    return record


class Submission:
    """One dataset's journey: upload files, create the job, poll to a terminal state."""

    def __init__(self, params: Params, client: openai.OpenAI, files: DatasetFiles, sleep=time.sleep):
        self.p, self.client, self.files, self.sleep = params.finetune, client, files, sleep
        self.state_path = self.p.out_dir / "state.json"
        self.sha = files.dataset_sha256()
        state = read_json(self.state_path, {})
        # a new dataset starts a new submission; the same dataset resumes where it stopped
        self.state = state if state.get("dataset_sha256") == self.sha else {"dataset_sha256": self.sha, "files": {}, "seen_events": []}

    def save(self) -> None:
        atomic.write_json(self.state_path, self.state)

    def check_gate(self) -> None:
        approvals = read_json(self.p.out_dir / "approvals.json", {})
        if self.sha not in approvals:
            raise StageError(f"dataset {self.p.dataset} (sha256 {self.sha[:12]}) is not approved: "
                             f"run `python -m tasks.finetune approve` after reading its report")
        checked = validation_summary(self.files, self.p.model, self.p.n_epochs)
        bad = [role for role in ("train", "val") if checked[role]["errors"]]
        if bad:
            raise StageError(f"{', '.join(bad)} file has validation errors; refusing to submit")

    def upload(self, role: str, path: Path) -> str:
        if role in self.state["files"]:
            return self.state["files"][role]
        name = f"{self.sha[:16]}-{path.name}"  # the sha in the name finds an upload whose response was lost
        for attempt in range(self.p.max_retries + 1):
            found = [f.id for f in self.client.files.list(purpose="fine-tune") if f.filename == name]
            if found:
                file_id = found[0]
                break
            try:
                with open(path, "rb") as fh:
                    file_id = self.client.with_options(max_retries=0).files.create(file=(name, fh), purpose="fine-tune").id
                break
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
                log.warning("upload of %s: %s; checking whether it arrived (attempt %d)", name, type(exc).__name__, attempt + 1)
                self.sleep(min(2**attempt, 30))
        else:
            raise StageError(f"could not upload {path} after {self.p.max_retries + 1} attempts")
        self.state["files"][role] = file_id
        self.save()
        return file_id

    def find_job(self) -> str | None:
        for job in self.client.fine_tuning.jobs.list(metadata={"dataset_sha256": self.sha}, limit=100):
            if (job.metadata or {}).get("dataset_sha256") == self.sha and job.status != "cancelled":
                return job.id
        return None

    def create_job(self) -> str:
        if self.state.get("job_id"):
            return self.state["job_id"]
        train_id = self.upload("train", self.files.train)
        val_id = self.upload("val", self.files.val)
        self.state["status"] = "creating"
        self.save()
        # creation is not idempotent: no blind client retry; after any failure, look before trying again
        for attempt in range(self.p.max_retries + 1):
            job_id = self.find_job()
            if job_id:
                log.info("resuming existing job %s for this dataset", job_id)
                break
            try:
                job = self.client.with_options(max_retries=0).fine_tuning.jobs.create(
                    model=self.p.model, training_file=train_id, validation_file=val_id, suffix=self.p.suffix,
                    seed=self.p.seed, hyperparameters=hyperparameters(self.p),
                    metadata={"dataset_sha256": self.sha, "dataset": self.p.dataset})
                job_id = job.id
                break
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
                log.warning("job creation: %s; checking whether the job exists (attempt %d)", type(exc).__name__, attempt + 1)
                self.sleep(min(2**attempt, 30))
        else:
            raise StageError(f"could not create the fine-tuning job after {self.p.max_retries + 1} attempts")
        self.state.update(job_id=job_id, status="created", created_at=time.time())
        self.save()
        return job_id

    def new_events(self, job_id: str) -> list:
        seen = set(self.state["seen_events"])
        fresh = [e for e in reversed(list(self.client.fine_tuning.jobs.list_events(job_id, limit=100))) if e.id not in seen]
        for event in fresh:
            log.info("job %s [%s] %s", job_id, event.level, event.message)
        self.state["seen_events"] += [e.id for e in fresh]
        return fresh

    def poll(self, wait: bool = True) -> dict:
        job_id = self.state["job_id"]
        interval = self.p.poll_interval_s
        while True:
            job = self.client.fine_tuning.jobs.retrieve(job_id)
            self.new_events(job_id)
            self.state["status"] = job.status
            self.save()
            self.write_job(job)
            if job.status in TERMINAL or not wait:
                return self.finish(job)
            self.sleep(interval)
            interval = min(interval * 1.5, self.p.poll_max_interval_s)

    def write_job(self, job) -> None:
        atomic.write_json(self.p.out_dir / "job.json", {
            "job_id": job.id, "status": job.status, "model": job.model, "fine_tuned_model": job.fine_tuned_model,
            "created_at": job.created_at, "finished_at": job.finished_at, "trained_tokens": job.trained_tokens,
            "error": job.error.model_dump() if job.error else None, "dataset_sha256": self.sha,
            "provider": self.p.provider})

    def finish(self, job) -> dict:
        if job.status == "succeeded":
            checkpoints = [c.model_dump(mode="json") for c in self.client.fine_tuning.jobs.checkpoints.list(job.id)]
            atomic.write_json(self.p.out_dir / "checkpoints.json", checkpoints)
            atomic.write_json(self.p.out_dir / "model.json", {"fine_tuned_model": job.fine_tuned_model, "job_id": job.id,
                                                              "base_model": job.model, "provider": self.p.provider})
        elif job.status == "failed":
            error = job.error.message if job.error else "no message"
            raise StageError(f"fine-tuning job {job.id} failed: {error}")
        return read_json(self.p.out_dir / "job.json", {})

    def run(self, wait: bool = True) -> dict:
        self.check_gate()
        with api_errors(self.p.provider):
            self.create_job()
            return self.poll(wait)


@contextlib.contextmanager
def api_errors(provider: str):
    """4xx (bad key, unknown model, invalid file) stop with the server's own message; a server that cannot be
    reached or does not answer in time (after the client's own retries) stops with one line naming its URL."""
    try:
        yield
    except openai.APIStatusError as exc:  # the server's own message, without the client's "Error code: N - " prefix
        body = exc.body if isinstance(exc.body, dict) else {}
        raise StageError(f"{provider} API error {exc.status_code}: {body.get('message') or exc.message}") from None
    except openai.APIConnectionError as exc:  # APITimeoutError is one
        url = exc.request.url.copy_with(query=None) if getattr(exc, "request", None) is not None else "its URL"
        what = "did not answer in time (finetune.timeout_s)" if isinstance(exc, openai.APITimeoutError) else \
            f"is unreachable ({_root_cause(exc)})"
        raise StageError(f"{provider} API at {url} {what}; check the server, the network or the base URL") from None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc) or type(exc).__name__


def run(params: Params, today: dt.date | None = None) -> dict:
    p = params.finetune
    today = today or dt.date.today()
    files = dataset_files(params)
    the_plan = plan(params, files, today)
    atomic.write_json(p.out_dir / "plan.json", the_plan)
    if the_plan["notice"]:
        log.warning(the_plan["notice"])
    if not p.submit:
        log.info("finetune.submit is false: wrote %s, no network call", p.out_dir / "plan.json")
        return the_plan
    return submission(params, files).run()


def submission(params: Params, files: DatasetFiles):
    """The provider's submission for these files: ``.run(wait)`` submits once and polls (or trains, for local)."""
    if params.finetune.provider == "local":
        from tasks.finetune_local import LocalSubmission

        return LocalSubmission(params, files)
    return Submission(params, make_client(params.finetune), files)


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.finetune")
    sub = ap.add_subparsers(dest="command")
    approve_cmd = sub.add_parser("approve", help="print the report summary and cost, then record the approval")
    approve_cmd.add_argument("--yes", action="store_true", help="approve without the interactive question")
    submit_cmd = sub.add_parser("submit", help="upload, create the job (once) and poll")
    submit_cmd.add_argument("--no-wait", action="store_true")
    for name in ("status", "events", "cancel"):
        sub.add_parser(name)
    serve_cmd = sub.add_parser("serve", help="provider local: serve model.json's merged model (OpenAI-compatible)")
    serve_cmd.add_argument("--host", default=None)
    serve_cmd.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    params = load_params()
    if args.command is None:
        run(params)
        return
    if args.command == "serve":
        from tasks.model_server import serve_finetuned

        serve_finetuned(params.finetune, args.host, args.port)
        return
    files = dataset_files(params)
    if args.command == "approve":
        confirm = (lambda: True) if args.yes else (lambda: input("approve this dataset for fine-tuning? [y/N] ").strip().lower() == "y")
        record = approve(params, files, confirm)
        print(f"approved: {record['files']}")
        return
    if params.finetune.provider == "local":
        from tasks import finetune_local

        finetune_local.command(args.command, params, files, wait=not getattr(args, "no_wait", False))
        return
    notice = provider_notice(params.finetune.provider, dt.date.today())
    if notice:
        log.warning(notice)
    submission = Submission(params, make_client(params.finetune), files)
    if args.command == "submit":
        print(json.dumps(submission.run(wait=not args.no_wait), indent=2))
        return
    job_id = submission.state.get("job_id")
    if not job_id:
        raise StageError("no job submitted for this dataset yet")
    with api_errors(params.finetune.provider):
        commands(args.command, submission, job_id)


def commands(command: str, submission: Submission, job_id: str) -> None:
    if command == "status":
        print(json.dumps(submission.poll(wait=False), indent=2))
    elif command == "events":
        for event in reversed(list(submission.client.fine_tuning.jobs.list_events(job_id, limit=100))):
            print(f"{event.created_at} [{event.level}] {event.message}")
    elif command == "cancel":
        job = submission.client.fine_tuning.jobs.cancel(job_id)
        submission.state["status"] = job.status
        submission.save()
        submission.write_job(job)
        print(f"{job_id}: {job.status}")


if __name__ == "__main__":
    run_main("finetune", lambda: cli(sys.argv[1:]))
