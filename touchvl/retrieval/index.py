"""FAISS indexes over unit vectors (inner product = cosine) and the one retriever everything uses.

An index is saved as ``<name>.faiss`` plus ``<name>.json`` (:class:`IndexMeta`).  The retriever
refuses queries from another vector space, dimension, encoder or projector -- the original
toolkit's most common mistake was searching a projected database with raw vectors -- and searches
with overfetch, a minimum cosine and de-duplication by ``source_id`` (augmented copies of one item
count once).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from touchvl import disk
from touchvl.errors import StageError
from touchvl.params import IndexParams

INDEX_TYPES = ("flat", "ivf", "ivf_pq", "hnsw")


class QueryMismatch(StageError):
    """The query vectors do not live in the index's space."""


@dataclass(frozen=True)
class IndexMeta:
    name: str  # "rgb", "tac_projected", ...
    space: str  # space of the stored vectors: "raw" (ImageBind) or "projected"
    query_spaces: tuple[str, ...]  # spaces whose queries are comparable with the stored vectors
    dim: int
    count: int
    encoder_fingerprint: str
    projector_hash: str | None
    index_type: str
    index_params: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexMeta":
        return cls(**{**d, "query_spaces": tuple(d["query_spaces"])})


@dataclass(frozen=True)
class QuerySpace:
    """What a query vector is: its space, dimension and the models that produced it."""

    space: str
    dim: int
    encoder_fingerprint: str
    projector_hash: str | None = None


@dataclass(frozen=True)
class Hit:
    uid: int
    score: float
    source_id: int
    caption: str
    tac_path: str
    rgb_path: str


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


_ADD_CHUNK = 65_536  # rows normalised and added at a time: a build holds the caller's array and the index, no third copy


