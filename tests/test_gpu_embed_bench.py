"""bench/gpu_embed.py cannot run here without a GPU; its --dry-run (CPU, tiny encoder, 8 images) runs the same
loader, timing and reporting code, so a broken bench shows up before anyone spends GPU time on it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_embed
from touchvl.imagebind.encoder import ENCODER_CONFIGS


def test_flop_formula_for_vit_h14():
    # 32 x (24 * 257 * 1280^2 + 4 * 257^2 * 1280) + patch conv + head: the ViT-H/14 figure the bench reports
    assert gpu_embed.vision_flops_per_image(ENCODER_CONFIGS["imagebind_huge"]) / 1e9 == pytest.approx(335.0, abs=0.1)


def test_dry_run_reports_both_paths(tmp_path):
    report = gpu_embed.main(["--dry-run", "--out", str(tmp_path / "report.json")])
    assert (tmp_path / "report.json").is_file()
    assert report["encoder"] == "imagebind_tiny" and report["images"] == 8 and report["runs"] == 3
    assert len(report["load_average_before"]) == 3 and len(report["load_average_after"]) == 3
    for path in ("exact", "fast"):
        r = report[path]
        assert len(r["runs"]) == 3 and r["decode_errors"] == 0
        for one in r["runs"]:  # 2 batches of 2 pairs each round, the first is warm-up
            assert one["images_timed"] == 4 and one["decode_errors"] == 0
            assert one["images_per_s"] > 0 and 0 <= one["loader_wait_s"] <= one["wall_s"]
        rates = sorted(one["images_per_s"] for one in r["runs"])
        assert r["images_per_s"] == {"min": rates[0], "median": rates[1], "max": rates[2]}
    # the formula and torch's counter agree on everything but the attention products it misses on the CPU
    assert report["gflops_per_image_counted"] == pytest.approx(report["gflops_per_image_formula"], rel=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real run would start")
def test_without_a_gpu_it_says_so():
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        gpu_embed.main(["--images", "4"])


def test_zero_rounds_is_refused():
    with pytest.raises(SystemExit) as stop:
        gpu_embed.main(["--dry-run", "--runs", "0"])
    assert stop.value.code == 2  # argparse's usage error, before any image is written


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real run would start")
def test_gpu_check_script_without_a_gpu_says_so_in_one_line():
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PY"}
    env["PY"] = sys.executable  # the interpreter running the tests, as the script's own default would find it
    done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "bench/gpu_check.sh: no CUDA GPU here" and "Traceback" not in done.stdout
