"""Validation at stage boundaries, on Great Expectations (ephemeral, in-process context).

A stage describes its artifacts as :class:`Table` s (a DataFrame plus expectations).  Each
expectation carries GX's own ``severity``: ``critical`` blocks the stage, ``warning`` is reported
only.  :func:`run_validation` runs every table through a GX Checkpoint, builds Data Docs HTML
under ``artifacts/reports/data_docs/<stage>/`` and writes
``artifacts/reports/validation/<stage>.json``::

    {"stage", "success", "blocking_failures", "warnings", "results": [
        {"table", "expectation", "kwargs", "severity", "success", "observed",
         "unexpected_count", "unexpected_examples"}]}

A failed critical expectation raises :class:`ValidationFailed` naming the expectation and the
first offending rows (by id column).
"""
from __future__ import annotations

import logging
import functools
import os
from dataclasses import asdict, dataclass, field

import pandas as pd

from touchvl import disk
from touchvl.params import ValidationParams
from touchvl.errors import StageError

log = logging.getLogger(__name__)


@functools.cache
def _gx():
    """Great Expectations, imported on first use (about 4 s): importing touchvl.checks costs nothing, so a stage
    or library caller pays for GX only when it actually builds expectations or validates."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # offline: no usage statistics calls
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before import: GX logs at import time
    import great_expectations as gx

    # GX sets some of its module loggers to INFO at import time ("Created temporary directory ..." on every run):
    # put every one of them back under our rule, libraries at WARNING (touchvl.logs)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")]:
        logging.getLogger(name).setLevel(logging.NOTSET)
    return gx


def __getattr__(name: str):
    # ``checks.gx`` and ``checks.gxe`` (the expectation classes) resolve lazily, PEP 562
    if name == "gxe":
        return _gx().expectations
    if name == "gx":
        return _gx()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MAX_EXAMPLES = 5


@dataclass
class Table:
    name: str
    frame: pd.DataFrame
    expectations: list  # great_expectations.expectations.Expectation
    id_column: str | None = None  # how unexpected rows are named in messages


@dataclass(frozen=True)
class ExpectationOutcome:
    table: str
    expectation: str
    kwargs: dict
    severity: str
    success: bool
    observed: object = None
    unexpected_count: int | None = None
    unexpected_examples: list = field(default_factory=list)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k not in ("batch_id",))
        text = f"{self.table}: {self.expectation}({args})"
        if self.unexpected_count:
            text += f" -- {self.unexpected_count} unexpected, e.g. {self.unexpected_examples}"
        elif self.observed is not None:
            text += f" -- observed {self.observed!r}"
        return text


class ValidationFailed(StageError):
    pass


@dataclass
class ValidationReport:
    stage: str
    results: list[ExpectationOutcome]

    @property
    def blocking_failures(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success and r.severity == "critical"]

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success and r.severity != "critical"]

    @property
    def success(self) -> bool:
        return not self.blocking_failures

    def to_dict(self) -> dict:
        return {"stage": self.stage, "success": self.success,
                "blocking_failures": len(self.blocking_failures), "warnings": len(self.warnings),
                "results": [asdict(r) for r in self.results]}

    def raise_if_failed(self) -> None:
        if self.success:
            return
        lines = "\n".join(f"  - {r.describe()}" for r in self.blocking_failures)
        raise ValidationFailed(f"validation of stage '{self.stage}' failed "
                               f"({len(self.blocking_failures)} blocking expectation(s)):\n{lines}")


def _examples(result: dict, frame: pd.DataFrame, id_column: str | None) -> list:
    if id_column and result.get("unexpected_index_list"):
        ids = []
        for entry in result["unexpected_index_list"][:MAX_EXAMPLES]:
            ids.append(entry.get(id_column) if isinstance(entry, dict) else entry)
        return ids
    return list(result.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def run_validation(stage: str, tables: list[Table], params: ValidationParams) -> ValidationReport:
    """Run each table's expectations in one ephemeral GX context; write JSON report and Data Docs."""
    gx = _gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    actions = []
    if params.build_data_docs:
        docs_dir = (params.data_docs_dir / stage).resolve()
        context.add_data_docs_site(site_name=stage, site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        })
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=[stage]))
    source = context.data_sources.add_pandas(name=stage)
    outcomes: list[ExpectationOutcome] = []
    for table in tables:
        batch_definition = source.add_dataframe_asset(name=table.name).add_batch_definition_whole_dataframe(table.name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"{stage}.{table.name}"))
        for expectation in table.expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{stage}.{table.name}", data=batch_definition, suite=suite))
        result_format = {"result_format": "COMPLETE"}
        if table.id_column:
            result_format["unexpected_index_column_names"] = [table.id_column]
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{stage}.{table.name}", validation_definitions=[definition], actions=actions,
            result_format=result_format))
        run = checkpoint.run(batch_parameters={"dataframe": table.frame})
        for suite_result in run.run_results.values():
            for r in suite_result.results:
                config = r.expectation_config
                res = r.result or {}
                outcomes.append(ExpectationOutcome(
                    table=table.name, expectation=config.type,
                    kwargs=_jsonable({k: v for k, v in config.kwargs.items() if k != "batch_id"}),
                    severity=str(getattr(config, "severity", "critical") or "critical").split(".")[-1].lower(),
                    success=bool(r.success), observed=_jsonable(res.get("observed_value")),
                    unexpected_count=res.get("unexpected_count"),
                    unexpected_examples=_jsonable(_examples(res, table.frame, table.id_column)),
                ))
    report = ValidationReport(stage, outcomes)
    disk.write_json(params.reports_dir / f"{stage}.json", report.to_dict())
    disk.write_text(params.reports_dir / f"{stage}.html", report_html(report))
    for w in report.warnings:
        log.warning("validation warning: %s", w.describe())
    log.info("validation %s: %d expectations, %d blocking failures, %d warnings -> %s",
             stage, len(outcomes), len(report.blocking_failures), len(report.warnings),
             params.reports_dir / f"{stage}.json")
    return report


