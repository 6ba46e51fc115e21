"""How much tactile->RGB retrieval the sample data allows, measured in one run (not asserted in tests).

The projector can only align what the encoder keeps. This puts the pipeline's own embeddings
(``embeddings/``, e.g. the random-weight ``imagebind_tiny``) beside a strong classical texture
descriptor computed from the same images -- the log power spectrum pooled into 12 radial x 24
orientation bins of the grey-level centre crop, standardised on the train split -- and runs the
*same* projector training (``train_stage1`` params, the same train/val/test rows as the stage) on
both. The descriptor sees pattern, spatial frequency and orientation the same way in both
modalities, so it is an upper-bound style reference for what a texture-aware encoder could reach
on this data, not a model the pipeline uses.

For the generated sample the hidden material of every test id is known, so R@1 is also broken
down by pattern (which kinds of material the data itself leaves ambiguous).

    .venv/bin/python -m bench.projector_ceiling        # after `make repro` (needs data/prepared, embeddings/)
Writes bench/results/projector_ceiling.json and prints a table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from touchvl import disk
from touchvl.params import load_params
from touchvl.projector.model import ProjectorConfig, ViTProjector
from touchvl.projector.training import project, recall_at_k
from touchvl.data.sample import draw_material
from touchvl.projector.pairs import PairedEmbeddings, fit, load_pairs

RADIAL_BINS, ORIENTATION_BINS, CROP = 12, 24, 64


def _bins(size: int) -> np.ndarray:
    yy, xx = np.mgrid[-size // 2:size // 2, -size // 2:size // 2]
    radius = np.hypot(yy, xx)
    edges = np.linspace(np.log(1.5), np.log(size / 2), RADIAL_BINS + 1)
    radial = np.digitize(np.log(np.maximum(radius, 1e-9)), edges) - 1
    orientation = (np.mod(np.arctan2(yy, xx), np.pi) / np.pi * ORIENTATION_BINS).astype(int) % ORIENTATION_BINS
    bins = radial * ORIENTATION_BINS + orientation
    bins[(radial < 0) | (radial >= RADIAL_BINS)] = -1  # DC and the corners: not pooled
    return bins


def texture_descriptor(path: str, bins: np.ndarray) -> np.ndarray:
    """Log power spectrum of the grey centre crop (128 px image, 64 px crop), pooled into log-polar bins."""
    grey = np.asarray(Image.open(path).convert("L").resize((2 * CROP, 2 * CROP), Image.BICUBIC), np.float32) / 255
    crop = grey[CROP // 2:CROP // 2 + CROP, CROP // 2:CROP // 2 + CROP]
    window = np.outer(np.hanning(CROP), np.hanning(CROP))
    power = np.abs(np.fft.fftshift(np.fft.fft2((crop - crop.mean()) * window))) ** 2
    sums = np.bincount(bins[bins >= 0], weights=power[bins >= 0], minlength=RADIAL_BINS * ORIENTATION_BINS)
    counts = np.bincount(bins[bins >= 0], minlength=RADIAL_BINS * ORIENTATION_BINS)
    return np.log(sums / np.maximum(counts, 1) + 1e-6)


def _standardised_unit(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    z = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def evaluate(data: PairedEmbeddings, params, device: str) -> dict:
    p = params.projector
    torch.manual_seed(params.train_stage1.seed)
    model = ViTProjector(ProjectorConfig(emb_dim=data.tac.shape[1], dim=p.dim, depth=p.depth, heads=p.heads,
                                         num_tokens=p.num_tokens, mlp_ratio=p.mlp_ratio, dropout=p.dropout,
                                         num_sensors=int(data.sensors.max()) + 1, sensor_tokens=p.sensor_tokens))
    result = fit(model, data, params.train_stage1, device)
    model.load_state_dict(result.best_state)
    te = (data.split == "test") & data.original
    projected = project(model, data.tac, data.sensors, device=device)
    sims = projected[te] @ (data.rgb[te] / np.linalg.norm(data.rgb[te], axis=1, keepdims=True)).T
    hits = sims.argmax(axis=1) == np.arange(te.sum())
    return {"raw": recall_at_k(data.tac[te], data.rgb[te]), "projected": recall_at_k(projected[te], data.rgb[te]),
            "best_val_r1": result.best_val_r1, "hits": hits}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.projector_ceiling")
    ap.add_argument("--out", type=Path, default=Path("bench/results/projector_ceiling.json"))
    args = ap.parse_args()
    params = load_params()
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    encoder_data = load_pairs(params.embed.out_dir, manifest, params.projector.val_fraction)
    rows = manifest.set_index("uid").loc[encoder_data.uids]
    bins = _bins(CROP)
    train = encoder_data.split == "train"
    descriptors = {m: np.stack([texture_descriptor(path, bins) for path in tqdm(rows[f"{m}_path"], desc=f"{m} spectra")])
                   for m in ("tac", "rgb")}
    descriptor_data = PairedEmbeddings(**{**encoder_data.__dict__,
                                          "tac": _standardised_unit(descriptors["tac"], train),
                                          "rgb": _standardised_unit(descriptors["rgb"], train), "text": None})
    results = {}
    for name, data in ((f"pipeline embeddings ({encoder_data.encoder_fingerprint})", encoder_data),
                       ("texture descriptor (log-polar spectrum)", descriptor_data)):
        results[name] = evaluate(data, params, "cpu")

    te = (encoder_data.split == "test") & encoder_data.original
    if Path(params.data.root).resolve() == Path(params.sample.out_dir).resolve():  # hidden materials are known
        patterns = np.array([draw_material(np.random.default_rng([params.sample.seed, int(i)]),
                                           params.sample.n_sensors).pattern
                             for i in rows["source_id"].to_numpy()[te]])
    else:
        patterns = np.array(["(real data)"] * int(te.sum()))
    report = {"test_queries": int(te.sum()), "results": {}}
    print(f"{'':48s} {'raw R@1':>8s} {'proj R@1':>9s} {'proj R@5':>9s}  projected R@1 by hidden pattern")
    for name, r in results.items():
        by_pattern = {p: float(r["hits"][patterns == p].mean()) for p in sorted(set(patterns))}
        report["results"][name] = {"raw": r["raw"], "projected": r["projected"], "best_val_r1": r["best_val_r1"],
                                   "projected_r1_by_pattern": by_pattern}
        print(f"{name[:48]:48s} {r['raw']['R@1']:8.3f} {r['projected']['R@1']:9.3f} {r['projected']['R@5']:9.3f}  "
              + ", ".join(f"{p} {v:.2f}" for p, v in by_pattern.items()))
    report["test_patterns"] = {p: int((patterns == p).sum()) for p in sorted(set(patterns))}
    disk.write_json(args.out, report)


if __name__ == "__main__":
    main()
