"""The upload stage against the local backend and, with the real oss2 client, a local OSS server."""
import base64
import hashlib
import logging
import urllib.request
from pathlib import Path

import oss2
import pandas as pd
import pytest

from tasks import prepare, upload
from touchvl.storage import upload as upload_core
from touchvl.chat.generate import read_url_mapping
from touchvl.storage.backends import Blob, make_storage
from touchvl.params import parse_params
from touchvl.errors import StageError
from tests.oss_server import Faults, OssServer, OssState

KEY_ID, SECRET = "LTAItestkeyid", "test-secret-value-0123456789"


def _params(tmp_path, root, **upload_params):
    return parse_params({
        "data": {"root": str(root)},
        "prepare": {"out_dir": str(tmp_path / "prepared"), "quarantine_csv": str(tmp_path / "q.csv"),
                    "augment": {"copies": 1}},
        "upload": {"local_dir": str(tmp_path / "bucket"), "manifest": str(tmp_path / "up/manifest.csv"),
                   "mapping": str(tmp_path / "up/mapping.csv"), "backoff_s": 0.01, "workers": 8, **upload_params},
        "validation": {"reports_dir": str(tmp_path / "val"), "build_data_docs": False},
    })


@pytest.fixture
def prepared(tmp_path, dataset):
    params = _params(tmp_path, dataset)
    manifest, _ = prepare.run(params)
    return params, manifest


@pytest.fixture
def oss_env(monkeypatch):
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET)


def _oss(params, server, **extra):
    return params.model_copy(update={"upload": params.upload.model_copy(update={
        "backend": "oss", "endpoint": server.endpoint, "bucket": "tvl", **extra})})


def _md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest().upper()


def test_local_backend_copies_maps_every_uid_and_rerun_sends_nothing(prepared):
    params, manifest = prepared
    first = upload.run(params)
    assert first.sent == manifest["tac_path"].nunique() + manifest["rgb_path"].nunique() and not first.failures
    mapping = pd.read_csv(params.upload.mapping)
    assert list(mapping.columns) == ["index", "tac_url", "rgb_url", "source_id"]
    assert mapping["index"].tolist() == manifest["uid"].tolist()
    assert mapping["source_id"].tolist() == manifest["source_id"].tolist()  # what captions.csv ids join on
    # local objects are named relative to the mapping's folder: the file (a DVC output) does not depend on where the
    # project lives; the one reader resolves them to file:// URLs
    raw = Path(params.upload.mapping).read_text()
    assert "file:" not in raw and str(Path(params.upload.local_dir).resolve()) not in raw
    resolved = read_url_mapping(params.upload.mapping)
    for row, src in zip(resolved.itertuples(), manifest.itertuples()):
        assert row.tac_url.startswith("file:///")
        local = Path(urllib.request.url2pathname(row.tac_url.removeprefix("file://")))
        assert _md5(local) == _md5(src.tac_path)
    # the project moved (a fresh clone elsewhere): the same mapping bytes name the objects at the new place
    import shutil
    moved = Path(params.upload.mapping).parents[1] / "moved"
    for folder in ("up", "bucket"):
        shutil.copytree(Path(params.upload.mapping).parents[1] / folder, moved / folder)
    again_resolved = read_url_mapping(moved / "up/mapping.csv")
    assert again_resolved["tac_url"].str.startswith((moved / "bucket").resolve().as_uri()).all()
    records = pd.read_csv(params.upload.manifest)
    assert list(records.columns) == upload_core.RECORD_COLUMNS and (records["etag"] == records["md5"].str.upper()).all()
    again = upload.run(params)
    assert again.sent == 0 and again.sent_bytes == 0


