"""prepare's image decoding: bit depth, constant images, EXIF orientation, decompression bombs -- real files."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import ExifTags, Image, ImageOps

from tasks.prepare import run
from touchvl.checks import run_validation
from touchvl.data.prepare import validation_tables
from touchvl.params import ValidationParams
from tests.conftest import make_params
from tests.jsonl_fuzz import bomb_png

RAMP = np.tile(np.linspace(0.0, 1.0, 64), (48, 1))  # 48 rows x 64 columns, 0 (left) .. 1 (right)


def _prepare(tmp_path, root, **prepare):
    params = make_params(tmp_path, root, **{"max_bad_fraction": 0.9, "augment": {"copies": 1}, **prepare})
    manifest, scan = run(params)
    q = pd.read_csv(params.prepare.quarantine_csv, dtype=str, keep_default_na=False).set_index("id")
    return params, manifest, q


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.getexif().get(ExifTags.Base.Orientation, 1) == 1  # nothing left for a consumer to apply
        return np.asarray(img).astype(np.float64)


def _original(manifest, source_id, kind) -> Path:
    return Path(manifest.loc[(manifest["source_id"] == source_id) & (manifest["copy"] == 0), f"{kind}_path"].item())


def test_16_and_32_bit_images_are_scaled_not_white(tmp_path, dataset):
    full16 = np.rint(RAMP * 65535).astype(np.uint16)
    Image.fromarray(full16).save(dataset / "images_tac/image_0_tac.jpg", format="PNG")              # I;16
    Image.fromarray(full16.astype(">u2")).save(dataset / "images_rgb/image_1_rgb.jpg", format="TIFF")  # I;16B
    Image.fromarray(np.rint(RAMP * 4000 - 2000).astype(np.int32)).save(
        dataset / "images_tac/image_2_tac.jpg", format="TIFF")                                          # I
    Image.fromarray((RAMP * 0.5 + 0.25).astype(np.float32)).save(
        dataset / "images_rgb/image_3_rgb.jpg", format="TIFF")                                          # F
    with Image.open(dataset / "images_rgb/image_1_rgb.jpg") as img:
        assert img.mode == "I;16B"
    params, manifest, q = _prepare(tmp_path, dataset)
    assert q.empty
    expected = RAMP * 255  # 16-bit: full range; 32-bit: min-max -- both a 0..255 ramp here
    for source_id, kind in ((0, "tac"), (1, "rgb"), (2, "tac"), (3, "rgb")):
        path = _original(manifest, source_id, kind)
        assert path.is_relative_to(params.prepare.out_dir)  # rewritten as an RGB JPEG
        got = _pixels(path)
        assert got.shape == (48, 64, 3)
        assert np.abs(got.mean(axis=2) - expected).mean() < 3, (source_id, kind)


def test_16_bit_scaling_is_full_range_not_min_max(tmp_path, dataset):
    dark = np.rint(RAMP * 4095).astype(np.uint16)  # a 12-bit sensor in a 16-bit file: dark, and stays dark
    Image.fromarray(dark).save(dataset / "images_tac/image_0_tac.jpg", format="PNG")
    _, manifest, q = _prepare(tmp_path, dataset)
    assert q.empty
    got = _pixels(_original(manifest, 0, "tac")).mean(axis=2)
    assert np.abs(got - RAMP * 4095 / 257).mean() < 2


def test_constant_and_unconvertible_images_are_quarantined(tmp_path, dataset):
    Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(dataset / "images_tac/image_0_tac.jpg", format="PNG")
    Image.new("RGB", (64, 64), (90, 120, 30)).save(dataset / "images_rgb/image_1_rgb.jpg")
    Image.new("F", (64, 64), 0.5).save(dataset / "images_rgb/image_2_rgb.jpg", format="TIFF")
    nan = (RAMP * 0.5).astype(np.float32)
    nan[3, 3] = np.nan
    Image.fromarray(nan).save(dataset / "images_tac/image_3_tac.jpg", format="TIFF")
    _, manifest, q = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"0": "constant_image", "1": "constant_image", "2": "constant_image",
                                 "3": "unsupported_image"}
    assert q.loc["1", "file"].endswith("image_1_rgb.jpg") and "(90, 120, 30)" in q.loc["1", "detail"]
    assert "NaN" in q.loc["3", "detail"]
    assert set(manifest["source_id"]) == set(range(4, 20))


def test_a_constant_prepared_image_fails_validation(tmp_path, dataset):
    params, manifest, _ = _prepare(tmp_path, dataset)
    copy = manifest[manifest["copy"] == 1].iloc[0]
    Image.new("RGB", (64, 64), (128, 128, 128)).save(copy["tac_path"])  # as if an augmentation went flat
    vparams = ValidationParams(reports_dir=tmp_path / "v", data_docs_dir=tmp_path / "d", build_data_docs=False, replay_dir=None)
    summary = {"quarantined": 0, "candidates": 20, "bad_fraction": 0.0}
    failures = run_validation("prepare", validation_tables(manifest, summary, 0.1), vparams).blocking_failures
    assert [(f.table, f.kwargs["column"], f.unexpected_examples) for f in failures] == [
        ("manifest", "tac_std", [int(copy["uid"])])]


def _exif_jpeg(path: Path, img: Image.Image, orientation: int) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied_once_for_both_modalities(tmp_path, dataset):
    # a 64x40 image whose left half is red and top rows are bright: orientation 6 says "rotate 90 degrees
    # clockwise to display", so the displayed image is 40x64 with red on top
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:, :32, 0] = 220
    stored[:8, :, 1] = 200
    for kind, source_id in (("tac", 0), ("rgb", 1)):
        _exif_jpeg(dataset / f"images_{kind}/image_{source_id}_{kind}.jpg", Image.fromarray(stored), 6)
    params, manifest, q = _prepare(tmp_path, dataset)
    assert q.empty
    for kind, source_id in (("tac", 0), ("rgb", 1)):
        src = dataset / f"images_{kind}/image_{source_id}_{kind}.jpg"
        with Image.open(src) as img:
            shown = np.asarray(ImageOps.exif_transpose(img)).astype(np.float64)
        path = _original(manifest, source_id, kind)
        assert path.is_relative_to(params.prepare.out_dir)  # normalised: consumers read plain pixels
        got = _pixels(path)
        assert got.shape == shown.shape == (64, 40, 3)
        assert np.abs(got - shown).mean() < 3
        assert got[:20, :, 0].mean() > 150 and got[-20:, :, 0].mean() < 60  # red on top, as displayed
        copies = manifest[(manifest["source_id"] == source_id) & (manifest["copy"] > 0)]
        for copy_path in copies[f"{kind}_path"]:  # augmented copies start from the same upright pixels
            assert _pixels(copy_path).shape == (64, 40, 3)
    # a plain RGB JPEG without the tag (or with Orientation=1) is still referenced in place
    _exif_jpeg(dataset / "images_tac/image_2_tac.jpg", Image.fromarray(stored), 1)
    _, manifest, _ = _prepare(tmp_path / "again", dataset)
    assert _original(manifest, 2, "tac") == dataset / "images_tac/image_2_tac.jpg"
    assert _original(manifest, 3, "tac") == dataset / "images_tac/image_3_tac.jpg"


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 Mpx: over PIL's warning limit; 400 Mpx: over its error limit
def test_a_header_over_max_image_pixels_is_image_too_large_whatever_pils_limit(tmp_path, dataset, side):
    (dataset / "images_rgb/image_5_rgb.jpg").write_bytes(bomb_png(side, side))
    _, _, q = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"5": "image_too_large"}
    assert f"{side * side} pixels > prepare.max_image_pixels=40000000" in q.loc["5", "detail"]
    # raised above PIL's own limit, ours still decides: 400 Mpx > 300 Mpx is too large ...
    _, _, q = _prepare(tmp_path / "raised", dataset, max_image_pixels=300_000_000)
    if side == 20_000:
        assert dict(q["reason"]) == {"5": "image_too_large"}
    else:  # ... and 100 Mpx, under ours, is decoded (here: found truncated), not refused by PIL's 89 Mpx
        assert dict(q["reason"]) == {"5": "corrupt_image"} and "bomb" not in q.loc["5", "detail"].lower()
