"""Tactile/RGB/text embeddings paired by uid with their split, and the test metrics of a projector.

Pairs are matched by uid.  Model selection (early stopping) uses ``projector.val_fraction`` of the *train*
source ids; the test split is only ever used for the reported metrics.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from touchvl import disk
from touchvl.errors import StageError
from touchvl.params import TrainStageParams
from touchvl.projector.model import ViTProjector
from touchvl.projector.training import TrainConfig, align_by_ids, recall_at_k, train

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


def validation_holdout(source_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the train source ids held out for early stopping: a stable hash, so copies of an item stay together."""
    return np.array([int(hashlib.sha256(f"val:{s}".encode()).hexdigest()[:8], 16) / 16**8 < fraction
                     for s in source_ids], dtype=bool)


def load_pairs(embeddings_dir: Path, manifest: pd.DataFrame, val_fraction: float) -> PairedEmbeddings:
    """The embed stage's outputs aligned by uid, with each row's split (train / val / test) from the manifest."""
    tac, tac_ids = disk.read_vectors(embeddings_dir / "embeddings_tac")
    rgb, rgb_ids = disk.read_vectors(embeddings_dir / "embeddings_rgb")
    tac_rows, rgb_rows = align_by_ids(tac_ids, rgb_ids)
    text = None
    if (embeddings_dir / "embeddings_text/all_embeddings.npy").is_file():
        text_vectors, text_ids = disk.read_vectors(embeddings_dir / "embeddings_text")
        _, text_rows = align_by_ids(tac_ids, text_ids)
        text = text_vectors[text_rows]
    sensors = disk.read_sensor_ids(embeddings_dir, len(tac_ids))[tac_rows]
    catalog = manifest.set_index("uid")
    uids = tac_ids[tac_rows]
    missing = np.setdiff1d(uids, catalog.index.to_numpy())
    if len(missing):
        raise StageError(f"{len(missing)} embedded uids are not in the manifest (e.g. {missing[:5].tolist()}): rerun embed")
    rows = catalog.loc[uids]
    split = rows["split"].to_numpy().astype(object)
    held = validation_holdout(rows["source_id"].to_numpy(), val_fraction)
    split[(split == "train") & held] = "val"
    meta = disk.read_meta(embeddings_dir)
    return PairedEmbeddings(uids, tac[tac_rows], rgb[rgb_rows], text, sensors, split,
                            rows["copy"].to_numpy() == 0, rows["caption"].to_numpy(), meta["fingerprint"])


def train_config(p: TrainStageParams, device: str) -> TrainConfig:
    return TrainConfig(**p.model_dump(), device=device)


def fit(model: ViTProjector, data: PairedEmbeddings, stage: TrainStageParams, device: str, on_epoch=None):
    """Train on the train split, select on the validation holdout; ``on_epoch(row)`` sees every epoch's row
    (loss, val_r1, tau, lr): the stage logs it as a curve."""
    tr = data.split == "train"
    va = (data.split == "val") & data.original
    if not va.any():
        raise StageError("validation holdout is empty: raise projector.val_fraction or add data")

    def each(row: dict) -> None:
        log.info("epoch %(epoch)d loss %(loss).4f val R@1 %(val_r1).3f tau %(tau).3f", row)
        if on_epoch:
            on_epoch(row)

    return train(model, data.tac[tr], data.rgb[tr], data.sensors[tr], data.tac[va], data.rgb[va], data.sensors[va],
                 train_config(stage, device), log=each)


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


def validation_tables(projected: np.ndarray, uids: np.ndarray, raw_ids: np.ndarray, history: list[dict] | None = None) -> list:
    """The train_projector boundary: every projected row finite and unit-norm, one per raw tactile uid, same order;
    with ``history``, stage 2's training curve finite (:func:`touchvl.checks.history_table`)."""
    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
    rows = pd.DataFrame({"uid": uids, "finite": np.isfinite(projected).all(axis=1),
                         "norm": np.linalg.norm(np.nan_to_num(projected), axis=1)})
    ids = pd.DataFrame({"raw_uid": raw_ids, "projected_uid": uids if len(uids) == len(raw_ids) else -1})
    tables = [checks.Table("projected", rows, [
                  gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True], severity="critical"),
                  gxe.ExpectColumnValuesToBeBetween(column="norm", min_value=0.999, max_value=1.001, severity="critical"),
                  gxe.ExpectColumnValuesToBeUnique(column="uid", severity="critical")], id_column="uid"),
              checks.Table("ids", ids, [
                  gxe.ExpectColumnPairValuesToBeEqual(column_A="raw_uid", column_B="projected_uid", severity="critical")],
                  id_column="raw_uid")]
    return tables + ([checks.history_table(history)] if history is not None else [])


def stage1_validation_tables(history: list[dict], state: dict, emb_dim: int, checkpoint_dim: int,
                             checkpoint_fingerprint: str, encoder_fingerprint: str, best_val_r1: float) -> list:
    """The stage-1 boundary: a finite training curve (every loss, val_r1, tau and lr: NaN included) and a checkpoint
    that fits the embeddings it was trained on, with finite weights and a finite best val_r1 in [0, 1]."""
    import torch

    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
    critical = dict(severity="critical")
    checkpoint = pd.DataFrame([{
        "dims_match": checkpoint_dim == emb_dim, "encoder_matches": checkpoint_fingerprint == encoder_fingerprint,
        "weights_finite": all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_floating_point(v)),
        "best_val_r1": float(best_val_r1), "best_val_r1_finite": bool(np.isfinite(best_val_r1))}])
    return [checks.history_table(history),
            checks.Table("checkpoint", checkpoint, [
                gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True], **critical)
                for c in ("dims_match", "encoder_matches", "weights_finite", "best_val_r1_finite")]
                + [gxe.ExpectColumnValuesToBeBetween(column="best_val_r1", min_value=0, max_value=1, **critical)])]
