"""Reading one image cell: a local path, a file:// or s3:// URI (through the storage layer), or bytes."""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

from PIL import Image

from kontinue.storage import Store, open_store


@lru_cache(maxsize=64)
def _bucket_store(bucket_uri: str) -> Store:
    """One client per bucket and process (each data-loader worker opens its own)."""
    return open_store(bucket_uri)


def read_image_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    uri = str(value).split(";")[0].strip()  # AutoMM: several images of one cell are ";"-separated
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return _bucket_store(f"s3://{bucket}").get_bytes(key)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    with open(path, "rb") as file:
        return file.read()


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value)


def load_image(value: Any) -> Image.Image:
    """An RGB image; a cell that is not an image fails naming what it holds."""
    data = read_image_bytes(value)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except OSError as error:
        shown = value if isinstance(value, str) else f"{len(data)} bytes"
        raise ValueError(f"cannot read an image from {shown}: {error}") from error
