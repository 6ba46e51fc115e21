"""What differs per fine-tuning provider, in one place: the re-validation's rules and prices, hyperparameters,
the plan (dry run), the approval prompt, and which submission submits.

Providers: ``openai``, ``azure``, ``compatible`` (:mod:`touchvl.finetune.remote`), ``together``
(:mod:`touchvl.finetune.together`) and ``local`` (:mod:`touchvl.finetune.local.job`).  The provider-independent
contract (the files, their sha256, the notice, the validation of the stage's outputs) is
:mod:`touchvl.finetune.contract`.
"""
from __future__ import annotations

import datetime as dt
import os

from touchvl import disk
from touchvl.errors import StageError
from touchvl.finetune import together
from touchvl.finetune.contract import DatasetFiles, local_hyperparameters, provider_notice, validation_summary
from touchvl.params import FinetuneParams, Params


def hyperparameters(p: FinetuneParams) -> dict:
    if p.provider == "local":
        return local_hyperparameters(p)
    if p.provider == "together":
        return together.hyperparameters(p)
    return {"n_epochs": p.n_epochs}


def trained_model(p: FinetuneParams) -> str:
    return {"local": p.local.base_model, "together": p.together.model}.get(p.provider, p.model)


def epochs_setting(p: FinetuneParams):
    return {"local": p.local.epochs, "together": p.together.n_epochs}.get(p.provider, p.n_epochs)


def checked_files(params: Params, files: DatasetFiles) -> dict:
    """The exact files re-validated with the provider's own rules and prices (never a report of another version)."""
    p = params.finetune
    if p.provider == "together":
        return together.validation_summary(p, files, params.jsonl.max_duplicate_fraction)
    return validation_summary(files, p.model, epochs_setting(p), params.jsonl.prices_per_million,
                              params.jsonl.max_duplicate_fraction)


def plan(params: Params, files: DatasetFiles, today: dt.date) -> dict:
    p = params.finetune
    shas = files.sha256
    approvals = disk.read_json(p.out_dir / "approvals.json", {})
    checked = checked_files(params, files)
    if p.provider == "local":  # trained here: tokens as the validator counts them, no price
        checked["cost"].update(model=p.local.base_model, price_per_million=None, cost_usd=0.0)
    return {"provider": p.provider, "model": trained_model(p), "suffix": p.suffix, "seed": p.seed,
            "hyperparameters": hyperparameters(p), "dataset_sha256": files.dataset_sha256(),
            "files": {role: {"path": str(getattr(files, role)), "sha256": shas[role], "examples": checked[role]["examples"],
                             "errors": checked[role]["errors"]} for role in ("train", "val")},
            "estimated_cost": checked["cost"], "approved": files.dataset_sha256() in approvals,
            "notice": provider_notice(p.provider, today, countdown=False), "submit": p.submit}


def approve(params: Params, files: DatasetFiles, confirm, reviewer: str | None = None, note: str = "") -> dict:
    p = params.finetune
    checked = checked_files(params, files)
    cost = checked["cost"]
    print(f"dataset {p.dataset}: train {checked['train']['examples']} examples ({checked['train']['errors']} errors, "
          f"{checked['train']['warnings']} warnings), val {checked['val']['examples']} examples ({checked['val']['errors']} errors)")
    if p.provider == "local":
        print(f"local training on {p.local.base_model}: ~{cost['trained_tokens']:,} tokens ({cost['epochs']} epochs), no API cost")
    elif cost["cost_usd"] is None:
        print(f"estimated {cost['trained_tokens']:,} trained tokens ({cost['epochs']} epochs) on {trained_model(p)}; "
              f"no price known for it, so no cost estimate")
    else:
        print(f"estimated cost: {cost['trained_tokens']:,} trained tokens ({cost['epochs']} epochs) ~ ${cost['cost_usd']} "
              f"on {trained_model(p)}")
    if checked["train"]["errors"] or checked["val"]["errors"]:
        raise StageError("the files have validation errors; fix them before approving "
                         f"(first: {checked['train']['first_error'] or checked['val']['first_error']})")
    if not confirm():
        raise StageError("not approved")
    record = {"dataset": p.dataset, "files": files.sha256, "model": trained_model(p), "estimated_cost_usd": cost["cost_usd"],
              "approved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "approved_by": reviewer or os.environ.get("USER", "unknown"), "note": note}
    approvals = disk.read_json(p.out_dir / "approvals.json", {})
    approvals[files.dataset_sha256()] = record
    disk.write_json(p.out_dir / "approvals.json", approvals)
    return record


def submission(params: Params, files: DatasetFiles):
    """The provider's submission for these files: ``.run(wait)`` submits once and polls (or trains, for
    ``local``); ``.status()``, ``.event_lines()`` and ``.cancel()`` act on the job already submitted."""
    if params.finetune.provider == "local":
        from touchvl.finetune.local.job import LocalSubmission

        return LocalSubmission(params, files)
    if params.finetune.provider == "together":
        return together.TogetherSubmission(params, files)
    from touchvl.finetune.remote import Submission, make_client

    return Submission(params, make_client(params.finetune), files)


def export(params: Params, files: DatasetFiles, fmt: str, out, fetch_images: bool = False) -> dict:
    """The approved dataset, re-validated, converted for LLaMA-Factory / TRL / axolotl (touchvl.chat.export):
    the same gate as a submission, for users who train with those tools themselves."""
    from touchvl.chat.export import export_dataset
    from touchvl.chat.validate import fetch_url

    sha = files.dataset_sha256()
    if sha not in disk.read_json(params.finetune.out_dir / "approvals.json", {}):
        raise StageError(f"dataset {params.finetune.dataset} (sha256 {sha[:12]}) is not approved: "
                         f"run `touchvl finetune approve` after reading its report")
    checked = checked_files(params, files)
    bad = [role for role in ("train", "val") if checked[role]["errors"]]
    if bad:
        raise StageError(f"{', '.join(bad)} file has validation errors; refusing to export")
    return export_dataset({"train": files.train, "val": files.val}, fmt, out,
                          {"dataset": params.finetune.dataset, "dataset_sha256": sha, "files": files.sha256},
                          fetch=fetch_url if fetch_images else None)
