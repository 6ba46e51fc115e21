"""A fully cached ``embed`` rerun imports neither torch nor Great Expectations, and writes the same bytes; a changed
image, or a failing validation, brings both back for real (issue 21: the cached rerun's cost was imports).

Each run is a fresh interpreter running the stage's own ``main`` (what ``bin/stage embed`` runs), which then
reports which of the two heavy packages ended up in ``sys.modules``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from tasks import embed, prepare
from touchvl.imagebind.cache import VectorCache, image_key
from touchvl.params import parse_params

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "great_expectations")
WRAPPER = """
import json, sys
from tasks.embed import main
try:
    main(sys.argv[1:])
finally:  # also when the stage fails (sys.exit): which heavy packages did this run load?
    loaded = {m: m in sys.modules for m in %r}
    # GX validated for real here or in the side process the stage started for it (touchvl/gx_side.py)
    side = getattr(sys.modules.get("touchvl.checks"), "_side", None)
    loaded["great_expectations"] = loaded["great_expectations"] or bool(side and side.answered)
    loaded["gx_side_started"] = side is not None
    print("LOADED " + json.dumps(loaded))
""" % (HEAVY,)


def _raw(tmp_path: Path, dataset: Path) -> dict:
    out = tmp_path / "out"
    return {
        "data": {"root": str(dataset)},
        "prepare": {"out_dir": str(tmp_path / "prepared"), "quarantine_csv": str(out / "q.csv"),
                    "headline": str(out / "data.json"), "augment": {"copies": 1}},
        "embed": {"random_weights": True, "num_workers": 0, "out_dir": str(out / "emb"),
                  "cache_dir": str(tmp_path / "cache"), "summary": str(out / "summary.json"),
                  "metrics": str(out / "encoder.json"), "headline": str(out / "headline.json"),
                  "text_search": str(out / "text_search.json")},
        "validation": {"reports_dir": str(out / "val"), "data_docs_dir": str(out / "docs"), "build_data_docs": False},
    }


def _prepared(tmp_path: Path, dataset: Path) -> tuple[Path, dict]:
    raw = _raw(tmp_path, dataset)
    prepare.run(parse_params(raw))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def _stage(params: Path) -> tuple[int, dict, str]:
    """(exit code, {package: loaded}, stderr) of one fresh ``embed`` process."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "--params", str(params)], cwd=params.parent,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout's code, not an installed one
    line = [x for x in proc.stdout.splitlines() if x.startswith("LOADED ")]
    assert line, proc.stdout + proc.stderr
    loaded = json.loads(line[-1][len("LOADED "):])
    side_started = loaded.pop("gx_side_started")
    # nothing embedded: no side process either (a replay needs none; a failure validates in the stage's process)
    assert loaded["torch"] or not side_started, "a run that embedded nothing started a GX side process"
    return proc.returncode, loaded, proc.stderr


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file the stage writes except its run summary (counts differ by design) and the validation report
    (compared on its own: a replay says so)."""
    skip = {"summary.json", "embed.json", "embed.html"}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in skip}


def test_cached_rerun_loads_neither_torch_nor_gx_and_a_changed_image_loads_both(tmp_path, dataset):
    params, raw = _prepared(tmp_path, dataset)
    out = tmp_path / "out"
    code, loaded, err = _stage(params)
    assert code == 0, err
    assert loaded == {"torch": True, "great_expectations": True}  # the first run computes and validates for real
    first, first_report = _outputs(out), json.loads((out / "val/embed.json").read_text())
    first_bytes = (out / "val/embed.json").read_bytes()
    pairs = json.loads((out / "summary.json").read_text())["pairs"]
    assert first_report["success"] and "replayed_from" not in first_report
    assert json.loads((out / "summary.json").read_text())["validation_replayed_from"] is None

    code, loaded, err = _stage(params)
    assert code == 0, err
    assert loaded == {"torch": False, "great_expectations": False}, err
    assert json.loads((out / "summary.json").read_text())["embedded_now"] == 0
    assert _outputs(out) == first  # vectors, meta.json, metrics, text search: byte for byte
    # the same report, byte for byte (a DVC output: a forced rerun must not change it); the run's summary and the
    # log say it was replayed
    assert (out / "val/embed.json").read_bytes() == first_bytes
    assert json.loads((out / "summary.json").read_text())["validation_replayed_from"] == first_report["content_hash"]
    assert "Replayed from the passing run for content hash" in (out / "val/embed.html").read_text()
    assert "replayed the passing run" in err

    # one image's bytes change (a valid JPEG, other pixels): that pair is embedded and GX runs again
    manifest = pd.read_csv(Path(raw["prepare"]["out_dir"]) / "manifest.csv")
    victim = manifest.iloc[2]
    pixels = np.asarray(Image.open(victim["tac_path"]).convert("RGB")).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(victim["tac_path"], format="JPEG", quality=95)
    code, loaded, err = _stage(params)
    assert code == 0, err
    assert loaded == {"torch": True, "great_expectations": True}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embedded_now"] == (manifest["tac_path"] == victim["tac_path"]).sum() == 1
    assert summary["pairs"] == pairs
    changed = json.loads((out / "val/embed.json").read_text())
    assert changed["success"] and summary["validation_replayed_from"] is None
    assert changed["content_hash"] != first_report["content_hash"]
    assert _outputs(out)["emb/embeddings_tac/all_embeddings.npy"] != first["emb/embeddings_tac/all_embeddings.npy"]


def test_a_failing_validation_is_never_replayed(tmp_path, dataset):
    params, raw = _prepared(tmp_path, dataset)
    result = embed.run(parse_params(raw))  # the first run in this process: it fills the cache and passes
    # a cached vector goes bad (twice its length): every vector still comes from the cache, and the norm check fails
    cache = VectorCache(raw["embed"]["cache_dir"], result.meta["fingerprint"])
    manifest = pd.read_csv(Path(raw["prepare"]["out_dir"]) / "manifest.csv")
    key = image_key(manifest.iloc[1]["rgb_path"])
    cache.put(key, 2 * cache.get(key))
    cache.flush()
    cache.compact()  # one shard holding the bad vector, the good one gone
    records = Path(raw["embed"]["cache_dir"]) / embed.VALIDATION_RECORDS
    stored = sorted(records.iterdir())
    assert len(stored) == 1  # the passing first run
    for _ in range(2):
        code, loaded, err = _stage(params)
        assert code == 1 and "validation of stage 'embed' failed" in err and "rgb_norm" in err, err
        assert loaded == {"torch": False, "great_expectations": True}  # nothing to embed; validated for real
        report = json.loads((Path(raw["validation"]["reports_dir"]) / "embed.json").read_text())
        assert not report["success"] and "replayed_from" not in report
        assert sorted(records.iterdir()) == stored  # a failure is never stored
