"""Validator speed against a bare parse of the same file, and its memory, at 5k and N examples.

    .venv/bin/python -m bench.jsonl [--examples 50000] [--runs 3]

Two files of each size, both with one 128x128 JPEG data URL per example (the validator decodes it) and
distinct texts on every line (no token-count cache hit but the system prompt):

* ``repeated_image``: the same image on every line (bench/jsonl.py's generator since the start) -- the
  validator decodes it once and reuses the outcome (the same bytes decode the same way);
* ``distinct_images``: a different image on every line (its colour) -- every line's image is decoded.

Time: in each of ``--runs`` rounds, a bare ``json.loads`` pass, a bare ``orjson.loads`` pass (read the file
line by line, parse, nothing else) and ``validate_file`` over the same file, in this process; min and median
of the rounds, and the ratio validator / json.loads -- the headline: wall-clock seconds, one process.  Each
pass's CPU time (``time.process_time``: this process's own) is written beside it, with the CPU ratio: on a
shared machine the other work's share of the cores moves the wall seconds more than the CPU seconds.  Then,
labelled ``multi_process`` and kept apart from the headline, ``validate_file(workers=--workers)`` (forked
processes, one chunk each) in the same rounds: wall seconds only (the children's CPU is not this process's).
No tracemalloc while timing (it slows the validator about 4x).  Memory: tracemalloc's peak of one more
``validate_file`` run, on its own, one process.  The load average (``os.getloadavg``) before and after is
printed and written: it says how much to trust the seconds.  Writes bench/results/jsonl.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import orjson
from PIL import Image

from touchvl import disk
from touchvl.chat.messages import jpeg_data_url
from touchvl.chat.validate import validate_file

GOAL_RATIO = 3.0  # issue 21: 50k examples validated in at most 3x a bare json.loads pass


def _data_url(colour: tuple[int, int, int]) -> str:
    return jpeg_data_url(Image.new("RGB", (128, 128), colour), quality=75)  # PIL's default JPEG quality


def write_file(path: Path, n: int, distinct_images: bool = False) -> None:
    url = _data_url((90, 120, 200))
    with open(path, "w") as fh:
        for i in range(n):
            if distinct_images:
                url = _data_url((i % 256, (i // 256) % 256, (i // 65536) % 256))
            fh.write(json.dumps({"messages": [
                {"role": "system", "content": "You describe how things feel."},
                {"role": "user", "content": [{"type": "text", "text": f"Item {i}: how does it feel?"},
                                             {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]},
                {"role": "assistant", "content": f"It feels smooth, hard and glossy (item {i})."}]}) + "\n")


def bare_pass(path: Path, loads) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of reading ``path`` line by line and parsing each line, nothing else."""
    start, cpu = time.perf_counter(), time.process_time()
    with open(path, "rb") as fh:
        for raw in fh:
            loads(raw)
    return time.perf_counter() - start, time.process_time() - cpu


