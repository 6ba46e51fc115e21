"""A failing ``prepare`` under the real ``dvc repro`` keeps the previous ``data/prepared`` (and DVC stays honest).

DVC deletes a stage's outputs before running its command unless they are ``persist: true``; prepare's output
is persistent and swapped in atomically by prepare itself, so a failed run leaves the previous folder, and
dvc.lock still describes it.
"""
import hashlib
import shutil
from pathlib import Path

import yaml

from tests.test_dvc_pipeline import repo, sh  # noqa: F401  (the throwaway git + DVC repo fixture)


def _digests(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _set_prepare(repo_dir: Path, **values) -> None:
    params = yaml.safe_load((repo_dir / "params.yaml").read_text())
    params["prepare"].update(values)
    (repo_dir / "params.yaml").write_text(yaml.safe_dump(params))


def test_failed_prepare_under_dvc_repro_keeps_previous_output(repo):  # noqa: F811
    first = sh("dvc", "repro", "prepare", cwd=repo)
    assert first.returncode == 0, first.stderr + first.stdout
    prepared = repo / "data/prepared"
    before, lock = _digests(prepared), (repo / "dvc.lock").read_text()
    assert any("_aug1_" in name for name in before)

    _set_prepare(repo, min_image_side=100)  # the sample's 48 px images: every id quarantined, the stage fails
    failed = sh("dvc", "repro", "prepare", cwd=repo)
    assert failed.returncode != 0
    assert "ids quarantined" in failed.stderr + failed.stdout and "Traceback" not in failed.stderr
    assert _digests(prepared) == before  # the previous output survived dvc's run
    assert (repo / "dvc.lock").read_text() == lock  # and dvc.lock still describes it
    quarantine = (repo / "artifacts/reports/prepare/quarantine.csv").read_text()
    assert "image_too_small" in quarantine  # the failed run's report is there to read
    status = sh("dvc", "status", "prepare", cwd=repo)
    assert "changed" in status.stdout  # not "up to date": the failure is not mistaken for a fresh output
    assert "data/prepared" not in status.stdout  # ... and the output itself still matches dvc.lock

    # the documented recovery, should the folder be lost anyway (deleted by hand, a DVC version that removes it)
    shutil.rmtree(prepared)
    restored = sh("dvc", "checkout", "data/prepared", cwd=repo)
    assert restored.returncode == 0, restored.stderr
    assert _digests(prepared) == before

    # persist does not keep stale files: the next good run replaces the whole folder
    _set_prepare(repo, min_image_side=16, augment={**yaml.safe_load((repo / "params.yaml").read_text())
                                                     ["prepare"]["augment"], "copies": 0})
    again = sh("dvc", "repro", "prepare", cwd=repo)
    assert again.returncode == 0, again.stderr + again.stdout
    after = _digests(prepared)
    assert after and not any("_aug" in name for name in after)
    assert (repo / "dvc.lock").read_text() != lock
    assert "up to date" in sh("dvc", "status", "prepare", cwd=repo).stdout
