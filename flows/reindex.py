"""The nightly re-index flow: find new, changed and deleted images under ``data.root``, bring
prepare → embed → projector → index up to date through DVC, and publish what changed.

Embedding is incremental through the content-hash cache (only new or changed images are
encoded) and the RGB index through ``add_with_ids`` / ``remove_ids``; the report artifact
(``reindex-report``) gives the image diff, how many pairs were embedded, the index sizes and
modes, the duration and the test retrieval metrics before and after.

    .venv/bin/python -m flows.reindex [--repo .]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import build
from touchvl import disk
from touchvl.params import load_params

STAGES = ["prepare", "embed", "train_projector_stage1", "train_projector_stage2", "index"]


def snapshot(root: Path) -> dict[str, str]:
    """Image file -> sha256 for everything under images_tac/ and images_rgb/."""
    return {p.relative_to(root).as_posix(): disk.sha256_file(p)
            for folder in ("images_tac", "images_rgb") for p in sorted((root / folder).glob("*")) if p.is_file()}


def diff(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    return {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
            "changed": sorted(k for k in set(before) & set(after) if before[k] != after[k])}


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@flow(name="reindex", log_prints=True)
def reindex(repo: str = ".") -> dict:
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")
    data_root = params.data.root if params.data.root.is_absolute() else root / params.data.root
    snapshot_path = root / "artifacts/reindex/snapshot.json"
    changes = diff(_read(snapshot_path), snapshot(data_root))
    index_metrics = root / params.index.metrics
    before = _read(index_metrics).get("tac_to_rgb", {}).get("index")
    start = time.perf_counter()
    build(str(root), stages=STAGES)
    after_metrics = _read(index_metrics)
    report = {"added": len(changes["added"]), "removed": len(changes["removed"]), "changed": len(changes["changed"]),
              "embedded_now": _read(root / params.embed.summary).get("embedded_now"),
              "index": _read(root / params.index.build_report), "duration_s": round(time.perf_counter() - start, 1),
              "retrieval_before": before, "retrieval_after": after_metrics.get("tac_to_rgb", {}).get("index")}
    disk.write_json(snapshot_path, snapshot(data_root))
    create_markdown_artifact(key="reindex-report", description="nightly re-index", markdown="\n".join([
        "# Nightly re-index", "",
        f"- images: +{report['added']} added, {report['changed']} changed, -{report['removed']} removed",
        f"- pairs embedded this run: {report['embedded_now']}", f"- duration: {report['duration_s']} s",
        f"- indexes: {json.dumps(report['index'])}",
        f"- test tactile→RGB retrieval before: {report['retrieval_before']}",
        f"- after: {report['retrieval_after']}"]))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.reindex")
    ap.add_argument("--repo", default=".")
    print(json.dumps(reindex(ap.parse_args().repo), indent=2))


if __name__ == "__main__":
    main()
