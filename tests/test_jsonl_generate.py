import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from touchvl.chat.generate import Item, answer, multimodal_set, quota_counts, tactile_set
from touchvl.chat.validate import validate_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(intents=("describe", "compare", "material", "property"), system="sys", mode="url", detail="low")


def _items(n=30, same_caption=False):
    return [Item(i * 1000, "rough, grainy, hard, matte" + ("" if same_caption else f", s{i}"), f"https://h/tac/{i}.jpg",
                 f"https://h/rgb/{i}.jpg") for i in range(n)]


@pytest.mark.parametrize("total,quotas,expected", [
    (1500, {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15}, {"tactile_only": 900, "dual_image": 375, "text_only": 225}),
    (7, {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15}, {"tactile_only": 4, "dual_image": 2, "text_only": 1}),
    (10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, {"a": 3, "b": 4, "c": 3}),
])
def test_quota_counts_are_exact_up_to_rounding(total, quotas, expected):
    counts = quota_counts(total, quotas)
    assert sum(counts.values()) == total
    assert all(abs(counts[k] - total * v) < 1 for k, v in quotas.items())
    assert counts == expected or sorted(counts.values()) == sorted(expected.values())


def test_tactile_set_honours_quotas_and_is_deterministic():
    quotas = {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15}
    examples = tactile_set(_items(), 101, quotas, seed=3, **COMMON)
    kinds = Counter(e.kind for e in examples)
    assert kinds == quota_counts(101, quotas)
    assert [e.messages for e in examples] == [e.messages for e in tactile_set(_items(), 101, quotas, seed=3, **COMMON)]
    images = {e.kind: sum(p.get("type") == "image_url" for p in e.messages[1]["content"]) if isinstance(e.messages[1]["content"], list) else 0
              for e in examples}
    assert images == {"tactile_only": 1, "dual_image": 2, "text_only": 0}


def test_multimodal_set_text_only_every_n_and_answers_from_caption():
    examples = multimodal_set(_items(), 50, 5, seed=0, **COMMON)
    assert [i for i, e in enumerate(examples) if e.kind == "text_only"] == [4, 9, 14, 19, 24, 29, 34, 39, 44, 49]
    for e in examples:
        assert "rough" in e.messages[-1]["content"] or "grainy" in e.messages[-1]["content"]
    assert answer("property", "soft, smooth, glossy").startswith("Hardness: soft. Roughness: smooth.")


