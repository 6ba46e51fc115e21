"""Shared fixtures: small real datasets on disk in SSVTP layout, and params pointing into tmp_path."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from touchvl.params import Params, parse_params
from touchvl.data.sample import render_item

ROOT = Path(__file__).resolve().parents[1]
# What `make repro` built and DVC tracks: a test must never write there (DVC would then call stale or foreign
# outputs fresh, or restore over them). tests/ and the sources are not watched: editing them is the point.
WATCHED = ("artifacts", "data", "embeddings", "bench/results", "dvc.lock", "params.yaml")
TESTS_OWN = "artifacts/tests"  # what tests leave for a person to look at (the chat page's screenshot): not DVC's
OUTPUT_ROOTS = ("artifacts", "embeddings", "data")


def _snapshot() -> dict[str, tuple[int, int]]:
    files = {}
    for top in WATCHED:
        path = ROOT / top
        walk = [(str(path.parent), [], [path.name])] if path.is_file() else os.walk(path)
        for folder, _dirs, names in walk:
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                if not rel.startswith(TESTS_OWN + os.sep):
                    stat = os.stat(os.path.join(folder, name))
                    files[rel] = (stat.st_size, stat.st_mtime_ns)
    return files


# The longest files first (measured: `make test PYTEST_ARGS=--durations=60`), longest first: under `make test`'s two
# xdist workers (--dist loadfile --no-loadscope-reorder) a worker takes the next file when it is done, so the
# files that build whole pipelines (test_flows: one build serves the flow and the DVC CLI checks, minutes) start at
# once and the short ones fill in at the end, where they keep both workers busy to the last minute.
LONGEST_FIRST = ("tests/test_flows.py", "tests/test_chat.py", "tests/test_cli.py", "tests/test_finetune_local.py",
                 "tests/test_encoder_sees.py", "tests/test_dvc_prepare.py", "tests/test_embed_cached.py",
                 "tests/test_jsonl_validate.py", "tests/test_finetune_together.py", "tests/test_serve.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def pytest_sessionstart(session):
    session.config._project_before = _snapshot()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_project_before", None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    after = _snapshot()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if changed:
        shown = "\n  ".join(changed[:20]) + (f"\n  ... and {len(changed) - 20} more" if len(changed) > 20 else "")
        print(f"\nFAILED: the tests wrote into the project's own outputs (point them into tmp_path):\n  {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _run_outside_the_project(tmp_path_factory, monkeypatch):
    """Every test starts in an empty directory: an output a test forgot to point into tmp_path (a headline or a
    detail report: their defaults are relative paths) lands there, never in the project's artifacts/."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def write_pair(root: Path, item_id, size: int = 64) -> None:
    """Real rendered tactile + RGB images for one id (file names use ``item_id`` verbatim)."""
    item = render_item(zlib.crc32(str(item_id).encode()) % 10_000, size, 2, seed=1)
    (root / "images_tac").mkdir(parents=True, exist_ok=True)
    (root / "images_rgb").mkdir(parents=True, exist_ok=True)
    Image.fromarray(item.tactile).save(root / "images_tac" / f"image_{item_id}_tac.jpg")
    Image.fromarray(item.rgb).save(root / "images_rgb" / f"image_{item_id}_rgb.jpg")


def write_captions(root: Path, rows: list[tuple]) -> Path:
    path = root / "captions.csv"
    cols = ["index", "caption", "sensor"][: len(rows[0])] if rows else ["index", "caption"]
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path


def write_dataset(root: Path) -> Path:
    """20 good pairs with captions and sensors, no split file."""
    for i in range(20):
        write_pair(root, i)
    write_captions(root, [(i, "smooth, glossy, hard", i % 2) for i in range(20)])
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """20 good pairs with captions and sensors, no split file."""
    return write_dataset(tmp_path / "ds")


