"""DVC stage ``prepare``: join captions to image pairs by id, quarantine bad inputs, augment, split.

Reads a dataset folder in SSVTP layout (``data.root``: ``images_tac/image_{id}_tac.jpg``,
``images_rgb/image_{id}_rgb.jpg``, ``captions.csv`` ``index,caption[,sensor]``, optional ``split.csv``); writes
``data/prepared/manifest.csv`` (one row per image pair, originals and augmented copies), prepared images under
``data/prepared/images_{tac,rgb}/``, ``artifacts/reports/prepare/quarantine.csv`` (one row per bad id) and
``summary.json``.  Bad inputs are quarantined, never fatal and never able to drop a good row; the stage fails
when the quarantined fraction exceeds ``prepare.max_bad_fraction`` (core: touchvl.data.prepare).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from touchvl import disk, headline
from touchvl.data.prepare import PrepareError, ScanResult, build_manifest, scan_dataset, threshold_error, validation_tables
from touchvl import checks  # light: Great Expectations is imported only when it runs
from touchvl.logs import run_stage
from touchvl.params import Params

log = logging.getLogger(__name__)


def _staged(path: str, final_dir: Path, staging: Path) -> str:
    """Where a manifest path lives until the staging folder is swapped in."""
    p = Path(path)
    return str(staging / p.relative_to(final_dir)) if p.is_relative_to(final_dir) else path


def run(params: Params) -> tuple[pd.DataFrame, ScanResult]:
    """Scan ``data.root``, write prepared images, manifest and quarantine; validate; return both."""

    p = params.prepare
    scan = scan_dataset(params.data.root, params.data.captions, params.data.splits, p)
    for q in scan.quarantine:
        log.warning("quarantined id %s (%s): %s %s", q.id, q.reason, q.file, q.detail)
    report_dir = p.quarantine_csv.parent
    disk.write_csv(p.quarantine_csv, scan.quarantine_frame())
    disk.write_json(report_dir / "summary.json", scan.summary())
    disk.write_json(p.headline, headline.data(scan.summary()))
    error = threshold_error(scan, p.max_bad_fraction, p.quarantine_csv)
    if scan.n_candidates == 0:
        raise PrepareError(error)
    # validated before the swap: a failing run publishes its report and leaves the previous output in place
    with disk.replace_dir(p.out_dir) as staging:
        manifest = build_manifest(scan.pairs, p, staging, p.out_dir)
        disk.write_csv(staging / "manifest.csv", manifest)
        checked = manifest.assign(tac_path=manifest["tac_path"].map(lambda s: _staged(s, p.out_dir, staging)),
                                  rgb_path=manifest["rgb_path"].map(lambda s: _staged(s, p.out_dir, staging)))
        tables = validation_tables(checked, scan.summary(), p.max_bad_fraction,
                                   max_sensor_id=p.max_sensor_id, max_image_pixels=p.max_image_pixels)
        report = checks.run_validation("prepare", tables, params.validation)
        if error:
            raise PrepareError(error)
        report.raise_if_failed()
    return manifest, scan


def main(argv: list[str] | None = None) -> None:
    def body(params: Params, args) -> None:
        manifest, scan = run(params)
        log.info("manifest: %d rows (%d source pairs, %d quarantined) -> %s",
                 len(manifest), len(scan.pairs), len(scan.quarantine), params.prepare.out_dir / "manifest.csv")

    run_stage("prepare", __doc__, body, argv, start=checks.stage_starts)


if __name__ == "__main__":
    main()
