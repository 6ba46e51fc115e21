"""A local server speaking the Aliyun OSS object protocol, for the real ``oss2`` client in tests.

Path-style requests (oss2 uses them for IP endpoints), v1 header signatures and signed-URL query
signatures verified against the configured secret (403 ``SignatureDoesNotMatch``), ETag = quoted
uppercase MD5, ``Content-MD5`` checked (400 ``InvalidDigest``), PUT/HEAD/GET/DELETE, ListObjects,
multipart upload, OSS XML error bodies with ``x-oss-request-id``, and fault injection: 500/503
responses, latency, and connections dropped *after* the object was stored.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import random
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler

from tests.loopback import LoopbackServer
from xml.sax.saxutils import escape

SUBRESOURCES = {"acl", "uploads", "location", "cors", "logging", "website", "referer", "lifecycle", "delete",
                "append", "tagging", "objectMeta", "uploadId", "partNumber", "security-token", "position", "img",
                "style", "styleName", "replication", "replicationProgress", "replicationLocation", "cname",
                "bucketInfo", "comp", "qos", "live", "status", "vod", "startTime", "endTime", "symlink",
                "x-oss-process", "response-content-type", "response-content-language", "response-expires",
                "response-cache-control", "response-content-disposition", "response-content-encoding",
                "udf", "udfName", "udfImage", "udfId", "udfImageDesc", "udfApplication", "udfApplicationLog",
                "restore", "callback", "callback-var", "stat", "encryption", "versions", "versioning",
                "versionId", "policy", "requestPayment", "x-oss-traffic-limit", "qosInfo", "asyncFetch",
                "sequential", "inventory", "inventoryId", "continuation-token", "worm", "wormId",
                "wormExtend", "resourceGroup", "style", "styleName", "x-oss-async-process", "regionList",
                "x-oss-write-get-object-response"}


@dataclass
class Faults:
    error_rate: float = 0.0  # fraction of requests answered 500/503 before doing anything
    drop_rate: float = 0.0  # fraction of PUTs stored, then the connection closed without a response
    latency_s: float = 0.0
    seed: int = 0


@dataclass
class StoredObject:
    data: bytes
    etag: str
    content_type: str


@dataclass
class OssState:
    credentials: dict[str, str]
    buckets: set[str]
    faults: Faults = field(default_factory=Faults)
    objects: dict[tuple[str, str], StoredObject] = field(default_factory=dict)
    uploads: dict[str, dict] = field(default_factory=dict)
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # method, path, status
    bytes_received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.rng = random.Random(self.faults.seed)


def string_to_sign(method: str, headers, resource: str, date: str) -> bytes:
    oss_headers = sorted((k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-oss-"))
    canonical = "".join(f"{k}:{v}\n" for k, v in oss_headers)
    return "\n".join([method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""), date,
                      canonical + resource]).encode()


def sign(secret: str, payload: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), payload, hashlib.sha1).digest()).decode()


class OssHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "OssServer"

    def log_message(self, *args):  # keep test output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _parse(self):
        parsed = urllib.parse.urlsplit(self.path)
        parts = parsed.path.lstrip("/").split("/", 1)
        bucket = urllib.parse.unquote(parts[0])
        key = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
        query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        return bucket, key, query

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
        # record before answering: once the body is written the client may already be checking ``requests``
        with self.server.state.lock:
            self.server.state.requests.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("x-oss-request-id", uuid.uuid4().hex.upper()[:24])
        self.send_header("Date", formatdate(usegmt=True))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, **extra):
        fields = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in extra.items())
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}</Message>'
                f"<RequestId>{uuid.uuid4().hex.upper()[:24]}</RequestId><HostId>127.0.0.1</HostId>{fields}</Error>").encode()
        # close after an error, as a front end does: the client retries on a fresh connection
        self.close_connection = True
        self._send(status, body, {"Content-Type": "application/xml", "Connection": "close"})

    def _resource(self, bucket: str, key: str, query: dict) -> str:
        sub = sorted((k, v) for k, v in query.items() if k in SUBRESOURCES)
        suffix = ("?" + "&".join(f"{k}={v}" if v else k for k, v in sub)) if sub else ""
        return f"/{bucket}/{key}{suffix}" if bucket else "/" + suffix

    def _authorised(self, bucket: str, key: str, query: dict) -> bool:
        creds = self.server.state.credentials
        auth = self.headers.get("Authorization")
        if auth:
            if not auth.startswith("OSS ") or ":" not in auth:
                self._error(400, "InvalidArgument", "Authorization header is invalid.")
                return False
            key_id, signature = auth[4:].rsplit(":", 1)
            date = self.headers.get("x-oss-date") or self.headers.get("Date", "")
        elif "Signature" in query:
            key_id, signature, date = query.get("OSSAccessKeyId", ""), query["Signature"], query.get("Expires", "0")
            if int(date) < time.time():
                self._error(403, "AccessDenied", "Request has expired.", Expires=date)
                return False
        else:
            self._error(403, "AccessDenied", "You have no right to access this object because of bucket acl.")
            return False
        if key_id not in creds:
            self._error(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.",
                        OSSAccessKeyId=key_id)
            return False
        payload = string_to_sign(self.command, self.headers, self._resource(bucket, key, query), date)
        if not hmac.compare_digest(sign(creds[key_id], payload), signature):
            self._error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match the "
                        "signature you provided. Check your key and signing method.", OSSAccessKeyId=key_id)
            return False
        return True

    def _preamble(self):
        """Latency, injected 5xx, auth and bucket checks. Returns (bucket, key, query, body) or None."""
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with state.lock:
            state.bytes_received += len(body)
            fail = state.rng.random() < state.faults.error_rate
            status = state.rng.choice([500, 503])
        if state.faults.latency_s:
            time.sleep(state.faults.latency_s)
        if fail:
            self._error(status, "InternalError" if status == 500 else "ServiceUnavailable", "Injected fault.")
            return None
        bucket, key, query = self._parse()
        if not self._authorised(bucket, key, query):
            return None
        if bucket not in state.buckets:
            self._error(404, "NoSuchBucket", "The specified bucket does not exist.", BucketName=bucket)
            return None
        return bucket, key, query, body

    def _drop_after_store(self) -> bool:
        state = self.server.state
        with state.lock:
            drop = state.rng.random() < state.faults.drop_rate
        if drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        return drop

    # ------------------------------------------------------------------ verbs
    def do_PUT(self):
        parsed = self._preamble()
        if parsed is None:
            return
        bucket, key, query, body = parsed
        digest = hashlib.md5(body).digest()
        claimed = self.headers.get("Content-MD5")
        if claimed and claimed != base64.b64encode(digest).decode():
            self._error(400, "InvalidDigest", "The Content-MD5 you specified is not valid.")
            return
        etag = digest.hex().upper()
        state = self.server.state
        if "uploadId" in query:
            upload = state.uploads.get(query["uploadId"])
            if upload is None:
                self._error(404, "NoSuchUpload", "The specified upload does not exist.")
                return
            upload["parts"][int(query["partNumber"])] = (body, etag)
        else:
            with state.lock:
                state.objects[(bucket, key)] = StoredObject(body, etag, self.headers.get("Content-Type", ""))
        if self._drop_after_store():
            return
        self._send(200, headers={"ETag": f'"{etag}"'})

    def do_HEAD(self):
        parsed = self._preamble()
        if parsed is None:
            return
        bucket, key, _, _ = parsed
        obj = self.server.state.objects.get((bucket, key))
        if obj is None:
            self._send(404)  # HEAD errors carry no body
            return
        self._send(200, headers={"ETag": f'"{obj.etag}"', "Content-Length": str(len(obj.data)),
                                 "Content-Type": obj.content_type or "application/octet-stream"})

    def do_GET(self):
        parsed = self._preamble()
        if parsed is None:
            return
        bucket, key, query, _ = parsed
        if not key:
            self._list(bucket, query)
            return
        if "uploadId" in query:
            self._list_parts(bucket, key, query["uploadId"])
            return
        obj = self.server.state.objects.get((bucket, key))
        if obj is None:
            self._error(404, "NoSuchKey", "The specified key does not exist.", Key=key)
            return
        self._send(200, obj.data, {"ETag": f'"{obj.etag}"', "Content-Type": obj.content_type or "application/octet-stream"})

    def do_DELETE(self):
        parsed = self._preamble()
        if parsed is None:
            return
        bucket, key, _, _ = parsed
        with self.server.state.lock:
            self.server.state.objects.pop((bucket, key), None)
        self._send(204)

    def do_POST(self):
        parsed = self._preamble()
        if parsed is None:
            return
        bucket, key, query, body = parsed
        state = self.server.state
        if "uploads" in query:
            upload_id = uuid.uuid4().hex.upper()
            state.uploads[upload_id] = {"bucket": bucket, "key": key, "parts": {},
                                        "content_type": self.headers.get("Content-Type", "")}
            xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<InitiateMultipartUploadResult><Bucket>{bucket}</Bucket>"
                   f"<Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>")
            self._send(200, xml.encode(), {"Content-Type": "application/xml"})
        elif "uploadId" in query:
            upload = state.uploads.pop(query["uploadId"], None)
            if upload is None:
                self._error(404, "NoSuchUpload", "The specified upload does not exist.")
                return
            parts = [upload["parts"][n] for n in sorted(upload["parts"])]
            data = b"".join(p for p, _ in parts)
            etag = hashlib.md5(b"".join(bytes.fromhex(e) for _, e in parts)).hexdigest().upper() + f"-{len(parts)}"
            with state.lock:
                state.objects[(bucket, key)] = StoredObject(data, etag, upload["content_type"])
            xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CompleteMultipartUploadResult><Bucket>{bucket}</Bucket>"
                   f"<Key>{escape(key)}</Key><ETag>\"{etag}\"</ETag></CompleteMultipartUploadResult>")
            self._send(200, xml.encode(), {"Content-Type": "application/xml", "ETag": f'"{etag}"'})
        else:
            self._error(400, "InvalidArgument", "Unsupported POST.")

    def _list_parts(self, bucket: str, key: str, upload_id: str):
        upload = self.server.state.uploads.get(upload_id)
        if upload is None:
            self._error(404, "NoSuchUpload", "The specified upload does not exist.")
            return
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                        f"<ETag>\"{etag}\"</ETag><Size>{len(data)}</Size></Part>"
                        for n, (data, etag) in sorted(upload["parts"].items()))
        xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListPartsResult><Bucket>{bucket}</Bucket><Key>{escape(key)}</Key>"
               f"<UploadId>{upload_id}</UploadId><PartNumberMarker>0</PartNumberMarker><NextPartNumberMarker>0</NextPartNumberMarker>"
               f"<MaxParts>1000</MaxParts><IsTruncated>false</IsTruncated>{parts}</ListPartsResult>")
        self._send(200, xml.encode(), {"Content-Type": "application/xml"})

    def _list(self, bucket: str, query: dict):
        prefix = query.get("prefix", "")
        keys = sorted(k for b, k in self.server.state.objects if b == bucket and k.startswith(prefix))
        limit = int(query.get("max-keys", 100))
        marker = query.get("marker", "")
        keys = [k for k in keys if k > marker]
        page, truncated = keys[:limit], len(keys) > limit
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
            f"<ETag>\"{self.server.state.objects[(bucket, k)].etag}\"</ETag><Type>Normal</Type>"
            f"<Size>{len(self.server.state.objects[(bucket, k)].data)}</Size><StorageClass>Standard</StorageClass></Contents>"
            for k in page)
        xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult><Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix>"
               f"<Marker>{escape(marker)}</Marker><MaxKeys>{limit}</MaxKeys><Delimiter></Delimiter>"
               f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
               f"<NextMarker>{escape(page[-1]) if truncated else ''}</NextMarker>{contents}</ListBucketResult>")
        self._send(200, xml.encode(), {"Content-Type": "application/xml"})


class OssServer(LoopbackServer):
    def __init__(self, state: OssState):
        super().__init__(OssHandler, state)

    @property
    def endpoint(self) -> str:
        return self.origin