def report_html(report: ValidationReport) -> str:
    """The report as one self-contained page (inline style, no script, no network): what a browser opens
    offline.  GX's Data Docs load their CSS and JS from CDNs, so they are opt-in (validation.build_data_docs)."""
    import html

    rows = []
    for r in report.results:
        column = next((str(r.kwargs[k]) for k in ("column", "column_A", "column_list", "column_set") if k in r.kwargs), "(table)")
        args = ", ".join(f"{k}={v!r}" for k, v in r.kwargs.items() if k not in ("column", "batch_id"))
        verdict = "met" if r.success else ("NOT MET" if r.severity == "critical" else "warning")
        rows.append(f'<tr class="{"ok" if r.success else r.severity}"><td>{html.escape(r.table)}</td>'
                    f"<td>{html.escape(column)}</td><td>{html.escape(r.expectation)}</td><td>{html.escape(args[:300])}</td>"
                    f"<td>{r.severity}</td><td>{verdict}</td><td>{r.unexpected_count if r.unexpected_count is not None else ''}</td>"
                    f"<td>{html.escape(str(r.unexpected_examples)[:300])}</td></tr>")
    verdict = "passed" if report.success else f"FAILED: {len(report.blocking_failures)} blocking"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>validation: {html.escape(report.stage)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}
tr.critical td{{background:#fdd}} tr.warning td{{background:#ffd}} .passed{{color:#2a2}} .failed{{color:#c22}}</style></head><body>
<h1>Validation of stage <code>{html.escape(report.stage)}</code>: <span class="{"passed" if report.success else "failed"}">{verdict}</span></h1>
<p>{len(report.results)} expectations, {len(report.warnings)} warnings (Great Expectations).</p>
<table><tr><th>table</th><th>column</th><th>expectation</th><th>arguments</th><th>severity</th><th>result</th>
<th>unexpected</th><th>examples</th></tr>{"".join(rows)}</table></body></html>
"""
