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

Replay (``run_validation(..., replay_dir=...)``): importing GX costs seconds, more than a fully cached stage
rerun does. When every expectation is declared as plain data (:data:`expect`, built into GX objects only when GX
really runs), a run is keyed by the content hash of exactly what is validated (each table's frame, and the
arrays it was derived from) and the hash of the suite (expectations, id columns, GX/pandas/numpy versions and
this module's source). A *passing* run stores its report under that key; a later run with the same key writes
the same report (byte for byte: ``replayed_from`` is in the log and the caller's run summary, not in the
report) without importing GX. Failures are never stored,
so never replayed; any changed byte or expectation changes the key and GX runs for real.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from touchvl import disk
from touchvl.params import ValidationParams
from touchvl.errors import StageError

log = logging.getLogger(__name__)


@functools.cache
def import_gx():
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
        return import_gx().expectations
    if name == "gx":
        return import_gx()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MAX_EXAMPLES = 5
REPLAY_FORMAT = 1  # bump when what a stored record means changes
REPLAY_KEEP = 8  # passing records kept per stage: enough for a few alternating datasets, bounded on disk


@dataclass
class Expect:
    """A GX expectation as plain data (class name and arguments); :meth:`build` makes the GX object, importing
    GX, only when the validation really runs. A suite of these can be hashed without GX (the replay key)."""

    type: str  # the class name in great_expectations.expectations, e.g. "ExpectColumnValuesToBeUnique"
    kwargs: dict

    def build(self):
        return getattr(import_gx().expectations, self.type)(**self.kwargs)

    def definition(self) -> dict:
        return {"type": self.type, "kwargs": _jsonable(self.kwargs)}


class _Declare:
    """``checks.expect.ExpectColumnValuesToBeUnique(column="uid", severity="critical")``: spelt as with
    ``checks.gxe``, but an :class:`Expect` (no GX import); a misspelt class fails when GX builds it."""

    def __getattr__(self, name: str):
        if not name.startswith("Expect"):
            raise AttributeError(name)
        return lambda **kwargs: Expect(name, kwargs)


expect = _Declare()


@dataclass
class Table:
    name: str
    frame: pd.DataFrame
    expectations: list  # great_expectations.expectations.Expectation, or Expect (replayable)
    id_column: str | None = None  # how unexpected rows are named in messages
    derived_from: tuple = ()
    """Arrays the frame was computed from (e.g. the vectors behind a norm column): hashed into the replay key
    with the frame, so a changed byte the frame's summary cannot show (same norm) still re-validates."""


HISTORY_COLUMNS = ("epoch", "loss", "val_r1", "tau", "lr")


def history_table(history: list[dict], bounded: dict[str, tuple[float, float]] | None = None,
                  columns: tuple[str, ...] = HISTORY_COLUMNS) -> Table:
    """A training curve (one row per epoch) as a suite: at least one epoch, every value finite, ``bounded``
    columns (default: ``val_r1`` in [0, 1]) within their ranges.

    Finiteness is its own boolean column per value: GX's range and set expectations count a NaN as a *missing*
    value and skip it, so a NaN ``val_r1`` or ``loss`` passed ``ExpectColumnValuesToBeBetween`` silently; a
    missing column (an epoch that logged no ``tau``) is not finite either.
    """
    bounded = {"val_r1": (0.0, 1.0)} if bounded is None else bounded
    curve = pd.DataFrame(history, columns=list(columns))
    critical = dict(severity="critical")
    expectations = [expect.ExpectTableRowCountToBeBetween(min_value=1, **critical)]
    for column in columns:
        values = pd.to_numeric(curve[column], errors="coerce").to_numpy(dtype=float)
        curve[f"{column}_finite"] = np.isfinite(values)
        expectations.append(expect.ExpectColumnValuesToBeInSet(column=f"{column}_finite", value_set=[True], **critical))
    for column, (lo, hi) in bounded.items():
        expectations.append(expect.ExpectColumnValuesToBeBetween(column=column, min_value=lo, max_value=hi, **critical))
    return Table("history", curve, expectations, id_column="epoch")


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
    content_hash: str | None = None  # of what was validated; set when the run was replayable
    replayed_from: str | None = None  # the content hash of the passing run this report replays

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
        out = {"stage": self.stage, "success": self.success,
               "blocking_failures": len(self.blocking_failures), "warnings": len(self.warnings)}
        if self.content_hash:  # only replayable runs carry it: other stages' reports keep their shape
            # not whether this report was replayed (that goes to the log and the run's summary): the report is a
            # DVC output, and a forced rerun on identical inputs must write the same bytes
            out["content_hash"] = self.content_hash
        out["results"] = [asdict(r) for r in self.results]
        return out

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


def run_validation(stage: str, tables: list[Table], params: ValidationParams,
                   replay_dir: Path | None = None) -> ValidationReport:
    """Run each table's expectations in one ephemeral GX context; write JSON report and Data Docs.

    With ``replay_dir`` (default: ``params.replay_dir``) and every expectation an :class:`Expect`, a passing
    result is stored there, and a later
    run on identical content and suite replays it without importing GX (not when Data Docs are wanted: those
    are GX's own rendering of a real run).
    """
    replay_dir = params.replay_dir if replay_dir is None else replay_dir  # embed keeps its records in its cache
    key = replay_key(stage, tables) if replay_dir is not None else None
    if key and not params.build_data_docs:
        report = _replayed(Path(replay_dir), stage, key)
        if report is not None:
            _write_report(report, params)
            log.info("validation %s: replayed the passing run for content hash %s (%d expectations, %d warnings; "
                     "Great Expectations not run) -> %s", stage, report.content_hash, len(report.results),
                     len(report.warnings), params.reports_dir / f"{stage}.json")
            return report
    report = ValidationReport(stage, _outcomes(stage, tables, params), content_hash=key["content"] if key else None)
    _write_report(report, params)
    log.info("validation %s: %d expectations, %d blocking failures, %d warnings -> %s",
             stage, len(report.results), len(report.blocking_failures), len(report.warnings),
             params.reports_dir / f"{stage}.json")
    if key and report.success:  # never a failure: a failing run must fail again, for real, next time
        _store(Path(replay_dir), stage, key, report)
    return report


def report_paths(stage: str, params: ValidationParams) -> tuple[Path, Path]:
    """The JSON and HTML reports :func:`run_validation` writes for ``stage``."""
    return params.reports_dir / f"{stage}.json", params.reports_dir / f"{stage}.html"


def _write_report(report: ValidationReport, params: ValidationParams) -> None:
    json_path, html_path = report_paths(report.stage, params)
    disk.write_json(json_path, report.to_dict())
    disk.write_text(html_path, report_html(report))
    for w in report.warnings:
        log.warning("validation warning: %s", w.describe())


# --- GX in a side process (touchvl/gx_side.py) -------------------------------------------------------------

_side = None  # the gx_side.SideProcess this process started, if any
_side_allowed = False


def allow_background_gx() -> None:
    """This process is a stage's own (its ``main()``), so a side process may be started for it. A library caller
    (a test, a notebook, a flow calling a stage's ``run()``) never gets one unless it asks: GX then runs in its
    own process, as before."""
    global _side_allowed
    _side_allowed = True


def stage_starts(params) -> None:
    """``run_stage(..., start=checks.stage_starts)``: a validating stage's process starts GX in a side process
    at once."""
    allow_background_gx()
    start_background_gx(params.validation)


def stage_may_start(params) -> None:
    """``run_stage(..., start=checks.stage_may_start)``: the stage starts it itself once it knows it validates new
    content (embed, on a cache miss: a fully cached rerun replays its validation and must not pay for GX)."""
    allow_background_gx()


def start_background_gx(params: ValidationParams) -> None:
    """Start importing Great Expectations in a side process now, while the stage computes, so that its
    validation does not wait ~3 s for the import (``validation.background``; only with 2 or more usable CPUs,
    where the stage's ``threads: auto`` leaves one free). Nothing when not allowed, already started, or
    switched off. An unused side process (the validation was replayed) is killed at exit, not waited for."""
    global _side
    from touchvl.devices import usable_cpus

    if _side is not None or not _side_allowed or not params.background or usable_cpus() < 2:
        return
    from touchvl.gx_side import SideProcess

    try:
        _side = SideProcess()
    except OSError as exc:  # no process to spare: GX runs here, as without the side process
        log.warning("validation: could not start Great Expectations in a side process (%s); running it in-process", exc)


def _outcomes(stage: str, tables: list[Table], params: ValidationParams) -> list[ExpectationOutcome]:
    """:func:`gx_outcomes` in the side process when one was started and the suite is plain data, else here."""
    global _side
    if _side is None or not all(isinstance(e, Expect) for t in tables for e in t.expectations):
        return gx_outcomes(stage, tables, params)
    from touchvl.gx_side import Unavailable

    # only what GX reads: the frames can be large, the arrays they were derived from larger
    sent = [Table(t.name, t.frame, t.expectations, t.id_column) for t in tables]
    try:
        return _side.run(stage, sent, params)
    except Unavailable as exc:
        log.warning("validation %s: the Great Expectations side process is unavailable (%s); running it in-process",
                    stage, exc)
        _side = None
        return gx_outcomes(stage, tables, params)


def gx_outcomes(stage: str, tables: list[Table], params: ValidationParams) -> list[ExpectationOutcome]:
    gx = import_gx()
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
            suite.add_expectation(expectation.build() if isinstance(expectation, Expect) else expectation)
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
    return outcomes


# --- replay ---------------------------------------------------------------------------------------------------

def _feed(h, tag: str, data: bytes) -> None:
    h.update(f"{tag}:{len(data)}:".encode())  # length-prefixed: no two different inputs feed the same bytes
    h.update(data)


def _feed_values(h, tag: str, values) -> None:
    values = np.asarray(values)
    _feed(h, f"{tag}/{values.dtype.str}/{values.shape}", b"")
    if values.dtype.kind in "biufcmMSU":  # fixed-size values: the raw bytes are the content
        _feed(h, tag, np.ascontiguousarray(values).tobytes())
    else:  # objects (strings, mixed): repr keeps type and value (1 != "1" != 1.0); an address in a repr only misses
        _feed(h, tag, json.dumps([repr(v) for v in values.ravel().tolist()]).encode())


def content_hash(tables: list[Table]) -> str:
    """sha256 of exactly what GX would see: each table's name, columns, dtypes, index and values, and the
    arrays it was derived from."""
    h = hashlib.sha256()
    for table in tables:
        frame = table.frame
        _feed(h, "table", json.dumps([table.name, [repr(c) for c in frame.columns],
                                      [str(t) for t in frame.dtypes]]).encode())
        _feed_values(h, "index", frame.index.to_numpy())
        for i in range(frame.shape[1]):
            _feed_values(h, "column", frame.iloc[:, i].to_numpy())
        for j, array in enumerate(table.derived_from):
            _feed_values(h, f"source{j}", array)
    return h.hexdigest()


def suite_hash(stage: str, tables: list[Table]) -> str | None:
    """sha256 of the suite definition and what interprets it (None when an expectation is a GX object: hashing
    that needs GX). The versions and this module's source are in: another GX or another report format
    re-validates."""
    if not all(isinstance(e, Expect) for t in tables for e in t.expectations):
        return None
    definition = {
        "format": REPLAY_FORMAT, "stage": stage,
        "versions": {"great_expectations": importlib.metadata.version("great_expectations"),
                     "pandas": pd.__version__, "numpy": np.__version__},
        "checks_source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "tables": [{"name": t.name, "id_column": t.id_column, "expectations": [e.definition() for e in t.expectations]}
                   for t in tables],
    }
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=repr).encode()).hexdigest()


