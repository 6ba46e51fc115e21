"""Concurrent uploader vs a sequential loop (the original toolkit's way) against the local OSS test
server with injected latency; then a rerun that should send 0 bytes.

Each of ``--runs`` rounds (>= 3) uploads every file once sequentially and once concurrently, each under its
own key prefix (so nothing is skipped), then reruns the concurrent upload with that round's records; min and
median of the rounds, and the load average before and after, are printed.

    .venv/bin/python -m bench.upload [--files 200] [--latency 0.02] [--workers 16] [--runs 3]
Writes bench/results/upload.json and prints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import oss2

from touchvl import disk
from touchvl.params import UploadParams
from touchvl.storage.backends import Blob, OssStorage
from touchvl.storage.upload import upload_all
from tests.oss_server import Faults, OssServer, OssState


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--size", type=int, default=20_000)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (at least 3)")
    args = ap.parse_args()
    runs = max(3, args.runs)
    os.environ.setdefault("OSS_ACCESS_KEY_ID", "bench-key")
    os.environ.setdefault("OSS_ACCESS_KEY_SECRET", "bench-secret")
    state = OssState({os.environ["OSS_ACCESS_KEY_ID"]: os.environ["OSS_ACCESS_KEY_SECRET"]}, {"bench"},
                     Faults(latency_s=args.latency))
    load_before = os.getloadavg()
    sequential, concurrent, rerun_s, rerun_sent, rerun_bytes = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, OssServer(state) as server:
        paths = []
        for i in range(args.files):
            path = Path(tmp) / f"image_{i}_tac.jpg"
            path.write_bytes(os.urandom(args.size))
            paths.append(path)
        # the original image2cloud.py: one bucket, one put_object_from_file after another
        bucket = oss2.Bucket(oss2.Auth(os.environ["OSS_ACCESS_KEY_ID"], os.environ["OSS_ACCESS_KEY_SECRET"]),
                             server.endpoint, "bench")
        storage = OssStorage(UploadParams(backend="oss", endpoint=server.endpoint, bucket="bench", workers=args.workers,
                                          manifest=Path(tmp) / "m.csv"))
        for round_ in range(runs):
            start = time.perf_counter()
            for path in paths:
                bucket.put_object_from_file(f"seq{round_}/tac/{path.name}", str(path))
            sequential.append(time.perf_counter() - start)
            blobs = [Blob(f"run{round_}/tac/{p.name}", p, args.size, hashlib.md5(p.read_bytes()).hexdigest())
                     for p in paths]
            start = time.perf_counter()
            first = upload_all(storage, blobs, {}, args.workers, f"run{round_}/tac/")
            concurrent.append(time.perf_counter() - start)
            assert first.sent == args.files, first
            state.bytes_received = 0
            start = time.perf_counter()
            rerun = upload_all(storage, blobs, first.records, args.workers, f"run{round_}/tac/")
            rerun_s.append(time.perf_counter() - start)
            rerun_sent.append(rerun.sent)
            rerun_bytes.append(state.bytes_received)
    load_after = os.getloadavg()
    stats = lambda v: {"min": round(min(v), 4), "median": round(statistics.median(v), 4)}  # noqa: E731
    result = {"files": args.files, "file_bytes": args.size, "latency_s": args.latency, "workers": args.workers,
              "runs": runs, "cpu_count": os.cpu_count(),
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in load_after],
              "sequential_s": stats(sequential), "concurrent_s": stats(concurrent),
              "speedup": {"min": round(min(sequential) / min(concurrent), 1),
                          "median": round(statistics.median(sequential) / statistics.median(concurrent), 1)},
              "rerun_s": stats(rerun_s), "rerun_objects_sent": max(rerun_sent),
              "rerun_bytes_received_by_server": max(rerun_bytes)}
    disk.write_json(Path(__file__).parent / "results" / "upload.json", result)
    for key, value in result.items():
        print(f"{key:32s} {value}")

if __name__ == "__main__":
    main()
