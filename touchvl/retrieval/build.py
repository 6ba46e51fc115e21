"""Building the FAISS indexes over the RGB and projected-tactile databases (incrementally), and their metrics.

Builds ``artifacts/index/rgb.faiss`` (raw ImageBind RGB vectors; accepts raw or projected queries,
since the projector maps tactile vectors *into* RGB space) and ``artifacts/index/tac_projected.faiss``
(projected tactile vectors; projected queries from the same projector only), each with a metadata
JSON.  When an index of the same space, encoder, projector and type exists, only new uids are added
and deleted/changed ones removed (the nightly path); otherwise it is rebuilt.

"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from touchvl import disk
from touchvl.params import IndexParams
from touchvl.errors import StageError
from touchvl.retrieval.index import IndexMeta, build_index, index_ids, index_recall_at_k, load_index, normalize, save_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Database:
    """Vectors to index, with where they came from."""

    name: str
    space: str
    query_spaces: tuple[str, ...]
    vectors: np.ndarray
    ids: np.ndarray
    encoder_fingerprint: str
    projector_hash: str | None


def vector_digests(vectors: np.ndarray) -> np.ndarray:
    """One int64 per row: detects a uid whose vector changed (image edited in place)."""
    return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "big", signed=True)
                     for row in np.ascontiguousarray(vectors, dtype=np.float32)], dtype=np.int64)


def index_kwargs(p: IndexParams) -> dict:
    kwargs = dict(nlist=p.nlist, nprobe=p.nprobe, hnsw_m=p.hnsw_m, ef_construction=p.ef_construction,
                  ef_search=p.ef_search, train_size=p.train_size)
    if p.type == "ivf_pq":  # only this type's metadata names them (the other types' saved metadata is unchanged)
        kwargs.update(pq_m=p.pq_m, refine_k_factor=p.refine_k_factor)
    return kwargs


def update_or_build(db: Database, p: IndexParams, folder: Path) -> tuple[faiss.Index, IndexMeta, dict]:
    """Incremental add/remove when compatible with the saved index, else a full build (nothing saved yet:
    :func:`save_database` writes it once it has been validated)."""
    meta = IndexMeta(db.name, db.space, db.query_spaces, db.vectors.shape[1], len(db.ids), db.encoder_fingerprint,
                     db.projector_hash, p.type, index_kwargs(p))
    digests = vector_digests(db.vectors)
    digest_path = folder / f"{db.name}.digests.npz"
    report = {"mode": "rebuild", "added": len(db.ids), "removed": 0}
    try:
        old_index, old_meta = load_index(folder, db.name)
        with np.load(digest_path) as saved:
            old = dict(zip(saved["ids"].tolist(), saved["digests"].tolist()))
    except (StageError, FileNotFoundError, KeyError, ValueError, RuntimeError):
        old_index, old_meta, old = None, None, {}
    compatible = old_meta is not None and (
        (old_meta.space, old_meta.dim, old_meta.encoder_fingerprint, old_meta.projector_hash, old_meta.index_type,
         old_meta.index_params) == (meta.space, meta.dim, meta.encoder_fingerprint, meta.projector_hash, meta.index_type,
                                    meta.index_params))
    new = dict(zip(db.ids.tolist(), digests.tolist()))
    stale = [uid for uid, d in old.items() if new.get(uid) != d]  # deleted or changed
    # ivf_pq's exact re-ranking (IndexRefineFlat) cannot remove ids: a deletion rebuilds it
    removable = not stale or p.type != "ivf_pq"
    if compatible and removable and set(old) == set(index_ids(old_index).tolist()):
        fresh = [i for i, uid in enumerate(db.ids.tolist()) if old.get(uid) != new[uid]]
        if stale:
            old_index.remove_ids(np.array(stale, dtype=np.int64))
        if fresh:
            old_index.add_with_ids(normalize(db.vectors[fresh]), db.ids[fresh])
        index, report = old_index, {"mode": "incremental", "added": len(fresh), "removed": len(stale)}
    else:
        index = build_index(db.vectors, db.ids, p.type, **index_kwargs(p))
    return index, meta, report


def save_database(index: faiss.Index, meta: IndexMeta, db: Database, folder: Path) -> None:
    save_index(index, meta, folder)
    with disk.atomic_open(folder / f"{db.name}.digests.npz", "wb") as fh:
        np.savez(fh, ids=db.ids, digests=vector_digests(db.vectors))


def validation_tables(built: list[tuple[faiss.Index, IndexMeta, Database]], encoder_fingerprint: str) -> list:
    """The index boundary: each index holds exactly its database's uids, once each, and its metadata guard
    (space, dimension, encoder, projector) describes the vectors it was built from."""
    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
    critical = dict(severity="critical")
    tables = []
    for index, meta, db in built:
        stored = index_ids(index)
        values, counts = np.unique(stored, return_counts=True)
        ids = pd.DataFrame({"uid": db.ids, "indexed": np.isin(db.ids, stored)})
        extra = pd.DataFrame({"uid": values, "in_database": np.isin(values, db.ids), "copies": counts})
        guard = pd.DataFrame([{"count_matches": index.ntotal == len(db.ids) == meta.count,
                               "dim_matches": index.d == db.vectors.shape[1] == meta.dim,
                               "encoder_matches": meta.encoder_fingerprint == db.encoder_fingerprint == encoder_fingerprint,
                               "projector_matches": meta.projector_hash == db.projector_hash,
                               "space_matches": meta.space == db.space}])
        tables += [
            checks.Table(f"{db.name}_ids", ids, [gxe.ExpectColumnValuesToBeInSet(column="indexed", value_set=[True], **critical)],
                         id_column="uid"),
            checks.Table(f"{db.name}_stored", extra, [
                gxe.ExpectColumnValuesToBeInSet(column="in_database", value_set=[True], **critical),
                gxe.ExpectColumnValuesToBeBetween(column="copies", min_value=1, max_value=1, **critical)], id_column="uid"),
            checks.Table(f"{db.name}_guard", guard, [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True], **critical)
                                                     for c in guard.columns])]
    return tables


# ----------------------------------------------------------------------------- inputs


def load_databases(embeddings_dir: Path) -> tuple[Database, Database, dict]:
    encoder_meta = disk.read_meta(embeddings_dir)
    rgb, rgb_ids = disk.read_vectors(embeddings_dir / "embeddings_rgb")
    tac, tac_ids = disk.read_vectors(embeddings_dir / "embeddings_tac_projected")
    projected_meta = disk.read_meta(embeddings_dir / "embeddings_tac_projected")
    fingerprint = encoder_meta["fingerprint"]
    # RGB vectors do not depend on the projector: retraining it must not force an RGB rebuild
    return (Database("rgb", "raw", ("raw", "projected"), rgb, rgb_ids, fingerprint, None),
            # the projected vectors' own record of their encoder: stale projections of another encoder fail validation
            Database("tac_projected", "projected", ("projected",), tac, tac_ids, projected_meta.get("encoder_fingerprint", ""),
                     projected_meta["projector_hash"]),
            encoder_meta)


# ----------------------------------------------------------------------------- metrics and gallery


def retrieval_metrics(rgb_index: faiss.Index, rgb: Database, tac: Database, test_uids: np.ndarray,
                      p: IndexParams) -> dict:
    """Test-split projected-tactile -> RGB recall of the built index, exact search, and ANN vs flat."""
    rows = {uid: i for i, uid in enumerate(tac.ids.tolist())}
    queries = tac.vectors[[rows[u] for u in test_uids.tolist()]]
    metrics = {"queries": len(test_uids), "index_type": p.type,
               "index": index_recall_at_k(rgb_index, queries, test_uids)}
    flat = build_index(rgb.vectors, rgb.ids, "flat")
    metrics["exact"] = index_recall_at_k(flat, queries, test_uids)
    if p.type != "flat":
        _, ann = rgb_index.search(normalize(queries), 10)
        _, exact = flat.search(normalize(queries), 10)
        metrics["ann_recall@10_vs_flat"] = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann.tolist(), exact.tolist())]))
    return metrics
