"""``index``: FAISS indexes over the RGB and projected-tactile databases, retrieval metrics, gallery.

Builds ``artifacts/index/rgb.faiss`` (raw ImageBind RGB vectors; accepts raw or projected queries,
since the projector maps tactile vectors *into* RGB space) and ``artifacts/index/tac_projected.faiss``
(projected tactile vectors; projected queries from the same projector only), each with a metadata
JSON.  When an index of the same space, encoder, projector and type exists, only new uids are added
and deleted/changed ones removed (the nightly path); otherwise it is rebuilt.

CLI::

    python -m tasks.index                     # the DVC stage
    python -m tasks.index search --image data/sample/images_tac/image_3_tac.jpg [--sensor 1] -k 5
    python -m tasks.index search --text "glossy, smooth" -k 5
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from PIL import Image

from tasks import atomic
from tasks.params import IndexParams, Params, load_params
from tasks.retrieval import (IndexMeta, QuerySpace, Retriever, SearchParams, build_index, index_ids,
                             load_index, normalize, recall_at_k, save_index)
from tasks.stage import StageError, run_main

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
    return dict(nlist=p.nlist, nprobe=p.nprobe, hnsw_m=p.hnsw_m, ef_construction=p.ef_construction,
                ef_search=p.ef_search, train_size=p.train_size)


def update_or_build(db: Database, p: IndexParams, folder: Path) -> tuple[faiss.Index, IndexMeta, dict]:
    """Incremental add/remove when compatible with the saved index, else a full build."""
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
    if compatible and set(old) == set(index_ids(old_index).tolist()):
        new = dict(zip(db.ids.tolist(), digests.tolist()))
        stale = [uid for uid, d in old.items() if new.get(uid) != d]  # deleted or changed
        fresh = [i for i, uid in enumerate(db.ids.tolist()) if old.get(uid) != new[uid]]
        if stale:
            old_index.remove_ids(np.array(stale, dtype=np.int64))
        if fresh:
            old_index.add_with_ids(normalize(db.vectors[fresh]), db.ids[fresh])
        index, report = old_index, {"mode": "incremental", "added": len(fresh), "removed": len(stale)}
    else:
        index = build_index(db.vectors, db.ids, p.type, **index_kwargs(p))
    save_index(index, meta, folder)
    with atomic.atomic_open(digest_path, "wb") as fh:
        np.savez(fh, ids=db.ids, digests=digests)
    return index, meta, report


# ----------------------------------------------------------------------------- inputs


def _load_npy_pair(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        return np.load(folder / "all_embeddings.npy"), np.load(folder / "all_indices.npy")
    except FileNotFoundError as exc:
        raise StageError(f"{exc.filename}: missing (run the stage that writes it: `dvc repro`)") from None


def load_databases(embeddings_dir: Path) -> tuple[Database, Database, dict]:
    encoder_meta = json.loads((embeddings_dir / "meta.json").read_text())
    rgb, rgb_ids = _load_npy_pair(embeddings_dir / "embeddings_rgb")
    tac, tac_ids = _load_npy_pair(embeddings_dir / "embeddings_tac_projected")
    projected_meta = json.loads((embeddings_dir / "embeddings_tac_projected" / "meta.json").read_text())
    fingerprint = encoder_meta["fingerprint"]
    # RGB vectors do not depend on the projector: retraining it must not force an RGB rebuild
    return (Database("rgb", "raw", ("raw", "projected"), rgb, rgb_ids, fingerprint, None),
            Database("tac_projected", "projected", ("projected",), tac, tac_ids, fingerprint,
                     projected_meta["projector_hash"]),
            encoder_meta)


# ----------------------------------------------------------------------------- metrics and gallery


def retrieval_metrics(rgb_index: faiss.Index, rgb: Database, tac: Database, test_uids: np.ndarray,
                      p: IndexParams) -> dict:
    """Test-split projected-tactile -> RGB recall of the built index, exact search, and ANN vs flat."""
    rows = {uid: i for i, uid in enumerate(tac.ids.tolist())}
    queries = tac.vectors[[rows[u] for u in test_uids.tolist()]]
    metrics = {"queries": len(test_uids), "index_type": p.type,
               "index": recall_at_k(rgb_index, queries, test_uids)}
    flat = build_index(rgb.vectors, rgb.ids, "flat")
    metrics["exact"] = recall_at_k(flat, queries, test_uids)
    if p.type != "flat":
        _, ann = rgb_index.search(normalize(queries), 10)
        _, exact = flat.search(normalize(queries), 10)
        metrics["ann_recall@10_vs_flat"] = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann.tolist(), exact.tolist())]))
    return metrics


def thumbnail(path: str, size: int = 112) -> str:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
    except OSError:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery_html(queries: list[tuple[pd.Series, list]], title: str) -> str:
    """Self-contained page: each query's tactile image beside its top-k RGB hits, true match marked."""
    rows = []
    for query, hits in queries:
        cells = []
        for rank, hit in enumerate(hits, start=1):
            true = hit.source_id == int(query["source_id"])
            cells.append(
                f'<td class="hit{" true" if true else ""}"><img src="{thumbnail(hit.rgb_path)}" alt="uid {hit.uid}">'
                f'<div>#{rank} uid {hit.uid} · cos {hit.score:.3f}{" ✔ true match" if true else ""}</div>'
                f'<div class="cap">{html.escape(hit.caption)}</div></td>')
        rows.append(
            f'<tr><td class="query"><img src="{thumbnail(query["tac_path"])}" alt="query uid {query["uid"]}">'
            f'<div>query uid {query["uid"]} (sensor {query["sensor_id"]})</div>'
            f'<div class="cap">{html.escape(str(query["caption"]))}</div></td>{"".join(cells) or "<td>no hit above min_cos</td>"}</tr>')
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:1em}} td{{vertical-align:top;padding:6px;width:120px;font-size:12px}}
td.query{{background:#eef}} td.true{{outline:3px solid #2a2}} .cap{{color:#555}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Tactile query (left) and its top RGB results; the true match has a green frame.</p>
<table>{"".join(rows)}</table></body></html>
"""


# ----------------------------------------------------------------------------- stage


def run(params: Params) -> dict:
    p = params.index
    manifest = pd.read_csv(params.prepare.out_dir / "manifest.csv", keep_default_na=False)
    rgb, tac, _ = load_databases(params.embed.out_dir)
    report = {}
    indexes = {}
    for db in (rgb, tac):
        start = time.perf_counter()
        index, meta, how = update_or_build(db, p, p.out_dir)
        indexes[db.name] = (index, meta)
        report[db.name] = {**how, "count": index.ntotal, "seconds": round(time.perf_counter() - start, 3)}
        log.info("index %s: %s (+%d -%d) -> %d vectors", db.name, how["mode"], how["added"], how["removed"], index.ntotal)
    test = manifest[(manifest["split"] == "test") & (manifest["copy"] == 0)]
    metrics = {"build": report, "tac_to_rgb": retrieval_metrics(indexes["rgb"][0], rgb, tac, test["uid"].to_numpy(np.int64), p)}
    atomic.write_json(p.metrics, metrics)
    retriever = Retriever(*indexes["rgb"], manifest)
    query_rows = test.sort_values("uid").head(p.gallery_queries)
    rows = {uid: i for i, uid in enumerate(tac.ids.tolist())}
    space = QuerySpace("projected", tac.vectors.shape[1], tac.encoder_fingerprint, tac.projector_hash)
    hits = retriever.search(tac.vectors[[rows[u] for u in query_rows["uid"]]], space, search_params(p))
    atomic.write_text(p.gallery, gallery_html(list(zip((r for _, r in query_rows.iterrows()), hits)),
                                              "Tactile → RGB retrieval (test split)"))
    return metrics


def search_params(p: IndexParams, k: int | None = None) -> SearchParams:
    s = p.search
    return SearchParams(k=k or s.k, overfetch_mul=s.overfetch_mul, overfetch_bias=s.overfetch_bias,
                        min_cos=s.min_cos, dedupe=s.dedupe)


def search_cli(argv: list[str]) -> None:
    from tasks.query import QueryEncoder

    ap = argparse.ArgumentParser(prog="python -m tasks.index search", description="Search the RGB index")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", type=Path, help="tactile image (projected with the trained projector)")
    group.add_argument("--text", help="text query, e.g. 'glossy, smooth' (ImageBind text tower)")
    ap.add_argument("--sensor", type=int, default=None, help="sensor id of the tactile image (default: unknown)")
    ap.add_argument("-k", type=int, default=None)
    ap.add_argument("--index", default="rgb", help="index name under index.out_dir (rgb, tac_projected)")
    args = ap.parse_args(argv)
    params = load_params()
    manifest = pd.read_csv(params.prepare.out_dir / "manifest.csv", keep_default_na=False)
    retriever = Retriever(*load_index(params.index.out_dir, args.index), manifest)
    encoder = QueryEncoder(params)
    vector, space = encoder.tactile(args.image, args.sensor) if args.image else encoder.text(args.text)
    hits = retriever.search(vector, space, search_params(params.index, args.k))[0]
    for hit in hits:
        print(json.dumps(asdict(hit)))
    if not hits:
        print(f"no result with cosine >= index.search.min_cos={params.index.search.min_cos}", file=sys.stderr)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "search":
        search_cli(sys.argv[2:])
        return
    metrics = run(load_params())
    log.info("tactile->RGB on test: %s", metrics["tac_to_rgb"]["index"])


if __name__ == "__main__":
    run_main("index", main)
