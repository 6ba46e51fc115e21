"""Behaviour, not plumbing, now that the smoke encoder sees: one small real pipeline (sample, prepare, pretrain_smoke,
embed, both projector stages, index), then what a user would check by hand.

The sample's hidden materials are known (``render_item``), so "shares its material" is checked against the truth.
"""
import re

import numpy as np
import pytest

from tasks import embed, index, prepare, pretrain_smoke, train_projector
from touchvl import disk
from touchvl.data.sample import generate, render_item, write_dataset
from touchvl.params import parse_params
from touchvl.retrieval.index import Retriever, load_index, search_params
from touchvl.retrieval.query import QueryEncoder
from tests.conftest import outputs_under

N_IDS, SIZE = 150, 64


@pytest.fixture(scope="module")
def seeing(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sees")
    params = parse_params(outputs_under(  # every output under tmp
        tmp,
        sample={"n_ids": N_IDS, "image_size": SIZE},
        pretrain_smoke={"epochs": 20, "batch_size": 48},
        projector={"val_fraction": 0.2},
        train_stage1={"epochs": 40},
        index={"gallery_queries": 6, "search": {"k": 5, "min_cos": -1.0}},
        validation={"build_data_docs": False},
    ))
    write_dataset(*generate(params.sample), params.sample.out_dir)
    prepare.run(params)
    pretrain_smoke.run(params)
    embed.run(params)
    train_projector.run_stage1(params)
    train_projector.run_stage2(params)
    index.run(params)
    return params


def _patterns(ids) -> np.ndarray:
    return np.array([render_item(int(i), SIZE, 2, 0).material.pattern for i in ids])


def test_text_search_for_an_adjective_returns_photos_carrying_it(seeing):
    params = seeing
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    retriever = Retriever(*load_index(params.index.out_dir, "rgb"), manifest)
    vector, space = QueryEncoder(params).text("smooth")
    hits = retriever.search(vector, space, search_params(params.index, 5))[0]
    assert len(hits) == 5
    carrying = [("smooth" in h.caption.split(", ")) for h in hits]
    base_rate = float(np.mean(["smooth" in c.split(", ") for c in manifest["caption"]]))
    assert sum(carrying) >= 4, [h.caption for h in hits]
    assert base_rate < 0.4  # so 4 of 5 is far above what a random photo gives
    # over every adjective of the test captions, not just one: well above a random photo's rate
    metrics = disk.read_json(params.embed.metrics)
    assert metrics["adjective_P@5"] > metrics["adjective_P@5_chance"] + 0.15, metrics


def test_projected_neighbours_share_the_material_more_often_than_raw_ones(seeing):
    params = seeing
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    test = disk.evaluation_rows(manifest)

    def rows(folder):
        vectors, ids = disk.read_vectors(folder)
        at = {int(u): i for i, u in enumerate(ids)}
        return vectors[[at[int(u)] for u in test["uid"]]]

    rgb = rows(params.embed.out_dir / "embeddings_rgb")
    truth = _patterns(test["id"])
    agreement = {}
    for name, folder in (("raw", params.embed.out_dir / "embeddings_tac"), ("projected", params.projector.projected_dir)):
        for k in (5, 10):
            top = np.argsort(-(rows(folder) @ rgb.T), axis=1)[:, :k]
            agreement[f"{name}@{k}"] = float(np.mean(truth[top] == truth[:, None]))
    agreement["chance"] = float(np.mean([np.mean(truth == t) for t in truth]))
    # 30 test ids here; the default run (60) measures 0.27 projected vs 0.18 raw, chance 0.17 (README). With random
    # weights both sit at chance, and this fails.
    assert agreement["projected@5"] > agreement["raw@5"], agreement
    assert agreement["projected@5"] > 1.3 * agreement["chance"], agreement


def test_the_gallery_says_smoke_and_where_each_true_match_ranks(seeing):
    html = seeing.index.gallery.read_text()
    assert "SMOKE ENCODER imagebind_tiny" in html and "pretrained on the sample" in html
    ranks = [int(r) for r in re.findall(r"true match: rank (\d+)", html)]
    assert len(ranks) == seeing.index.gallery_queries  # every query says where its own photo ranks
    assert all(1 <= r <= N_IDS for r in ranks)
