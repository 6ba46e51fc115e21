"""Atomic file writes: write to a temp file in the target folder, fsync, then rename.

A crash mid-write leaves the previous file intact (never a half-written one), so reruns are safe.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import pandas as pd


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "w", **kwargs) -> Iterator[IO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def write_json(path: Path | str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: Path | str, df: pd.DataFrame) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, index=False, lineterminator="\n")


def save_image(path: Path | str, image, *, quality: int = 95) -> None:
    """Save a PIL image atomically; the format follows the suffix (JPEG for .jpg)."""
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None
    with atomic_open(path, "wb") as fh:
        if fmt == "JPEG":
            image.save(fh, format=fmt, quality=quality)
        else:
            image.save(fh, format=(fmt or path.suffix.lstrip(".").upper()))


def file_digest(path: Path | str, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path | str) -> str:
    return file_digest(path, "sha256")


def md5_file(path: Path | str) -> str:
    return file_digest(path, "md5")


@contextlib.contextmanager
def replace_dir(target: Path | str) -> Iterator[Path]:
    """Build a whole output folder beside ``target`` and swap it in only on success.

    Yields the staging folder.  On an exception the previous ``target`` is left untouched.
    """
    import shutil

    target = Path(target)
    staging = target.with_name(f".{target.name}.staging")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
