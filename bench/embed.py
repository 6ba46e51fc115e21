"""Embedding throughput on the sample's images, end to end, measured in one run (not asserted in tests).

1. The original toolkit's per-image loop (open, Meta's preprocessing, one forward per image, torch's default
   threads: what a user running that script gets) against the batched extraction ``tasks.embed`` runs
   (:func:`embed_pairs`: a batch's tactile and RGB images through one forward, the batch size, decoding
   workers and torch threads the stage picks for the device -- ``threads: auto``), with Meta's exact
   preprocessing and with ``embed.fast_decode``; and the batched path at torch's default threads beside it.
   Same images, same encoder, same vectors (the exact path's are checked equal to the loop's).
2. Incremental rerun: add 1 % new pairs to an embedded set and rerun :func:`compute_embeddings` vs a full run
   from an empty cache -- the inner function only; ``bench/embed_stage.py`` times whole stage processes.

Every path runs ``--runs`` times (>= 3), interleaved so a neighbour's load hits all alike; min and median are
reported, with the load average before and after (on a shared machine compare ratios, not seconds).

    .venv/bin/python -m bench.embed [--pairs 300] [--size 128] [--runs 3] [--encoder imagebind_tiny]
Writes bench/results/embed.json and prints a table.  Issue 21's goal: batched end to end >= 2x the loop.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from touchvl import disk
from touchvl.data.sample import render_item
from touchvl.devices import resolve_threads
from touchvl.imagebind.cache import VectorCache
from touchvl.imagebind.embedding import compute_embeddings, default_batch_size, default_num_workers, embed_pairs
from touchvl.imagebind.encoder import EncoderSpec, ImageBindEncoder, preprocess_image

GOAL_RATIO = 2.0  # issue 21: on the sample, batched end to end >= 2x the per-image loop


def make_pairs(folder: Path, ids: range, size: int) -> pd.DataFrame:
    rows = []
    for i in ids:
        item = render_item(i, size, 2, seed=123)
        tac, rgb = folder / f"image_{i}_tac.jpg", folder / f"image_{i}_rgb.jpg"
        Image.fromarray(item.tactile).save(tac)
        Image.fromarray(item.rgb).save(rgb)
        rows.append({"uid": i * 1000, "tac_path": str(tac), "rgb_path": str(rgb), "caption": item.caption,
                     "sensor_id": item.material.sensor})
    return pd.DataFrame(rows)


def per_image_loop(encoder: ImageBindEncoder, manifest: pd.DataFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for row in manifest.itertuples():
        vectors = []
        for path in (row.tac_path, row.rgb_path):
            with Image.open(path) as img:
                vectors.append(encoder.encode_images(preprocess_image(img).unsqueeze(0))[0])
        out[int(row.uid)] = tuple(vectors)
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _stats(values: list[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "runs": [round(v, 3) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--size", type=int, default=128, help="image side (the sample's: 128)")
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (at least 3)")
    ap.add_argument("--encoder", default="imagebind_tiny")
    args = ap.parse_args()
    runs = max(3, args.runs)
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    exact = ImageBindEncoder(EncoderSpec(name=args.encoder))
    fast = ImageBindEncoder(EncoderSpec(name=args.encoder, fast_decode=True))
    fast.__dict__["model"] = exact.model  # the same weights: only the preprocessing differs
    batch, workers = default_batch_size(exact.device), default_num_workers(exact.device)
    stage_threads = resolve_threads("auto", workers)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_pairs(tmp, range(args.pairs), args.size)
        rows = [(int(r.uid), r.tac_path, r.rgb_path) for r in manifest.itertuples()]
        extra = make_pairs(tmp, range(args.pairs, args.pairs + max(1, args.pairs // 100)), args.size)
        grown = pd.concat([manifest, extra], ignore_index=True)
        embed_pairs(exact, rows[:8], batch, 0)  # warm-up: first-call allocations
        paths = {  # name: (torch threads, what runs)
            "per_image_loop": (default_threads, lambda: per_image_loop(exact, manifest)),
            "batched_exact": (stage_threads, lambda: embed_pairs(exact, rows, batch, workers)[0]),
            "batched_fast_decode": (stage_threads, lambda: embed_pairs(fast, rows, batch, workers)[0]),
            "batched_exact_default_threads": (default_threads, lambda: embed_pairs(exact, rows, batch, workers)[0]),
        }
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        full, incremental = [], []
        for round_ in range(runs):
            for name, (threads, run) in paths.items():
                torch.set_num_threads(threads)
                took, vectors = timed(run)
                seconds[name].append(took)
                if name == "per_image_loop":
                    reference = vectors
                elif name == "batched_exact" and round_ == 0:  # the same vectors, batched or not
                    for uid, (tac, rgb) in vectors.items():
                        assert np.allclose(tac, reference[uid][0], atol=1e-5), uid
                        assert np.allclose(rgb, reference[uid][1], atol=1e-5), uid
            torch.set_num_threads(stage_threads)
            cache = VectorCache(tmp / f"cache_{round_}", "bench")
            full.append(timed(lambda: compute_embeddings(manifest, exact, cache, batch, workers))[0])
            incremental.append(timed(lambda: compute_embeddings(grown, exact, cache, batch, workers))[0])
    load_after = os.getloadavg()
    loop = seconds["per_image_loop"]
    result = {
        "encoder": args.encoder, "device": str(exact.device), "pairs": args.pairs, "image_size": args.size,
        "images": 2 * args.pairs, "runs": runs, "batch_pairs": batch, "workers": workers,
        "torch_threads": {"default": default_threads, "stage_auto": stage_threads}, "cpu_count": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "seconds": {name: _stats(s) for name, s in seconds.items()},
        "speedup_vs_loop": {name: {"min": round(min(loop) / min(s), 2),
                                   "median": round(statistics.median(loop) / statistics.median(s), 2)}
                            for name, s in seconds.items() if name != "per_image_loop"},
        "full_run_s": _stats(full), "incremental_1pct_s": _stats(incremental),
        "incremental_fraction_of_full": {"min": round(min(incremental) / min(full), 4),
                                         "median": round(statistics.median(incremental) / statistics.median(full), 4)},
    }
    disk.write_json(Path(__file__).parent / "results" / "embed.json", result)
    print(f"load average before {result['load_average_before']}  after {result['load_average_after']} "
          f"({os.cpu_count()} cores); {2 * args.pairs} images of {args.size} px x {runs} rounds; batch {batch} "
          f"pairs, {workers} decoding workers, torch threads: default {default_threads}, stage auto {stage_threads}")
    print(f"{'path':32s} {'s min / median':>18s} {'ms/image':>9s} {'x loop min / median':>21s}")
    for name, s in seconds.items():
        ratio = result["speedup_vs_loop"].get(name, {"min": 1.0, "median": 1.0})
        print(f"{name:32s} {min(s):8.3f} / {statistics.median(s):6.3f} {1e3 * min(s) / (2 * args.pairs):9.2f} "
              f"{ratio['min']:>10} / {ratio['median']:>6}")
    frac = result["incremental_fraction_of_full"]
    print(f"incremental rerun (+1 % pairs) / full run, inner function: {frac['min']:.1%} (min) {frac['median']:.1%} (median)")
    best = max(r["median"] for r in result["speedup_vs_loop"].values())
    print(f"goal: batched end to end >= {GOAL_RATIO}x the per-image loop (median): best {best}x "
          f"{'met' if best >= GOAL_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
