"""DVC stage ``finetune``: the dry-run plan (``finetune.submit: false``, the default) or the submission.

Writes ``artifacts/finetune/plan.json`` (files, sha256, hyperparameters, cost, approval state); with
``submit: true`` an approved dataset is submitted exactly once and polled (core: touchvl.finetune).  The
former module commands are aliases: ``python -m tasks.finetune approve|submit|status|events|cancel|serve ...``
= ``touchvl finetune ...`` (``export`` = ``touchvl export``).
"""
from __future__ import annotations

import datetime as dt
import importlib
import logging
import sys

from touchvl import disk
from touchvl.finetune.contract import dataset_files, provider_notice, validation_tables
from touchvl.finetune.providers import plan, submission
from touchvl import checks  # light: Great Expectations is imported only when it runs
from touchvl.logs import run_stage
from touchvl.params import Params

log = logging.getLogger(__name__)
COMMANDS = ("plan", "approve", "submit", "status", "events", "cancel", "list", "serve", "export")


def _check(params: Params, the_plan: dict, files) -> None:

    p = params.finetune
    tables = validation_tables(the_plan, files, disk.read_json(p.out_dir / "job.json"), disk.read_json(p.out_dir / "model.json"))
    checks.run_validation("finetune", tables, params.validation).raise_if_failed()


def run(params: Params, today: dt.date | None = None) -> dict:
    p = params.finetune
    files = dataset_files(params)
    today = today or dt.date.today()
    the_plan = plan(params, files, today)
    disk.write_json(p.out_dir / "plan.json", the_plan)
    if the_plan["notice"]:  # the log counts the days; the plan (a DVC output) does not
        log.warning(provider_notice(p.provider, today))
    if not p.submit:
        _check(params, the_plan, files)
        log.info("finetune.submit is false: wrote %s, no network call", p.out_dir / "plan.json")
        return the_plan
    job = submission(params, files).run()
    _check(params, the_plan, files)  # the job and model just written belong to this plan's dataset
    return job


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:  # the former module commands: now `touchvl finetune ...`
        cli = importlib.import_module("touchvl.cli").main  # at run time: the alias is not part of the stage's deps
        sys.exit(cli(["-C", ".", *(argv if argv[0] == "export" else ["finetune", *argv])]))
    run_stage("finetune", __doc__, lambda params, args: run(params), argv, start=checks.stage_starts)


if __name__ == "__main__":
    main()
