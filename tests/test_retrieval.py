import faiss
import numpy as np
import pandas as pd
import pytest

from touchvl.errors import StageError
from touchvl.params import IndexParams
from touchvl.retrieval.build import Database, save_database, update_or_build
from touchvl.retrieval.index import (IndexMeta, QueryMismatch, QuerySpace, Retriever, SearchParams, build_index,
                             index_ids, index_recall_at_k, load_index, normalize, save_index,
                             set_search_params)

DIM = 16


def _unit(n, seed=0):
    return normalize(np.random.default_rng(seed).normal(size=(n, DIM)))


def _catalog(uids, copies_of=None):
    return pd.DataFrame({"uid": uids, "source_id": [copies_of.get(u, u) if copies_of else u for u in uids],
                         "caption": [f"cap{u}" for u in uids], "tac_path": "t", "rgb_path": "r"})


def _meta(index_type="flat", space="raw", query_spaces=("raw", "projected"), projector=None, count=0):
    return IndexMeta("rgb", space, query_spaces, DIM, count, "enc1", projector, index_type, {})


RAW = QuerySpace("raw", DIM, "enc1")


@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivf_pq", "hnsw"])
def test_search_matches_numpy_brute_force(index_type):
    db, queries = _unit(500), _unit(20, seed=1)
    uids = np.arange(500, dtype=np.int64) * 1000 + 7
    index = build_index(db, uids, index_type, nlist=4, nprobe=4, pq_m=8)
    retriever = Retriever(index, _meta(index_type), _catalog(uids))
    hits = retriever.search(queries, RAW, SearchParams(k=5, min_cos=-1.0, dedupe=False))
    brute = np.argsort(-(queries @ db.T), axis=1)[:, :5]
    exact = [[int(uids[j]) for j in row] for row in brute]
    got = [[h.uid for h in row] for row in hits]
    if index_type == "flat":
        assert got == exact
        np.testing.assert_allclose([h.score for h in hits[0]], np.sort(queries[0] @ db.T)[::-1][:5], rtol=1e-5)
    else:  # approximate: at small scale with nprobe = nlist / high efSearch it is exact in practice
        assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, exact)]) > 0.9


def test_guard_refuses_other_space_dimension_encoder_and_projector():
    db = _unit(50)
    tac_meta = IndexMeta("tac_projected", "projected", ("projected",), DIM, 50, "enc1", "proj-a", "flat", {})
    retriever = Retriever(build_index(db, np.arange(50)), tac_meta, _catalog(np.arange(50)))
    with pytest.raises(QueryMismatch, match="query space 'raw' but index 'tac_projected' holds 'projected'"):
        retriever.search(db[:1], RAW, SearchParams())
    with pytest.raises(QueryMismatch, match="query dimension 8 != index dimension 16"):
        retriever.search(db[:1, :8], QuerySpace("projected", 8, "enc1", "proj-a"), SearchParams())
    with pytest.raises(QueryMismatch, match="query encoder enc2 != index encoder enc1"):
        retriever.search(db[:1], QuerySpace("projected", DIM, "enc2", "proj-a"), SearchParams())
    with pytest.raises(QueryMismatch, match="query projector proj-b != index projector proj-a"):
        retriever.search(db[:1], QuerySpace("projected", DIM, "enc1", "proj-b"), SearchParams())
    assert retriever.search(db[:1], QuerySpace("projected", DIM, "enc1", "proj-a"), SearchParams(k=1))[0][0].uid == 0


def test_min_cos_and_dedupe_by_source_id():
    base = _unit(3)
    # uids 0,1,2 are copies of source 0 (near-identical vectors); 10 and 20 are distinct items
    db = np.stack([base[0], normalize(base[0] + 0.01), normalize(base[0] - 0.01), base[1], base[2]])
    uids = np.array([0, 1, 2, 10, 20])
    catalog = _catalog(uids, copies_of={1: 0, 2: 0})
    retriever = Retriever(build_index(db, uids), _meta(), catalog)
    deduped = retriever.search(base[0], RAW, SearchParams(k=3, min_cos=-1.0))[0]
    assert [h.source_id for h in deduped][:1] == [0] and len({h.source_id for h in deduped}) == 3
    assert deduped[0].caption == "cap0"
    raw = retriever.search(base[0], RAW, SearchParams(k=3, min_cos=-1.0, dedupe=False))[0]
    assert sorted(h.uid for h in raw) == [0, 1, 2]
    strict = retriever.search(base[0], RAW, SearchParams(k=5, min_cos=0.9))[0]
    assert [h.uid for h in strict] == [0] and all(h.score >= 0.9 for h in strict)


