"""The fine-tuning contract every provider keeps: the exact files, the plan, the approval gate.

* :class:`DatasetFiles`: the train/validation JSONL pair, identified by its sha256 (the approval, file names
  and job metadata all carry it, so a changed byte is a new dataset);
* :func:`plan`: the dry run (``plan.json``): files, hyperparameters, cost from the one price table
  (``jsonl.prices_per_million``), approval state, the provider's notice;
* :func:`approve`: re-validates the exact bytes, shows the cost, records who approved what.

What differs per provider (rules and prices of the re-validation, hyperparameters, the plan, the approval
prompt, the submission) is :mod:`touchvl.finetune.providers`; each submission writes ``job.json``
(queued -> running -> succeeded | failed | cancelled) and, on success, ``model.json``.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from touchvl import disk
from touchvl.chat.prices import cost_estimate
from touchvl.chat.validate import validate_file
from touchvl.errors import StageError
from touchvl.params import FinetuneParams, Params

OPENAI_SHUTDOWN = dt.date(2027, 1, 6)  # OpenAI accepts no new fine-tuning jobs from this day
TERMINAL = ("succeeded", "failed", "cancelled")
TRAINING_KEYS = ("base_model", "quantization", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                 "exclude_modules", "epochs", "max_steps", "lr", "lr_scheduler", "warmup_steps", "weight_decay",
                 "max_grad_norm", "batch_size", "grad_accum", "max_length")


@dataclass(frozen=True)
class DatasetFiles:
    train: Path
    val: Path

    @property
    def sha256(self) -> dict[str, str]:
        return {"train": disk.sha256_file(self.train), "val": disk.sha256_file(self.val)}

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


def provider_notice(provider: str, today: dt.date, countdown: bool = True) -> str | None:
    """OpenAI's wind-down: warn before the cut-off, refuse from it.

    ``countdown=False`` for what goes into an artifact (the stage's plan.json, a DVC output): the days left
    change every day, and an output that changes with the calendar is one `dvc repro` can never reproduce."""
    if provider != "openai":
        return None
    if today >= OPENAI_SHUTDOWN:
        raise StageError(f"OpenAI accepts no new fine-tuning jobs since {OPENAI_SHUTDOWN}. Use finetune.provider: "
                         f"azure (Azure OpenAI) or compatible (an OpenAI-compatible endpoint), or local LoRA training.")
    left = f" ({(OPENAI_SHUTDOWN - today).days} days left)" if countdown else ""
    return (f"OpenAI stops accepting new fine-tuning jobs on {OPENAI_SHUTDOWN}{left}; "
            f"finetune.provider: azure or compatible keep working after that.")


def validation_summary(files: DatasetFiles, model: str, n_epochs, prices: dict[str, float],
                       max_duplicate_fraction: float | None = 0.01) -> dict:
    """Re-validate the exact bytes that would be uploaded (never trust a report of another version)."""
    out = {}
    for role, path in (("train", files.train), ("val", files.val)):
        report = validate_file(path, model=model, max_duplicate_fraction=max_duplicate_fraction)
        out[role] = {"path": str(path), "examples": report.summary.examples, "errors": len(report.errors),
                     "warnings": len(report.warnings), "first_error": report.errors[0].__dict__ if report.errors else None}
        if role == "train":
            out["cost"] = cost_estimate(report.summary, model, prices, n_epochs=n_epochs)
    return out


def local_hyperparameters(p: FinetuneParams) -> dict:
    return {"n_epochs": p.local.epochs, **p.local.model_dump(mode="json", include=set(TRAINING_KEYS) - {"base_model", "epochs"})}


def validation_tables(plan_dict: dict, files: DatasetFiles, job: dict | None, model: dict | None) -> list:
    """The finetune boundary: the plan describes the files on disk now, and job.json / model.json (when they
    exist) belong to this plan's dataset and provider -- a model.json of an older dataset would otherwise be
    served by TouchQA as if it were trained on this one."""
    import pandas as pd

    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
    # with submit: true a stale job or model is an error; in a dry run it is only reported
    strict = dict(severity="critical" if plan_dict["submit"] else "warning")
    critical = dict(severity="critical")
    sha = files.dataset_sha256()
    plan_frame = pd.DataFrame([{"sha_matches_files": plan_dict["dataset_sha256"] == sha,
                                "files_valid": all(f["errors"] == 0 for f in plan_dict["files"].values())}])
    tables = [checks.Table("plan", plan_frame, [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True], **critical)
                                                for c in plan_frame.columns])]
    if job:
        job_frame = pd.DataFrame([{"job_dataset_matches_plan": job.get("dataset_sha256") == sha,
                                   "job_provider_matches_plan": job.get("provider") == plan_dict["provider"]}])
        tables.append(checks.Table("job", job_frame, [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True], **strict)
                                                      for c in job_frame.columns]))
    if model:
        model_frame = pd.DataFrame([{"model_job_matches_job": bool(job) and model.get("job_id") == job.get("job_id"),
                                     "job_succeeded": bool(job) and job.get("status") == "succeeded",
                                     "model_provider_matches_plan": model.get("provider") == plan_dict["provider"]}])
        tables.append(checks.Table("model", model_frame, [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True], **strict)
                                                          for c in model_frame.columns]))
    return tables
