"""Prefect build flow over the real DVC pipeline in a throwaway git repo (one harness per session)."""
import json

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import build, stage_order
from tests.test_dvc_pipeline import repo  # noqa: F401  (the temp git + DVC repo fixture)


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifact(key):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_build_runs_stages_in_dag_order_then_skips_them_and_fails_on_validation(repo):  # noqa: F811
    order = stage_order(repo)
    assert order.index("sample") < order.index("prepare") < order.index("embed") < order.index("index")
    assert order.index("upload") < order.index("jsonl") < order.index("finetune")

    first = build(str(repo))
    assert [r["stage"] for r in first] == order and all(r["ran"] for r in first)
    assert _artifact("validation-prepare") and _artifact("validation-embed-table")

    second = build(str(repo))
    assert not any(r["ran"] for r in second)

    # a blocking validation failure: one corrupt image with no tolerance for quarantine
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["max_bad_fraction"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "data/sample/images_rgb/image_3_rgb.jpg").write_bytes(b"broken")
    state = build(str(repo), stages=["prepare"], return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="1 of 40 ids quarantined"):
        state.result()
    report = json.loads((repo / "artifacts/reports/validation/prepare.json").read_text())
    assert report["success"] is False
    latest = _artifact("validation-prepare")
    assert any("FAILED" in (a.data or "") for a in latest)


def test_reindex_adds_only_new_images(repo):  # noqa: F811
    from PIL import Image

    from flows.reindex import reindex

    build(str(repo))  # the sample stage makes data.root; the nightly flow itself never regenerates it
    first = reindex(str(repo))
    assert first["added"] == 80 and first["index"]["rgb"]["mode"] == "rebuild"
    sample = repo / "data/sample"
    Image.open(sample / "images_tac/image_0_tac.jpg").rotate(90).save(sample / "images_tac/image_500_tac.jpg")
    Image.open(sample / "images_rgb/image_0_rgb.jpg").rotate(90).save(sample / "images_rgb/image_500_rgb.jpg")
    with open(sample / "captions.csv", "a") as fh:
        fh.write('500,"rough, hard",0\n')
    second = reindex(str(repo))
    assert (second["added"], second["removed"], second["changed"]) == (2, 0, 0)
    assert second["index"]["rgb"]["mode"] == "incremental" and second["index"]["rgb"]["removed"] == 0
    assert second["embedded_now"] == second["index"]["rgb"]["added"] >= 1  # only the new pair (and its copies)
    assert second["retrieval_before"] is not None and _artifact("reindex-report")
