import json

import numpy as np
import pandas as pd
import pytest

from tasks import prepare
from tasks.embed import run
from touchvl.disk import read_sensor_ids, read_vectors
from touchvl.imagebind.embedding import EmbedError, EmbeddingSet, validation_tables
from touchvl.params import parse_params
from touchvl.checks import run_validation
from tests.conftest import write_captions, write_pair


def _params(tmp_path, root, **embed):
    return parse_params({
        "data": {"root": str(root)},
        "prepare": {"out_dir": str(tmp_path / "prepared"), "quarantine_csv": str(tmp_path / "q.csv"),
                    "augment": {"copies": 1}},
        "embed": {"random_weights": True, "out_dir": str(tmp_path / "emb"), "cache_dir": str(tmp_path / "emb/cache"),
                  "summary": str(tmp_path / "emb/summary.json"), "num_workers": 0, **embed},
        "validation": {"reports_dir": str(tmp_path / "val"), "build_data_docs": False},
    })


@pytest.fixture
def prepared(tmp_path, dataset):
    params = _params(tmp_path, dataset)
    prepare.run(params)
    return params


def test_outputs_in_the_original_toolkits_layout(prepared):
    result = run(prepared)
    manifest = pd.read_csv(prepared.prepare.out_dir / "manifest.csv")
    out = prepared.embed.out_dir
    for modality in ("tac", "rgb", "text"):
        vectors, indices = read_vectors(out / f"embeddings_{modality}")
        assert vectors.dtype == np.float32 and vectors.shape == (len(manifest), 64)
        assert indices.dtype == np.int64 and indices.tolist() == manifest["uid"].tolist()
    tac, _ = read_vectors(out / "embeddings_tac")
    np.testing.assert_allclose(np.linalg.norm(tac, axis=1), 1.0, atol=1e-5)
    assert read_sensor_ids(out, len(manifest)).tolist() == manifest["sensor_id"].tolist()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["smoke"] is True and "smoke runs only" in meta["note"]
    assert meta["dim"] == 64 and meta["count"] == len(manifest) and meta["fingerprint"] == result.meta["fingerprint"]
    # tactile and RGB of a pair are different images, so different vectors; captions shared by copies agree
    assert not np.allclose(result.vectors["tac"][0], result.vectors["rgb"][0])
    text, _ = read_vectors(out / "embeddings_text")
    same_caption = manifest.groupby("caption").indices
    for rows in same_caption.values():
        np.testing.assert_array_equal(text[rows[0]], text[rows[-1]])
    assert json.loads((prepared.validation.reports_dir / "embed.json").read_text())["success"]


def test_cache_embeds_only_new_images_and_encoder_change_invalidates(tmp_path, prepared, dataset):
    first = run(prepared)
    pairs = len(first.uids)
    assert first.embedded_now == pairs
    meta = (prepared.embed.out_dir / "meta.json").read_bytes()
    assert run(prepared).embedded_now == 0
    # a cache-only rerun leaves meta.json (a dependency of the projector stages) byte-identical;
    # the run's counts go to the summary metric
    assert (prepared.embed.out_dir / "meta.json").read_bytes() == meta
    summary = json.loads(prepared.embed.summary.read_text())
    assert summary == {"pairs": pairs, "embedded_now": 0, "from_cache": pairs, "fingerprint": first.meta["fingerprint"],
                       "decode": "exact", "preprocess": "clip224-v2",
                       "validation_replayed_from": summary["validation_replayed_from"]}
    assert len(summary["validation_replayed_from"]) == 64  # identical vectors: the first run's passing validation
    write_pair(dataset, 99)
    caps = pd.read_csv(dataset / "captions.csv")
    write_captions(dataset, list(caps.itertuples(index=False, name=None)) + [(99, "new, rough", 0)])
    prepare.run(prepared)
    grown = run(prepared)
    added = len(grown.uids) - pairs
    assert 1 <= added <= 2 and grown.embedded_now == added  # the new id (and its copy, if train)
    # the cached vectors are exactly the ones computed before
    np.testing.assert_array_equal(grown.vectors["tac"][:pairs], first.vectors["tac"])
    reseeded = run(_params(tmp_path, dataset, seed=1))
    assert reseeded.embedded_now == len(grown.uids)
    assert reseeded.meta["fingerprint"] != grown.meta["fingerprint"]


