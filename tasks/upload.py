"""DVC stage ``upload``: the manifest's images to object storage (local folder or Aliyun OSS), plus URLs.

Writes ``artifacts/upload/manifest.csv`` (what is stored where, with MD5 and ETag) and
``artifacts/upload/image_url_mapping.csv`` (``index,tac_url,rgb_url,source_id``; index = manifest uid, source_id = the dataset id).  A run with
failures keeps what succeeded, names the failed keys and exits non-zero; the next run sends only what is
missing (core: touchvl.storage).
"""
from __future__ import annotations

import logging

from touchvl import disk
from touchvl.errors import StageError
from touchvl import checks  # light: Great Expectations is imported only when it runs
from touchvl.logs import run_stage
from touchvl.params import Params
from touchvl.storage.backends import make_storage
from touchvl.storage.upload import (UploadResult, build_mapping, plan_blobs, read_records, stored_objects_table,
                                    upload_all, validation_tables, write_records)

log = logging.getLogger(__name__)


def run(params: Params) -> UploadResult:

    p = params.upload
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    storage = make_storage(p)  # credentials are checked here, before any request
    blobs = plan_blobs(manifest, p.prefix)
    result = upload_all(storage, blobs, read_records(p.manifest, storage.destination), p.workers, p.prefix)
    write_records(p.manifest, storage.destination, result.records)  # what succeeded is kept even when some keys failed
    log.info("upload: %d sent (%d bytes), %d already stored, %d failed",
             result.sent, result.sent_bytes, result.skipped, len(result.failures))
    if result.failures:
        lines = "\n  ".join(reason for _, reason in sorted(result.failures.items())[:20])
        raise StageError(f"{len(result.failures)} object(s) failed to upload (rerun to retry only these):\n  {lines}")
    mapping = build_mapping(manifest, p.prefix, storage, p.mapping.parent)
    # checked against a fresh listing, not against our own records: a URL is published only for a stored object
    objects = stored_objects_table(blobs, result.records, storage.list_etags(p.prefix))
    checks.run_validation("upload", validation_tables(objects, mapping, manifest), params.validation).raise_if_failed()
    disk.write_csv(p.mapping, mapping)
    return result


def main(argv: list[str] | None = None) -> None:
    run_stage("upload", __doc__, lambda params, args: run(params), argv, start=checks.stage_starts)


if __name__ == "__main__":
    main()
