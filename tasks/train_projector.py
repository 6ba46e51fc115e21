"""``train_projector``: stage 1 (InfoNCE) and stage 2 (low-LR polish with EMA) of the ViT projector.

    python -m tasks.train_projector --stage 1   # -> artifacts/projector/stage1.pt
    python -m tasks.train_projector --stage 2   # -> artifacts/projector/projector.pt,
                                                #    embeddings/embeddings_tac_projected/, metrics

Pairs are matched by uid.  Model selection (early stopping) uses ``projector.val_fraction`` of the
*train* source ids; the test split is only ever used for the reported metrics.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks import atomic
from tasks.encoders import resolve_device
from tasks.params import Params, TrainStageParams, load_params
from tasks.projector_model import ProjectorConfig, ViTProjector, checkpoint_dict, projector_from_checkpoint
from tasks.projector_train import TrainConfig, align_by_ids, project, recall_at_k, train
from tasks.stage import StageError, run_main

log = logging.getLogger(__name__)


@dataclass
class PairedEmbeddings:
    """Tactile/RGB/text rows aligned by uid, with the manifest's split and sensor for each row."""

    uids: np.ndarray
    tac: np.ndarray
    rgb: np.ndarray
    text: np.ndarray | None
    sensors: np.ndarray
    split: np.ndarray  # "train" | "val" | "test"
    original: np.ndarray  # bool: copy 0 (evaluation uses originals only)
    captions: np.ndarray
    encoder_fingerprint: str


def load_pairs(params: Params) -> PairedEmbeddings:
    root = params.embed.out_dir
    tac, tac_ids = np.load(root / "embeddings_tac/all_embeddings.npy"), np.load(root / "embeddings_tac/all_indices.npy")
    rgb, rgb_ids = np.load(root / "embeddings_rgb/all_embeddings.npy"), np.load(root / "embeddings_rgb/all_indices.npy")
    tac_rows, rgb_rows = align_by_ids(tac_ids, rgb_ids)
    text_path = root / "embeddings_text/all_embeddings.npy"
    text = None
    if text_path.is_file():
        text_ids = np.load(root / "embeddings_text/all_indices.npy")
        _, text_rows = align_by_ids(tac_ids, text_ids)
        text = np.load(text_path)[text_rows]
    sensors = np.load(root / "sensor_ids.npy")[tac_rows]
    manifest = pd.read_csv(params.prepare.out_dir / "manifest.csv", keep_default_na=False).set_index("uid")
    uids = tac_ids[tac_rows]
    missing = np.setdiff1d(uids, manifest.index.to_numpy())
    if len(missing):
        raise StageError(f"{len(missing)} embedded uids are not in the manifest (e.g. {missing[:5].tolist()}): rerun embed")
    rows = manifest.loc[uids]
    split = rows["split"].to_numpy().astype(object)
    # validation holdout by source id, so copies of a held-out item never train
    sources = rows["source_id"].to_numpy()
    held = np.array([int(hashlib.sha256(f"val:{s}".encode()).hexdigest()[:8], 16) / 16**8 < params.projector.val_fraction
                     for s in sources])
    split[(split == "train") & held] = "val"
    meta = json.loads((root / "meta.json").read_text())
    return PairedEmbeddings(uids, tac[tac_rows], rgb[rgb_rows], text, sensors, split,
                            rows["copy"].to_numpy() == 0, rows["caption"].to_numpy(), meta["fingerprint"])


def train_config(p: TrainStageParams, device: str) -> TrainConfig:
    return TrainConfig(**p.model_dump(), device=device)


def fit(model: ViTProjector, data: PairedEmbeddings, stage: TrainStageParams, device: str):
    tr = data.split == "train"
    va = (data.split == "val") & data.original
    if not va.any():
        raise StageError("validation holdout is empty: raise projector.val_fraction or add data")
    return train(model, data.tac[tr], data.rgb[tr], data.sensors[tr], data.tac[va], data.rgb[va], data.sensors[va],
                 train_config(stage, device), log=lambda row: log.info("epoch %(epoch)d loss %(loss).4f val R@1 %(val_r1).3f tau %(tau).3f", row))


def caption_recall_at_1(query: np.ndarray, text: np.ndarray, captions: np.ndarray) -> float:
    """Tactile -> text: a hit when the nearest distinct caption is the query's own caption."""
    unique, first = np.unique(captions, return_index=True)
    gallery = text[first]
    nearest = np.argmax((query / np.linalg.norm(query, axis=1, keepdims=True)) @ gallery.T, axis=1)
    return float(np.mean(unique[nearest] == captions))


def test_metrics(data: PairedEmbeddings, projected: np.ndarray) -> dict:
    te = (data.split == "test") & data.original
    metrics = {"test_queries": int(te.sum())}
    for name, tac in (("raw", data.tac), ("projected", projected)):
        metrics[name] = {"tac_to_rgb": recall_at_k(tac[te], data.rgb[te]),
                         "rgb_to_tac": recall_at_k(data.rgb[te], tac[te])}
        if data.text is not None:
            metrics[name]["tac_to_text_R@1"] = caption_recall_at_1(tac[te], data.text[te], data.captions[te])
    return metrics


