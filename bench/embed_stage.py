"""The embed stage as DVC runs it: a full run from an empty vector cache vs a fully cached rerun, each a fresh
``bin/stage embed`` process (imports, model build, validation, writes: everything a user waits for).

    .venv/bin/python -m bench.embed_stage [--runs 3]       # after `make repro` (needs data/prepared, the smoke encoder)

Every output goes to a temp folder (the project's embeddings are untouched). Prints the load average, min and
median of each, and the ratio (goal, issue 21: a fully cached rerun <= 10 % of a full run); writes
bench/results/embed_stage.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp: Path, cache: Path) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["embed"].update(out_dir=str(tmp / "emb"), cache_dir=str(cache), summary=str(tmp / "summary.json"),
                        metrics=str(tmp / "encoder.json"), headline=str(tmp / "headline.json"),
                        text_search=str(tmp / "text_search.json"))
    raw["validation"].update(reports_dir=str(tmp / "val"), data_docs_dir=str(tmp / "docs"))
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(params: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    subprocess.run([str(ROOT / "bin/stage"), "embed", "--params", str(params)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, json.loads((params.parent / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    load_before = os.getloadavg()
    full, cached = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for _ in range(args.runs):  # interleaved: a load change hits both sides alike
            shutil.rmtree(tmp / "cache", ignore_errors=True)
            params = _params(tmp, tmp / "cache")
            seconds, summary = _run(params)
            assert summary["embedded_now"] == summary["pairs"], summary  # a real full run
            full.append(seconds)
            seconds, summary = _run(params)
            assert summary["embedded_now"] == 0, summary  # fully cached
            cached.append(seconds)
    pairs = summary["pairs"]
    result = {"pairs": pairs, "full_s": full, "cached_s": cached, "load_avg_before": load_before,
              "load_avg_after": os.getloadavg(), "cpus": os.cpu_count(),
              "cached_over_full_min": min(cached) / min(full),
              "cached_over_full_median": statistics.median(cached) / statistics.median(full)}
    out = ROOT / "bench/results/embed_stage.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"embed stage, {pairs} pairs, {args.runs} runs each, load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"  full run (empty cache): min {min(full):.1f} s, median {statistics.median(full):.1f} s")
    print(f"  fully cached rerun:     min {min(cached):.1f} s, median {statistics.median(cached):.1f} s")
    print(f"  cached / full: {result['cached_over_full_min']:.1%} (min), {result['cached_over_full_median']:.1%} "
          "(median); goal <= 10 %")


if __name__ == "__main__":
    main()
