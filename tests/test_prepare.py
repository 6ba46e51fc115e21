import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tasks.prepare import run
from touchvl.data.prepare import REASONS, UID_STRIDE, PrepareError, draw_augment, stable_split
from touchvl.disk import MANIFEST_COLUMNS
from tests.conftest import make_params, write_captions, write_pair

ROOT = Path(__file__).resolve().parents[1]


def _quarantine(params) -> pd.DataFrame:
    return pd.read_csv(params.prepare.quarantine_csv, dtype=str, keep_default_na=False)


def _digests(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_good_dataset_manifest_augmentation_and_reports(tmp_path, dataset):
    params = make_params(tmp_path, dataset, augment={"copies": 2})
    manifest, scan = run(params)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert scan.quarantine == [] and len(scan.pairs) == 20
    n_train = sum(p.split == "train" for p in scan.pairs)
    assert len(manifest) == 20 + 2 * n_train  # test split is not augmented by default
    assert manifest["uid"].is_unique
    assert (manifest["uid"] == manifest["source_id"] * UID_STRIDE + manifest["copy"]).all()
    for _, rows in manifest.groupby("source_id"):
        # caption, sensor and split of the source go to every copy
        assert rows[["caption", "sensor_id", "split"]].nunique().max() == 1
        assert (rows.loc[rows["copy"] == 0, "aug"] == "orig").all()
        assert rows.loc[rows["copy"] > 0, "aug"].str.contains("rot=").all()
    assert (manifest.loc[manifest["split"] == "test", "copy"] == 0).all()
    assert all(Path(p).is_file() for p in manifest["tac_path"]) and all(Path(p).is_file() for p in manifest["rgb_path"])
    on_disk = pd.read_csv(params.prepare.out_dir / "manifest.csv")
    assert on_disk["uid"].dtype == "int64" and on_disk["uid"].tolist() == manifest["uid"].tolist()
    report = json.loads((params.validation.reports_dir / "prepare.json").read_text())
    assert report["success"] is True and report["blocking_failures"] == 0
    page = (params.validation.reports_dir / "prepare.html").read_text()
    assert "passed" in page and "manifest" in page and "http" not in page.split("</style>", 1)[1]  # offline
    assert list(_quarantine(params).columns) == ["id", "file", "reason", "detail"]


def test_every_quarantine_reason_with_real_files(tmp_path):
    root = tmp_path / "ds"
    good = list(range(10))
    for i in good:
        write_pair(root, i)
    rows = [(i, "rough, hard") for i in good]
    # corrupt images: truncated JPEG, zero-byte file
    write_pair(root, 20)
    data = (root / "images_tac/image_20_tac.jpg").read_bytes()
    (root / "images_tac/image_20_tac.jpg").write_bytes(data[: len(data) // 2])
    write_pair(root, 21)
    (root / "images_rgb/image_21_rgb.jpg").write_bytes(b"")
    # tiny and huge images (huge: header says 49 Mpx; must be rejected before decoding)
    write_pair(root, 22)
    Image.new("RGB", (1, 1)).save(root / "images_tac/image_22_tac.jpg")
    write_pair(root, 23)
    Image.new("L", (7000, 7000)).save(root / "images_rgb/image_23_rgb.jpg", format="PNG")
    # duplicate ids: conflicting caption rows; two files for one id
    write_pair(root, 24)
    rows += [(24, "soft"), (24, "hard")]
    write_pair(root, 25)
    write_pair(root, "025")
    # empty and whitespace captions
    write_pair(root, 26)
    write_pair(root, 27)
    rows += [(26, ""), (27, "   ")]
    # non-integer ids, in captions and in file names
    rows += [("abc", "smooth")]
    write_pair(root, "x1")
    # missing partners
    write_pair(root, 28)
    (root / "images_tac/image_28_tac.jpg").unlink()
    write_pair(root, 29)
    (root / "images_rgb/image_29_rgb.jpg").unlink()
    rows += [(30, "grainy")]  # no images at all
    write_pair(root, 31)  # images, no caption
    rows += [(i, "smooth, glossy") for i in (20, 21, 22, 23, 25, 28, 29)]
    write_captions(root, rows)
    with open(root / "captions.csv", "ab") as fh:  # a line that is not UTF-8
        fh.write(b'32,"caf\xe9 smooth"\n')
    write_pair(root, 32)

    params = make_params(tmp_path, root, max_bad_fraction=0.9)
    manifest, scan = run(params)
    q = _quarantine(params)
    assert q["id"].is_unique  # one row per bad id
    got = dict(zip(q["id"], q["reason"]))
    assert got == {
        "20": "corrupt_image", "21": "corrupt_image", "22": "image_too_small", "23": "image_too_large",
        "24": "duplicate_id", "25": "duplicate_id", "26": "empty_caption", "27": "empty_caption",
        "abc": "bad_id", "x1": "bad_id", "28": "missing_tac", "29": "missing_rgb",
        "30": "missing_images", "31": "missing_caption", "32": "bad_encoding",
    }
    assert set(q["reason"]) <= set(REASONS)
    by_id = q.set_index("id")
    assert by_id.loc["20", "file"].endswith("image_20_tac.jpg")
    assert by_id.loc["21", "detail"] == "zero-byte file"
    assert "max_image_pixels" in by_id.loc["23", "detail"]
    assert by_id.loc["32", "file"].startswith("captions.csv:")
    assert by_id.loc["abc", "file"].startswith("captions.csv:")
    # good data is never lost
    assert sorted(manifest.loc[manifest["copy"] == 0, "source_id"]) == good


def test_png_grayscale_and_rgba_disguised_as_jpg_are_accepted_as_rgb(tmp_path, dataset):
    # not constant (a constant image is quarantined): a horizontal ramp in each
    ramp = Image.linear_gradient("L").rotate(90).resize((64, 64))
    Image.merge("RGB", (ramp, ramp, Image.new("L", (64, 64), 10))).save(dataset / "images_tac/image_0_tac.jpg", format="PNG")
    ramp.save(dataset / "images_rgb/image_1_rgb.jpg")
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (32, 0, 64, 64))  # left half transparent, right half opaque blue
    rgba.save(dataset / "images_rgb/image_2_rgb.jpg", format="PNG")
    params = make_params(tmp_path, dataset, augment={"copies": 0})
    manifest, scan = run(params)
    assert not scan.quarantine
    originals = manifest.set_index("uid")
    for uid, col in ((0, "tac_path"), (1000, "rgb_path"), (2000, "rgb_path")):
        path = Path(originals.loc[uid, col])
        assert path.is_relative_to(params.prepare.out_dir)  # normalised copy, source untouched
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
    with Image.open(originals.loc[2000, "rgb_path"]) as img:
        assert img.getpixel((5, 5))[0] > 240  # transparent pixels composited on white, not black
    assert Path(originals.loc[3000, "tac_path"]).parent == dataset / "images_tac"  # good RGB JPEGs are referenced


def test_identical_duplicate_caption_rows_are_kept_once(tmp_path, dataset):
    rows = [(i, "smooth, glossy, hard", i % 2) for i in range(20)] + [(5, "smooth, glossy, hard", 1)]
    write_captions(dataset, rows)
    manifest, scan = run(make_params(tmp_path, dataset))
    assert not scan.quarantine and (manifest["source_id"] == 5).any()


def test_too_many_bad_ids_fail_with_summary_and_keep_previous_output(tmp_path, dataset):
    params = make_params(tmp_path, dataset)
    run(params)
    before = _digests(params.prepare.out_dir)
    for i in range(5):
        (dataset / f"images_rgb/image_{i}_rgb.jpg").write_bytes(b"not an image")
    with pytest.raises(PrepareError) as info:
        run(params)
    message = str(info.value)
    assert "5 of 20 ids quarantined" in message and "corrupt_image=5" in message
    assert "prepare.max_bad_fraction" in message and str(params.prepare.quarantine_csv) in message
    assert len(_quarantine(params)) == 5  # the quarantine list is written even when the stage fails
    assert _digests(params.prepare.out_dir) == before


def test_split_file_is_respected_and_copies_never_cross_splits(tmp_path, dataset):
    pd.DataFrame({"index": range(20), "split": ["test" if i < 5 else "train" for i in range(20)]}).to_csv(
        dataset / "split.csv", index=False)
    params = make_params(tmp_path, dataset, augment={"copies": 3, "apply_to_test": True})
    manifest, _ = run(params)
    assert manifest.groupby("source_id")["split"].nunique().max() == 1
    assert set(manifest.loc[manifest["split"] == "test", "source_id"]) == set(range(5))
    assert (manifest.groupby("source_id").size() == 4).all()


def test_bad_split_file_names_the_line(tmp_path, dataset):
    (dataset / "split.csv").write_text("index,split\n0,train\n1,validation\n")
    with pytest.raises(PrepareError, match=r"split\.csv:3"):
        run(make_params(tmp_path, dataset))


def test_hash_split_is_stable_when_ids_are_added():
    before = {i: stable_split(i, 0.2) for i in range(500)}
    assert {i: stable_split(i, 0.2) for i in range(1000)}.items() >= before.items()
    assert 0.12 < sum(v == "test" for v in before.values()) / 500 < 0.28


def test_augmentation_is_deterministic_and_seeded(tmp_path, dataset):
    a = make_params(tmp_path / "a", dataset, augment={"copies": 2, "seed": 7})
    b = make_params(tmp_path / "b", dataset, augment={"copies": 2, "seed": 7})
    ma, _ = run(a)
    mb, _ = run(b)
    assert ma["aug"].tolist() == mb["aug"].tolist()
    assert _digests(a.prepare.out_dir / "images_tac") == _digests(b.prepare.out_dir / "images_tac")
    spec = draw_augment(a.prepare.augment, 3, 1)
    assert spec == draw_augment(a.prepare.augment, 3, 1)
    assert spec != draw_augment(a.prepare.augment.model_copy(update={"seed": 8}), 3, 1)
    # pair geometry is shared, crops are per modality
    assert spec.tac_crop != spec.rgb_crop


def test_rerun_is_safe_and_identical(tmp_path, dataset):
    params = make_params(tmp_path, dataset)
    first, _ = run(params)
    digests = _digests(params.prepare.out_dir)
    second, _ = run(params)
    assert first.equals(second) and _digests(params.prepare.out_dir) == digests
    assert not list(tmp_path.glob(".*staging*"))


def test_cli_reports_a_clear_error_without_traceback(tmp_path, dataset):
    (dataset / "captions.csv").unlink()
    params_yaml = tmp_path / "params.yaml"
    params_yaml.write_text(f"data:\n  root: {dataset}\n")
    proc = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "captions.csv: captions file not found" in proc.stderr and "Traceback" not in proc.stderr
