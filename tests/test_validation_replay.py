"""Replaying a passing validation (touchvl.checks): only for the same content and the same suite, never a failure.

GX runs in this process (a real run is what a replay must reproduce); tests/test_embed_cached.py checks, in fresh
processes, that a replay does not import Great Expectations at all.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from touchvl.checks import Table, expect, gxe, replay_key, run_validation
from touchvl.params import ValidationParams


@pytest.fixture
def vparams(tmp_path):
    return ValidationParams(reports_dir=tmp_path / "validation", data_docs_dir=tmp_path / "docs", replay_dir=None)


def _unit(n=5, dim=4, seed=0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _tables(vectors: np.ndarray, max_len: int = 500, captions=None) -> list[Table]:
    frame = pd.DataFrame({"uid": np.arange(len(vectors)) * 10, "norm": np.linalg.norm(vectors, axis=1),
                          "caption": captions or ["a", "b", "c" * 600, "d", "e"][: len(vectors)]})
    return [Table("rows", frame, [
        expect.ExpectColumnValuesToBeUnique(column="uid", severity="critical"),
        expect.ExpectColumnValuesToBeBetween(column="norm", min_value=0.999, max_value=1.001, severity="critical"),
        expect.ExpectColumnValueLengthsToBeBetween(column="caption", max_value=max_len, severity="warning"),
    ], id_column="uid", derived_from=(vectors,))]


def _saved(vparams) -> dict:
    return json.loads((vparams.reports_dir / "toy.json").read_text())


def test_a_pass_is_replayed_with_the_same_report(tmp_path, vparams):
    vectors = _unit()
    real = run_validation("toy", _tables(vectors), vparams, replay_dir=tmp_path / "records")
    assert real.success and real.replayed_from is None and len(real.warnings) == 1  # passing with a warning
    first = _saved(vparams)
    again = run_validation("toy", _tables(vectors.copy()), vparams, replay_dir=tmp_path / "records")
    assert again.replayed_from == real.content_hash == first["content_hash"]
    assert _saved(vparams) == first and "replayed_from" not in first  # the written report: the same bytes
    assert again.results == real.results and [w.describe() for w in again.warnings] == [w.describe() for w in real.warnings]
    # without a replay folder nothing is stored or replayed, and the report keeps the plain shape
    plain = run_validation("toy", _tables(vectors), vparams)
    assert plain.replayed_from is None and "content_hash" not in _saved(vparams)


def test_any_changed_byte_or_expectation_validates_for_real(tmp_path, vparams):
    vectors = _unit()
    records = tmp_path / "records"
    base = run_validation("toy", _tables(vectors), vparams, replay_dir=records)
    # one vector moves but keeps its float32 norm bit for bit: the frame is the same, the source array is not
    moved = vectors.copy()
    moved[1] = moved[1][[1, 0, 2, 3]]
    assert np.array_equal(np.linalg.norm(moved, axis=1), np.linalg.norm(vectors, axis=1))
    assert run_validation("toy", _tables(moved), vparams, replay_dir=records).replayed_from is None
    # a caption changes (a frame value), or the suite does (an expectation's argument)
    assert run_validation("toy", _tables(vectors, captions=["a", "b", "c" * 600, "d", "f"]), vparams,
                          replay_dir=records).replayed_from is None
    assert run_validation("toy", _tables(vectors, max_len=400), vparams, replay_dir=records).replayed_from is None
    keys = {replay_key("toy", t)["key"] for t in (_tables(vectors), _tables(moved), _tables(vectors, max_len=400))}
    assert len(keys) == 3
    # another stage name is another suite
    assert replay_key("other", _tables(vectors))["key"] != replay_key("toy", _tables(vectors))["key"]
    # and the original content is still replayed
    assert run_validation("toy", _tables(vectors), vparams, replay_dir=records).replayed_from == base.content_hash


def test_a_failure_is_never_stored_nor_replayed(tmp_path, vparams):
    records = tmp_path / "records"
    bad = _unit()
    bad[3] *= 2  # critical: norm out of range
    for _ in range(2):
        report = run_validation("toy", _tables(bad), vparams, replay_dir=records)
        assert not report.success and report.replayed_from is None
        assert [f.unexpected_examples for f in report.blocking_failures] == [[30]]
    assert not records.exists() or not list(records.iterdir())


def test_a_record_edited_to_hide_a_failure_or_damaged_is_not_replayed(tmp_path, vparams):
    records = tmp_path / "records"
    vectors = _unit()
    run_validation("toy", _tables(vectors), vparams, replay_dir=records)
    (record,) = records.iterdir()
    data = json.loads(record.read_text())
    data["report"]["results"][0]["success"] = False  # a critical result that failed, "success" left true
    record.write_text(json.dumps(data))
    assert run_validation("toy", _tables(vectors), vparams, replay_dir=records).replayed_from is None
    record.write_text("{not json")
    assert run_validation("toy", _tables(vectors), vparams, replay_dir=records).replayed_from is None
    # the real run rewrote a good record: replayable again
    assert run_validation("toy", _tables(vectors), vparams, replay_dir=records).replayed_from is not None


def test_gx_objects_and_data_docs_are_never_replayed(tmp_path, vparams):
    def table():  # a GX expectation object belongs to the suite it was added to: a new one per run
        return Table("rows", pd.DataFrame({"uid": [1, 2, 3]}),
                     [gxe.ExpectColumnValuesToBeUnique(column="uid", severity="critical")])

    assert replay_key("toy", [table()]) is None  # a GX object's definition cannot be hashed without GX
    for _ in range(2):
        assert run_validation("toy", [table()], vparams, replay_dir=tmp_path / "records").replayed_from is None
    docs = vparams.model_copy(update={"build_data_docs": True})
    vectors = _unit()
    for _ in range(2):  # Data Docs are GX's rendering of a real run
        assert run_validation("toy", _tables(vectors), docs, replay_dir=tmp_path / "records").replayed_from is None
