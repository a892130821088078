"""A Store on a local (or mounted, e.g. a PersistentVolume) directory."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import BinaryIO

from .base import (CHUNK, ObjectInfo, ObjectNotFound, StorageError, Store, atomic_file, check_key,
                   is_temp_name)


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key, st.st_size, None, st.st_mtime)


class LocalStore(Store):
    """Objects are plain files under ``root``; writes go through a temp file + os.replace."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root).absolute()
        self.uri = self.root.as_uri()

    def child(self, *parts: str) -> LocalStore:
        return LocalStore(self.root.joinpath(*(check_key(p) for p in parts)))

    def delete_all(self) -> int:
        """Also removes what listing skips (temporaries of a killed writer) and the directories."""
        count = len(self.list())
        try:
            shutil.rmtree(self.root)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise StorageError(f"{self.uri}: {error}") from error
        return count

    def local_path(self, key: str) -> pathlib.Path:
        """The file backing ``key`` (it may not exist yet)."""
        return self.root / self._key(key)

    @contextlib.contextmanager
    def _errors(self, key: str, missing=(FileNotFoundError, NotADirectoryError)) -> Iterator[None]:
        try:
            yield
        except missing as exc:
            raise self._error(key, "no such object", ObjectNotFound) from exc
        except OSError as exc:
            raise self._error(key, str(exc)) from exc

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        with self._errors(key, missing=()), atomic_file(self.root / key) as f:
            yield f

    def _write(self, key: str, stream: BinaryIO, size: int) -> ObjectInfo:
        path = self.root / key
        with self._errors(key, missing=()), atomic_file(path) as f:
            shutil.copyfileobj(stream, f, CHUNK)
        return _info(key, path.stat())

    def _read(self, key: str, sink: BinaryIO) -> ObjectInfo:
        with self._errors(key), open(self.root / key, "rb") as f:
            shutil.copyfileobj(f, sink, CHUNK)
            return _info(key, os.fstat(f.fileno()))

    def _info(self, key: str) -> ObjectInfo:
        with self._errors(key):
            path = self.root / key
            if not path.is_file():
                raise FileNotFoundError(path)
            return _info(key, path.stat())

    def _iter(self, prefix: str) -> Iterator[ObjectInfo]:
        for dirpath, _, names in os.walk(self.root / prefix.rpartition("/")[0]):
            for name in names:
                path = pathlib.Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix) or is_temp_name(name):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted while we walked
                    continue
                yield _info(key, st)

    def remove_interrupted_writes(self, prefix: str = "") -> None:
        """Temp files of `atomic_file`s a kill cut short (a checkpoint's can be gigabytes)."""
        for dirpath, _, names in os.walk(self.root / check_key(prefix, prefix=True).rpartition("/")[0]):
            for name in names:
                path = pathlib.Path(dirpath, name)
                if is_temp_name(name) and path.relative_to(self.root).as_posix().startswith(prefix):
                    path.unlink(missing_ok=True)

    def _remove(self, key: str) -> None:
        with self._errors(key):
            (self.root / key).unlink(missing_ok=True)

    def _rename(self, src: str, dst: str) -> None:
        with self._errors(dst):
            (self.root / dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / src, self.root / dst)