def build_index(vectors: np.ndarray, ids: np.ndarray, index_type: str = "flat", *, nlist: int = 100,
                nprobe: int = 10, hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 64,
                train_size: int = 50_000, pq_m: int = 128, refine_k_factor: float = 64.0, seed: int = 0,
                encoding: str | None = None) -> faiss.Index:
    """An ``IndexIDMap2`` (ids = manifest uids) over normalised vectors, inner-product metric.

    ``ivf_pq``: an inverted file whose lists hold 4-bit product-quantizer codes of the residuals (FAISS's
    fast-scan ``IVF<nlist>,PQ<pq_m>x4fsr``: ``pq_m / 2`` bytes a vector), re-ranked exactly: ``IndexRefineFlat``
    keeps the full vectors and re-scores the ``refine_k_factor * k`` best candidates. It cannot remove ids
    (:func:`touchvl.retrieval.build.update_or_build` rebuilds instead). ``encoding`` (a FAISS factory suffix
    such as ``"SQ8"`` or ``"PQ128x4fsr,RFlat"``) builds any other IVF variant the same way (benchmarks).
    """
    vectors = np.asarray(vectors)
    ids = np.asarray(ids, dtype=np.int64)
    dim = vectors.shape[1]
    if index_type == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif index_type in ("ivf", "ivf_pq"):
        nlist = max(1, min(nlist, len(vectors) // 39 or 1))  # FAISS wants >= 39 training points per list
        if index_type == "ivf_pq" and dim % pq_m:
            raise StageError(f"index.pq_m {pq_m} does not divide the dimension {dim}")
        if encoding is None:
            encoding = "Flat" if index_type == "ivf" else f"PQ{pq_m}x4fsr,RFlat"
        inner = faiss.index_factory(dim, f"IVF{nlist},{encoding}", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        inner.train(normalize(vectors[rng.choice(len(vectors), size=min(train_size, len(vectors)), replace=False)]))
        faiss.extract_index_ivf(inner).nprobe = min(nprobe, nlist)
        if isinstance(inner, faiss.IndexRefine):
            inner.k_factor = float(refine_k_factor)
    elif index_type == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = ef_construction
        inner.hnsw.efSearch = ef_search
    else:
        raise StageError(f"index type {index_type!r} is not one of {INDEX_TYPES}")
    index = faiss.IndexIDMap2(inner)
    # HNSW inserts a batch level by level, so chunks would change its graph: one batch, as before
    chunk = len(vectors) if index_type == "hnsw" else _ADD_CHUNK
    for start in range(0, len(vectors), max(1, chunk)):
        index.add_with_ids(normalize(vectors[start:start + chunk]), ids[start:start + chunk])
    return index


def set_search_params(index: faiss.Index, index_type: str, params: dict) -> None:
    """Search-time settings (``nprobe``, ``ef_search``, ``refine_k_factor``) on an index :func:`build_index` made."""
    if index_type == "hnsw":
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = params.get("ef_search", 64)
    elif index_type in ("ivf", "ivf_pq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(params.get("nprobe", 10), ivf.nlist)
        inner = faiss.downcast_index(faiss.downcast_index(index).index)
        if isinstance(inner, faiss.IndexRefine):
            inner.k_factor = float(params.get("refine_k_factor", 64.0))


def index_ids(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def save_index(index: faiss.Index, meta: IndexMeta, folder: Path) -> None:
    path = folder / f"{meta.name}.faiss"
    with disk.atomic_open(path, "wb") as fh:
        fh.write(faiss.serialize_index(index).tobytes())
    disk.write_json(folder / f"{meta.name}.json", asdict(meta))


def load_index(folder: Path, name: str) -> tuple[faiss.Index, IndexMeta]:
    path = folder / f"{name}.faiss"
    if not path.is_file():
        raise StageError(f"{path}: index not found (run `dvc repro index`)")
    meta = IndexMeta.from_dict(json.loads((folder / f"{name}.json").read_text()))
    index = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    set_search_params(index, meta.index_type, meta.index_params)
    return index, meta


def check_query(meta: IndexMeta, query: QuerySpace) -> None:
    problems = []
    if query.space not in meta.query_spaces:
        problems.append(f"query space '{query.space}' but index '{meta.name}' holds '{meta.space}' vectors "
                        f"(accepts {list(meta.query_spaces)} queries)")
    if query.dim != meta.dim:
        problems.append(f"query dimension {query.dim} != index dimension {meta.dim}")
    if query.encoder_fingerprint != meta.encoder_fingerprint:
        problems.append(f"query encoder {query.encoder_fingerprint} != index encoder {meta.encoder_fingerprint}")
    if query.space == "projected" and meta.projector_hash and query.projector_hash != meta.projector_hash:
        problems.append(f"query projector {query.projector_hash} != index projector {meta.projector_hash}")
    if problems:
        raise QueryMismatch("; ".join(problems))


@dataclass
class SearchParams:
    k: int = 5
    overfetch_mul: int = 4
    overfetch_bias: int = 10
    min_cos: float = 0.0
    dedupe: bool = True


def search_params(p: IndexParams, k: int | None = None) -> SearchParams:
    """The retriever's settings from ``index.search`` (``k`` overrides ``index.search.k``)."""
    s = p.search
    return SearchParams(k=k or s.k, overfetch_mul=s.overfetch_mul, overfetch_bias=s.overfetch_bias,
                        min_cos=s.min_cos, dedupe=s.dedupe)


class Retriever:
    """Searches one index; ``catalog`` (the manifest, by uid) turns ids into captions and paths."""

    def __init__(self, index: faiss.Index, meta: IndexMeta, catalog: pd.DataFrame):
        self.index, self.meta = index, meta
        self.catalog = catalog.set_index("uid", drop=False) if "uid" in catalog.columns else catalog

    def search(self, queries: np.ndarray, query: QuerySpace, p: SearchParams) -> list[list[Hit]]:
        """Top-``k`` hits per query row, best first, after ``min_cos`` and de-duplication."""
        check_query(self.meta, query)
        queries = normalize(np.atleast_2d(queries))
        # overfetch: min_cos and de-dup drop candidates, so ask FAISS for more than k
        fetch = max(1, min(self.index.ntotal, p.k * p.overfetch_mul + p.overfetch_bias))
        scores, ids = self.index.search(queries, fetch)
        return [self._filter(row_scores, row_ids, p) for row_scores, row_ids in zip(scores, ids)]

    def _filter(self, scores: np.ndarray, ids: np.ndarray, p: SearchParams) -> list[Hit]:
        hits: list[Hit] = []
        seen: set[int] = set()
        for score, uid in zip(scores.tolist(), ids.tolist()):
            if uid < 0 or score < p.min_cos:
                continue
            row = self.catalog.loc[uid]
            source = int(row["source_id"])
            if p.dedupe and source in seen:
                continue
            seen.add(source)
            hits.append(Hit(int(uid), float(score), source, str(row["caption"]), str(row["tac_path"]), str(row["rgb_path"])))
            if len(hits) == p.k:
                break
        return hits


def index_recall_at_k(index: faiss.Index, queries: np.ndarray, true_ids: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Fraction of queries whose true id is in the index's top k (no de-dup, exact index semantics)."""
    _, ids = index.search(normalize(queries), max(ks))
    hit_rank = [(list(row).index(t) if t in row else None) for row, t in zip(ids.tolist(), true_ids.tolist())]
    return {f"R@{k}": float(np.mean([r is not None and r < k for r in hit_rank])) for k in ks}
