"""embed.fast_decode: how far the DCT-domain JPEG path strays from Meta's preprocessing, and that the two
paths never share cached vectors.

Measured bounds (photo-like JPEGs of tests/synthetic_photos.py, quality 90, 4 per size; errors in uint8
grey levels after undoing the CLIP normalisation; cosines from the tiny encoder with random weights):

    source     fast: mean |d|  p99 |d|  min cos      nearest after draft: mean  p99    photos apart: max cos
    1024x1024        0.65      4         0.99999                          1.21  12                  0.97
    640x480          0.98      7         0.99998                          1.69  14                  0.96

The p99 bound is what a wrong resampler fails (nearest-neighbour doubles it, checked below); the cosine
bound (>= 0.9999, against <= 0.97 between two different photos) is what a wrong crop, channel order or
normalisation fails.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import prepare
from tasks.embed import run
from tests.synthetic_photos import write_jpeg
from tests.test_embed import _params
from touchvl.imagebind.encoder import EncoderSpec, ImageBindEncoder, fingerprint
from touchvl.imagebind.preprocess import (CLIP_STD, FAST_PREPROCESS_VERSION, PREPROCESS_VERSION, SIZE,
                                          fast_pixels, normalize_pixels, preprocess_image, preprocess_image_fast,
                                          resized_size)

# (width, height): (mean |d| bound, p99 |d| bound), grey levels; about 1.3x the measured figures above
PIXEL_BOUNDS = {(1024, 1024): (0.9, 6.0), (640, 480): (1.3, 9.5), (1001, 750): (0.9, 6.0)}
MIN_COSINE = 0.9999
PHOTOS = 4


def _grey_levels(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) * 255  # undo the std: differences in uint8 steps


def _preprocessed(paths, fn) -> torch.Tensor:
    out = []
    for path in paths:
        with Image.open(path) as img:
            out.append(fn(img))
    return torch.stack(out)


def _errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (_grey_levels(a) - _grey_levels(b)).abs().flatten()
    return d.mean().item(), d.quantile(0.99).item()


def _nearest_after_draft(img: Image.Image) -> torch.Tensor:
    """The fast path with a nearest-neighbour resize: what the pixel bound must reject."""
    width, height = img.size
    w, h = resized_size(width, height)
    top, left = int(round((h - SIZE) / 2.0)), int(round((w - SIZE) / 2.0))
    shrink = img.draft("RGB", (SIZE, SIZE))[1][2] / width
    sx, sy = width / w * shrink, height / h * shrink
    box = (left * sx, top * sy, (left + SIZE) * sx, (top + SIZE) * sy)
    return normalize_pixels(np.array(img.convert("RGB").resize((SIZE, SIZE), Image.NEAREST, box=box)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return {size: [write_jpeg(folder / f"{size[0]}x{size[1]}_{i}.jpg", *size, seed=100 + i) for i in range(PHOTOS)]
            for size in PIXEL_BOUNDS}


@pytest.fixture(scope="module")
def tiny():
    return ImageBindEncoder(EncoderSpec(device="cpu"))


@pytest.mark.parametrize("size", list(PIXEL_BOUNDS))
def test_fast_pixels_stay_close_to_the_exact_path_and_nearest_would_not(photos, size):
    exact = _preprocessed(photos[size], preprocess_image)
    fast = _preprocessed(photos[size], preprocess_image_fast)
    assert fast.shape == exact.shape == (PHOTOS, 3, SIZE, SIZE) and fast.dtype == torch.float32
    assert not torch.equal(fast, exact)  # it is another path (else the version split would be pointless)
    mean_bound, p99_bound = PIXEL_BOUNDS[size]
    mean, p99 = _errors(fast, exact)
    assert mean <= mean_bound and p99 <= p99_bound, (mean, p99)
    # the bound has teeth: the same draft with a nearest-neighbour resize breaks it
    _, nearest_p99 = _errors(_preprocessed(photos[size], _nearest_after_draft), exact)
    assert nearest_p99 > p99_bound, nearest_p99


@pytest.mark.parametrize("size", [(1024, 1024), (640, 480)])
def test_fast_embeddings_keep_cosine_above_bound(photos, tiny, size):
    exact = tiny.encode_images(_preprocessed(photos[size], preprocess_image))
    fast = tiny.encode_images(_preprocessed(photos[size], preprocess_image_fast))
    cosine = (exact * fast).sum(dim=1)
    assert cosine.min().item() >= MIN_COSINE, cosine.tolist()
    # what the bound separates: two different photos are far below it
    apart = exact @ exact.T
    assert apart[~torch.eye(PHOTOS, dtype=torch.bool)].max().item() < 0.99


def test_draft_decodes_at_the_smallest_dct_scale_covering_224(photos):
    for size, decoded in [((1024, 1024), (256, 256)), ((640, 480), (320, 240)), ((1001, 750), (501, 375))]:
        with Image.open(photos[size][0]) as img:
            fast_pixels(img)
            assert img.size == decoded


def test_non_jpeg_and_loaded_images_take_the_exact_path(tmp_path, photos):
    png = tmp_path / "photo.png"
    with Image.open(photos[(640, 480)][0]) as img:
        img.save(png)
    with Image.open(png) as img:
        assert torch.equal(preprocess_image_fast(img), preprocess_image(img))
    with Image.open(photos[(640, 480)][0]) as img:
        img.load()  # too late to draft
        assert torch.equal(preprocess_image_fast(img), preprocess_image(img))
    for mode in ("L", "CMYK"):  # other JPEG colour models still come out RGB, 224 px
        path = tmp_path / f"{mode}.jpg"
        Image.open(photos[(640, 480)][0]).convert(mode).save(path)
        with Image.open(path) as img:
            assert preprocess_image_fast(img).shape == (3, SIZE, SIZE)


def test_small_jpegs_differ_only_by_float_rounding(tmp_path):
    # below 2x224 the draft cannot shrink: same bicubic pixels, only the fused normalisation's rounding
    path = write_jpeg(tmp_path / "small.jpg", 300, 200, seed=3)
    with Image.open(path) as a, Image.open(path) as b:
        assert torch.allclose(preprocess_image_fast(a), preprocess_image(b), atol=1e-5)


def test_fast_decode_has_its_own_fingerprint():
    exact, fast = EncoderSpec(), EncoderSpec(fast_decode=True)
    assert fingerprint(exact) != fingerprint(fast)
    assert ImageBindEncoder(exact).fingerprint_info()["preprocess"] == PREPROCESS_VERSION  # old caches stay valid
    assert ImageBindEncoder(fast).fingerprint_info()["preprocess"] == FAST_PREPROCESS_VERSION


def test_switching_path_recomputes_vectors_and_the_report_says_which(tmp_path, dataset):
    exact_params = _params(tmp_path, dataset)
    prepare.run(exact_params)
    exact = run(exact_params)
    assert json.loads(exact_params.embed.summary.read_text())["decode"] == "exact"
    fast_params = _params(tmp_path, dataset, fast_decode=True)  # same cache_dir, other path
    fast = run(fast_params)
    assert fast.embedded_now == len(fast.uids)  # nothing served from the exact path's vectors
    assert fast.meta["fingerprint"] != exact.meta["fingerprint"]
    meta = json.loads((fast_params.embed.out_dir / "meta.json").read_text())
    summary = json.loads(fast_params.embed.summary.read_text())
    assert meta["preprocess"] == summary["preprocess"] == FAST_PREPROCESS_VERSION and summary["decode"] == "fast"
    assert run(exact_params).embedded_now == 0  # and back: the exact vectors are still cached
