"""Embedding throughput, measured in one run (not asserted in tests).

1. Batched extraction (tasks.embed: DataLoader workers decode, a batch's tactile and RGB images go
   through one forward) vs the original toolkit's per-image loop (open, preprocess, one forward per
   image), same images, same encoder.
2. Incremental rerun: add 1% new pairs to an embedded set and rerun vs a full run from an empty cache.

    .venv/bin/python -m bench.embed [--pairs 200] [--size 128] [--encoder imagebind_tiny]
Writes bench/results/embed.json and prints a table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from touchvl import disk
from touchvl.imagebind.embedding import compute_embeddings, default_batch_size, default_num_workers, embed_pairs
from touchvl.imagebind.encoder import EncoderSpec, ImageBindEncoder, preprocess_image
from touchvl.data.sample import render_item
from touchvl.imagebind.cache import VectorCache


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


def per_image_loop(encoder: ImageBindEncoder, manifest: pd.DataFrame) -> None:
    for row in manifest.itertuples():
        for path in (row.tac_path, row.rgb_path):
            with Image.open(path) as img:
                encoder.encode_images(preprocess_image(img).unsqueeze(0))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--encoder", default="imagebind_tiny")
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default: per device)")
    args = ap.parse_args()
    torch.manual_seed(0)
    encoder = ImageBindEncoder(EncoderSpec(name=args.encoder))
    batch = default_batch_size(encoder.device)
    if args.workers is None:
        args.workers = default_num_workers(encoder.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_pairs(tmp, range(args.pairs), args.size)
        rows = [(int(r.uid), r.tac_path, r.rgb_path) for r in manifest.itertuples()]
        embed_pairs(encoder, rows[:8], batch, 0)  # warm-up: first-call allocations
        naive = timed(lambda: per_image_loop(encoder, manifest))
        batched = timed(lambda: embed_pairs(encoder, rows, batch, args.workers))

        full = timed(lambda: compute_embeddings(manifest, encoder, VectorCache(tmp / "cache", "bench"), batch, args.workers))
        extra = make_pairs(tmp, range(args.pairs, args.pairs + max(1, args.pairs // 100)), args.size)
        grown = pd.concat([manifest, extra], ignore_index=True)
        incremental = timed(lambda: compute_embeddings(grown, encoder, VectorCache(tmp / "cache", "bench"), batch, args.workers))
    result = {
        "encoder": args.encoder, "device": str(encoder.device), "pairs": args.pairs, "image_size": args.size,
        "batch_pairs": batch, "workers": args.workers, "torch_threads": torch.get_num_threads(),
        "per_image_loop_s": round(naive, 3), "batched_s": round(batched, 3),
        "batched_speedup": round(naive / batched, 2),
        "full_run_s": round(full, 3), "incremental_1pct_s": round(incremental, 3),
        "incremental_fraction_of_full": round(incremental / full, 4),
    }
    disk.write_json(Path(__file__).parent / "results" / "embed.json", result)
    for key, value in result.items():
        print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
