"""Great Expectations in a side process (touchvl/gx_side.py, touchvl/gx_worker.py): the same outcomes as in-process, failures
included; a dead side process means GX runs in-process; the side process never outlives the stage."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from touchvl import checks
from touchvl.checks import Table, expect, run_validation
from touchvl.params import ValidationParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def vparams(tmp_path):
    return ValidationParams(reports_dir=tmp_path / "validation", data_docs_dir=tmp_path / "docs", replay_dir=None)


@pytest.fixture
def side(vparams, monkeypatch):
    """A side process started as a stage's main() starts it; stopped and forgotten afterwards."""
    monkeypatch.setattr("touchvl.devices.usable_cpus", lambda: 2)
    monkeypatch.setattr(checks, "_side", None)
    monkeypatch.setattr(checks, "_side_allowed", False)
    checks.allow_background_gx()
    checks.start_background_gx(vparams)
    assert checks._side is not None
    yield checks._side
    if checks._side is not None:
        checks._side.close()


def _tables(norm_off: float = 0.0) -> list[Table]:
    frame = pd.DataFrame({"uid": [10, 20, 30, 40], "norm": [1.0, 1.0 + norm_off, 1.0, 1.0],
                          "caption": ["smooth", "rough, " * 100, "soft", "hard"]})
    return [Table("rows", frame, [
        expect.ExpectColumnValuesToBeUnique(column="uid", severity="critical"),
        expect.ExpectColumnValuesToBeBetween(column="norm", min_value=0.999, max_value=1.001, severity="critical"),
        expect.ExpectColumnValueLengthsToBeBetween(column="caption", max_value=500, severity="warning"),
    ], id_column="uid", derived_from=(np.ones((4, 3)),)),
        Table("count", pd.DataFrame({"n": [4]}), [expect.ExpectTableRowCountToBeBetween(min_value=1, severity="critical")])]


def _report(vparams, stage: str) -> str:
    return (vparams.reports_dir / f"{stage}.json").read_text()


@pytest.mark.parametrize("norm_off", [0.0, 0.5])
def test_the_side_process_reports_what_gx_in_process_reports(side, vparams, norm_off):
    there = run_validation("toy", _tables(norm_off), vparams)
    assert checks._side is side and side.proc.poll() is None  # it answered and is still up for the next
    sent = _report(vparams, "toy")
    checks._side = None  # the same validation with GX in this process
    here = run_validation("toy", _tables(norm_off), vparams)
    assert there.results == here.results and sent == _report(vparams, "toy")
    assert there.success is (norm_off == 0.0) and len(there.warnings) == 1
    if norm_off:  # the failure names the offending row, raised in the stage as before
        with pytest.raises(checks.ValidationFailed, match=r"expect_column_values_to_be_between\(column=.norm.*\[20\]"):
            there.raise_if_failed()


def test_a_dead_side_process_means_gx_runs_in_process(side, vparams, caplog):
    side.proc.kill()
    side.proc.wait()
    with caplog.at_level(logging.WARNING):
        report = run_validation("toy", _tables(0.5), vparams)
    assert "side process is unavailable" in caplog.text and checks._side is None
    assert not report.success and report.blocking_failures[0].unexpected_examples == [20]


def test_an_error_raised_in_the_side_process_is_raised_in_the_stage(side, vparams):
    tables = [Table("rows", pd.DataFrame({"uid": [1]}), [expect.ExpectColumnValuesToBeUniqe(column="uid")])]  # misspelt
    checks._side = None
    with pytest.raises(AttributeError, match="ExpectColumnValuesToBeUniqe"):
        run_validation("toy", tables, vparams)
    checks._side = side
    with pytest.raises(AttributeError, match="ExpectColumnValuesToBeUniqe"):
        run_validation("toy", tables, vparams)
    assert checks._side is side and side.proc.poll() is None  # raised there, sent back: the process serves on


def test_no_side_process_unless_a_stage_main_allows_it_or_switched_off(vparams, monkeypatch):
    monkeypatch.setattr(checks, "_side", None)
    monkeypatch.setattr(checks, "_side_allowed", False)
    checks.start_background_gx(vparams)  # a library caller: GX stays in-process
    assert checks._side is None
    checks.allow_background_gx()
    checks.start_background_gx(vparams.model_copy(update={"background": False}))
    assert checks._side is None
    monkeypatch.setattr("touchvl.devices.usable_cpus", lambda: 1)  # no CPU to overlap with
    checks.start_background_gx(vparams)
    assert checks._side is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: it only waits for its parent (gone) to be reaped by init
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


@pytest.mark.parametrize("validates", [True, False])
def test_the_side_process_is_gone_when_the_stage_exits(tmp_path, validates):
    """A stage's process validates in the side process (GX never imported in its own) or exits without
    validating (a replay, an early error): either way the child does not outlive it."""
    script = textwrap.dedent(f"""
        import json, sys
        import pandas as pd
        from touchvl import checks
        from touchvl.params import ValidationParams
        p = ValidationParams(reports_dir={str(tmp_path / 'v')!r}, replay_dir=None)
        import touchvl.devices; touchvl.devices.usable_cpus = lambda: 2
        checks.allow_background_gx(); checks.start_background_gx(p)
        out = {{"pid": checks._side.proc.pid}}
        if {validates}:
            t = checks.Table("t", pd.DataFrame({{"a": [1, 2]}}), [checks.expect.ExpectColumnValuesToBeUnique(column="a")])
            out["success"] = checks.run_validation("s", [t], p).success
            out["gx_here"] = "great_expectations" in sys.modules
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if validates:
        assert out["success"] is True and out["gx_here"] is False
    deadline = time.monotonic() + 10
    while _alive(out["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(out["pid"]), "the GX side process outlived the stage"
    assert "Traceback" not in run.stderr
