"""train_projector's validation of its training curves: a NaN or infinite loss, val_r1, tau or lr in either stage's
history fails the stage (GX skips a NaN in a range expectation as "missing": it used to pass)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tasks import train_projector
from touchvl import checks, disk
from touchvl.checks import ValidationFailed, run_validation
from touchvl.params import ValidationParams
from touchvl.projector import training
from touchvl.projector.pairs import stage1_validation_tables, validation_tables

GOOD = [{"epoch": 1, "loss": 2.0, "val_r1": 0.10, "tau": 0.07, "lr": 1e-3},
        {"epoch": 2, "loss": 1.5, "val_r1": 0.20, "tau": 0.07, "lr": 1e-3},
        {"epoch": 3, "loss": 1.2, "val_r1": 0.25, "tau": 0.07, "lr": 1e-3}]


def _with(epoch: int, **values) -> list[dict]:
    return [{**row, **values} if row["epoch"] == epoch else row for row in GOOD]


def _stage1(history, best=0.25):
    import torch

    state = {"w": torch.zeros(2)}
    return stage1_validation_tables(history, state, 4, 4, "fp", "fp", best)


@pytest.fixture
def vparams(tmp_path) -> ValidationParams:
    return ValidationParams(reports_dir=tmp_path / "val", data_docs_dir=tmp_path / "docs", build_data_docs=False, replay_dir=None)


def _failed_columns(report) -> set[str]:
    return {r.kwargs.get("column") for r in report.blocking_failures}


def test_a_good_history_passes_both_stages(vparams):
    assert run_validation("train_projector_stage1", _stage1(GOOD), vparams).success
    projected = np.eye(3, 4, dtype=np.float32)
    uids = np.array([1, 2, 3])
    assert run_validation("train_projector_stage2", validation_tables(projected, uids, uids, GOOD), vparams).success


@pytest.mark.parametrize("bad", [dict(val_r1=math.nan), dict(val_r1=math.inf), dict(loss=math.nan),
                                 dict(loss=-math.inf), dict(tau=math.nan), dict(lr=math.nan)],
                         ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items()))
def test_a_non_finite_value_in_either_history_fails(vparams, bad):
    (column, _), = bad.items()
    report = run_validation("train_projector_stage1", _stage1(_with(2, **bad)), vparams)
    assert not report.success and f"{column}_finite" in _failed_columns(report)
    failure = next(r for r in report.blocking_failures if r.kwargs.get("column") == f"{column}_finite")
    assert failure.table == "history" and failure.unexpected_examples == [2]  # the epoch is named
    projected, uids = np.eye(3, 4, dtype=np.float32), np.array([1, 2, 3])
    report = run_validation("train_projector_stage2", validation_tables(projected, uids, uids, _with(2, **bad)), vparams)
    assert not report.success and f"{column}_finite" in _failed_columns(report)


def test_a_nan_best_val_r1_fails_the_checkpoint_check(vparams):
    report = run_validation("train_projector_stage1", _stage1(GOOD, best=math.nan), vparams)
    assert not report.success and "best_val_r1_finite" in _failed_columns(report)


def test_history_table_treats_a_missing_value_as_not_finite():
    table = checks.history_table([{"epoch": 1, "loss": 1.0, "val_r1": 0.5, "lr": 1e-3}])  # no tau logged
    assert table.frame["tau_finite"].tolist() == [False]


@pytest.mark.parametrize("stage", [1, 2])
def test_the_stage_fails_and_writes_nothing_when_an_epoch_has_a_nan_val_r1(built, monkeypatch, stage):
    """The whole stage: epoch 2's validation recall comes out NaN (what a diverged run gives)."""
    calls = {"n": 0}
    real = training.recall_at_k

    def flaky(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return {**out, "R@1": math.nan} if calls["n"] == 2 else out

    out = built.projector.out_dir / ("stage1.pt" if stage == 1 else "projector.pt")
    before = disk.sha256_file(out)
    monkeypatch.setattr(training, "recall_at_k", flaky)
    params = built.model_copy(update={"train_stage1": built.train_stage1.model_copy(update={"epochs": 3, "patience": 5}),
                                      "train_stage2": built.train_stage2.model_copy(update={"epochs": 3, "patience": 5})})
    run = train_projector.run_stage1 if stage == 1 else train_projector.run_stage2
    with pytest.raises(ValidationFailed, match=r"val_r1_finite"):
        run(params)
    assert disk.sha256_file(out) == before  # the previous checkpoint stands
