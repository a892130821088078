"""One small interface over URIs (local paths, ``file://``, ``s3://``) for checkpoints and run directories."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping

from .base import ChecksumMismatch, ObjectInfo, ObjectNotFound, StorageError, Store
from .local import LocalStore
from .s3 import S3Config, S3Store

__all__ = [
    "ChecksumMismatch", "LocalStore", "ObjectInfo", "ObjectNotFound", "S3Config", "S3Store",
    "StorageError", "Store", "open_store",
]


def open_store(uri: str | os.PathLike, *, environ: Mapping[str, str] | None = None) -> Store:
    """The Store for ``uri``: ``file:///x``, ``/abs/path`` or ``relative/path`` (made absolute) -> LocalStore;
    ``s3://bucket/prefix`` -> S3Store configured from ``environ`` (default os.environ, see S3Config.from_environ).

    Never creates buckets (see S3Store.ensure_bucket).
    """
    uri = os.fspath(uri)
    if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        return LocalStore(uri)  # a plain path, made absolute
    url = urllib.parse.urlsplit(uri)
    if url.username or url.password:  # don't echo: that would print the credentials
        raise StorageError("storage URIs must not contain credentials; use the KONTINUE_S3_* variables")
    if url.scheme == "file" and url.netloc in ("", "localhost") and url.path:
        return LocalStore(urllib.parse.unquote(url.path))
    if url.scheme == "s3" and url.netloc:
        return S3Store(S3Config.from_environ(environ), url.netloc, url.path)
    raise StorageError(f"unsupported storage URI {uri!r}: expected file:///path, s3://bucket/prefix or a path")
