"""Validator throughput and memory on a large file (streaming check).

    .venv/bin/python -m bench.jsonl [--examples 50000]
Writes bench/results/jsonl.json: examples/s and Python heap peak for 5k and N examples (a
constant-memory validator's peak barely grows with N).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

from PIL import Image

from touchvl import disk
from touchvl.chat.validate import validate_file


def write_file(path: Path, n: int) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (128, 128), (90, 120, 200)).save(buf, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [
                {"role": "system", "content": "You describe how things feel."},
                {"role": "user", "content": [{"type": "text", "text": f"Item {i}: how does it feel?"},
                                             {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]},
                {"role": "assistant", "content": f"It feels smooth, hard and glossy (item {i})."}]}) + "\n")


def measure(path: Path) -> tuple[float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    report = validate_file(path)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.ok, report.errors[:3]
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=50_000)
    args = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (5_000, args.examples):
            path = Path(tmp) / f"{n}.jsonl"
            write_file(path, n)
            seconds, peak = measure(path)
            result[str(n)] = {"file_mb": round(path.stat().st_size / 2**20, 1), "seconds": round(seconds, 2),
                              "examples_per_s": round(n / seconds), "heap_peak_mb": round(peak / 2**20, 2)}
    disk.write_json(Path(__file__).parent / "results" / "jsonl.json", result)
    for n, r in result.items():
        print(f"{n:>7} examples: {r['file_mb']} MB in {r['seconds']} s ({r['examples_per_s']}/s), heap peak {r['heap_peak_mb']} MB")


if __name__ == "__main__":
    main()
