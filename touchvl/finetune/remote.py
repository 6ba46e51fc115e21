"""Hosted fine-tuning through the ``openai`` client: OpenAI, Azure OpenAI, any OpenAI-compatible endpoint.

:class:`Submission` uploads the approved files, creates the job and polls it to a terminal state -- exactly
once and resumable.  State (``artifacts/finetune/state.json``) is written before and after every remote step;
files and jobs carry the dataset's sha256 (file names, job metadata), so a response lost after the server acted
is recovered by looking the object up instead of creating a second one, and a rerun after kill -9 resumes
polling the same job.  Retries of 429/5xx/timeouts are the ``openai`` client's own.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path


from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a client is made or its errors are caught: an offline answer, a plan
    import openai  # or a search never pays the SDK's import (~1.2 s a process)

from touchvl import disk
from touchvl.errors import StageError
from touchvl.finetune.contract import TERMINAL, DatasetFiles, validation_summary
from touchvl.params import FinetuneParams, Params

log = logging.getLogger(__name__)
KEY_VARS = {"openai": "OPENAI_API_KEY", "compatible": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY",
            "local": "LOCAL_MODEL_API_KEY",  # local: optional, only if the local server was started with one
            "together": "TOGETHER_API_KEY"}


def serve_url(p: FinetuneParams) -> str:
    return p.local.serve_url or f"http://{p.local.serve_host}:{p.local.serve_port}/v1"


def make_client(p: FinetuneParams) -> openai.OpenAI:
    import openai

    if p.provider == "local":  # the served local model: TouchQA and evaluate use it through the same client
        return openai.OpenAI(base_url=serve_url(p), api_key=os.environ.get(KEY_VARS["local"]) or "local",
                             max_retries=p.max_retries, timeout=p.timeout_s)
    key_var = KEY_VARS[p.provider]
    key = os.environ.get(key_var)
    if p.provider == "together" and key:  # Together's chat API is OpenAI-compatible: TouchQA and evaluate use it as is
        return openai.OpenAI(base_url=p.together.base_url.rstrip("/") + "/v1", api_key=key, max_retries=p.max_retries,
                             timeout=p.timeout_s)
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


class Submission:
    """One dataset's journey: upload files, create the job, poll to a terminal state."""

    def __init__(self, params: Params, client: openai.OpenAI, files: DatasetFiles, sleep=time.sleep):
        self.params, self.p, self.client, self.files, self.sleep = params, params.finetune, client, files, sleep
        self.state_path = self.p.out_dir / "state.json"
        self.sha = files.dataset_sha256()
        state = disk.read_json(self.state_path, {})
        # a new dataset starts a new submission; the same dataset resumes where it stopped
        self.state = state if state.get("dataset_sha256") == self.sha else {"dataset_sha256": self.sha, "files": {}, "seen_events": []}

    def save(self) -> None:
        disk.write_json(self.state_path, self.state)

    def check_gate(self) -> None:
        approvals = disk.read_json(self.p.out_dir / "approvals.json", {})
        if self.sha not in approvals:
            raise StageError(f"dataset {self.p.dataset} (sha256 {self.sha[:12]}) is not approved: "
                             f"run `touchvl finetune approve` after reading its report")
        self.checked = checked = self.checked_files()
        bad = [role for role in ("train", "val") if checked[role]["errors"]]
        if bad:
            raise StageError(f"{', '.join(bad)} file has validation errors; refusing to submit")

    def checked_files(self) -> dict:
        """The exact files re-validated with this provider's rules and prices (overridden per provider)."""
        return validation_summary(self.files, self.p.model, self.p.n_epochs, self.params.jsonl.prices_per_million,
                                  self.params.jsonl.max_duplicate_fraction)

    def upload(self, role: str, path: Path) -> str:
        import openai

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
        import openai

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
                    seed=self.p.seed, hyperparameters={"n_epochs": self.p.n_epochs},
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

    # -- polling: idempotent reads, so faults are waited out (not the end of the run) until finetune.poll_timeout_s
    def retrieve(self, job_id: str):
        return self.client.fine_tuning.jobs.retrieve(job_id)

    def job_status(self, job) -> str:
        return job.status

    def list_checkpoints(self, job_id: str) -> list[dict]:
        return [c.model_dump(mode="json") for c in self.client.fine_tuning.jobs.checkpoints.list(job_id)]

    def transient(self, exc: Exception) -> bool:
        """No answer, a timeout, a 5xx or a 429: worth another poll (a 4xx other than 429 is not)."""
        import openai

        return isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)) or (
            isinstance(exc, openai.APIStatusError) and (exc.status_code >= 500 or exc.status_code == 429))

    def poll(self, wait: bool = True) -> dict:
        """Poll to a terminal state (``wait``) or once.  Only a terminal job state, a 4xx other than 429, or
        ``finetune.poll_timeout_s`` of waiting ends it; 5xx, 429 (honouring ``Retry-After``) and dropped
        connections are waited out with capped exponential backoff, after the client's own retries."""
        job_id = self.state["job_id"]
        interval = self.p.poll_interval_s
        waited, faults = 0.0, 0
        while True:
            try:
                job = self.retrieve(job_id)
                self.new_events(job_id)
                status = self.job_status(job)
                checkpoints = self.list_checkpoints(job_id) if status == "succeeded" else None
            except Exception as exc:
                if not self.transient(exc):
                    raise
                faults += 1
                if not wait:
                    raise StageError(f"could not read job {job_id} ({type(exc).__name__}); try again") from None
                asked = retry_after(exc)  # the server's own wait wins; our backoff is capped
                delay = asked if asked is not None else min(self.p.poll_interval_s * 2 ** min(faults, 10), self.p.poll_max_interval_s)
                if waited + delay > self.p.poll_timeout_s:
                    raise StageError(f"gave up polling job {job_id} after {waited:.0f} s of waiting (finetune.poll_timeout_s="
                                     f"{self.p.poll_timeout_s:.0f}); the last error: {type(exc).__name__}. The job keeps "
                                     f"running at the provider: a rerun resumes polling it") from None
                log.warning("polling job %s: %s (%d in a row); trying again in %.1f s", job_id, type(exc).__name__, faults, delay)
                self.sleep(delay)
                waited += delay
                continue
            faults = 0
            self.state["status"] = status
            self.save()
            self.write_job(job)
            if status in TERMINAL or not wait:
                return self.finish(job, checkpoints)
            if waited + interval > self.p.poll_timeout_s:
                raise StageError(f"job {job_id} is still {status} after {waited:.0f} s of polling (finetune.poll_timeout_s="
                                 f"{self.p.poll_timeout_s:.0f}); it keeps running at the provider: a rerun resumes polling it")
            self.sleep(interval)
            waited += interval
            interval = min(interval * 1.5, self.p.poll_max_interval_s)

    def write_job(self, job) -> None:
        disk.write_json(self.p.out_dir / "job.json", {
            "job_id": job.id, "status": job.status, "model": job.model, "fine_tuned_model": job.fine_tuned_model,
            "created_at": job.created_at, "finished_at": job.finished_at, "trained_tokens": job.trained_tokens,
            "error": job.error.model_dump() if job.error else None, "dataset_sha256": self.sha,
            "provider": self.p.provider})

    def finish(self, job, checkpoints: list[dict] | None) -> dict:
        if job.status == "succeeded":
            disk.write_json(self.p.out_dir / "checkpoints.json", checkpoints or [])
            disk.write_json(self.p.out_dir / "model.json", {"fine_tuned_model": job.fine_tuned_model, "job_id": job.id,
                                                              "base_model": job.model, "provider": self.p.provider})
        elif job.status == "failed":
            error = job.error.message if job.error else "no message"
            raise StageError(f"fine-tuning job {job.id} failed: {error}")
        return disk.read_json(self.p.out_dir / "job.json", {})

    def run(self, wait: bool = True) -> dict:
        self.check_gate()
        with api_errors(self.p.provider):
            self.create_job()
            return self.poll(wait)

    # -- the commands of an existing job (``touchvl finetune status | events | cancel``)
    def _job_id(self) -> str:
        job_id = self.state.get("job_id")
        if not job_id:
            raise StageError(f"no job submitted for dataset {self.p.dataset} (sha256 {self.sha[:12]}) yet")
        return job_id

    def status(self) -> dict:
        self._job_id()  # fails clearly before any request when nothing was submitted
        with api_errors(self.p.provider):
            return self.poll(wait=False)

    def event_lines(self) -> list[str]:
        job_id = self._job_id()
        with api_errors(self.p.provider):
            events = reversed(list(self.client.fine_tuning.jobs.list_events(job_id, limit=100)))
            return [f"{e.created_at} [{e.level}] {e.message}" for e in events]

    def cancel(self) -> dict:
        job_id = self._job_id()
        with api_errors(self.p.provider):
            job = self.client.fine_tuning.jobs.cancel(job_id)
        self.state["status"] = job.status
        self.save()
        self.write_job(job)
        return disk.read_json(self.p.out_dir / "job.json", {})


def retry_after(exc: Exception) -> float | None:
    """Seconds a 429 asks us to wait (``retry-after-ms`` or ``retry-after``), when it says."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, float(headers.get(name)) / scale)
    return None


@contextlib.contextmanager
def api_errors(provider: str):
    """4xx (bad key, unknown model, invalid file) stop with the server's own message; a server that cannot be
    reached or does not answer in time (after the client's own retries) stops with one line naming its URL."""
    import openai

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


