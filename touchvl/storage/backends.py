"""Object storage backends for the upload stage: a local folder (``file://`` URLs) or Aliyun OSS.

Both answer the same three questions: which keys under a prefix are stored with which ETag
(``list_etags``), store these bytes under a key, verified by MD5 (``put``), and what URL serves a
key (``url``).  ETags are uppercase
MD5 hex for single-request uploads, as OSS computes them.
"""
from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import oss2
import requests
from urllib3.util.retry import Retry

from touchvl import disk
from touchvl.params import UploadParams
from touchvl.errors import StageError

CREDENTIAL_VARS = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET")


class StorageError(StageError):
    pass


class PermanentUploadError(StorageError):
    """A 4xx other than 429: retrying cannot help."""


@dataclass(frozen=True)
class Blob:
    key: str
    path: Path
    size: int
    md5: str  # hex


class Storage(Protocol):
    destination: str
    """Where objects go (backend + endpoint + bucket, or the local folder): upload records are keyed by it."""

    def list_etags(self, prefix: str) -> dict[str, str]: ...
    def put(self, blob: Blob) -> str: ...
    def url(self, key: str, relative_to: Path | None = None) -> str: ...


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root
        self.destination = f"local:{Path(root).as_posix()}"
        # temp files of a copy live beside the folder, never inside it: a killed upload must not leave files
        # in the output folder that DVC would record (and a later listing would report)
        self.tmp = root.parent / f".{root.name}.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)  # a killed run's leftovers

    def list_etags(self, prefix: str) -> dict[str, str]:
        found = {}
        for path in self.root.glob(f"{prefix}**/*"):
            if path.is_file() and not path.name.startswith("."):
                found[path.relative_to(self.root).as_posix()] = disk.md5_file(path).upper()
        return found

    def put(self, blob: Blob) -> str:
        target = self.root / blob.key
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, open(blob.path, "rb") as src:
                shutil.copyfileobj(src, out)
                out.flush()
                os.fsync(out.fileno())
            etag = disk.md5_file(tmp).upper()
            if etag != blob.md5.upper():
                raise StorageError(f"{blob.key}: copy does not match the source MD5 ({etag} != {blob.md5.upper()})")
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"{blob.key}: cannot copy {blob.path} to {target}: {exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return etag

    def url(self, key: str, relative_to: Path | None = None) -> str:
        """A ``file://`` URL, or with ``relative_to`` (the mapping's folder) a relative reference (RFC 3986 §4.2)
        that ``read_url_mapping`` resolves against that folder: the mapping's bytes, and so ``dvc.lock``, do not
        depend on where the project is cloned."""
        target = (self.root / key).resolve()
        if relative_to is None:
            return target.as_uri()
        return urllib.parse.quote(Path(os.path.relpath(target, Path(relative_to).resolve())).as_posix())


def credentials_from_env() -> oss2.credentials.EnvironmentVariableCredentialsProvider:
    """Fail before any request, naming the missing variable; values are never logged or stored."""
    missing = [name for name in CREDENTIAL_VARS if not os.environ.get(name)]
    if missing:
        raise StorageError(f"upload.backend=oss needs {', '.join(missing)} in the environment "
                           f"(and OSS_SESSION_TOKEN for STS credentials)")
    return oss2.credentials.EnvironmentVariableCredentialsProvider()


def retrying_session(p: UploadParams, workers: int) -> oss2.Session:
    """oss2 session whose HTTP adapter retries 5xx/429, timeouts and dropped connections with
    exponential backoff and jitter (urllib3's own Retry); other 4xx fail at once."""
    retry = Retry(total=p.retries, connect=p.retries, read=p.retries, status=p.retries, other=p.retries,
                  backoff_factor=p.backoff_s, backoff_jitter=p.backoff_s, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None, raise_on_status=False, respect_retry_after_header=True)
    adapter = requests.adapters.HTTPAdapter(pool_connections=workers, pool_maxsize=workers, max_retries=retry)
    return oss2.Session(adapter=adapter)


class OssStorage:
    def __init__(self, p: UploadParams):
        provider = credentials_from_env()
        auth = oss2.ProviderAuthV4(provider) if p.region else oss2.ProviderAuth(provider)
        self.p = p
        # enable_crc=False: oss2's CRC wraps the body in a one-shot reader that a retried request
        # would resend empty; Content-MD5 on every PUT gives the server-side integrity check instead
        self.bucket = oss2.Bucket(auth, p.endpoint, p.bucket, session=retrying_session(p, p.workers),
                                  connect_timeout=p.timeout_s, region=p.region, enable_crc=False)
        self.destination = f"oss:{p.endpoint.rstrip('/')}/{p.bucket}"

    def list_etags(self, prefix: str) -> dict[str, str]:
        """One LIST request per 1,000 keys instead of one HEAD per object."""
        try:
            return {obj.key: obj.etag for obj in oss2.ObjectIterator(self.bucket, prefix=prefix)}
        except oss2.exceptions.OssError as exc:
            raise _classify(f"list {prefix!r}", exc) from None

    def put(self, blob: Blob) -> str:
        md5_b64 = base64.b64encode(bytes.fromhex(blob.md5)).decode()
        try:
            if blob.size >= self.p.multipart_threshold:
                # multipart, resumable across runs; each part carries its own Content-MD5 check
                result = oss2.resumable_upload(self.bucket, blob.key, str(blob.path), multipart_threshold=self.p.multipart_threshold,
                                               store=oss2.ResumableStore(root=str(self.p.manifest.parent / ".resumable")),
                                               num_threads=1, headers={"Content-Type": "image/jpeg"})
            else:
                # bytes (not a file handle) so a retried request resends the whole body
                data = blob.path.read_bytes()
                result = self.bucket.put_object(blob.key, data, headers={"Content-MD5": md5_b64, "Content-Type": "image/jpeg"})
        except oss2.exceptions.OssError as exc:
            raise _classify(blob.key, exc) from None
        return result.etag

    def url(self, key: str, relative_to: Path | None = None) -> str:  # absolute: objects live at the endpoint
        if self.p.url_mode == "signed":
            return self.bucket.sign_url("GET", key, self.p.expires_s, slash_safe=True)
        return self.bucket._make_url(self.bucket.bucket_name, key, slash_safe=True)


def _classify(key: str, exc: oss2.exceptions.OssError) -> StorageError:
    status = getattr(exc, "status", None)
    message = f"{key}: OSS {status} {getattr(exc, 'code', '')} {getattr(exc, 'message', '')}".strip()
    if status == 403:
        message += " (check OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET and the bucket's permissions)"
    if status is not None and 400 <= status < 500 and status != 429:
        return PermanentUploadError(message)
    return StorageError(message)


def make_storage(p: UploadParams) -> Storage:
    return OssStorage(p) if p.backend == "oss" else LocalStorage(p.local_dir)