def test_undecodable_image_fails_with_path_and_uid_and_keeps_outputs(prepared):
    run(prepared)
    before = (prepared.embed.out_dir / "embeddings_tac/all_embeddings.npy").read_bytes()
    manifest = pd.read_csv(prepared.prepare.out_dir / "manifest.csv")
    victim = manifest.iloc[3]
    with open(victim["rgb_path"], "r+b") as fh:  # changed since prepare: same name, broken bytes
        fh.truncate(100)
    with pytest.raises(EmbedError) as info:
        run(prepared)
    assert victim["rgb_path"] in str(info.value) and f"uid {victim['uid']}" in str(info.value)
    assert (prepared.embed.out_dir / "embeddings_tac/all_embeddings.npy").read_bytes() == before


def _toy_set(n=6, dim=8):
    rng = np.random.default_rng(0)
    unit = lambda: (v := rng.normal(size=(n, dim)).astype(np.float32)) / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    return EmbeddingSet(np.arange(n, dtype=np.int64) * 1000, np.zeros(n, dtype=np.int64),
                        {"tac": unit(), "rgb": unit(), "text": unit()}, {"dim": dim})


def test_validation_catches_nan_rows_and_misaligned_indices(tmp_path):
    params = parse_params({"validation": {"reports_dir": str(tmp_path), "build_data_docs": False}}).validation
    good = _toy_set()
    manifest = pd.DataFrame({"uid": good.uids})
    assert run_validation("embed", validation_tables(good, manifest), params).success

    nan = _toy_set()
    nan.vectors["tac"][2, 1] = np.nan
    failures = run_validation("embed", validation_tables(nan, manifest), params).blocking_failures
    assert [(f.kwargs["column"], f.unexpected_examples) for f in failures] == [
        ("tac_finite", [2000]), ("tac_norm", [2000])]

    misaligned = _toy_set()
    misaligned.uids = np.array([0, 1000, 2000, 2000, 4000, 5000])  # uid 3000 lost, 2000 twice
    failures = run_validation("embed", validation_tables(misaligned, manifest), params).blocking_failures
    assert {(f.table, f.expectation) for f in failures} == {
        ("vectors", "expect_column_values_to_be_unique"),
        ("manifest_coverage", "expect_column_values_to_be_in_set")}
    coverage = next(f for f in failures if f.table == "manifest_coverage")
    assert coverage.unexpected_examples == [3000]


def test_sensor_ids_reader_names_a_missing_or_misaligned_file(tmp_path):
    from touchvl.disk import save_npy
    from touchvl.errors import StageError

    with pytest.raises(StageError, match=r"sensor_ids.npy: missing .*dvc repro embed"):
        read_sensor_ids(tmp_path, 3)
    save_npy(tmp_path / "sensor_ids.npy", np.array([0, 1, 2], dtype=np.int64))
    assert read_sensor_ids(tmp_path, 3).tolist() == [0, 1, 2]
    with pytest.raises(StageError, match=r"does not match the 4 tactile embeddings"):
        read_sensor_ids(tmp_path, 4)
    save_npy(tmp_path / "sensor_ids.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(StageError, match=r"float32 \(3,\) does not match"):
        read_sensor_ids(tmp_path, 3)


def test_batches_decoded_a_thread_ahead_are_the_dataloaders(tmp_path):
    """Without worker processes the next batches are decoded by a thread: the same batches as torch's
    DataLoader(num_workers=0) gives -- uids, pixels to the bit, a bad file's error in its batch, the short last
    batch -- in the same order, and abandoning the loop midway leaves no thread behind."""
    import threading

    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

    from touchvl.imagebind.embedding import _PairImages, _stack, pair_loader
    from touchvl.imagebind.preprocess import preprocess_image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(11):
        paths = []
        for kind in ("tac", "rgb"):
            path = tmp_path / f"image_{i}_{kind}.jpg"
            Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        rows.append((i * 1000, *paths))
    (tmp_path / "image_6_rgb.jpg").write_bytes(b"not a jpeg")
    reference = list(DataLoader(_PairImages(rows, preprocess_image), batch_size=4, num_workers=0,
                                collate_fn=_stack, shuffle=False))
    threaded = list(pair_loader(rows, preprocess_image, 4, 0))
    assert [len(uids) + len(errors) for uids, _, errors in threaded] == [4, 4, 3]
    assert len(threaded) == len(reference)
    for (uids, pixels, errors), (ref_uids, ref_pixels, ref_errors) in zip(threaded, reference):
        assert uids == ref_uids and errors == ref_errors
        assert torch.equal(pixels, ref_pixels)
    assert threaded[1][2][0][0] == 6000 and "image_6_rgb.jpg" in threaded[1][2][0][1]

    before = {t for t in threading.enumerate() if t.name.startswith("touchvl-decode")}
    batches = pair_loader(rows, preprocess_image, 2, 0)
    next(iter(batches))
    batches.close()  # what a for loop that raises does to it
    assert {t for t in threading.enumerate() if t.name.startswith("touchvl-decode")} <= before
