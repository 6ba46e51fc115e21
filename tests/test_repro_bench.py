"""bench/repro.py runs two full `dvc repro`s (minutes): its timing wrapper and its arithmetic are checked here,
so a broken bench shows up before anyone spends those minutes on it."""
from __future__ import annotations

import subprocess

import pytest

from bench import repro


def test_wrapper_times_the_stage_and_passes_its_exit_status_on(tmp_path):
    log = tmp_path / "times.log"
    wrapper = repro.write_wrapper(tmp_path / "python", log)
    ok = subprocess.run([str(wrapper), "-c", "import time; time.sleep(0.2)"])
    failed = subprocess.run([str(wrapper), "-c", "raise SystemExit(3)"])
    assert (ok.returncode, failed.returncode) == (0, 3)
    times = repro.parse_stage_log(log.read_text())
    assert set(times) == {"-c import time; time.sleep(0.2)", "-c raise SystemExit(3)"}
    assert 0.2 <= times["-c import time; time.sleep(0.2)"] < 30


def test_stage_labels_are_bin_stage_spelling_and_repeats_are_summed():
    text = ("1000000000 3000000000 -m tasks.embed\n"
            "0 1500000000 -m tasks.train_projector --stage 1\n"
            "0 500000000 -m tasks.embed\n")
    assert repro.parse_stage_log(text) == {"embed": 2.5, "train_projector --stage 1": 1.5}


def test_like_for_like_leaves_out_only_the_stages_one_side_lacks():
    base = {"wall_s": 100.0, "stages_s": {"a": 40.0, "b": 50.0, "old": 2.0}}
    head = {"wall_s": 130.0, "stages_s": {"a": 30.0, "b": 30.0, "new": 60.0}}
    lfl = repro.like_for_like(base, head)
    assert lfl["common_stages"] == ["a", "b"] and lfl["only_head"] == ["new"] and lfl["only_baseline"] == ["old"]
    assert (lfl["baseline_stages_s"], lfl["head_stages_s"]) == (90.0, 60.0)
    # DVC's own work stays in the walls: 100 - 2 and 130 - 60
    assert (lfl["baseline_wall_s"], lfl["head_wall_s"]) == (pytest.approx(98.0), pytest.approx(70.0))


def test_a_stage_that_bypasses_the_wrapper_stops_the_bench():
    log = "0 1000000000 -m tasks.sample\n"
    repro.check_every_stage_timed("Running stage 'sample':\n", log, "abc1234567")  # one ran, one timed
    with pytest.raises(SystemExit, match="ran 2 stages but 1 went through"):
        repro.check_every_stage_timed("Running stage 'sample':\nRunning stage 'prepare':\n", log, "abc1234567")


def test_zero_rounds_is_refused_before_any_clone(capsys):
    with pytest.raises(SystemExit) as stopped:
        repro.main(["--runs", "0"])
    assert stopped.value.code == 2 and "--runs must be at least 1, got 0" in capsys.readouterr().err
