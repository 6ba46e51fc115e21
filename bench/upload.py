"""Concurrent uploader vs a sequential loop (the original toolkit's way) against the local OSS test
server with injected latency; then a rerun that should send 0 bytes.

    .venv/bin/python -m bench.upload [--files 200] [--latency 0.02] [--workers 16]
Writes bench/results/upload.json and prints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import os
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
    args = ap.parse_args()
    os.environ.setdefault("OSS_ACCESS_KEY_ID", "bench-key")
    os.environ.setdefault("OSS_ACCESS_KEY_SECRET", "bench-secret")
    state = OssState({os.environ["OSS_ACCESS_KEY_ID"]: os.environ["OSS_ACCESS_KEY_SECRET"]}, {"bench"},
                     Faults(latency_s=args.latency))
    with tempfile.TemporaryDirectory() as tmp, OssServer(state) as server:
        blobs = []
        for i in range(args.files):
            path = Path(tmp) / f"image_{i}_tac.jpg"
            path.write_bytes(os.urandom(args.size))
            blobs.append(Blob(f"tac/{path.name}", path, args.size, hashlib.md5(path.read_bytes()).hexdigest()))
        # the original image2cloud.py: one bucket, one put_object_from_file after another
        bucket = oss2.Bucket(oss2.Auth(os.environ["OSS_ACCESS_KEY_ID"], os.environ["OSS_ACCESS_KEY_SECRET"]),
                             server.endpoint, "bench")
        start = time.perf_counter()
        for blob in blobs:
            bucket.put_object_from_file("seq/" + blob.key, str(blob.path))
        sequential = time.perf_counter() - start
        storage = OssStorage(UploadParams(backend="oss", endpoint=server.endpoint, bucket="bench", workers=args.workers,
                                          manifest=Path(tmp) / "m.csv"))
        start = time.perf_counter()
        first = upload_all(storage, blobs, {}, args.workers, "tac/")
        concurrent = time.perf_counter() - start
        state.bytes_received = 0
        start = time.perf_counter()
        rerun = upload_all(storage, blobs, first.records, args.workers, "tac/")
        rerun_s = time.perf_counter() - start
    result = {"files": args.files, "file_bytes": args.size, "latency_s": args.latency, "workers": args.workers,
              "sequential_s": round(sequential, 3), "concurrent_s": round(concurrent, 3),
              "speedup": round(sequential / concurrent, 1), "rerun_s": round(rerun_s, 4),
              "rerun_objects_sent": rerun.sent, "rerun_bytes_received_by_server": state.bytes_received}
    disk.write_json(Path(__file__).parent / "results" / "upload.json", result)
    for key, value in result.items():
        print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