def test_incremental_add_remove_keeps_ids_consistent(tmp_path):
    db = _unit(100)
    uids = np.arange(100, dtype=np.int64) * 1000
    index = build_index(db[:90], uids[:90])
    index.add_with_ids(db[90:], uids[90:])
    index.remove_ids(np.array([5000, 6000], dtype=np.int64))
    assert index.ntotal == 98 and set(index_ids(index)) == set(uids) - {5000, 6000}
    save_index(index, _meta(count=98), tmp_path)
    loaded, meta = load_index(tmp_path, "rgb")
    _, found = loaded.search(db[[7]], 1)
    assert found[0, 0] == 7000 and meta.count == 98
    _, found = loaded.search(db[[5]], 1)
    assert found[0, 0] != 5000


def test_index_recall_at_k():
    db = _unit(200)
    noisy = normalize(db + np.random.default_rng(3).normal(scale=0.05, size=db.shape))
    index = build_index(db, np.arange(200))
    assert index_recall_at_k(index, noisy, np.arange(200))["R@1"] == 1.0
    assert index_recall_at_k(index, _unit(200, seed=9), np.arange(200))["R@1"] < 0.05


def _latent(n, dim=64, latent=8, seed=0):
    """Unit vectors near a low-dimensional subspace (as embeddings are), so an IVF has structure to use."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(latent, dim))
    return normalize(rng.normal(size=(n, latent)) @ basis + 0.3 * rng.normal(size=(n, dim)))


def test_ivf_pq_recall_exact_scores_ids_and_roundtrip(tmp_path):
    db, queries = np.split(_latent(3050), [3000])  # queries: held-out rows of the same distribution
    uids = np.arange(3000, dtype=np.int64) * 10 + 3
    params = dict(nlist=16, nprobe=8, pq_m=16, refine_k_factor=8.0, train_size=3000)
    index = build_index(db, uids, "ivf_pq", **params)
    assert index.ntotal == 3000 and sorted(index_ids(index)) == sorted(uids)
    scores, found = index.search(queries, 10)
    exact = uids[np.argsort(-(queries @ db.T), axis=1)[:, :10]]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist())]) >= 0.9
    # the re-ranking scores with the full vectors: the returned scores are exact cosines, best first
    by_uid = dict(zip(uids.tolist(), db))
    np.testing.assert_allclose(scores, [[queries[i] @ by_uid[u] for u in row] for i, row in enumerate(found.tolist())],
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    meta = IndexMeta("rgb", "raw", ("raw", "projected"), 64, 3000, "enc1", None, "ivf_pq", {**params, "nprobe": 2,
                                                                                            "refine_k_factor": 2.0})
    save_index(index, meta, tmp_path)
    loaded, loaded_meta = load_index(tmp_path, "rgb")
    assert loaded_meta == meta and sorted(index_ids(loaded)) == sorted(uids)
    # load_index applies the metadata's search settings
    assert faiss.extract_index_ivf(loaded).nprobe == 2
    assert faiss.downcast_index(faiss.downcast_index(loaded).index).k_factor == 2.0
    set_search_params(loaded, "ivf_pq", params)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], found)


def test_ivf_pq_update_adds_incrementally_and_rebuilds_on_removal(tmp_path):
    vectors = _latent(600, dim=32)
    uids = np.arange(600, dtype=np.int64) + 100
    p = IndexParams(type="ivf_pq", nlist=8, nprobe=8, pq_m=8, train_size=500)

    def run(rows):
        db = Database("rgb", "raw", ("raw", "projected"), vectors[rows], uids[rows], "enc1", None)
        index, meta, report = update_or_build(db, p, tmp_path)
        save_database(index, meta, db, tmp_path)
        assert sorted(index_ids(index)) == sorted(uids[rows]) and meta.index_params["pq_m"] == 8
        _, found = index.search(vectors[rows[:20]], 1)
        assert np.mean(found[:, 0] == uids[rows[:20]]) >= 0.9
        return report

    assert run(np.arange(500))["mode"] == "rebuild"
    assert run(np.arange(600)) == {"mode": "incremental", "added": 100, "removed": 0}
    # IndexRefineFlat cannot remove ids: a deletion rebuilds instead of failing
    assert run(np.arange(10, 600))["mode"] == "rebuild"


def test_ivf_pq_refuses_a_pq_m_that_does_not_divide_the_dimension():
    with pytest.raises(StageError, match="index.pq_m 6 does not divide the dimension 16"):
        build_index(_unit(200), np.arange(200), "ivf_pq", nlist=2, pq_m=6)