def make_params(tmp_path: Path, root: Path, **prepare) -> Params:
    """Params with every output under tmp_path; ``prepare`` overrides (dotted names as nested dicts)."""
    raw = {
        "data": {"root": str(root)},
        "prepare": {"out_dir": str(tmp_path / "prepared"),
                    "quarantine_csv": str(tmp_path / "reports/prepare/quarantine.csv"),
                    "augment": {"copies": 1}, **prepare},
        "validation": {"reports_dir": str(tmp_path / "reports/validation"),
                       "data_docs_dir": str(tmp_path / "reports/data_docs")},
    }
    return parse_params(raw)


def outputs_under(tmp: Path, **sections) -> dict:
    """Raw params with every path that defaults into the project's outputs (artifacts/, embeddings/, data/)
    moved under ``tmp``, then ``sections`` merged over them (what a test sets itself wins).  A stage a test runs
    can then write nowhere else, even through a key the test did not think of (a headline, a build report)."""
    from touchvl.params import parse_params

    raw: dict = {}

    def walk(value, keys: tuple[str, ...]) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, keys + (key,))
        elif isinstance(value, Path) and value.parts and value.parts[0] in OUTPUT_ROOTS:
            node = raw
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = str(tmp / value)

    walk(parse_params({}).model_dump(), ())
    return _merged(raw, sections)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def built(tmp_path, dataset):
    """A whole small pipeline run (prepare, embed, projector, no index yet) with outputs under tmp_path."""
    return build_pipeline(tmp_path, dataset)


def build_pipeline(tmp_path: Path, dataset: Path) -> Params:
    """prepare, embed, both projector stages on ``dataset``, every output under ``tmp_path`` (no index yet)."""
    from tasks import embed, prepare, train_projector

    params = parse_params({
        "data": {"root": str(dataset)},
        # every output under tmp_path: a default relative path would write into the project's own artifacts/
        "prepare": {"out_dir": str(tmp_path / "prepared"), "quarantine_csv": str(tmp_path / "q.csv"),
                    "headline": str(tmp_path / "metrics/data.json"), "augment": {"copies": 1}},
        # random weights: these tests are about plumbing (tests/test_smoke_encoder.py covers the pretrained encoder)
        "embed": {"random_weights": True, "out_dir": str(tmp_path / "emb"), "cache_dir": str(tmp_path / "emb/cache"),
                  "summary": str(tmp_path / "emb/summary.json"), "metrics": str(tmp_path / "emb/encoder.json"),
                  "headline": str(tmp_path / "metrics/encoder.json"), "text_search": str(tmp_path / "emb/text.json")},
        "projector": {"dim": 32, "depth": 1, "val_fraction": 0.3, "out_dir": str(tmp_path / "proj"),
                      "projected_dir": str(tmp_path / "emb/embeddings_tac_projected"),
                      "metrics": str(tmp_path / "metrics/projector.json"), "history_dir": str(tmp_path / "metrics"),
                      "headline": str(tmp_path / "metrics/retrieval.json")},
        "train_stage1": {"epochs": 2, "batch_size": 8},
        "train_stage2": {"epochs": 1, "batch_size": 8},
        "index": {"out_dir": str(tmp_path / "index"), "metrics": str(tmp_path / "metrics/index.json"),
                  "build_report": str(tmp_path / "index/build.json"),
                  "gallery": str(tmp_path / "gallery.html"), "gallery_queries": 3,
                  "search": {"k": 3, "min_cos": -1.0}},
        "validation": {"reports_dir": str(tmp_path / "val"), "build_data_docs": False},
    })
    prepare.run(params)
    embed.run(params)
    train_projector.run_stage1(params)
    train_projector.run_stage2(params)
    return params


def build_indexed_pipeline(tmp_path: Path, captions: list[str], ids: int) -> Params:
    """:func:`build_pipeline` on ``ids`` generated pairs (captions cycled, two sensors) and then the index."""
    from tasks import index

    root = tmp_path / "ds"
    for i in range(ids):
        write_pair(root, i)
    write_captions(root, [(i, captions[i % len(captions)], i % 2) for i in range(ids)])
    params = build_pipeline(tmp_path, root)
    index.run(params)
    return params
