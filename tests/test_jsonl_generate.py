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


def _items(n=30):
    return [Item(i * 1000, "rough, grainy, hard, matte", f"https://h/tac/{i}.jpg", f"https://h/rgb/{i}.jpg") for i in range(n)]


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
    pd.DataFrame({"index": range(12), "caption": ["smooth, glossy, hard"] * 12}).to_csv(captions, index=False)
    img = tmp_path / "t.jpg"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(img)
    mapping = tmp_path / "image_url_mapping.csv"
    pd.DataFrame({"index": range(12), "tac_url": [img.as_uri()] * 12, "rgb_url": [img.as_uri()] * 12}).to_csv(mapping, index=False)
    out = tmp_path / "tactile_ft4.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tasks.jsonl", "tactile", "--csv", str(captions), "--image-url-csv", str(mapping),
                           "--out", str(out), "--limit", "40", "--text-only-pairs", "10", "--intents", "describe,material",
                           "--seed", "1", "--image-mode", "base64"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 24  # 12 items x 2 intents caps the 40 asked for
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
