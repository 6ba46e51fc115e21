"""bench/gpu_embed.py cannot run here without a GPU; its --dry-run (CPU, tiny encoder, 8 images) runs the same
loader, timing and reporting code, so a broken bench shows up before anyone spends GPU time on it."""
from __future__ import annotations

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
    assert report["encoder"] == "imagebind_tiny" and report["images"] == 8
    for path in ("exact", "fast"):
        r = report[path]
        assert r["images_timed"] == 4 and r["decode_errors"] == 0  # 2 batches of 2 pairs, the first is warm-up
        assert r["images_per_s"] > 0 and 0 <= r["loader_wait_s"] <= r["wall_s"]
    # the formula and torch's counter agree on everything but the attention products it misses on the CPU
    assert report["gflops_per_image_counted"] == pytest.approx(report["gflops_per_image_formula"], rel=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real run would start")
def test_without_a_gpu_it_says_so():
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        gpu_embed.main(["--images", "4"])
