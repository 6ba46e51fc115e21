"""bench/finetune_gpu.py (run by bench/gpu_check.sh on a CUDA machine) on the CPU: the same trainer, step clock
and report code with LoRA on the tiny model, so a broken bench shows up before anyone spends GPU time on it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import finetune_gpu


def test_cpu_lora_run_times_every_step_asked(tmp_path):
    out = tmp_path / "finetune_gpu.json"
    # 16 examples at batch 4 are 4 steps an epoch: 6 steps need a second epoch, which the bench must ask for
    report = finetune_gpu.main(["--device", "cpu", "--modes", "lora", "--steps", "6", "--examples", "16",
                                "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["device"] == "cpu" and report["base"] == "tiny-random-llava" and report["gpu"] is None
    assert len(report["load_average_before"]) == 3 and len(report["load_average_after"]) == 3
    (row,) = report["rows"]
    assert row["mode"] == "lora" and row["steps"] == 6 and row["peak_gpu_gib"] is None
    step = row["step_tokens_per_s"]
    assert step["steps_timed"] == 5  # every step after the first (warm-up)
    assert 0 < step["min"] <= step["median"] and row["tokens_per_s"] > 0 and row["seconds"] > 0
    assert math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])


def test_qlora_without_cuda_is_one_line_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="qlora .* needs a CUDA GPU") as stop:
        finetune_gpu.main(["--device", "cpu", "--modes", "lora", "qlora", "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists() and "\n" not in str(stop.value.code)


def test_too_few_steps_is_refused():
    with pytest.raises(SystemExit) as stop:
        finetune_gpu.main(["--device", "cpu", "--modes", "lora", "--steps", "3"])
    assert stop.value.code == 2  # argparse's usage error: 3 steps leave 2 timed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real run would start")
def test_without_a_gpu_it_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        finetune_gpu.main(["--out", str(tmp_path / "r.json")])
