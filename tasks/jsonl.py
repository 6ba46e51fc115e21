"""DVC stage ``jsonl``: the two fine-tuning datasets (train + validation files), validated, with review reports.

Writes ``artifacts/jsonl/{rgb_tac,tactile}_{train,val}.jsonl``, ``artifacts/jsonl/reports/<name>/report.{json,md,html}``
and ``artifacts/jsonl/summary.json`` (core: touchvl.chat).  The former module commands are aliases of the CLI:
``python -m tasks.jsonl validate FILE ...`` = ``touchvl validate FILE ...``,
``python -m tasks.jsonl rgb_tac|tactile ...`` = ``touchvl generate rgb_tac|tactile ...``.
"""
from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import asdict

from touchvl import disk, headline
from touchvl.chat.generate import (data_roots, distinct_combinations, join_manifest, multimodal_set, read_url_mapping,
                                   tactile_set, write_jsonl)
from touchvl.chat.prices import cost_estimate
from touchvl.chat.report import composition, example_tables, report_dict, samples, write_reports
from touchvl.chat.validate import validate_file
from touchvl.errors import StageError
from touchvl import checks  # light: Great Expectations is imported only when it runs
from touchvl.logs import run_stage
from touchvl.params import Params

log = logging.getLogger(__name__)


def run(params: Params) -> dict:

    p = params.jsonl
    # a killed run's half-written temporaries, before DVC could record them as part of an output
    disk.remove_stale_temps(p.out_dir, p.headline, *checks.report_paths("jsonl", params.validation))
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    splits = {"train": manifest.loc[manifest["split"] == "train", "uid"],
              "val": disk.evaluation_rows(manifest)["uid"]}
    all_items = join_manifest(manifest, read_url_mapping(params.upload.mapping), str(params.upload.mapping))
    common = dict(intents=p.intents, system=p.system_prompt, mode=p.image_mode, detail=p.detail, roots=data_roots(params))
    summary = {}
    tables = []
    reports: dict[str, dict] = {}
    for split, uids in splits.items():
        wanted = set(uids)
        items = [item for item in all_items if item.uid in wanted]
        limit_scale = 1.0 if split == "train" else 0.2  # validation files: a fifth of the training size
        limits = {"rgb_tac": max(1, int(p.multimodal_limit * limit_scale)), "tactile": max(1, int(p.tactile_limit * limit_scale))}
        datasets = {
            "rgb_tac": (multimodal_set(items, limits["rgb_tac"], p.text_only_every, seed=p.seed, **common), None),
            "tactile": (tactile_set(items, limits["tactile"], p.tactile_quotas, seed=p.seed, **common), p.tactile_quotas),
        }
        for name, (examples, quotas) in datasets.items():
            path = p.out_dir / f"{name}_{split}.jsonl"
            write_jsonl(path, examples)
            report = validate_file(path, model=p.model, max_duplicate_fraction=p.max_duplicate_fraction)
            d = report_dict(report, cost_estimate(report.summary, p.model, p.prices_per_million, n_epochs=p.n_epochs))
            d["composition"] = composition(examples, quotas, requested=limits[name],
                                           capacity=distinct_combinations(items, p.intents))
            d["samples"] = samples(path)
            reports[f"{name}_{split}"] = d
            tables += example_tables(f"{name}_{split}", examples, quotas)
            summary[f"{name}_{split}"] = {"examples": len(examples), "errors": len(report.errors),
                                          "warnings": len(report.warnings), "cost_usd": d["summary"]["cost"]["cost_usd"],
                                          "duplicate_fraction": d["summary"]["duplicate_fraction"]}
    checked = checks.run_validation("jsonl", tables, params.validation)
    for name, d in reports.items():  # the example-table expectations feed each file's review report
        d["expectations"] = [asdict(r) for r in checked.results if r.table in (name, f"{name}_quotas")]
        write_reports(d, p.out_dir / "reports" / name)
    bad = {name: d["errors"] for name, d in reports.items() if d["errors"]}
    if bad:
        name, errors = next(iter(bad.items()))
        raise StageError(f"{name}.jsonl: {len(errors)} validation errors, first: {errors[0]}")
    checked.raise_if_failed()
    disk.write_json(p.out_dir / "summary.json", summary)
    disk.write_json(p.headline, headline.cost(summary, params.finetune.dataset))
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in ("validate", "rgb_tac", "tactile"):  # the former module commands
        cli = importlib.import_module("touchvl.cli").main  # at run time: the alias is not part of the stage's deps
        sys.exit(cli(["-C", ".", *(argv if argv[0] == "validate" else ["generate", *argv])]))
    run_stage("jsonl", __doc__, lambda params, args: log.info("jsonl: %s", run(params)), argv, start=checks.stage_starts)


if __name__ == "__main__":
    main()