def test_oss_with_faults_stores_everything_exactly_once_and_rerun_sends_nothing(prepared, oss_env):
    params, manifest = prepared
    state = OssState({KEY_ID: SECRET}, {"tvl"}, Faults(error_rate=0.3, drop_rate=0.3, seed=1))
    with OssServer(state) as server:
        p = _oss(params, server, retries=20)  # P(21 straight faults) ~ 1e-6 per object
        result = upload.run(p)
        assert not result.failures
        blobs = upload_core.plan_blobs(manifest, p.upload.prefix)
        assert set(k for _, k in state.objects) == {b.key for b in blobs}  # one object per key, no strays
        for blob in blobs:
            assert state.objects[("tvl", blob.key)].data == blob.path.read_bytes()
        injected = [s for _, _, s in state.requests if s >= 500]
        assert injected  # the faults really happened and were retried
        mapping = pd.read_csv(p.upload.mapping)
        assert mapping["index"].tolist() == manifest["uid"].tolist()
        assert mapping["tac_url"].str.startswith(f"{server.endpoint}/tvl/tvl/tac/").all()
        state.requests.clear()
        state.bytes_received = 0
        again = upload.run(p)
        # no object is sent; the only requests are the LIST pages that check the mapping against the bucket
        assert again.sent == 0 and state.bytes_received == 0
        assert state.requests and all(method == "GET" and "prefix=" in path for method, path, _ in state.requests)


def test_first_run_against_a_filled_bucket_heads_instead_of_sending(prepared, oss_env):
    params, manifest = prepared
    state = OssState({KEY_ID: SECRET}, {"tvl"})
    with OssServer(state) as server:
        p = _oss(params, server)
        upload.run(p)
        p.upload.manifest.unlink()  # a new machine: no local record of what is stored
        state.requests.clear()
        result = upload.run(p)
        assert result.sent == 0 and [m for m, _, _ in state.requests] == ["GET", "GET"]  # one listing, no PUT


def test_bad_secret_fails_clearly_without_retrying(prepared, monkeypatch):
    params, _ = prepared
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "wrong")
    state = OssState({KEY_ID: SECRET}, {"tvl"})
    with OssServer(state) as server:
        with pytest.raises(StageError, match=r"OSS 403.*check OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET") as info:
            upload.run(_oss(params, server))
        assert "SignatureDoesNotMatch" in str(info.value)
        assert len(state.requests) == 1  # the listing fails first; 403 is not retried; nothing is sent
        assert not params.upload.mapping.exists()