def test_original_toolkit_cli_flags(tmp_path):
    captions = tmp_path / "new_train.csv"
    pd.DataFrame({"index": range(12), "caption": [f"smooth, glossy, hard, n{i}" for i in range(12)]}).to_csv(captions, index=False)
    urls = {}
    for i in range(12):
        for kind in ("tac", "rgb"):
            img = tmp_path / "images" / f"image_{i}_{kind}.jpg"
            img.parent.mkdir(exist_ok=True)
            Image.new("RGB", (32, 32), (i * 20, 2, 3 if kind == "tac" else 200)).save(img)
            urls[i, kind] = img.as_uri()
    mapping = tmp_path / "image_url_mapping.csv"  # a toolkit mapping: its index is the dataset id, so it is source_id
    pd.DataFrame({"source_id": range(12), "index": range(100, 112), "tac_url": [urls[i, "tac"] for i in range(12)],
                  "rgb_url": [urls[i, "rgb"] for i in range(12)]}).to_csv(mapping, index=False)
    out = tmp_path / "tactile_ft4.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tasks.jsonl", "tactile", "--csv", str(captions), "--image-url-csv", str(mapping),
                           "--out", str(out), "--limit", "100", "--text-only-pairs", "10", "--intents", "describe,material",
                           "--seed", "1", "--image-mode", "base64", "--image-root", str(tmp_path / "images")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    # 12 items x 2 intents = 24 distinct tactile-only examples bind: 24 of them and 10 dual-image keep the quotas'
    # 0.6 : 0.25 ratio next to the 10 text-only ones, so 44 of the 100 asked for -- and the command says so
    assert len(lines) == 44 and "not the 100 asked for" in proc.stdout
    text_only = [l for l in lines if isinstance(l["messages"][1]["content"], str)]
    assert len(text_only) == 10
    assert validate_file(out).ok  # base64 data URLs decoded and checked
    out3 = tmp_path / "tactile_ft3.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tasks.jsonl", "rgb_tac", "--csv", str(captions), "--image-url-csv", str(mapping),
                           "--out", str(out3), "--limit", "20", "--text-only-every", "4", "--image-limit", "5", "--image-mode", "url"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in out3.read_text().splitlines()]
    assert sum(isinstance(r["messages"][1]["content"], list) for r in rows) == 5
    bad = subprocess.run([sys.executable, "-m", "tasks.jsonl", "rgb_tac", "--csv", str(captions), "--image-url-csv", str(mapping),
                          "--out", str(out3), "--intents", "smell"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown intent" in bad.stderr


# ------------------------------------------------------------------ the toolkit generator on a real upload mapping
def _mini_project(tmp_path, n_ids=6, copies=2, test_ids=()):
    """A manifest in the pipeline's layout (uid = row, several copies per dataset id), its images uploaded to a
    LocalStorage and the mapping written by the upload stage's own build_mapping; a unique caption per id."""
    from touchvl import disk
    from touchvl.storage.backends import Blob, LocalStorage
    from touchvl.storage.upload import build_mapping, object_key

    words = ["rough", "smooth", "soft", "hard", "grainy", "woven", "bumpy", "ridged", "slippery", "squishy", "fine", "coarse"]
    rows, uid = [], 0
    for source_id in range(n_ids):
        caption = f"{words[source_id % len(words)]}, {words[(source_id + 5) % len(words)]}, id{source_id}"
        for copy in range(copies + 1):
            name = f"{source_id}" if copy == 0 else f"{source_id}_aug{copy}"
            paths = {}
            for kind in ("tac", "rgb"):
                path = tmp_path / "prepared" / f"images_{kind}" / f"image_{name}_{kind}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 24), (source_id * 20 % 256, copy * 60, 7 if kind == "tac" else 99)).save(path)
                paths[kind] = str(path)
            if source_id in test_ids and copy:
                continue  # the test split has originals only, as prepare writes it
            rows.append(dict(uid=uid, id=name, source_id=source_id, copy=copy,
                             split="test" if source_id in test_ids else "train", sensor_id=0,
                             tac_path=paths["tac"], rgb_path=paths["rgb"], caption=caption, aug="orig" if copy == 0 else "x"))
            uid += 1
    manifest = pd.DataFrame(rows)
    disk.write_csv(tmp_path / "manifest.csv", manifest)
    storage = LocalStorage(tmp_path / "files")
    for r in rows:
        for kind in ("tac", "rgb"):
            path = Path(r[f"{kind}_path"])
            storage.put(Blob(object_key("tvl/", kind, str(path)), path, path.stat().st_size, disk.md5_file(path)))
    disk.write_csv(tmp_path / "image_url_mapping.csv", build_mapping(manifest, "tvl/", storage))
    captions = manifest[manifest["copy"] == 0][["source_id", "caption"]].rename(columns={"source_id": "index"})
    captions.to_csv(tmp_path / "captions.csv", index=False)
    return manifest


def _generate(*args):
    """The real CLI, in-process (fast); returns (exit status, stdout, stderr)."""
    import contextlib
    import io

    from touchvl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(["-C", str(ROOT), "generate", *map(str, args)])
        except SystemExit as exc:  # argparse usage errors
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def _examples(path):
    return [json.loads(l)["messages"] for l in Path(path).read_text().splitlines()]


def _image_urls(messages):
    content = messages[1]["content"]
    return [p["image_url"]["url"] for p in content if p.get("type") == "image_url"] if isinstance(content, list) else []


@pytest.mark.parametrize("kind", ["rgb_tac", "tactile"])
def test_toolkit_captions_join_the_mapping_by_dataset_id(tmp_path, kind):
    """captions.csv `index` is the dataset id; the mapping's `index` is the manifest uid: every example's caption must be
    the caption of the id whose images it shows (today id 1's caption lands on image_0_aug1)."""
    manifest = _mini_project(tmp_path)
    caption_of = dict(zip(manifest["source_id"], manifest["caption"]))
    out = tmp_path / f"{kind}.jsonl"
    status, stdout, stderr = _generate(kind, "--csv", tmp_path / "captions.csv", "--image-url-csv",
                                       tmp_path / "image_url_mapping.csv", "--out", out, "--image-mode", "url",
                                       "--limit", "60", "--seed", "2")
    assert status == 0, stderr
    seen_copies = set()
    for messages in _examples(out):
        for url in _image_urls(messages):
            name = Path(url).name  # image_{id}[_augN]_{tac,rgb}.jpg
            source_id = int(name.split("_")[1])
            seen_copies.add(name.split("_")[2])
            assert f"id{source_id}" in messages[-1]["content"], (url, messages[-1]["content"])
            assert caption_of[source_id].split(", ")[0] in messages[-1]["content"]
    assert {"aug1", "aug2"} & seen_copies  # the augmented copies of each id carry its caption too


def test_toolkit_alias_joins_by_dataset_id_too(tmp_path):
    manifest = _mini_project(tmp_path, n_ids=3, copies=1)
    out = tmp_path / "a.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tasks.jsonl", "rgb_tac", "--csv", str(tmp_path / "captions.csv"),
                           "--image-url-csv", str(tmp_path / "image_url_mapping.csv"), "--out", str(out),
                           "--image-mode", "url", "--limit", "20"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for messages in _examples(out):
        for url in _image_urls(messages):
            assert f"id{int(Path(url).name.split('_')[1])}" in messages[-1]["content"]
    assert len(manifest) == 6


def test_manifest_as_captions_joins_by_uid(tmp_path):
    manifest = _mini_project(tmp_path, n_ids=3)
    out = tmp_path / "m.jsonl"
    status, _, stderr = _generate("tactile", "--csv", tmp_path / "manifest.csv", "--image-url-csv",
                                  tmp_path / "image_url_mapping.csv", "--out", out, "--image-mode", "url", "--limit", "30")
    assert status == 0, stderr
    for messages in _examples(out):
        for url in _image_urls(messages):
            assert f"id{int(Path(url).name.split('_')[1])}" in messages[-1]["content"]


def test_ids_on_one_side_only_fail_naming_them(tmp_path):
    _mini_project(tmp_path, n_ids=4)
    captions = pd.read_csv(tmp_path / "captions.csv")
    extra = pd.concat([captions, pd.DataFrame({"index": [77], "caption": ["soft, smooth"]})])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    args = ["--image-url-csv", tmp_path / "image_url_mapping.csv", "--out", tmp_path / "x.jsonl", "--image-mode", "url"]
    status, _, stderr = _generate("rgb_tac", "--csv", tmp_path / "extra.csv", *args)
    assert status == 1 and "77" in stderr and "Traceback" not in stderr and not (tmp_path / "x.jsonl").exists()
    captions[captions["index"] != 2].to_csv(tmp_path / "fewer.csv", index=False)
    status, _, stderr = _generate("rgb_tac", "--csv", tmp_path / "fewer.csv", *args)
    assert status == 1 and "[2]" in stderr and "--captions-subset" in stderr
    status, _, stderr = _generate("rgb_tac", "--csv", tmp_path / "fewer.csv", "--captions-subset", *args)
    assert status == 0, stderr
    assert not any("id2" in m[-1]["content"] for m in _examples(tmp_path / "x.jsonl"))
    # a mapping without source_id cannot be joined to dataset ids: refused, not guessed
    pd.read_csv(tmp_path / "image_url_mapping.csv").drop(columns="source_id").to_csv(tmp_path / "old.csv", index=False)
    status, _, stderr = _generate("rgb_tac", "--csv", tmp_path / "captions.csv", "--image-url-csv", tmp_path / "old.csv",
                                  "--out", tmp_path / "y.jsonl")
    assert status == 1 and "source_id" in stderr and not (tmp_path / "y.jsonl").exists()
    # duplicate ids and a malformed mapping: one clear line each
    pd.concat([captions, captions.head(1)]).to_csv(tmp_path / "dup.csv", index=False)
    status, _, stderr = _generate("rgb_tac", "--csv", tmp_path / "dup.csv", *args)
    assert status == 1 and "Traceback" not in stderr and "0" in stderr
    (tmp_path / "bad_map.csv").write_text("index,tac_url\nx,y\n")
    status, _, stderr = _generate("rgb_tac", "--csv", tmp_path / "captions.csv", "--image-url-csv", tmp_path / "bad_map.csv",
                                  "--out", tmp_path / "z.jsonl")
    assert status == 1 and "bad_map.csv" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("kind,flag", [("rgb_tac", "--text-only-pairs"), ("tactile", "--text-only-every")])
def test_flags_of_the_other_generator_are_refused(tmp_path, kind, flag):
    _mini_project(tmp_path, n_ids=2)
    status, _, stderr = _generate(kind, "--csv", tmp_path / "captions.csv", "--image-url-csv", tmp_path / "image_url_mapping.csv",
                                  "--out", tmp_path / "x.jsonl", flag, "3")
    assert status == 2 and flag in stderr and not (tmp_path / "x.jsonl").exists()


def test_text_only_pairs_is_exact_or_refused(tmp_path):
    _mini_project(tmp_path, n_ids=4)
    common = ["--csv", tmp_path / "captions.csv", "--image-url-csv", tmp_path / "image_url_mapping.csv", "--image-mode", "url"]
    status, _, stderr = _generate("tactile", *common, "--out", tmp_path / "t.jsonl", "--limit", "40", "--text-only-pairs", "7")
    assert status == 0, stderr
    assert sum(isinstance(m[1]["content"], str) for m in _examples(tmp_path / "t.jsonl")) == 7
    # 4 captions x 4 intents = 16 distinct text-only examples: 17 cannot be honoured
    status, _, stderr = _generate("tactile", *common, "--out", tmp_path / "u.jsonl", "--text-only-pairs", "17")
    assert status == 2 and "16" in stderr and not (tmp_path / "u.jsonl").exists()


# ------------------------------------------------------------------ no duplicate examples
def _digests(examples):
    return Counter(json.dumps(e.messages, sort_keys=True) for e in examples)


def test_generated_sets_have_no_duplicates_and_are_capped_at_the_distinct_combinations():
    # 10 ids x 3 copies sharing a caption (as the manifest has them), 2 ids with the same caption text
    items = [Item(10 * s + c, "rough, grainy, hard" if s < 2 else f"soft, smooth, n{s}",
                  f"https://h/tac/{s}_{c}.jpg", f"https://h/rgb/{s}_{c}.jpg") for s in range(10) for c in range(3)]
    # text-only examples depend only on (caption, intent): 9 distinct captions x 4 intents = 36
    for examples in (multimodal_set(items, 10_000, 5, seed=0, **COMMON),
                     tactile_set(items, 10_000, {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15}, seed=0, **COMMON)):
        digests = _digests(examples)
        assert max(digests.values()) == 1, "duplicate examples"
        kinds = Counter(e.kind for e in examples)
        assert kinds["text_only"] <= 36 and kinds.get("dual_image", 0) <= 120 and kinds.get("tactile_only", 0) <= 120
        combos = Counter((e.uid, e.kind, e.intent) for e in examples)
        assert max(combos.values()) == 1
    rgb = multimodal_set(items, 10_000, 5, seed=0, **COMMON)
    assert len(rgb) == 150  # text-only capacity binds: 36 text-only -> every 5th -> 150 examples (120 dual + 30 text)
    assert [i for i, e in enumerate(rgb) if e.kind == "text_only"] == list(range(4, 150, 5))
    tac = tactile_set(items, 10_000, {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15}, seed=0, **COMMON)
    assert Counter(e.kind for e in tac) == quota_counts(len(tac), {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15})


def test_stage_sized_sets_have_no_duplicates():
    """The sample's shape: 240 train ids x 3 copies, 4 intents, limits 3000 / 1500 (753 and 92 duplicates before)."""
    items = [Item(3 * s + c, f"rough, hard, s{s}", f"file:///t/{s}_{c}.jpg", f"file:///r/{s}_{c}.jpg") for s in range(240) for c in range(3)]
    quotas = {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15}
    rgb = multimodal_set(items, 3000, 5, seed=0, **COMMON)
    tac = tactile_set(items, 1500, quotas, seed=0, **COMMON)
    assert len(rgb) == 3000 and len(tac) == 1500
    assert max(_digests(rgb).values()) == 1 and max(_digests(tac).values()) == 1


def test_composition_says_when_a_set_is_capped():
    from touchvl.chat.generate import distinct_combinations
    from touchvl.chat.report import composition

    items = _items(3, same_caption=True)  # 3 items, one caption: text-only capacity 1 x 4 intents
    examples = multimodal_set(items, 1000, 5, seed=0, **COMMON)
    capacity = distinct_combinations(items, COMMON["intents"])
    assert capacity == {"tactile_only": 12, "dual_image": 12, "text_only": 4}
    comp = composition(examples, None, requested=1000, capacity=capacity)
    assert comp["capped"] and comp["requested"] == 1000 and comp["examples"] == len(examples) == 15
    assert "distinct" in comp["note"] and "1000" in comp["note"].replace(",", "")


# ------------------------------------------------------------------ file:// images only from the data roots
def test_file_urls_outside_the_data_roots_are_refused(tmp_path):
    from touchvl.chat.messages import image_part
    from touchvl.errors import StageError

    root = tmp_path / "data"
    root.mkdir()
    inside = root / "t.jpg"
    Image.new("RGB", (8, 8)).save(inside)
    assert image_part(inside.as_uri(), "base64", "low", roots=[root])["image_url"]["url"].startswith("data:image/jpeg;base64,")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (root / "link.jpg").symlink_to(secret)
    for url in ("file:///etc/passwd", secret.as_uri(), (root / "link.jpg").as_uri(), f"file://{root}/../secret.txt",
                f"FILE://{secret}", f"file://{root}/%2e%2e/secret.txt"):
        with pytest.raises(StageError, match="outside the data folders"):
            image_part(url, "base64", "low", roots=[root])
    with pytest.raises(StageError, match="outside the data folders"):
        image_part(inside.as_uri(), "base64", "low", roots=[])  # no roots: nothing is inlined
    big = root / "big.jpg"
    big.write_bytes(b"\xff\xd8" + b"0" * (11 * 2**20))
    with pytest.raises(StageError, match="big.jpg.*MB"):
        image_part(big.as_uri(), "base64", "low", roots=[root])
    assert image_part(inside.as_uri(), "url", "low", roots=[])["image_url"]["url"] == inside.as_uri()  # not read


def test_generator_cli_refuses_a_mapping_pointing_at_etc_passwd(tmp_path):
    _mini_project(tmp_path, n_ids=2)
    mapping = pd.read_csv(tmp_path / "image_url_mapping.csv")
    mapping["tac_url"] = "file:///etc/passwd"
    mapping.to_csv(tmp_path / "evil.csv", index=False)
    out = tmp_path / "x.jsonl"
    status, _, stderr = _generate("tactile", "--csv", tmp_path / "captions.csv", "--image-url-csv", tmp_path / "evil.csv",
                                  "--out", out, "--image-mode", "base64", "--image-root", tmp_path)
    assert status == 1 and "file:///etc/passwd" in stderr and "outside the data folders" in stderr
    assert not out.exists()
    # the images the upload stage stored are inlined once their folder is an allowed root
    status, _, stderr = _generate("tactile", "--csv", tmp_path / "captions.csv", "--image-url-csv",
                                  tmp_path / "image_url_mapping.csv", "--out", out, "--image-mode", "base64",
                                  "--image-root", tmp_path / "files", "--limit", "12")
    assert status == 0, stderr
    assert validate_file(out).ok
    status, _, stderr = _generate("tactile", "--csv", tmp_path / "captions.csv", "--image-url-csv",
                                  tmp_path / "image_url_mapping.csv", "--out", tmp_path / "w.jsonl", "--image-mode", "base64")
    assert status == 1 and "outside the data folders" in stderr  # tmp_path is not one of the project's data roots


# ------------------------------------------------------------------ the jsonl stage
def _stage_params(tmp_path):
    from touchvl.params import parse_params

    return parse_params({
        "data": {"root": str(tmp_path / "no-dataset")},
        "prepare": {"out_dir": str(tmp_path)},  # manifest.csv; the images are under tmp_path/prepared
        "upload": {"local_dir": str(tmp_path / "files"), "mapping": str(tmp_path / "image_url_mapping.csv")},
        "jsonl": {"out_dir": str(tmp_path / "jsonl"), "headline": str(tmp_path / "cost.json"), "multimodal_limit": 60,
                  "tactile_limit": 40},
        "validation": {"reports_dir": str(tmp_path / "reports/validation"), "build_data_docs": False},
    })


def test_stage_reports_the_duplicate_rate_and_fails_a_set_over_the_limit(tmp_path, monkeypatch):
    from tasks import jsonl as stage
    from touchvl.errors import StageError

    _mini_project(tmp_path, n_ids=8, copies=2, test_ids=(6, 7))
    params = _stage_params(tmp_path)
    summary = stage.run(params)
    assert set(summary) == {"rgb_tac_train", "tactile_train", "rgb_tac_val", "tactile_val"}
    assert all(s["duplicate_fraction"] == 0 and s["errors"] == 0 for s in summary.values())
    for name in summary:
        d = json.loads((tmp_path / f"jsonl/reports/{name}/report.json").read_text())
        assert d["summary"]["duplicate_examples"] == 0 and d["summary"]["max_duplicate_fraction"] == 0.01
        assert "0 duplicates (0.0%; at most 1.0% allowed)" in (tmp_path / f"jsonl/reports/{name}/report.md").read_text()
        assert "0 duplicates (0.0%" in (tmp_path / f"jsonl/reports/{name}/report.html").read_text()
    val = json.loads((tmp_path / "jsonl/reports/rgb_tac_val/report.json").read_text())["composition"]
    # 2 test originals x 4 intents: 8 dual-image + 2 text-only of the 12 asked for, and the report says why
    assert val["capped"] and val["requested"] == 12 and val["examples"] == 10 and "distinct" in val["note"]
    assert "Capped" in (tmp_path / "jsonl/reports/rgb_tac_val/report.md").read_text()

    real = stage.multimodal_set  # a generator that regressed to repeating examples must fail the stage
    monkeypatch.setattr(stage, "multimodal_set", lambda *a, **k: (lambda ex: ex + ex[:5])(real(*a, **k)))
    with pytest.raises(StageError, match="too_many_duplicates"):
        stage.run(params)


def test_data_urls_have_one_encoder_and_one_decoder(tmp_path):
    """touchvl.chat.messages encodes and decodes every data URL: the generators, the gallery's and the chat page's
    thumbnails, the exporter and the model server read and write the same thing."""
    import io

    from touchvl.chat.export import image_bytes
    from touchvl.chat.messages import bytes_data_url, decode_data_url, jpeg_data_url, read_image_url
    from touchvl.errors import StageError
    from touchvl.retrieval.gallery import thumbnail
    from touchvl.ui.service import image_data_url

    photo = tmp_path / "p.png"
    Image.new("RGB", (300, 150), (200, 30, 10)).save(photo)
    png = photo.read_bytes()
    url = bytes_data_url(png)
    assert url.startswith("data:image/png;base64,") and decode_data_url(url) == png
    assert read_image_url(url, "x") == image_bytes(url, "x") == png
    for made, side in ((thumbnail(str(photo), 64), 64), (image_data_url(photo, 10_000_000, 128), 128), (jpeg_data_url(photo), 300)):
        assert made.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(decode_data_url(made))) as img:
            assert img.format == "JPEG" and max(img.size) == side
    assert thumbnail(str(tmp_path / "missing.jpg")) == ""  # the gallery shows no picture, it does not fail
    for bad, why in (("data:image/png,abc", "only base64"), ("data:image/png;base64,@@@", "Only base64 data")):
        with pytest.raises(ValueError, match=why):
            decode_data_url(bad)
        for reader in (read_image_url, image_bytes):
            with pytest.raises(StageError, match=f"line 3: cannot read image: .*{why}"):
                reader(bad, "line 3")


def test_the_duplicate_gate_is_jsonl_max_duplicate_fraction(tmp_path, monkeypatch):
    """The stage reads its limit from params: a set whose duplicate share is above jsonl.max_duplicate_fraction fails
    (naming the set and the share), the same set at or under the limit passes, and the reports say the limit."""
    from tasks import jsonl as stage
    from touchvl.errors import StageError

    _mini_project(tmp_path, n_ids=8, copies=2, test_ids=(6, 7))
    real = stage.multimodal_set  # rgb_tac sets repeat 5 of their examples
    monkeypatch.setattr(stage, "multimodal_set", lambda *a, **k: (lambda ex: ex + ex[:5])(real(*a, **k)))

    def limited(fraction):
        params = _stage_params(tmp_path)
        return params.model_copy(update={"jsonl": params.jsonl.model_copy(update={"max_duplicate_fraction": fraction})})

    summary = stage.run(limited(1.0))
    shares = {name: s["duplicate_fraction"] for name, s in summary.items()}
    assert shares["tactile_train"] == shares["tactile_val"] == 0
    worst = max(shares, key=shares.get)
    counted = json.loads((tmp_path / f"jsonl/reports/{worst}/report.json").read_text())["summary"]
    share = counted["duplicate_examples"] / counted["examples"]  # exact (the summary's share is rounded)
    assert worst.startswith("rgb_tac") and 0 < share < 1 and share == pytest.approx(shares[worst], abs=1e-3)
    assert stage.run(limited(share))  # at the limit: allowed
    report = json.loads((tmp_path / f"jsonl/reports/{worst}/report.json").read_text())
    assert report["ok"] and report["summary"]["max_duplicate_fraction"] == share
    with pytest.raises(StageError, match=rf"{worst}\.jsonl: 1 validation errors, first: .*too_many_duplicates"
                                         r".*\(jsonl\.max_duplicate_fraction\)"):
        stage.run(limited(share - 0.001))  # just under the worst set's share: that set fails
    report = json.loads((tmp_path / f"jsonl/reports/{worst}/report.json").read_text())
    assert not report["ok"] and report["summary"]["max_duplicate_fraction"] == pytest.approx(share - 0.001)
