"""The smoke encoder: pretrain_smoke trains the tiny ImageBind on training photos and captions only, embed loads
its checkpoint through the code that loads Meta's weights, and the result sees (text search finds the adjective).
"""
import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tasks import pretrain_smoke, prepare
from touchvl import disk
from touchvl.data.sample import generate, write_dataset
from touchvl.imagebind.encoder import (SMOKE_CHECKPOINT_NAME, EncoderError, ImageBindEncoder, encoder_spec,
                                       fingerprint_info)
from touchvl.imagebind.pretrain import PretrainError, training_photos
from touchvl.params import EmbedParams, parse_params


def _params(tmp_path, root, n_ids=24, **pretrain):
    return parse_params({
        "data": {"root": str(root)},
        "sample": {"out_dir": str(root), "n_ids": n_ids, "image_size": 48},
        "prepare": {"out_dir": str(tmp_path / "prepared"), "quarantine_csv": str(tmp_path / "q.csv"),
                    "augment": {"copies": 1}},
        "embed": {"smoke_dir": str(tmp_path / "encoder")},
        "pretrain_smoke": {"epochs": 2, "batch_size": 8, "metrics": str(tmp_path / "metrics/pretrain.json"),
                           "curves_dir": str(tmp_path / "metrics/pretrain"), **pretrain},
        "validation": {"reports_dir": str(tmp_path / "val"), "build_data_docs": False},
    })


def _checkpoint_sha(params) -> str:
    return hashlib.sha256((params.embed.smoke_dir / SMOKE_CHECKPOINT_NAME).read_bytes()).hexdigest()


@pytest.fixture
def sampled(tmp_path):
    params = _params(tmp_path, tmp_path / "sample")
    write_dataset(*generate(params.sample), params.sample.out_dir)
    prepare.run(params)
    return params


def test_checkpoint_loads_through_embeds_code_and_never_depends_on_test_ids(sampled, tmp_path):
    params = sampled
    metrics = pretrain_smoke.run(params)
    assert metrics["pretrained"] == 1 and metrics["photos"] > 0 and np.isfinite(metrics["loss"])
    report = disk.read_json(params.embed.smoke_dir / "pretrain.json")
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    test_sources = set(manifest.loc[manifest["split"] == "test", "source_id"])
    assert test_sources and not test_sources & set(report["source_ids"])
    assert report["photos"] == int((manifest["split"] == "train").sum())  # every training photo, nothing else
    assert (tmp_path / "metrics/pretrain/plots/metrics/train/loss.tsv").is_file()

    # embed's own loader: the same code path and checks as Meta's checkpoint, flagged as a smoke encoder
    encoder = ImageBindEncoder(encoder_spec(params.embed))
    info = encoder.fingerprint_info()
    assert encoder.is_smoke and info["weights"] == _checkpoint_sha(params) and info["smoke"]
    random_weights = params.embed.model_copy(update={"random_weights": True})
    assert fingerprint_info(encoder_spec(random_weights))["weights"] == "random-seed-0"
    assert not torch.allclose(encoder.encode_texts(["smooth"]),
                              ImageBindEncoder(encoder_spec(random_weights)).encode_texts(["smooth"]))

    # change every test pair (both images and the caption): the checkpoint is byte-identical
    before = _checkpoint_sha(params)
    root = params.data.root
    captions = pd.read_csv(root / "captions.csv")
    test_ids = manifest.loc[manifest["split"] == "test", "id"].astype(str).tolist()
    rng = np.random.default_rng(1)
    for item_id in test_ids:
        for kind in ("tac", "rgb"):
            noise = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
            disk.save_image(root / f"images_{kind}/image_{item_id}_{kind}.jpg", Image.fromarray(noise))
    captions.loc[captions["index"].astype(str).isin(test_ids), "caption"] = "sticky, warm, test only"
    disk.write_csv(root / "captions.csv", captions)
    prepare.run(params)
    pretrain_smoke.run(params)
    assert _checkpoint_sha(params) == before

    # ...and a training caption does change it (the check above can fail)
    train_id = manifest.loc[manifest["split"] == "train", "id"].astype(str).iloc[0]
    captions.loc[captions["index"].astype(str) == train_id, "caption"] = "sticky, warm"
    disk.write_csv(root / "captions.csv", captions)
    prepare.run(params)
    pretrain_smoke.run(params)
    assert _checkpoint_sha(params) != before