def test_missing_credentials_fail_before_any_request(prepared, monkeypatch):
    params, _ = prepared
    monkeypatch.delenv("OSS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET)
    state = OssState({KEY_ID: SECRET}, {"tvl"})
    with OssServer(state) as server:
        with pytest.raises(StageError, match="needs OSS_ACCESS_KEY_ID in the environment"):
            upload.run(_oss(params, server))
        assert state.requests == []


def test_failed_keys_are_listed_and_the_next_run_sends_only_them(prepared, oss_env):
    params, manifest = prepared
    state = OssState({KEY_ID: SECRET}, {"tvl"}, Faults(error_rate=0.5, seed=3))
    with OssServer(state) as server:
        p = _oss(params, server, retries=0)
        with pytest.raises(StageError, match="failed to upload") as info:
            upload.run(p)
        stored = pd.read_csv(p.upload.manifest)
        n_total = len(upload_core.plan_blobs(manifest, "tvl/"))
        assert 0 < len(stored) < n_total and str(n_total - len(stored)) in str(info.value)
        state.faults.error_rate = 0.0
        state.requests.clear()
        result = upload.run(p)
        assert result.sent + result.skipped - len(stored) <= n_total - len(stored)
        assert len([1 for m, _, _ in state.requests if m == "PUT"]) <= n_total - len(stored)
        assert len(pd.read_csv(p.upload.mapping)) == len(manifest)


def test_signed_urls_fetch_and_secrets_never_leak(prepared, oss_env, caplog):
    params, manifest = prepared
    state = OssState({KEY_ID: SECRET}, {"tvl"})
    caplog.set_level(logging.DEBUG)
    with OssServer(state) as server:
        p = _oss(params, server, url_mode="signed", expires_s=600)
        upload.run(p)
        mapping = pd.read_csv(p.upload.mapping)
        row = mapping.iloc[0]
        assert urllib.request.urlopen(row["tac_url"]).read() == Path(manifest["tac_path"][0]).read_bytes()
        tampered = row["rgb_url"].replace("Signature=", "Signature=x")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(tampered)
        assert info.value.code == 403 and b"SignatureDoesNotMatch" in info.value.read()
    for text in (caplog.text, p.upload.manifest.read_text(), p.upload.mapping.read_text()):
        assert SECRET not in text
    assert KEY_ID not in p.upload.manifest.read_text()


def test_server_rejects_a_corrupted_body_by_content_md5(oss_env):
    state = OssState({KEY_ID: SECRET}, {"tvl"})
    with OssServer(state) as server:
        bucket = oss2.Bucket(oss2.Auth(KEY_ID, SECRET), server.endpoint, "tvl")
        wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        with pytest.raises(oss2.exceptions.ServerError) as info:
            bucket.put_object("k", b"payload", headers={"Content-MD5": wrong})
        assert info.value.status == 400 and info.value.code == "InvalidDigest"
        assert ("tvl", "k") not in state.objects


def test_large_files_go_multipart(tmp_path, oss_env):
    big = tmp_path / "image_1_tac.jpg"
    big.write_bytes(bytes(range(256)) * 1200)  # 300 KiB
    blob = Blob("tvl/tac/image_1_tac.jpg", big, big.stat().st_size, hashlib.md5(big.read_bytes()).hexdigest())
    state = OssState({KEY_ID: SECRET}, {"tvl"})
    with OssServer(state) as server:
        p = parse_params({"upload": {"backend": "oss", "endpoint": server.endpoint, "bucket": "tvl",
                                     "multipart_threshold": 102400, "manifest": str(tmp_path / "m.csv")}}).upload
        etag = make_storage(p).put(blob)
    assert etag.endswith("-3") or etag.endswith("-1")
    assert state.objects[("tvl", blob.key)].data == big.read_bytes()


# --- the upload manifest is keyed by destination -----------------------------------------------------------


def test_switching_to_oss_with_the_same_prefix_uploads_everything_and_maps_only_stored_objects(prepared, oss_env):
    """After a local run, `upload.backend: oss` must not trust the local records: every object is sent."""
    params, manifest = prepared
    local = upload.run(params)
    state = OssState({KEY_ID: SECRET}, {"tvl", "other"})
    with OssServer(state) as server:
        remote = upload.run(_oss(params, server))
        assert remote.sent == local.sent and remote.skipped == 0
        stored = {k for _, k in state.objects}
        mapping = pd.read_csv(params.upload.mapping)
        for url in mapping["tac_url"].tolist() + mapping["rgb_url"].tolist():
            assert url.startswith(f"{server.endpoint}/tvl/") and url.split("/", 4)[4] in stored
        # another bucket on the same endpoint is another destination too
        other = upload.run(_oss(params, server, bucket="other"))
        assert other.sent == local.sent
    records = pd.read_csv(params.upload.manifest)
    assert records["destination"].nunique() == 3  # local + two buckets, none overwriting another
    assert upload.run(params).sent == 0  # the local records are still there, and true


@pytest.mark.parametrize("change", ["endpoint", "bucket"])
def test_a_changed_endpoint_or_bucket_is_checked_against_its_own_listing_and_gets_what_it_lacks(prepared, oss_env, change):
    """Same backend and prefix, another endpoint (a second server) or bucket: the first destination's records prove
    nothing there. Objects the new destination already holds with the same MD5 are kept (one listing); those it
    lacks, or holds with other bytes, are sent; the mapping names the new destination; the first one is untouched."""
    from tests.oss_server import StoredObject

    params, manifest = prepared
    first_state = OssState({KEY_ID: SECRET}, {"tvl", "other"})
    second_state = OssState({KEY_ID: SECRET}, {"tvl"}) if change == "endpoint" else first_state
    with OssServer(first_state) as first, OssServer(second_state) as second:
        before = upload.run(_oss(params, first))
        keys = sorted(k for _, k in first_state.objects)
        assert before.sent == len(keys) > 8
        target_bucket = "other" if change == "bucket" else "tvl"
        target = _oss(params, second if change == "endpoint" else first, bucket=target_bucket)
        # the new destination already holds five of the objects (another machine stored them), one with other bytes
        for key in keys[:5]:
            second_state.objects[(target_bucket, key)] = first_state.objects[("tvl", key)]
        second_state.objects[(target_bucket, keys[5])] = StoredObject(b"stale bytes", '"0"', "image/jpeg")
        first_requests = len(first_state.requests)
        after = upload.run(target)
        assert (after.sent, after.skipped) == (len(keys) - 5, 5)
        blobs = {b.key: b for b in upload_core.plan_blobs(manifest, params.upload.prefix)}
        for key, blob in blobs.items():  # every object now at the new destination, with the right bytes
            assert second_state.objects[(target_bucket, key)].data == blob.path.read_bytes()
        mapping = pd.read_csv(params.upload.mapping)
        origin = f"{target.upload.endpoint}/{target_bucket}/"
        assert mapping["tac_url"].str.startswith(origin).all() and mapping["rgb_url"].str.startswith(origin).all()
        if change == "endpoint":
            assert len(first_state.requests) == first_requests  # the old endpoint is not even asked
        assert upload.run(_oss(params, first)).sent == 0  # its own records still hold there
    records = pd.read_csv(params.upload.manifest)
    assert records["destination"].nunique() == 2 and len(records) == 2 * len(keys)


def test_a_destination_that_already_holds_the_objects_is_listed_not_reuploaded(prepared, oss_env):
    params, manifest = prepared
    state = OssState({KEY_ID: SECRET}, {"tvl"})
    with OssServer(state) as server:
        first = upload.run(_oss(params, server))
        Path(params.upload.manifest).unlink()  # e.g. another machine, or a fresh clone
        again = upload.run(_oss(params, server))
    assert first.sent > 0 and again.sent == 0 and again.skipped == first.sent


def test_a_mapped_object_missing_at_the_destination_fails_validation_and_publishes_no_mapping(prepared, monkeypatch):
    """The mapping is checked against a fresh listing: a URL to an object that is not stored is never written."""
    params, manifest = prepared
    from touchvl.storage.backends import LocalStorage

    real_put = LocalStorage.put

    def put_then_lose(self, blob):
        etag = real_put(self, blob)
        if blob.key.endswith("image_3_rgb.jpg"):
            (self.root / blob.key).unlink()  # stored, acknowledged, then gone (eventual consistency, a cleanup job...)
        return etag

    monkeypatch.setattr(LocalStorage, "put", put_then_lose)
    with pytest.raises(StageError, match=r"(?s)validation of stage 'upload' failed.*stored_objects.*image_3_rgb"):
        upload.run(params)
    assert not Path(params.upload.mapping).exists()


def test_a_killed_copy_leaves_nothing_inside_the_output_folder(prepared, monkeypatch):
    params, manifest = prepared
    import shutil as shutil_module

    stale = params.upload.local_dir.parent / f".{params.upload.local_dir.name}.tmp"
    stale.mkdir(parents=True)
    (stale / "leftover.part").write_bytes(b"half a file from a kill -9")
    calls = {"n": 0}
    real_copy = shutil_module.copyfileobj

    def dying_copy(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            dst.write(src.read(100))
            raise OSError("disk full")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr("touchvl.storage.backends.shutil.copyfileobj", dying_copy)
    with pytest.raises(StageError, match="failed to upload"):
        upload.run(params)
    inside = [p for p in params.upload.local_dir.rglob("*") if p.is_file()]
    assert inside and all(not p.name.startswith(".") and not p.name.endswith((".tmp", ".part")) for p in inside)
    assert not (stale / "leftover.part").exists()
    assert all(_md5(p) == _md5(next(Path(s) for s in manifest["tac_path"].tolist() + manifest["rgb_path"].tolist()
                                     if Path(s).name == p.name)) for p in inside)
