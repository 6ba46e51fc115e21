import hashlib

import numpy as np
import pandas as pd
from PIL import Image

from touchvl.params import SampleParams
from touchvl.data.sample import PATTERNS, draw_material, generate, render_item, write_dataset


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_determinism(tmp_path):
    p = SampleParams(out_dir=tmp_path / "a", n_ids=12, image_size=64, seed=3)
    for out in ("a", "b"):
        items, captions, split = generate(p)
        write_dataset(items, captions, split, tmp_path / out)
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(12):
        for kind in ("tac", "rgb"):
            name = f"images_{kind}/image_{i}_{kind}.jpg"
            assert _digest(a / name) == _digest(b / name)
            assert Image.open(a / name).size == (64, 64)
    caps = pd.read_csv(a / "captions.csv")
    assert list(caps.columns) == ["index", "caption", "sensor"]
    assert caps.equals(pd.read_csv(b / "captions.csv"))
    split = pd.read_csv(a / "split.csv")
    assert set(split["split"]) == {"train", "test"} and list(split["index"]) == list(range(12))


def test_seed_changes_data_and_ids_are_independent_of_dataset_size():
    assert render_item(5, 32, 2, seed=0).caption == generate(SampleParams(n_ids=8, image_size=32))[0][5].caption
    a, b = render_item(5, 32, 2, seed=0), render_item(5, 32, 2, seed=1)
    assert not np.array_equal(a.rgb, b.rgb)


def test_captions_are_tvl_style_and_follow_hidden_parameters():
    items = [render_item(i, 48, 2, seed=0) for i in range(120)]
    for it in items:
        words = it.caption.split(", ")
        assert 2 <= len(words) <= 6 and all(w.isalpha() and w.islower() for w in words)
        m = it.material
        assert ("soft" in words) == (m.hardness <= 0.33)
        assert ("hard" in words) == (m.hardness > 0.66)
        assert ("glossy" in words) == (m.gloss > 0.6)
    assert {it.material.sensor for it in items} == {0, 1}
    assert {it.material.pattern for it in items} == set(PATTERNS)


def _high_freq_energy(img: np.ndarray) -> float:
    g = img[20:44, 20:44].astype(float).mean(axis=2)  # inside the contact patch, away from its rim
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def test_tactile_and_rgb_share_signal_with_the_caption():
    """Rough materials leave more relief in the gel image than smooth ones: real, learnable signal."""
    items = [render_item(i, 64, 1, seed=0) for i in range(150)]
    for modality in ("tactile", "rgb"):
        smooth = [_high_freq_energy(getattr(it, modality)) for it in items if "smooth" in it.caption]
        rough = [_high_freq_energy(getattr(it, modality)) for it in items if "rough" in it.caption]
        assert smooth and rough and np.mean(rough) > 2 * np.mean(smooth), modality


def test_material_draws_cover_the_parameter_ranges():
    rng = np.random.default_rng(0)
    mats = [draw_material(rng, 2) for _ in range(300)]
    assert min(m.hardness for m in mats) < 0.05 and max(m.hardness for m in mats) > 0.95
    assert all(m.roughness < 0.15 for m in mats if m.pattern == "smooth")


def test_sensors_have_distinct_looks():
    items = [render_item(i, 64, 2, seed=0) for i in range(60)]
    corner = lambda it: it.tactile[:6, :6].reshape(-1, 3).mean(0)  # noqa: E731 - gel background
    by_sensor = {s: np.mean([corner(it) for it in items if it.material.sensor == s], axis=0) for s in (0, 1)}
    assert np.abs(by_sensor[0] - by_sensor[1]).max() > 10


def test_validation_passes_the_sample_and_catches_a_constant_image(tmp_path):
    import dataclasses

    import pytest

    from touchvl.checks import run_validation
    from touchvl.data.sample import validation_tables
    from touchvl.params import ValidationParams

    p = SampleParams(n_ids=12, image_size=32)
    items, captions, split = generate(p)
    vp = ValidationParams(reports_dir=tmp_path / "val", build_data_docs=False, replay_dir=None)
    assert run_validation("sample", validation_tables(items, captions, split, p), vp).success
    flat = dataclasses.replace(items[3], tactile=items[3].tactile * 0 + 255)  # what a broken renderer would write
    report = run_validation("sample", validation_tables([*items[:3], flat, *items[4:]], captions, split, p), vp)
    failed = report.blocking_failures
    assert [f.kwargs["column"] for f in failed] == ["tac_std"] and failed[0].unexpected_examples == [items[3].id]
    with pytest.raises(Exception, match="tac_std"):
        report.raise_if_failed()
