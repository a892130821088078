"""A Store on an S3-compatible bucket (AWS, MinIO, Ceph, ...) via the ``minio`` client.

Atomicity relies on S3 itself: an object becomes visible only when its single PUT or its
CompleteMultipartUpload succeeds, so readers never see a partial object and a failed upload leaves
the previous version in place (the writer aborts its unfinished multipart upload). No temp keys needed.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import mmap
import os
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import BinaryIO
from xml.etree import ElementTree as ET

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException, S3Error

from .base import CHUNK, ObjectInfo, ObjectNotFound, StorageError, Store, check_key
from .buffers import SpareBuffers

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 32 << 20
DEFAULT_PARALLEL_UPLOADS = 4
MAX_PARTS = 10_000  # S3's limit per multipart upload
KEPT_PART_BUFFERS = DEFAULT_PARALLEL_UPLOADS + 1  # one upload's: the parts on the way and the one being filled
PRESIGNED_FOR = timedelta(hours=1)  # a request's signature is good for this long
RETRIES = 5  # as minio's client: a connection that failed, for any request; a 5xx or a cut reply, for PUT and DELETE
_S3_XML = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_SIGNED_QUERY = re.compile(r"(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s'\"]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credential, signature and session token of any presigned URL in it blanked:
    such a URL grants its request until it expires."""
    return _SIGNED_QUERY.sub(r"\1<redacted>", text)


