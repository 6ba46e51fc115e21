"""Preprocessing images/s per core, exact (Meta's transform) vs fast (``embed.fast_decode``), in one run.

Decode + resize + crop + normalise of JPEG files, one process, one torch thread (what one DataLoader
worker does), on: 1024-px photo-like RGB JPEGs, 640x480 tactile-size JPEGs, and the sample's own
tactile and RGB renders at ``sample.image_size`` (params.yaml).  Exact and fast runs alternate, so a
neighbour's load hits both alike; each is repeated ``--runs`` times and min / median are reported.
The load average is printed before and after: on a shared machine compare ratios, not absolute rates.

    .venv/bin/python -m bench.decode [--images 40] [--runs 5]
Writes bench/results/decode.json and prints a table.  Issue 21's goal: fast >= 3x exact on 1024-px sources.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from touchvl import disk
from touchvl.data.sample import render_item
from touchvl.imagebind.preprocess import preprocess_image, preprocess_image_fast
from touchvl.params import load_params
from tests.synthetic_photos import write_jpeg

PATHS = {"exact": preprocess_image, "fast": preprocess_image_fast}


def sample_jpegs(folder: Path, n: int, size: int) -> tuple[list[Path], list[Path]]:
    """The sample's tactile and RGB images as the sample stage writes them (quality 92)."""
    tac, rgb = [], []
    for i in range(n):
        item = render_item(i, size, 2, seed=0)
        tac.append(folder / f"sample_{i}_tac.jpg")
        rgb.append(folder / f"sample_{i}_rgb.jpg")
        Image.fromarray(item.tactile).save(tac[-1], quality=92)
        Image.fromarray(item.rgb).save(rgb[-1], quality=92)
    return tac, rgb


def one_pass(paths: list[Path], preprocess) -> float:
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            preprocess(img)
    return time.perf_counter() - start


def measure(paths: list[Path], runs: int) -> dict:
    for preprocess in PATHS.values():
        one_pass(paths[:4], preprocess)  # warm-up: page cache, first-call allocations
    seconds = {name: [] for name in PATHS}
    for _ in range(runs):
        for name, preprocess in PATHS.items():  # interleaved: load spikes land on both paths
            seconds[name].append(one_pass(paths, preprocess))
    out = {}
    for name, s in seconds.items():
        out[name] = {"images_per_s_best": round(len(paths) / min(s), 1),
                     "images_per_s_median": round(len(paths) / statistics.median(s), 1),
                     "ms_per_image_min": round(1e3 * min(s) / len(paths), 2),
                     "ms_per_image_median": round(1e3 * statistics.median(s) / len(paths), 2)}
    out["ratio_best"] = round(min(seconds["exact"]) / min(seconds["fast"]), 2)
    out["ratio_median"] = round(statistics.median(seconds["exact"]) / statistics.median(seconds["fast"]), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40, help="files per source kind")
    ap.add_argument("--runs", type=int, default=5, help="timed passes per path (>= 3)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per core: a decode worker is one process on one core
    sample_size = load_params().sample.image_size
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {
            "rgb_1024x1024": [write_jpeg(tmp / f"rgb_{i}.jpg", 1024, 1024, seed=i) for i in range(args.images)],
            "tactile_640x480": [write_jpeg(tmp / f"tac_{i}.jpg", 640, 480, seed=1000 + i) for i in range(args.images)],
        }
        tac, rgb = sample_jpegs(tmp, args.images, sample_size)
        sources[f"sample_tactile_{sample_size}px"], sources[f"sample_rgb_{sample_size}px"] = tac, rgb
        for name, paths in sources.items():
            results[name] = measure(paths, max(3, args.runs))
    load_after = os.getloadavg()
    report = {"images_per_source": args.images, "runs": max(3, args.runs), "torch_threads": 1,
              "cpu_count": os.cpu_count(), "pillow": Image.__version__,
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in load_after], "sources": results}
    disk.write_json(Path(__file__).parent / "results" / "decode.json", report)
    print(f"load average before {report['load_average_before']}  after {report['load_average_after']} "
          f"({os.cpu_count()} cores); {args.images} images x {report['runs']} runs, 1 thread")
    print(f"{'source':26s} {'exact img/s best/med':>22s} {'fast img/s best/med':>22s} {'ratio best/med':>16s}")
    for name, r in results.items():
        print(f"{name:26s} {r['exact']['images_per_s_best']:>10} /{r['exact']['images_per_s_median']:>9} "
              f"{r['fast']['images_per_s_best']:>10} /{r['fast']['images_per_s_median']:>9} "
              f"{r['ratio_best']:>8} /{r['ratio_median']:>5}")


if __name__ == "__main__":
    main()
