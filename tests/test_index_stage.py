"""The index stage on a real (tiny) pipeline run: build, incremental update, metrics, gallery, search."""
import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from tasks import embed, index, prepare, train_projector
from touchvl.retrieval.query import QueryEncoder
from touchvl.retrieval.index import (IndexMeta, QueryMismatch, Retriever, SearchParams, build_index, index_ids,
                             load_index)
from tests.conftest import write_captions, write_pair


class _Gallery(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.images, self.true_marks = 0, [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.rows += tag == "tr"
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "td" and "true" in (attrs.get("class") or "").split():
            self.true_marks += 1


def test_build_metrics_gallery_and_incremental_update(built, dataset):
    metrics = index.run(built)
    assert metrics["build"]["rgb"]["mode"] == "rebuild"
    tac_to_rgb = metrics["tac_to_rgb"]
    assert tac_to_rgb["index"] == tac_to_rgb["exact"]  # flat index == exact search
    rgb_index, meta = load_index(built.index.out_dir, "rgb")
    manifest = pd.read_csv(built.prepare.out_dir / "manifest.csv")
    assert meta.count == len(manifest) and set(index_ids(rgb_index)) == set(manifest["uid"])
    _, tac_meta = load_index(built.index.out_dir, "tac_projected")
    projected_meta = json.loads((built.embed.out_dir / "embeddings_tac_projected/meta.json").read_text())
    assert tac_meta.projector_hash == projected_meta["projector_hash"] and meta.projector_hash is None

    page = _Gallery()
    page.feed(built.index.gallery.read_text())
    queries = manifest[(manifest["split"] == "test") & (manifest["copy"] == 0)].head(3)
    assert page.rows == len(queries)
    # per query: its tactile image, its own RGB photo, then the top 3
    assert len(page.images) == len(queries) * (2 + 3) and all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    html_text = built.index.gallery.read_text()
    for uid in queries["uid"]:
        assert f"query uid {uid}" in html_text and f"its own photo, uid {uid}" in html_text
    assert html_text.count("true match: rank ") == len(queries)


    # nightly: one new id, one deleted id -> incremental add/remove, same space and encoder
    write_pair(dataset, 77)
    caps = pd.read_csv(dataset / "captions.csv")
    rows = [r for r in caps.itertuples(index=False, name=None) if r[0] != 4] + [(77, "coarse, hard", 1)]
    write_captions(dataset, rows)
    prepare.run(built)
    embed.run(built)
    train_projector.run_stage2(built)  # the projector is retrained: the tactile index must be rebuilt
    again = index.run(built)["build"]
    assert again["rgb"]["mode"] == "incremental" and again["tac_projected"]["mode"] == "rebuild"
    new_manifest = pd.read_csv(built.prepare.out_dir / "manifest.csv")
    gone = set(manifest["uid"]) - set(new_manifest["uid"])
    added = set(new_manifest["uid"]) - set(manifest["uid"])
    assert again["rgb"]["removed"] == len(gone) and again["rgb"]["added"] == len(added)
    rgb_index, _ = load_index(built.index.out_dir, "rgb")
    assert set(index_ids(rgb_index)) == set(new_manifest["uid"])


def test_text_search_returns_caption_matching_items(built):
    encoder = QueryEncoder(built)
    manifest = pd.read_csv(built.prepare.out_dir / "manifest.csv")
    captions = ["glossy, smooth, hard", "rough, grainy, soft", "woven, matte, firm"]
    catalog = pd.DataFrame({"uid": [1, 2, 3], "source_id": [1, 2, 3], "caption": captions, "tac_path": "t", "rgb_path": "r"})
    # a constructed database whose vectors are the captions' own text embeddings
    vectors = encoder.encoder.encode_texts(captions).numpy()
    meta = IndexMeta("text_db", "raw", ("raw",), vectors.shape[1], 3, encoder.encoder.fingerprint, None, "flat", {})
    retriever = Retriever(build_index(vectors, np.array([1, 2, 3])), meta, catalog)
    for caption in captions:
        vector, space = encoder.text(caption)
        assert retriever.search(vector, space, SearchParams(k=1, min_cos=-1))[0][0].caption == caption
    # and a tactile query is projected and refused by an index of raw tactile vectors
    vector, space = encoder.tactile(manifest["tac_path"][0], sensor_id=0)
    assert space.space == "projected" and space.projector_hash
    raw_meta = IndexMeta("tac_raw", "raw", ("raw",), vectors.shape[1], 3, encoder.encoder.fingerprint, None, "flat", {})
    with pytest.raises(QueryMismatch, match="query space 'projected'"):
        Retriever(build_index(vectors, np.array([1, 2, 3])), raw_meta, catalog).search(vector, space, SearchParams())


def test_index_validation_refuses_stale_projections_and_missing_uids(built, tmp_path):
    """The index boundary: projected vectors of another encoder, or an index missing a uid, fail the stage."""
    import json

    import pytest

    from touchvl.checks import ValidationFailed, run_validation
    from touchvl.retrieval.build import build_index, load_databases, validation_tables

    params = built
    rgb, tac, encoder_meta = load_databases(params.embed.out_dir)
    good = [(build_index(db.vectors, db.ids), None, db) for db in (rgb, tac)]
    from touchvl.retrieval.index import IndexMeta

    def meta(db):
        return IndexMeta(db.name, db.space, db.query_spaces, db.vectors.shape[1], len(db.ids), db.encoder_fingerprint,
                         db.projector_hash, "flat")

    vp = params.validation
    assert run_validation("index", validation_tables([(i, meta(db), db) for i, _, db in good], encoder_meta["fingerprint"]), vp).success
    short = build_index(rgb.vectors[1:], rgb.ids[1:])
    report = run_validation("index", validation_tables([(short, meta(rgb), rgb)], encoder_meta["fingerprint"]), vp)
    assert {f.table for f in report.blocking_failures} == {"rgb_ids", "rgb_guard"}
    projected_meta = params.projector.projected_dir / "meta.json"
    stale = {**json.loads(projected_meta.read_text()), "encoder_fingerprint": "another-encoder"}
    projected_meta.write_text(json.dumps(stale))
    with pytest.raises(ValidationFailed, match="tac_projected_guard"):
        index.run(params)


def test_true_match_rank_counts_distinct_sources_above_the_true_one():
    import numpy as np

    from touchvl.retrieval.gallery import true_match_rank

    gallery = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1]], dtype=np.float32)
    sources = np.array([7, 7, 3, 5])  # source 7 has two copies: counted once
    assert true_match_rank(np.array([1.0, 0.0]), gallery, sources, 7) == 1
    assert true_match_rank(np.array([1.0, 0.0]), gallery, sources, 3) == 2
    assert true_match_rank(np.array([0.0, 1.0]), gallery, sources, 7) == 3
    assert true_match_rank(np.array([1.0, 0.0]), gallery, sources, 99) is None
