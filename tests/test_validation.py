import json

import pandas as pd
import pytest

from touchvl.params import ValidationParams
from tasks.prepare import run
from touchvl.data.prepare import validation_tables
from touchvl.checks import Table, ValidationFailed, gxe, run_validation
from tests.conftest import make_params


@pytest.fixture
def vparams(tmp_path):
    return ValidationParams(reports_dir=tmp_path / "validation", data_docs_dir=tmp_path / "docs", replay_dir=None)


@pytest.fixture
def manifest(tmp_path, dataset):
    frame, _ = run(make_params(tmp_path / "run", dataset))
    return frame


SUMMARY = {"quarantined": 0, "candidates": 20, "bad_fraction": 0.0}


def test_prepare_suite_passes_on_a_good_manifest(manifest, vparams):
    report = run_validation("prepare", validation_tables(manifest, SUMMARY, 0.1), vparams)
    assert report.success and not report.warnings
    saved = json.loads((vparams.reports_dir / "prepare.json").read_text())
    assert saved["success"] and {r["table"] for r in saved["results"]} == {"manifest", "source_splits", "quarantine"}
    page = (vparams.reports_dir / "prepare.html").read_text()  # self-contained: opens offline
    assert "passed" in page and "expect_column_values_to_be_unique" in page and "<script" not in page
    docs = run_validation("prepare", validation_tables(manifest, SUMMARY, 0.1),
                          vparams.model_copy(update={"build_data_docs": True}))  # GX's Data Docs stay available
    assert docs.success and (vparams.data_docs_dir / "prepare" / "index.html").is_file()


def test_prepare_suite_fails_naming_expectation_and_rows(manifest, vparams):
    bad = manifest.copy()
    bad.loc[3, "uid"] = bad.loc[2, "uid"]  # duplicate uid
    bad.loc[5, "tac_path"] = "missing/image_5_tac.jpg"  # file gone
    bad.loc[7, "split"] = "val"
    report = run_validation("prepare", validation_tables(bad, SUMMARY, 0.1), vparams)
    assert not report.success
    with pytest.raises(ValidationFailed) as info:
        report.raise_if_failed()
    message = str(info.value)
    assert "expect_column_values_to_be_unique(column='uid')" in message
    assert f"e.g. [{bad.loc[2, 'uid']}, {bad.loc[2, 'uid']}]" in message
    assert "expect_column_values_to_be_in_set(column='tac_exists'" in message
    assert str(bad.loc[5, "uid"]) in message
    assert "column='split'" in message and "'val'" not in message  # rows are named by uid
    saved = json.loads((vparams.reports_dir / "prepare.json").read_text())
    # the 'val' row also puts its source id in two splits
    failed = {(r["table"], r["kwargs"].get("column")) for r in saved["results"] if not r["success"]}
    assert saved["success"] is False and failed == {
        ("manifest", "uid"), ("manifest", "tac_exists"), ("manifest", "split"), ("source_splits", "splits_per_source")}


def test_copies_crossing_splits_and_quarantine_over_threshold_block(manifest, vparams):
    bad = manifest.copy()
    copy_row = bad.index[bad["copy"] == 1][0]
    bad.loc[copy_row, "split"] = "test" if bad.loc[copy_row, "split"] == "train" else "train"
    summary = {"quarantined": 5, "candidates": 20, "bad_fraction": 0.25}
    failures = run_validation("prepare", validation_tables(bad, summary, 0.1), vparams).blocking_failures
    assert {(f.table, f.expectation) for f in failures} == {
        ("source_splits", "expect_column_values_to_be_between"),
        ("quarantine", "expect_column_values_to_be_between")}


def test_warnings_are_reported_and_do_not_block(vparams):
    frame = pd.DataFrame({"uid": [1, 2, 3], "caption": ["a", "b", "c" * 600]})
    table = Table("captions", frame, [
        gxe.ExpectColumnValuesToBeUnique(column="uid", severity="critical"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="caption", max_value=500, severity="warning"),
    ], id_column="uid")
    report = run_validation("toy", [table], vparams)
    assert report.success
    assert [w.expectation for w in report.warnings] == ["expect_column_value_lengths_to_be_between"]
    assert report.warnings[0].unexpected_examples == [3]
    report.raise_if_failed()  # does not raise