def replay_key(stage: str, tables: list[Table]) -> dict | None:
    suite = suite_hash(stage, tables)
    if suite is None:
        return None
    content = content_hash(tables)
    return {"content": content, "suite": suite, "key": hashlib.sha256(f"{content}:{suite}".encode()).hexdigest()}


def _record_path(replay_dir: Path, stage: str, key: dict) -> Path:
    return replay_dir / f"{stage}-{key['key'][:32]}.json"


def _store(replay_dir: Path, stage: str, key: dict, report: ValidationReport) -> None:
    disk.write_json(_record_path(replay_dir, stage, key),
                    {"format": REPLAY_FORMAT, "key": key["key"], "content_hash": key["content"],
                     "suite_hash": key["suite"], "report": report.to_dict()})
    records = sorted(replay_dir.glob(f"{stage}-*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in records[REPLAY_KEEP:]:
        old.unlink(missing_ok=True)


def _replayed(replay_dir: Path, stage: str, key: dict) -> ValidationReport | None:
    """The stored passing report for ``key``, or None (no record, another key, unreadable, or not a pass)."""
    path = _record_path(replay_dir, stage, key)
    try:
        record = disk.read_json(path)
        if not record or (record.get("format"), record.get("key"), record.get("content_hash"),
                          record.get("suite_hash")) != (REPLAY_FORMAT, key["key"], key["content"], key["suite"]):
            return None
        stored = record["report"]
        report = ValidationReport(stage, [ExpectationOutcome(**r) for r in stored["results"]],
                                  content_hash=key["content"], replayed_from=key["content"])
    except (StageError, OSError, KeyError, TypeError) as exc:  # a damaged record is a miss, never a stage failure
        log.warning("validation %s: ignoring replay record %s (%s)", stage, path, exc)
        return None
    # the results themselves must pass, whatever the record's "success" says: a failure is never replayed
    if not report.success or stored.get("success") is not True or stored.get("stage") != stage:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: pruning (REPLAY_KEEP, by mtime) drops the records nobody replays
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
    replayed = (f"<p>Replayed from the passing run for content hash <code>{html.escape(report.replayed_from)}</code> "
                "(identical data and expectations; Great Expectations was not run again).</p>"
                if report.replayed_from else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>validation: {html.escape(report.stage)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}
tr.critical td{{background:#fdd}} tr.warning td{{background:#ffd}} .passed{{color:#2a2}} .failed{{color:#c22}}</style></head><body>
<h1>Validation of stage <code>{html.escape(report.stage)}</code>: <span class="{"passed" if report.success else "failed"}">{verdict}</span></h1>
<p>{len(report.results)} expectations, {len(report.warnings)} warnings (Great Expectations).</p>{replayed}
<table><tr><th>table</th><th>column</th><th>expectation</th><th>arguments</th><th>severity</th><th>result</th>
<th>unexpected</th><th>examples</th></tr>{"".join(rows)}</table></body></html>
"""