def file_sha256(path: Path) -> str:
    return atomic.sha256_file(path)[:16]


def write_history(history: list[dict], path: Path) -> None:
    atomic.write_csv(path, pd.DataFrame(history))


def run_stage1(params: Params) -> dict:
    p = params.projector
    data = load_pairs(params)
    device = str(resolve_device(p.device))
    num_sensors = p.num_sensors if p.num_sensors is not None else int(max(data.sensors.max(), -1) + 1)
    torch.manual_seed(params.train_stage1.seed)
    model = ViTProjector(ProjectorConfig(emb_dim=data.tac.shape[1], dim=p.dim, depth=p.depth, heads=p.heads,
                                         num_tokens=p.num_tokens, mlp_ratio=p.mlp_ratio, dropout=p.dropout,
                                         num_sensors=num_sensors, sensor_tokens=p.sensor_tokens))
    result = fit(model, data, params.train_stage1, device)
    model.load_state_dict(result.best_state)
    ckpt = checkpoint_dict(model, stage=1, best_epoch=result.best_epoch, best_val_r1=result.best_val_r1,
                           encoder_fingerprint=data.encoder_fingerprint)
    with atomic.atomic_open(p.out_dir / "stage1.pt", "wb") as fh:
        torch.save(ckpt, fh)
    write_history(result.history, p.history_dir / "projector_stage1.csv")
    return {"best_epoch": result.best_epoch, "best_val_r1": result.best_val_r1}


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise StageError(f"{path}: projector checkpoint not found (run `dvc repro train_projector_stage1`)")
    return torch.load(path, map_location="cpu", weights_only=True)


def run_stage2(params: Params) -> dict:
    from tasks import validation

    p = params.projector
    data = load_pairs(params)
    device = str(resolve_device(p.device))
    stage1 = load_checkpoint(p.out_dir / "stage1.pt")
    if stage1["config"]["emb_dim"] != data.tac.shape[1]:
        raise StageError(f"stage-1 projector expects dim {stage1['config']['emb_dim']}, embeddings have {data.tac.shape[1]}")
    model = projector_from_checkpoint(stage1)
    result = fit(model, data, params.train_stage2, device)
    model.load_state_dict(result.best_state)
    with atomic.atomic_open(p.out_dir / "projector.pt", "wb") as fh:
        torch.save(checkpoint_dict(model, stage=2, best_epoch=result.best_epoch, best_val_r1=result.best_val_r1,
                                   encoder_fingerprint=data.encoder_fingerprint), fh)
    write_history(result.history, p.history_dir / "projector_stage2.csv")
    projector_hash = file_sha256(p.out_dir / "projector.pt")
    projected = project(model, data.tac, data.sensors, device=device)
    report = validation.run_validation("train_projector", validation_tables(projected, data.uids, params), params.validation)
    report.raise_if_failed()
    out = p.projected_dir
    for name, array in (("all_embeddings.npy", projected), ("all_indices.npy", data.uids)):
        with atomic.atomic_open(out / name, "wb") as fh:
            np.save(fh, array)
    atomic.write_json(out / "meta.json", {"projector_hash": projector_hash, "projector": str(p.out_dir / "projector.pt"),
                                          "encoder_fingerprint": data.encoder_fingerprint, "dim": int(projected.shape[1]),
                                          "count": len(projected), "normalized": True})
    metrics = {"projector_hash": projector_hash, "stage1_val_r1": float(stage1.get("best_val_r1", -1)),
               "stage2_val_r1": result.best_val_r1, **test_metrics(data, projected)}
    atomic.write_json(p.metrics, metrics)
    return metrics


def validation_tables(projected: np.ndarray, uids: np.ndarray, params: Params) -> list:
    from tasks import validation

    gxe = validation.gxe
    raw_ids = np.load(params.embed.out_dir / "embeddings_tac/all_indices.npy")
    rows = pd.DataFrame({"uid": uids, "finite": np.isfinite(projected).all(axis=1),
                         "norm": np.linalg.norm(np.nan_to_num(projected), axis=1)})
    ids = pd.DataFrame({"raw_uid": raw_ids, "projected_uid": uids if len(uids) == len(raw_ids) else -1})
    return [validation.Table("projected", rows, [
                gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True], severity="critical"),
                gxe.ExpectColumnValuesToBeBetween(column="norm", min_value=0.999, max_value=1.001, severity="critical"),
                gxe.ExpectColumnValuesToBeUnique(column="uid", severity="critical")], id_column="uid"),
            validation.Table("ids", ids, [
                gxe.ExpectColumnPairValuesToBeEqual(column_A="raw_uid", column_B="projected_uid", severity="critical")],
                id_column="raw_uid")]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.train_projector")
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True)
    args = ap.parse_args()
    params = load_params()
    summary = run_stage1(params) if args.stage == 1 else run_stage2(params)
    log.info("stage %d: %s", args.stage, json.dumps(summary)[:400])


if __name__ == "__main__":
    run_main("train_projector", main)