def validate_pass(path: Path, workers: int = 1) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``validate_file``; the file must be valid."""
    start, cpu = time.perf_counter(), time.process_time()
    report = validate_file(path, workers=workers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert report.ok, report.errors[:3]
    return seconds, cpu


def heap_peak(path: Path) -> int:
    tracemalloc.start()
    try:
        assert validate_file(path).ok
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _stats(values: list[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "runs": [round(v, 3) for v in values]}


def _ratio(a: list[float], b: list[float]) -> dict:
    return {"min": round(min(a) / min(b), 2), "median": round(statistics.median(a) / statistics.median(b), 2)}


def measure(path: Path, n: int, runs: int, workers: int) -> dict:
    bare_pass(path, json.loads)  # the file into the page cache, the parsers warm
    passes = {"json_loads": lambda: bare_pass(path, json.loads), "orjson_loads": lambda: bare_pass(path, orjson.loads),
              "validate": lambda: validate_pass(path)}
    wall = {k: [] for k in passes}
    cpu = {k: [] for k in passes}
    parallel: list[float] = []
    for _ in range(runs):  # interleaved: a drift in the machine's load hits all of them alike
        for name, run in passes.items():
            seconds, cpu_seconds = run()
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        parallel.append(validate_pass(path, workers)[0])
    out = {"examples": n, "file_mb": round(path.stat().st_size / 2**20, 1),
           **{f"{k}_s": _stats(v) for k, v in wall.items()}}
    v, j, o = wall["validate"], wall["json_loads"], wall["orjson_loads"]
    out["ratio_vs_json_loads"] = _ratio(v, j)  # the headline
    out["ratio_vs_orjson_loads"] = _ratio(v, o)
    out["examples_per_s"] = round(n / min(v))
    out["cpu"] = {**{f"{k}_s": _stats(t) for k, t in cpu.items()},
                  "ratio_vs_json_loads": _ratio(cpu["validate"], cpu["json_loads"])}
    out["multi_process"] = {"workers": workers, "validate_s": _stats(parallel), "ratio_vs_json_loads": _ratio(parallel, j)}
    out["heap_peak_mb"] = round(heap_peak(path) / 2**20, 2)  # its own run, after the timed ones
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (at least 3)")
    ap.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 1),
                    help="processes of the multi-process figure (default: the CPUs, at least 2)")
    args = ap.parse_args()
    runs = max(3, args.runs)
    result = {"python": platform.python_version(), "cpus": os.cpu_count(), "runs": runs, "workers": args.workers,
              "load_average_before": [round(x, 2) for x in os.getloadavg()], "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("repeated_image", "distinct_images"):
            result["files"][kind] = {}
            for n in (5_000, args.examples):
                path = Path(tmp) / f"{kind}_{n}.jsonl"
                write_file(path, n, distinct_images=kind == "distinct_images")
                r = result["files"][kind][str(n)] = measure(path, n, runs, args.workers)
                print(f"{kind:>15} {n:>7} examples ({r['file_mb']} MB): validate min {r['validate_s']['min']} s / "
                      f"median {r['validate_s']['median']} s; json.loads {r['json_loads_s']['min']} / "
                      f"{r['json_loads_s']['median']} s, orjson.loads {r['orjson_loads_s']['min']} / "
                      f"{r['orjson_loads_s']['median']} s; validator / json.loads {r['ratio_vs_json_loads']['min']}x "
                      f"(min) {r['ratio_vs_json_loads']['median']}x (median); {r['examples_per_s']}/s; "
                      f"heap peak {r['heap_peak_mb']} MB", flush=True)
                c, m = r["cpu"], r["multi_process"]
                print(f"{'':>15} {'':>7} CPU seconds: validate {c['validate_s']['min']} / {c['validate_s']['median']}, "
                      f"json.loads {c['json_loads_s']['min']} / {c['json_loads_s']['median']}: "
                      f"{c['ratio_vs_json_loads']['min']}x (min) {c['ratio_vs_json_loads']['median']}x (median); "
                      f"multi-process ({m['workers']} workers, wall) {m['validate_s']['min']} / {m['validate_s']['median']} s: "
                      f"{m['ratio_vs_json_loads']['min']}x (min) {m['ratio_vs_json_loads']['median']}x (median)", flush=True)
                path.unlink()
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    big = result["files"]["repeated_image"][str(args.examples)]["ratio_vs_json_loads"]
    distinct = result["files"]["distinct_images"][str(args.examples)]["ratio_vs_json_loads"]
    result["goal"] = {"ratio_vs_json_loads_max": GOAL_RATIO, "examples": args.examples,
                      "measured_as": "median wall-clock seconds, one process, validator / json.loads",
                      "met_repeated_image": big["median"] <= GOAL_RATIO,
                      "met_distinct_images": distinct["median"] <= GOAL_RATIO}
    disk.write_json(Path(__file__).parent / "results" / "jsonl.json", result)
    print(f"load average (1, 5, 15 min) before {result['load_average_before']}, after {result['load_average_after']} "
          f"on {result['cpus']} CPUs")
    print(f"goal: validator <= {GOAL_RATIO}x json.loads at {args.examples} examples (median): "
          f"repeated image {big['median']}x {'met' if result['goal']['met_repeated_image'] else 'NOT met'}, "
          f"distinct images {distinct['median']}x {'met' if result['goal']['met_distinct_images'] else 'NOT met'} "
          f"(wall, one process; CPU seconds: repeated image "
          f"{result['files']['repeated_image'][str(args.examples)]['cpu']['ratio_vs_json_loads']['median']}x, distinct images "
          f"{result['files']['distinct_images'][str(args.examples)]['cpu']['ratio_vs_json_loads']['median']}x)")


if __name__ == "__main__":
    main()