class _RedactPresignedURLs(logging.Filter):
    """urllib3 logs each request's URL at DEBUG: a presigned one would put a live signature in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(str(record.msg))
        record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args or ())
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_RedactPresignedURLs())


def _env(environ: Mapping[str, str], *names: str, required: bool = False) -> str | None:
    """First non-empty variable among ``names`` (empty values from a Secret count as unset)."""
    for name in names:
        if environ.get(name):
            return environ[name]
    if required:
        raise StorageError(f"S3 storage is not configured: set {' or '.join(names)}")
    return None


def _epoch(http_date: str | None) -> float:
    return email.utils.parsedate_to_datetime(http_date).timestamp() if http_date else time.time()


def _s3_error(response: urllib3.BaseHTTPResponse) -> S3Error:
    """The S3 error a response carries (minio's type, so one mapping serves both); a body that is
    not S3's XML (a proxy's page) still gives the status."""
    try:
        return S3Error.fromxml(response)
    except ET.ParseError:
        return S3Error(response, f"HTTP {response.status}", response.reason, None, None, None)


def part_size_for(number: int, part_size: int) -> int:
    """The size of part ``number`` (from 1): ``part_size``, doubled every 2,000 parts. S3 takes
    10,000 parts at most, which at 32 MiB each would cap a checkpoint at 320 GiB; this way about 1.9 TiB."""
    return part_size << ((number - 1) // 2000)


_PART_BUFFERS = SpareBuffers(KEPT_PART_BUFFERS, lambda size: mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))


class _PartWriter:
    """A writer whose bytes go to S3 while they are written: in parts, ``parallel_uploads`` at a
    time, each from a buffer of its own, kept for the next upload once sent (a writer that outruns
    the upload waits for one to be free).
    Nothing is visible until :meth:`finish` completes the upload (a single PUT when it all fits one
    part); :meth:`abandon` aborts it, so no parts are left behind.

    The requests are presigned, so their bodies are not hashed to sign them: minio's put_object
    hashes every part (sha256 to sign it over HTTP, MD5 over HTTPS), 0.16 or 0.39 CPU-s per
    271 MB, more than the rest of the upload. What guards a checkpoint end to end is its own
    sha256, recorded beside it and checked on every fetch; HTTPS guards it in transit."""

    def __init__(self, store: S3Store, key: str):
        self._store, self._key, self._name = store, key, store._name(key)
        self._uploads = ThreadPoolExecutor(store.parallel_uploads, thread_name_prefix=f"upload {self._name}")
        self._free_slots = threading.Semaphore(store.parallel_uploads)
        self._parts: list[Future] = []  # each gives its ETag
        self._failure: BaseException | None = None  # the first part that failed, told to the writer
        self._upload_id: str | None = None
        self._buffer: mmap.mmap | None = None
        self._filled = 0
        self.stored_at = 0.0  # the server's time of the completing request

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        while view:
            if self._buffer is None:  # anonymous memory: pages a small object never touches cost nothing
                self._buffer = _PART_BUFFERS.take(part_size_for(len(self._parts) + 1, self._store.part_size))
            taken = min(len(self._buffer) - self._filled, len(view))
            self._buffer[self._filled:self._filled + taken] = view[:taken]
            self._filled, view = self._filled + taken, view[taken:]
            if self._filled == len(self._buffer):
                self._send_part()
        return written

    def flush(self) -> None:
        pass

    def _send_part(self) -> None:
        with self._store._errors(self._key):
            if self._failure is not None:
                raise self._failure
            if self._upload_id is None:
                response = self._store._request("POST", self._name, uploads="")
                self._upload_id = ET.fromstring(response.data).findtext(f"{_S3_XML}UploadId")
            number = len(self._parts) + 1
            if number > MAX_PARTS:
                raise ValueError(f"the object needs more than {MAX_PARTS} parts of part_size {self._store.part_size}")
            self._free_slots.acquire()  # given back when a part is sent, or fails
            buffer, size = self._buffer, self._filled
            self._buffer, self._filled = None, 0
            self._parts.append(self._uploads.submit(self._put_part, number, buffer, size))

    def _put_part(self, number: int, buffer: mmap.mmap, size: int) -> str:
        try:
            with memoryview(buffer) as view:
                response = self._store._request("PUT", self._name, view[:size],
                                                partNumber=str(number), uploadId=self._upload_id)
            return response.headers["ETag"]
        except BaseException as error:
            self._failure = self._failure or error
            raise
        finally:
            _PART_BUFFERS.give_back(buffer)
            self._free_slots.release()

    def finish(self) -> None:
        """Send what is left and complete the upload: the object appears, whole."""
        with self._store._errors(self._key):
            if self._upload_id is None:
                with memoryview(self._buffer if self._buffer is not None else b"") as view:
                    response = self._store._request("PUT", self._name, view[:self._filled])
            else:
                if self._filled:
                    self._send_part()
                parts = "".join(f"<Part><PartNumber>{number}</PartNumber><ETag>{part.result()}</ETag></Part>"
                                for number, part in enumerate(self._parts, 1))
                response = self._store._request(
                    "POST", self._name, f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode(),
                    uploadId=self._upload_id)
            self.stored_at = _epoch(response.headers.get("date"))
        self._close()

    def _close(self) -> None:
        self._uploads.shutdown(cancel_futures=True)
        if self._buffer is not None:  # the writer may be kept for its result; its buffer is not
            _PART_BUFFERS.give_back(self._buffer)
            self._buffer = None

    def abandon(self) -> None:
        """Stop the parts not yet sent, wait for those on the way, and abort the upload."""
        self._close()
        if self._upload_id is not None:
            try:
                with self._store._errors(self._key):
                    self._store._request("DELETE", self._name, uploadId=self._upload_id)
            except StorageError as error:  # the object is not written either way; its parts stay until removed
                log.warning("could not abort the unfinished upload (a bucket lifecycle rule "
                            "AbortIncompleteMultipartUpload removes its parts): %s", error)


@dataclass(frozen=True)
class S3Config:
    """How to reach the S3 endpoint. The credentials are left out of repr so they never reach logs."""

    endpoint: str  # host[:port], no scheme
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    secure: bool = True
    region: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> S3Config:
        """Read ``KONTINUE_S3_*`` (what the pod gets from a Secret), falling back to the ``AWS_*`` names."""
        env = os.environ if environ is None else environ
        endpoint = _env(env, "KONTINUE_S3_ENDPOINT", "AWS_ENDPOINT_URL", required=True)
        url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        if url.scheme not in ("", "http", "https") or not url.hostname or url.username or url.path.strip("/"):
            # the value itself is not echoed: a URL may carry user:password
            raise StorageError("KONTINUE_S3_ENDPOINT / AWS_ENDPOINT_URL must be host[:port] or http(s)://host[:port]")
        secure = url.scheme != "http"
        if flag := _env(env, "KONTINUE_S3_SECURE"):
            if flag.lower() not in ("true", "false"):
                raise StorageError(f"KONTINUE_S3_SECURE must be 'true' or 'false', got {flag!r}")
            secure = flag.lower() == "true"
        return cls(
            endpoint=url.netloc,
            access_key=_env(env, "KONTINUE_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID", required=True),
            secret_key=_env(env, "KONTINUE_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY", required=True),
            secure=secure,
            region=_env(env, "KONTINUE_S3_REGION", "AWS_REGION"),
        )

    def client(self, http: urllib3.PoolManager | None = None) -> Minio:
        return Minio(self.endpoint, self.access_key, self.secret_key, secure=self.secure, region=self.region,
                     http_client=http)

    @staticmethod
    def http() -> urllib3.PoolManager:
        """Connections for minio's client and kontinue's uploads alike, set as minio sets its own."""
        timeout = timedelta(minutes=5).seconds
        return urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout), maxsize=10, cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))


class S3Store(Store):
    """Objects are ``<prefix>/<key>`` in ``bucket``. Objects larger than ``part_size`` upload
    multipart, ``parallel_uploads`` parts at a time."""

    def __init__(self, config: S3Config, bucket: str, prefix: str = "", *,
                 part_size: int = DEFAULT_PART_SIZE, parallel_uploads: int = DEFAULT_PARALLEL_UPLOADS,
                 http: urllib3.PoolManager | None = None, client: Minio | None = None):
        self.config, self.bucket, self.part_size = config, bucket, part_size
        self.parallel_uploads = parallel_uploads
        prefix = prefix.strip("/")
        self.prefix = check_key(prefix) if prefix else ""
        self.http = http or config.http()
        self.client = client or config.client(self.http)
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def __getstate__(self) -> dict:
        """Pickled (for kontinue's checkpoint serializer process) without its connections: the
        receiver connects anew with the same configuration."""
        return {name: value for name, value in vars(self).items() if name not in ("client", "http")}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.http = self.config.http()
        self.client = self.config.client(self.http)

    def child(self, *parts: str) -> S3Store:
        prefix = "/".join([self.prefix, *(check_key(p) for p in parts)]).strip("/")
        return S3Store(self.config, self.bucket, prefix, part_size=self.part_size,
                       parallel_uploads=self.parallel_uploads, http=self.http, client=self.client)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (never done implicitly: a typo should fail, not create)."""
        with self._errors(""):
            if self.client.bucket_exists(self.bucket):
                return
            try:
                self.client.make_bucket(self.bucket)  # in the client's region
            except S3Error as exc:
                if exc.code != "BucketAlreadyOwnedByYou":  # else: lost a harmless race with another creator
                    raise

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Turn minio/urllib3 failures into StorageError naming the URI (no credentials are in them)."""
        try:
            yield
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise self._error(key, f"bucket {self.bucket!r} does not exist (create it with ensure_bucket())") from exc
            if exc.code in ("NoSuchKey", "ResourceNotFound"):
                raise self._error(key, "no such object", ObjectNotFound) from exc
            raise self._error(key, f"{exc.code}: {exc.message}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._error(key, f"{type(exc).__name__}: {exc}") from exc

    def _request(self, method: str, name: str, body: bytes | memoryview = b"",
                 **query: str) -> urllib3.BaseHTTPResponse:
        """One request to the object ``name`` on a presigned URL (see _PartWriter); S3Error if
        refused. Retried here rather than by urllib3, whose messages would carry the URL."""
        idempotent = method in ("PUT", "DELETE")
        for attempt in range(RETRIES + 1):
            if attempt:
                time.sleep(0.2 * 2 ** (attempt - 1))
            url = self.client.get_presigned_url(method, self.bucket, name, PRESIGNED_FOR, extra_query_params=query)
            try:
                response = self.http.request(method, url, body=body, headers={"Content-Length": str(len(body))},
                                             retries=False)
            except urllib3.exceptions.HTTPError as error:
                if attempt < RETRIES and (idempotent or isinstance(error, urllib3.exceptions.ConnectTimeoutError)):
                    continue
                raise urllib3.exceptions.HTTPError(redact(f"{type(error).__name__}: {error}")) from None
            if idempotent and attempt < RETRIES and response.status in (500, 502, 503, 504):
                continue
            # CompleteMultipartUpload can fail after its 200 status: the error is then the body
            if response.status >= 300 or response.data.lstrip().startswith(b"<?xml") and \
                    ET.fromstring(response.data).tag in ("Error", f"{_S3_XML}Error"):
                raise _s3_error(response)
            return response

    def _write(self, key: str, stream: BinaryIO, size: int) -> ObjectInfo:
        with self._open(key) as out:
            shutil.copyfileobj(stream, out, CHUNK)
        return ObjectInfo(key, size, None, out.stored_at)  # S3 stamps the time the upload completed

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[_PartWriter]:
        """The object is uploaded while it is written, in parts sent in parallel (length unknown
        up front); it appears when CompleteMultipartUpload (or the single PUT) succeeds."""
        out = _PartWriter(self, key)
        try:
            yield out
            out.finish()
        except BaseException:
            out.abandon()
            raise

    def _read(self, key: str, sink: BinaryIO) -> ObjectInfo:
        with self._errors(key):
            response = self.client.get_object(self.bucket, self._name(key))
            try:
                size = 0
                for chunk in response.stream(CHUNK):
                    sink.write(chunk)
                    size += len(chunk)
            finally:
                response.close()
                response.release_conn()
        return ObjectInfo(key, size, None, _epoch(response.headers.get("last-modified")))

    def _info(self, key: str) -> ObjectInfo:
        with self._errors(key):
            obj = self.client.stat_object(self.bucket, self._name(key))
        return ObjectInfo(key, obj.size, None, obj.last_modified.timestamp())

    def _iter(self, prefix: str) -> Iterator[ObjectInfo]:
        root = self._name("")
        with self._errors(prefix):
            for obj in self.client.list_objects(self.bucket, prefix=root + prefix, recursive=True):
                if not obj.is_dir:
                    yield ObjectInfo(obj.object_name[len(root):], obj.size, None, obj.last_modified.timestamp())

    def _remove(self, key: str) -> None:
        with self._errors(key):
            self.client.remove_object(self.bucket, self._name(key))

    def _rename(self, src: str, dst: str) -> None:
        """Server-side copy then delete: the object is never absent, briefly present under both keys."""
        with self._errors(src):
            self.client.copy_object(self.bucket, self._name(dst), CopySource(self.bucket, self._name(src)))
            self.client.remove_object(self.bucket, self._name(src))
