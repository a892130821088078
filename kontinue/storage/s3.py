"""A Store on an S3-compatible bucket (AWS, MinIO, Ceph, ...) via the ``minio`` client.

Atomicity relies on S3 itself: an object becomes visible only when its single PUT or its
CompleteMultipartUpload succeeds, so readers never see a partial object and a failed upload leaves
the previous version in place (minio aborts the unfinished multipart upload). No temp keys needed.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException, S3Error

from .base import CHUNK, ObjectInfo, ObjectNotFound, StorageError, Store, check_key

DEFAULT_PART_SIZE = 32 << 20
DEFAULT_PARALLEL_UPLOADS = 4
PIPE_SLICE = 8 << 20  # what the pipe between a writer and the uploader moves at a time


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


class _Pipe:
    """Bytes from a writer (a checkpoint's serializer) to minio's uploader in another thread.

    Bounded, so a fast serializer waits for the upload instead of buffering a whole checkpoint; a
    writer that fails aborts the reader (minio then aborts the multipart upload: nothing appears),
    and a failed upload stops the writer."""

    _EOF, _ABORT = object(), object()

    def __init__(self, slices: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=slices)
        self._current, self._done = memoryview(b""), False
        self.upload_failed = threading.Event()

    # -- the writer's side
    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), PIPE_SLICE):
            self._put(bytes(view[start:start + PIPE_SLICE]))
        return len(view)

    def flush(self) -> None:
        pass

    def _put(self, item) -> None:
        while True:
            if self.upload_failed.is_set():
                raise OSError("the upload failed")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self, *, abort: bool = False) -> None:
        with contextlib.suppress(OSError):  # an upload that failed already reads nothing more
            self._put(self._ABORT if abort else self._EOF)

    # -- the uploader's side
    def read(self, size: int = -1) -> bytes:
        """`size` bytes (fewer only at the end), in one piece: minio appends what each read
        returns to the part it assembles, so one read per part spares it copying the part again."""
        pieces: list[memoryview] = []
        wanted = size
        while wanted != 0 and not self._done:
            if not self._current:
                item = self._queue.get()
                if item is self._ABORT:
                    raise OSError("the writer failed; the upload is abandoned")
                if item is self._EOF:
                    self._done = True
                    break
                self._current = memoryview(item)
            piece = self._current if wanted < 0 else self._current[:wanted]
            self._current = self._current[len(piece):]
            pieces.append(piece)
            if wanted > 0:
                wanted -= len(piece)
        return b"".join(pieces)


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

    def client(self) -> Minio:
        return Minio(self.endpoint, self.access_key, self.secret_key, secure=self.secure, region=self.region)


class S3Store(Store):
    """Objects are ``<prefix>/<key>`` in ``bucket``. Objects larger than ``part_size`` upload
    multipart, ``parallel_uploads`` parts at a time."""

    def __init__(self, config: S3Config, bucket: str, prefix: str = "", *,
                 part_size: int = DEFAULT_PART_SIZE, parallel_uploads: int = DEFAULT_PARALLEL_UPLOADS,
                 client: Minio | None = None):
        self.config, self.bucket, self.part_size = config, bucket, part_size
        self.parallel_uploads = parallel_uploads
        prefix = prefix.strip("/")
        self.prefix = check_key(prefix) if prefix else ""
        self.client = client or config.client()
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def __getstate__(self) -> dict:
        """Pickled (for kontinue's checkpoint serializer process) without its client: the receiver
        connects anew with the same configuration."""
        return {name: value for name, value in vars(self).items() if name != "client"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.client = self.config.client()

    def child(self, *parts: str) -> S3Store:
        prefix = "/".join([self.prefix, *(check_key(p) for p in parts)]).strip("/")
        return S3Store(self.config, self.bucket, prefix, part_size=self.part_size,
                       parallel_uploads=self.parallel_uploads, client=self.client)

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

    def _write(self, key: str, stream: BinaryIO, size: int) -> ObjectInfo:
        with self._errors(key):
            result = self.client.put_object(self.bucket, self._name(key), stream, size, part_size=self.part_size,
                                            num_parallel_uploads=self.parallel_uploads)
        return ObjectInfo(key, size, None, _epoch(result.http_headers.get("date")))  # S3 stamps the PUT time

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        """The object is uploaded while it is written, in parts sent in parallel (length unknown
        up front); it appears when CompleteMultipartUpload (or the single PUT) succeeds."""
        pipe, failure = _Pipe(), []

        def upload() -> None:
            try:
                self._write(key, pipe, -1)
            except BaseException as error:  # noqa: BLE001 -- handed to the writer's thread
                failure.append(error)
                pipe.upload_failed.set()

        uploader = threading.Thread(target=upload, name=f"upload {self._name(key)}", daemon=True)
        uploader.start()
        try:
            yield pipe
        except BaseException as error:
            pipe.close(abort=True)
            uploader.join()
            if pipe.upload_failed.is_set() and isinstance(error, OSError):  # stopped by the upload: say why
                raise failure[0] from error
            raise
        pipe.close()
        uploader.join()
        if failure:
            raise failure[0]

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
