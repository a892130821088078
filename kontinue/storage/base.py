"""The storage contract shared by every backend.

Backends implement a handful of raw primitives (``_write``, ``_read``, ``_info``, ``_iter``,
``_remove``, ``_rename``); everything callers use -- key checking, sha256 sidecars, atomic local
downloads, directory sync -- is built once here on top of them, so local and S3 behave alike.
"""

from __future__ import annotations

import abc
import contextlib
import fnmatch
import hashlib
import io
import os
import pathlib
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

SIDECAR = ".sha256"  # `<key>.sha256` holds the hex digest of `<key>`; the suffix is reserved for this
CHUNK = 1 << 20  # copy buffer size


class StorageError(Exception):
    """A storage operation failed; the message names the URI and key involved."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The key does not exist (also a FileNotFoundError, so plain file-handling code copes)."""


class ChecksumMismatch(StorageError):
    """The object's bytes do not match its recorded sha256, or there is no recorded sha256."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store that returned it
    size: int
    sha256: str | None  # the recorded (sidecar) digest, when known
    modified: float  # epoch seconds


def check_key(key: str, *, prefix: bool = False) -> str:
    """Keys are relative 'a/b/c' paths. Refusing '..', '.' and empty segments keeps LocalStore inside
    its root and sync_down inside its target directory. A list prefix may end anywhere ('', 'dump/', 'dump/ep')."""
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in (parts[:-1] if prefix else parts)):
        raise StorageError(f"invalid storage key {key!r}: use a relative 'a/b/c' path")
    return key


def _dir_prefix(prefix: str) -> str:
    """'runs/7' or 'runs/7/' -> 'runs/7/' (a directory for the sync methods); '' -> ''."""
    prefix = prefix.strip("/")
    return check_key(prefix) + "/" if prefix else ""


def _is_skipped(rel: pathlib.PurePath) -> bool:
    """sync_up ignores temporaries (``*.tmp*``) anywhere in the path, e.g. a half-written ``ckpt.tmp/``."""
    return any(fnmatch.fnmatch(part, "*.tmp*") for part in rel.parts)


class _Hashed:
    """File wrapper that sha256-hashes every byte read from or written through it."""

    def __init__(self, f: BinaryIO):
        self._f, self.hash = f, hashlib.sha256()
        self.info: ObjectInfo | None = None  # set by Store.writer once the object is stored

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        return data

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def is_temp_name(name: str) -> bool:
    """Names produced by :func:`atomic_file`; stores hide them from listings."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_file(path: pathlib.Path) -> Iterator[BinaryIO]:
    """Write ``path`` all-or-nothing: a hidden temp file in the same directory, fsync, os.replace.

    On any error the temp file is removed and ``path`` keeps its previous content (if any).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Store(abc.ABC):
    """A tree of objects addressed by relative keys under one URI (``file://...`` or ``s3://...``)."""

    uri: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- backend primitives: keys are already checked; raise ObjectNotFound/StorageError ------
    @abc.abstractmethod
    def child(self, *parts: str) -> Store:
        """A Store rooted at ``uri/parts`` (no I/O)."""

    @abc.abstractmethod
    def _write(self, key: str, stream: BinaryIO, size: int) -> ObjectInfo:
        """Atomically replace ``key`` with the ``size`` bytes read from ``stream``."""

    @abc.abstractmethod
    def _open(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A writable stream for ``key``: the object appears, whole, when the block ends without an
        error, and not at all when it raises."""

    @abc.abstractmethod
    def _read(self, key: str, sink: BinaryIO) -> ObjectInfo:
        """Stream the object's bytes into ``sink``."""

    @abc.abstractmethod
    def _info(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def _iter(self, prefix: str) -> Iterable[ObjectInfo]:
        """Every object (sidecars included) whose key starts with ``prefix``."""

    @abc.abstractmethod
    def _remove(self, key: str) -> None:
        """Delete ``key``; a missing key is fine."""

    @abc.abstractmethod
    def _rename(self, src: str, dst: str) -> None: ...

    def _error(self, key: str, why: str, cls: type[StorageError] = StorageError) -> StorageError:
        return cls(f"{self.uri}/{key}: {why}" if key else f"{self.uri}: {why}")

    @staticmethod
    def _key(key: str) -> str:
        if check_key(key).endswith(SIDECAR):
            raise StorageError(f"invalid storage key {key!r}: the {SIDECAR!r} suffix is reserved for checksums")
        return key

    def _put(self, key: str, stream: BinaryIO, size: int, checksum: bool) -> ObjectInfo:
        key = self._key(key)
        hashed = _Hashed(stream) if checksum else None
        info = self._write(key, hashed or stream, size)
        return self._record_sha256(key, info, hashed.hash.hexdigest() if hashed else None)

    def _record_sha256(self, key: str, info: ObjectInfo, digest: str | None) -> ObjectInfo:
        """Writes the sidecar only once the object is in place; without a digest removes a stale one."""
        if digest is None:  # a digest left over from an earlier version of the key would be a lie
            self._remove(key + SIDECAR)
            return info
        line = f"{digest}\n".encode()
        self._write(key + SIDECAR, io.BytesIO(line), len(line))
        return replace(info, sha256=digest)

    # -- public API -------------------------------------------------------------------------
    def local_path(self, key: str) -> pathlib.Path | None:
        """Where the object lives on this machine's filesystem, if it does (lets callers skip copies)."""
        return None

    def put_file(self, key: str, local_path: str | os.PathLike, *, checksum: bool = False) -> ObjectInfo:
        """Upload a file atomically; with ``checksum`` also record its sha256 (computed while streaming)."""
        with open(local_path, "rb") as f:
            return self._put(key, f, os.fstat(f.fileno()).st_size, checksum)

    @contextlib.contextmanager
    def writer(self, key: str, *, checksum: bool = False) -> Iterator[BinaryIO]:
        """Streams an object in as it is produced (a checkpoint straight from its serializer): no
        scratch copy, all-or-nothing, the sha256 sidecar (with ``checksum``) computed on the way and
        written once the object is in place. ``writer.info`` holds the result after the block."""
        key = self._key(key)
        with self._open(key) as sink:
            hashed = _Hashed(sink)
            yield hashed
        hashed.info = self._record_sha256(key, self._info(key), hashed.hash.hexdigest() if checksum else None)

    def put_bytes(self, key: str, data: bytes, *, checksum: bool = False) -> ObjectInfo:
        return self._put(key, io.BytesIO(data), len(data), checksum)

    def write_text(self, key: str, text: str) -> ObjectInfo:
        return self.put_bytes(key, text.encode("utf-8"))

    def _recorded_sha256(self, key: str) -> str:
        expected = self.sha256_of(key)
        if expected is None:
            raise self._error(key, f"no recorded sha256 ({key}{SIDECAR} is missing)", ChecksumMismatch)
        return expected

    def _check_sha256(self, key: str, hashed: _Hashed, expected: str) -> None:
        if (actual := hashed.hash.hexdigest()) != expected:
            raise self._error(key, f"sha256 is {actual}, recorded {expected}", ChecksumMismatch)

    def get_file(self, key: str, local_path: str | os.PathLike, *, verify: bool = False,
                 sha256: str | None = None) -> ObjectInfo:
        """Download into ``local_path`` all-or-nothing (parents created).

        With ``verify`` the bytes must match the recorded sha256 (or ``sha256``, when the caller
        knows what it expects), else ChecksumMismatch and ``local_path`` is left untouched.
        """
        key = self._key(key)
        expected = (sha256 or self._recorded_sha256(key)) if verify else None
        with atomic_file(pathlib.Path(local_path)) as f:
            sink = _Hashed(f) if verify else f
            info = self._read(key, sink)
            if verify:
                self._check_sha256(key, sink, expected)
        return replace(info, sha256=expected)

    def verify(self, key: str, sha256: str | None = None) -> str:
        """Checks ``key`` against its recorded sha256 (or ``sha256``) without keeping a copy; returns the digest."""
        key = self._key(key)
        expected = sha256 or self._recorded_sha256(key)
        with open(os.devnull, "wb") as null:
            sink = _Hashed(null)
            self._read(key, sink)
        self._check_sha256(key, sink, expected)
        return expected

    def get_bytes(self, key: str) -> bytes:
        buf = io.BytesIO()
        self._read(self._key(key), buf)
        return buf.getvalue()

    def read_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def exists(self, key: str) -> bool:
        try:
            self._info(self._key(key))
        except ObjectNotFound:
            return False
        return True

    def stat(self, key: str) -> ObjectInfo:
        """Size/mtime of ``key`` plus its recorded sha256; ObjectNotFound if absent."""
        return replace(self._info(self._key(key)), sha256=self.sha256_of(key))

    def sha256_of(self, key: str) -> str | None:
        """The recorded sidecar digest, None if there is none."""
        buf = io.BytesIO()
        try:
            self._read(self._key(key) + SIDECAR, buf)
        except ObjectNotFound:
            return None
        return buf.getvalue().decode("ascii", "replace").strip()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (recursive, sorted by key; sidecars folded into ``sha256``)."""
        found = {info.key: info for info in self._iter(check_key(prefix, prefix=True))}
        return [
            replace(info, sha256=self.sha256_of(key) if key + SIDECAR in found else None)
            for key, info in sorted(found.items())
            if not key.endswith(SIDECAR)
        ]

    def delete(self, key: str) -> None:
        """Delete ``key`` and its sidecar; missing is fine."""
        key = self._key(key)
        self._remove(key + SIDECAR)  # first: a stop in between leaves an object a listing still finds
        self._remove(key)

    def remove_interrupted_writes(self, prefix: str = "") -> None:
        """Remove what writes cut short by a kill left under ``prefix`` (no writer may be at work
        there). Nothing here: an S3 multipart upload that never completed stays invisible, and the
        bucket's AbortIncompleteMultipartUpload lifecycle rule reclaims its parts."""

    def delete_all(self) -> int:
        """Delete every object under this store's root; returns how many there were."""
        objects = self.list()
        for info in objects:
            self.delete(info.key)
        return len(objects)

    def move(self, src_key: str, dst_key: str) -> None:
        """Rename an object (and its sidecar); ObjectNotFound if ``src_key`` is absent."""
        src, dst = self._key(src_key), self._key(dst_key)
        if src == dst:
            self._info(src)
            return
        self._rename(src, dst)
        try:
            self._rename(src + SIDECAR, dst + SIDECAR)
        except ObjectNotFound:
            self._remove(dst + SIDECAR)

    def sync_up(self, local_dir: str | os.PathLike, prefix: str = "", *, checksum: bool = False) -> list[ObjectInfo]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``, skipping ``*.tmp*``.
        A local store's checksum sidecars are not uploaded as files: the files they belong to are
        uploaded with a checksum (as with ``checksum=True``, which does that for every file).

        Copy only: objects with no local counterpart are left alone.
        """
        root, base = pathlib.Path(local_dir), _dir_prefix(prefix)
        files = sorted(p for p in root.rglob("*") if p.is_file() and not _is_skipped(p.relative_to(root)))
        sidecars = {p for p in files if p.name.endswith(SIDECAR) and p.with_name(p.name[:-len(SIDECAR)]).is_file()}
        return [self.put_file(base + p.relative_to(root).as_posix(), p,
                              checksum=checksum or p.with_name(p.name + SIDECAR) in sidecars)
                for p in files if p not in sidecars]

    def sync_down(self, local_dir: str | os.PathLike, prefix: str = "", *, verify: bool = False) -> list[ObjectInfo]:
        """Download every object under ``prefix/`` into ``local_dir`` (copy only, nothing deleted)."""
        base = _dir_prefix(prefix)
        return [
            self.get_file(info.key, pathlib.Path(local_dir, info.key[len(base):]), verify=verify)
            for info in self.list(base)
        ]
