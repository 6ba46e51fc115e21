"""The manifest's images to object storage, idempotently and concurrently, plus their URLs (``upload``'s core).

Writes ``artifacts/upload/manifest.csv`` (destination, key, local_path, size, md5, etag, uploaded_at) and
``artifacts/upload/image_url_mapping.csv`` (``index,tac_url,rgb_url,source_id``; index = manifest uid, source_id = the dataset id).

The upload manifest is keyed by destination (:attr:`Storage.destination`: backend, endpoint, bucket or
folder; the prefix is part of every key): an object recorded *at this destination* with the same MD5 is
skipped without a request, and records of another destination are never taken as proof that an object is
stored here.  What is not recorded is checked against one listing of the destination (objects an earlier run
or another machine stored) and uploaded when missing.  A run with failures keeps what succeeded, names the
failed keys and exits non-zero; the next run sends only what is missing.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from touchvl import disk
from touchvl.errors import StageError
from touchvl.storage.backends import Blob, Storage, StorageError

log = logging.getLogger(__name__)
RECORD_COLUMNS = ["destination", "key", "local_path", "size", "md5", "etag", "uploaded_at"]


@dataclass(frozen=True)
class UploadRecord:
    destination: str
    key: str
    local_path: str
    size: int
    md5: str
    etag: str
    uploaded_at: str


@dataclass
class UploadResult:
    records: dict[str, UploadRecord]
    failures: dict[str, str]  # key -> reason
    sent: int  # objects sent this run
    sent_bytes: int
    skipped: int


def object_key(prefix: str, kind: str, path: str) -> str:
    return f"{prefix}{kind}/{Path(path).name}"


def plan_blobs(manifest: pd.DataFrame, prefix: str) -> list[Blob]:
    blobs: dict[str, Blob] = {}
    for kind in ("tac", "rgb"):
        for path in manifest[f"{kind}_path"]:
            key = object_key(prefix, kind, path)
            if key in blobs and blobs[key].path != Path(path):
                raise StageError(f"two files map to object key {key}: {blobs[key].path} and {path}")
            if key not in blobs:
                blobs[key] = Blob(key, Path(path), Path(path).stat().st_size, disk.md5_file(path))
    return list(blobs.values())


def upload_all(storage: Storage, blobs: list[Blob], previous: dict[str, UploadRecord], workers: int,
               prefix: str = "") -> UploadResult:
    """Upload what is not already stored with the same MD5; never raises for one object's failure."""
    now = lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    records = dict(previous)
    result = UploadResult(records, {}, 0, 0, 0)
    todo = []
    for blob in blobs:
        known = previous.get(blob.key)
        if known and known.md5 == blob.md5 and known.size == blob.size:
            result.skipped += 1
        else:
            todo.append(blob)
    if todo:  # objects stored by an earlier run or another machine: one listing instead of a HEAD each
        remote = storage.list_etags(prefix)
        for blob in list(todo):
            if remote.get(blob.key, "").upper() == blob.md5.upper():
                records[blob.key] = UploadRecord(storage.destination, blob.key, str(blob.path), blob.size, blob.md5,
                                                 remote[blob.key], now())
                result.skipped += 1
                todo.remove(blob)

    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=sum(b.size for b in todo), unit="B", unit_scale=True, desc="upload") as bar:
        futures = {pool.submit(storage.put, blob): blob for blob in todo}
        for future in as_completed(futures):
            blob = futures[future]
            bar.update(blob.size)
            try:
                etag = future.result()
            except StorageError as exc:
                result.failures[blob.key] = str(exc)
                continue
            records[blob.key] = UploadRecord(storage.destination, blob.key, str(blob.path), blob.size, blob.md5, etag, now())
            result.sent += 1
            result.sent_bytes += blob.size
    return result


def read_all_records(path: Path) -> list[UploadRecord]:
    """Every record of the upload manifest, all destinations (a manifest without destinations yields none)."""
    if not path.is_file():
        return []
    frame = pd.read_csv(path, dtype={"size": "int64"}, keep_default_na=False)
    if "destination" not in frame.columns:  # written before records were keyed by destination: proves nothing
        log.warning("%s has no destination column (an older version): checking the destination's listing instead", path)
        return []
    return [UploadRecord(**{c: r[c] for c in RECORD_COLUMNS}) for r in frame.to_dict("records")]


def read_records(path: Path, destination: str) -> dict[str, UploadRecord]:
    """The records of one destination, by key."""
    return {r.key: r for r in read_all_records(path) if r.destination == destination}


def write_records(path: Path, destination: str, records: dict[str, UploadRecord]) -> None:
    """This destination's records replace its old ones; other destinations' records are kept as they were."""
    others = [r for r in read_all_records(path) if r.destination != destination]
    rows = [asdict(r) for r in sorted(others + list(records.values()), key=lambda r: (r.destination, r.key))]
    disk.write_csv(path, pd.DataFrame(rows, columns=RECORD_COLUMNS))


def stored_objects_table(blobs: list[Blob], records: dict[str, UploadRecord], listing: dict[str, str]) -> pd.DataFrame:
    """One row per object the mapping points at: is it stored at the destination, with the recorded MD5 and ETag?"""
    rows = []
    for blob in blobs:
        record = records.get(blob.key)
        stored = listing.get(blob.key)
        rows.append({"key": blob.key, "recorded": record is not None, "stored": stored is not None,
                     "md5_matches": record is not None and record.md5 == blob.md5,
                     "etag_matches": record is not None and stored is not None and stored.upper() == record.etag.upper()})
    return pd.DataFrame(rows, columns=["key", "recorded", "stored", "md5_matches", "etag_matches"])


def validation_tables(objects: pd.DataFrame, mapping: pd.DataFrame, manifest: pd.DataFrame) -> list:
    """The upload boundary: every mapped URL names a stored object with the recorded MD5; one row per uid."""
    from touchvl import checks

    gxe = checks.expect  # declared as data: a rerun on identical content replays without importing GX
    critical = dict(severity="critical")
    object_checks = [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True], **critical)
                     for c in ("recorded", "stored", "md5_matches", "etag_matches")]
    coverage = pd.DataFrame({"uid": manifest["uid"].to_numpy()})
    mapping_checks = [gxe.ExpectColumnValuesToBeUnique(column="index", **critical),
                      gxe.ExpectColumnValuesToNotBeNull(column="tac_url", **critical),
                      gxe.ExpectColumnValuesToNotBeNull(column="rgb_url", **critical)]
    coverage_checks = [gxe.ExpectColumnValuesToBeInSet(column="uid", value_set=mapping["index"].tolist(), **critical)]
    return [checks.Table("stored_objects", objects, object_checks, id_column="key"),
            checks.Table("mapping", mapping, mapping_checks, id_column="index"),
            checks.Table("mapping_coverage", coverage, coverage_checks, id_column="uid")]


def build_mapping(manifest: pd.DataFrame, prefix: str, storage: Storage,
                  mapping_dir: Path | None = None) -> pd.DataFrame:
    """One row per uid; with ``mapping_dir`` local objects are named relative to the mapping's folder."""
    return pd.DataFrame({
        "index": manifest["uid"].astype("int64"),
        "tac_url": [storage.url(object_key(prefix, "tac", p), mapping_dir) for p in manifest["tac_path"]],
        "rgb_url": [storage.url(object_key(prefix, "rgb", p), mapping_dir) for p in manifest["rgb_path"]],
        "source_id": manifest["source_id"].astype("int64"),  # the dataset id: what captions.csv `index` joins on
    })
