"""Files on disk: atomic writes, and the one reader (and writer) of each on-disk data contract.

Writes go to a temp file in the target folder, are fsynced, then renamed: a crash mid-write leaves the
previous file intact (never a half-written one), so reruns are safe.

Data contracts read here and nowhere else:

* the manifest (``data/prepared/manifest.csv``, :data:`MANIFEST_COLUMNS`): :func:`read_manifest`,
  :func:`evaluation_rows` (the test split's originals, what every metric is computed on);
* an embeddings folder (``all_embeddings.npy`` [N, D] float32 + ``all_indices.npy`` [N] int64 uids, and
  optionally ``meta.json``): :func:`read_vectors` / :func:`write_vectors`, :func:`read_meta`, and the embed
  output's ``sensor_ids.npy`` (row-aligned with ``embeddings_tac``): :func:`read_sensor_ids`;
* JSON files: :func:`read_json`; JSON Lines data files (chat fine-tuning files, question sets): :func:`read_jsonl`
  (UTF-8 with or without a BOM, as the validator accepts them; append-only logs that tolerate a torn last line
  are not data files and keep their own forgiving readers).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pandas as pd

from touchvl.errors import StageError

log = logging.getLogger(__name__)
TEMP_SUFFIX = ".tmp"  # what atomic_open names its temporary files: .<name>.<random>.tmp beside the target
MANIFEST_COLUMNS = ["uid", "id", "source_id", "copy", "split", "sensor_id", "tac_path", "rgb_path", "caption", "aug"]
MANIFEST_INT_COLUMNS = ("uid", "source_id", "copy", "sensor_id")


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "w", **kwargs) -> Iterator[IO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
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


def remove_stale_temps(*paths: Path | str) -> list[Path]:
    """Delete what a killed run left of its atomic writes, before a stage writes again; returns what went.

    A folder the stage owns (``embeddings/embeddings_tac``, ``artifacts/index``): every ``*.tmp`` file in it, at any
    depth -- DVC would otherwise hash it as part of the output.  A file (existing or not): only its own temporaries
    beside it (``.<name>.*.tmp``), so a folder other stages also write into (``artifacts/metrics``) is left alone.
    Called at the start of a stage, when nothing else writes there (DVC holds its lock).
    """
    removed = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [f for f in path.rglob(f"*{TEMP_SUFFIX}") if f.is_file() or f.is_symlink()]
        elif path.parent.is_dir():
            found = [f for f in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}") if f.is_file()]
        else:
            found = []
        for f in found:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                removed.append(f)
    if removed:
        log.info("removed %d temporary file(s) a killed run left: %s", len(removed),
                                         ", ".join(str(f) for f in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


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


HASH_MEMO_ENV = "TOUCHVL_HASH_MEMO"


def hash_memo_path() -> Path:
    """The user-level memo of large files' hashes ($TOUCHVL_HASH_MEMO, else $XDG_CACHE_HOME/touchvl/file_hashes.json)."""
    if os.environ.get(HASH_MEMO_ENV):
        return Path(os.environ[HASH_MEMO_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "touchvl" / "file_hashes.json"


def sha256_file_memo(path: Path | str) -> str:
    """sha256 of a large file, remembered across processes by (path, device, inode, size, mtime) as git and DVC
    remember theirs: a 4.5 GB checkpoint is hashed once, not on every stage run.  Rewriting the file changes its
    mtime (and usually its inode), so it is hashed again; a memo that cannot be read or written is ignored."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = hash_memo_path()
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    known = memo.get(key)
    if isinstance(known, str) and len(known) == 64:
        return known
    digest = sha256_file(path)
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")}  # the file's older versions go
    memo[key] = digest
    with contextlib.suppress(OSError):  # a read-only home: hash on every run, as before
        write_json(memo_file, memo)
    return digest


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


# ---------------------------------------------------------------------------------------------- readers


def read_json(path: Path | str, default=None):
    """The decoded file, or ``default`` when it does not exist (a corrupt file is an error, not a default)."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); remove it or rerun the stage that writes it") from None


def read_jsonl(path: Path | str) -> Iterator[tuple[str, object]]:
    """``(where, value)`` for each non-blank line (``where`` is ``path:line``); a line that is not JSON, or a file
    that cannot be read or is not UTF-8, is a StageError naming the file and line.  A leading BOM is accepted
    (editors on Windows write one): the validator accepts such a file, so every reader of it must too."""
    path = Path(path)
    try:
        fh = open(path, "rb")  # bytes, decoded line by line: a decoding error names its own line
    except OSError as exc:
        raise StageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise StageError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise StageError(f"{where}: not valid JSON ({exc})") from None
            yield where, value


def read_manifest(path: Path | str) -> pd.DataFrame:
    """The prepared manifest with its columns checked and the id columns as int64."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: manifest not found (run `dvc repro prepare`)")
    frame = pd.read_csv(path, keep_default_na=False, dtype={"id": str, "split": str, "caption": str, "aug": str,
                                                             "tac_path": str, "rgb_path": str})
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise StageError(f"{path}: not a manifest of this version (missing columns {missing}); rerun `dvc repro prepare`")
    try:
        return frame.astype({c: "int64" for c in MANIFEST_INT_COLUMNS})
    except (ValueError, TypeError) as exc:
        raise StageError(f"{path}: non-integer value in an id column ({exc})") from None


def evaluation_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows every evaluation uses: the test split's originals (copy 0), never an augmented copy."""
    return manifest[(manifest["split"] == "test") & (manifest["copy"] == 0)]


def read_vectors(folder: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors [N, D] float32, uids [N] int64)`` of an embeddings folder, checked to agree."""
    folder = Path(folder)
    try:
        vectors = np.load(folder / "all_embeddings.npy", allow_pickle=False)
        ids = np.load(folder / "all_indices.npy", allow_pickle=False)
    except FileNotFoundError as exc:
        raise StageError(f"{exc.filename}: missing (run the stage that writes it: `dvc repro`)") from None
    except ValueError as exc:
        raise StageError(f"{folder}: unreadable embeddings ({exc})") from None
    if vectors.ndim != 2 or ids.ndim != 1 or len(vectors) != len(ids):
        raise StageError(f"{folder}: all_embeddings.npy {vectors.shape} and all_indices.npy {ids.shape} do not "
                         f"describe the same rows (rerun the stage that writes them)")
    return vectors, ids.astype(np.int64, copy=False)


def read_sensor_ids(embeddings_dir: Path | str, rows: int) -> np.ndarray:
    """``sensor_ids.npy`` of an embed output (int64 [rows], aligned with ``embeddings_tac``'s rows), checked."""
    path = Path(embeddings_dir) / "sensor_ids.npy"
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StageError(f"{path}: missing (run the stage that writes it: `dvc repro embed`)") from None
    except ValueError as exc:
        raise StageError(f"{path}: unreadable ({exc})") from None
    if ids.shape != (rows,) or not np.issubdtype(ids.dtype, np.integer):
        raise StageError(f"{path}: {ids.dtype} {ids.shape} does not match the {rows} tactile embeddings "
                         f"(rerun `dvc repro embed`)")
    return ids.astype(np.int64, copy=False)


def write_vectors(folder: Path | str, vectors: np.ndarray, ids: np.ndarray, meta: dict | None = None) -> None:
    folder = Path(folder)
    save_npy(folder / "all_embeddings.npy", np.asarray(vectors, dtype=np.float32))
    save_npy(folder / "all_indices.npy", np.asarray(ids, dtype=np.int64))
    if meta is not None:
        write_json(folder / "meta.json", meta)


def read_meta(folder: Path | str) -> dict:
    meta = read_json(Path(folder) / "meta.json")
    if meta is None:
        raise StageError(f"{Path(folder) / 'meta.json'}: missing (run the stage that writes it: `dvc repro`)")
    return meta


def save_npy(path: Path | str, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array)


def write_checkpoint(path: Path | str, checkpoint: dict) -> None:
    """A torch checkpoint of plain tensors and dicts (readable with ``weights_only=True``), atomically."""
    import torch

    with atomic_open(path, "wb") as fh:
        torch.save(checkpoint, fh)


def read_checkpoint(path: Path | str, stage_hint: str = "") -> dict:
    """A checkpoint written by :func:`write_checkpoint` (tensors only: never unpickles code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        hint = f" (run `dvc repro {stage_hint}`)" if stage_hint else ""
        raise StageError(f"{path}: checkpoint not found{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise StageError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