def test_a_real_encoder_or_random_weights_skip_pretraining(sampled):
    for update in ({"encoder": "imagebind_huge"}, {"random_weights": True}):
        params = sampled.model_copy(update={"embed": sampled.embed.model_copy(update=update)})
        assert pretrain_smoke.run(params) == {"pretrained": 0}
        assert not (params.embed.smoke_dir / SMOKE_CHECKPOINT_NAME).exists()
        assert disk.read_json(params.embed.smoke_dir / "pretrain.json")["pretrained"] is False


def test_missing_smoke_checkpoint_names_the_stage_that_writes_it(tmp_path):
    with pytest.raises(EncoderError, match=r"dvc repro pretrain_smoke.*random_weights"):
        ImageBindEncoder(encoder_spec(EmbedParams(smoke_dir=tmp_path / "nothing")))


def test_a_source_id_in_both_splits_is_refused_by_name():
    manifest = pd.DataFrame({"uid": [0, 1, 2], "source_id": [5, 5, 6], "split": ["train", "test", "train"],
                             "rgb_path": ["a", "b", "c"], "caption": ["x", "y", "z"]})
    with pytest.raises(PretrainError, match=r"\[5\].*refuses to train on test ids"):
        training_photos(manifest)


def _augment_out_of_place(pixels, config, rng):
    """The augmentation as first written (out of place, boolean-mask gathers): the reference the in-place
    version must equal bit for bit, so the same seed still trains the same weights."""
    from touchvl.imagebind.pretrain import _MEAN, _STD, random_crops_

    rgb = pixels * _STD + _MEAN
    grey = torch.from_numpy(rng.random(len(pixels)) < config.grayscale_p)
    if grey.any():
        luma = (0.299 * rgb[grey, 0] + 0.587 * rgb[grey, 1] + 0.114 * rgb[grey, 2]).unsqueeze(1)
        rgb[grey] = luma.expand(-1, 3, -1, -1)
    low = rng.random(len(pixels)) < config.low_contrast_p
    factor = torch.from_numpy(np.where(low, rng.uniform(0.25, 1.0, len(pixels)), 1.0)).float().view(-1, 1, 1, 1)
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    rgb = mean + (rgb - mean) * factor
    random_crops_(rgb, config.crop_scale, rng)  # unchanged by the rewrite: the same function, the same draws
    return (rgb - _MEAN) / _STD


@pytest.mark.parametrize("grey, low, crop", [(0.8, 0.0, (1.0, 1.0)), (0.5, 0.5, (1.0, 1.0)), (0.3, 0.4, (0.5, 1.0)),
                                             (1.0, 0.0, (1.0, 1.0)), (0.0, 1.0, (1.0, 1.0))])
def test_the_in_place_augmentation_is_the_out_of_place_one_bit_for_bit(grey, low, crop):
    from touchvl.imagebind.pretrain import PretrainConfig, _augment

    config = PretrainConfig(grayscale_p=grey, low_contrast_p=low, crop_scale=crop)
    pixels = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    before = pixels.clone()
    fast = _augment(pixels, config, np.random.default_rng(5))
    assert torch.equal(pixels, before)  # the batch it was given is left alone
    assert torch.equal(fast, _augment_out_of_place(pixels, config, np.random.default_rng(5)))
    if grey == 1.0:  # every view grey: its three channels are one luma image once un-normalised
        from touchvl.imagebind.pretrain import _MEAN, _STD

        rgb = fast * _STD + _MEAN
        assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)
