"""Storage access through fsspec: the same calls for local disk and object stores.

Example::

    from pipeline.storage import open_storage
    store = open_storage("/srv/models/my_model")
    store.create_only(store.join(store.root, "_exports", "claims", "17"), b"owner")

Local paths get POSIX semantics where they matter (``O_EXCL`` for create-only
writes, ``fsync`` before a rename); object stores get their server-side
preconditions (``ifGenerationMatch=0`` on GCS).
"""

from __future__ import annotations

import errno
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Entry:
    name: str          # base name
    path: str          # full path, without protocol
    is_dir: bool
    size: int
    mtime: float | None
    crc32c: str | None = None


class Storage:
    """One filesystem (local, gs://, s3://, memory://…) and the root path in it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url_in = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as err:
            raise PipelineError(f"cannot open storage ({err}): {url}") from None
        protocol = self.fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        self.is_local = self.protocol in ("file", "local")
        self.root = self.root.rstrip("/") or "/"

    # -- paths -----------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return posixpath.join(*parts) if not self.is_local else os.path.join(*parts)

    def url(self, path: str) -> str:
        """The path as a user would write it (with ``gs://`` where it applies)."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    def rel(self, *parts: str) -> str:
        return self.join(self.root, *parts)

    # -- reading ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        if self.is_local:
            return os.path.isdir(path)
        return self.fs.isdir(path)

    def isfile(self, path: str) -> bool:
        if self.is_local:
            return os.path.isfile(path)
        return self.fs.isfile(path)

    def list_dir(self, path: str) -> list[Entry]:
        """Children of ``path`` in one listing call; empty when ``path`` is absent."""
        if self.is_local:
            out = []
            try:
                with os.scandir(path) as it:
                    for de in it:
                        try:
                            st = de.stat()
                        except FileNotFoundError:
                            continue  # removed while listing
                        out.append(Entry(de.name, de.path, de.is_dir(), st.st_size, st.st_mtime))
            except (FileNotFoundError, NotADirectoryError):
                return []
            return out
        self.invalidate(path)
        try:
            infos = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            full = info["name"].rstrip("/")
            if full == path.rstrip("/"):
                continue
            out.append(
                Entry(
                    posixpath.basename(full),
                    full,
                    info.get("type") == "directory",
                    int(info.get("size") or 0),
                    _mtime(info),
                    info.get("crc32c"),
                )
            )
        return out

    def info(self, path: str) -> Entry:
        if self.is_local:
            st = os.stat(path)
            return Entry(os.path.basename(path), path, os.path.isdir(path), st.st_size, st.st_mtime)
        self.invalidate(path)
        info = self.fs.info(path)
        return Entry(posixpath.basename(path.rstrip("/")), path, info.get("type") == "directory",
                     int(info.get("size") or 0), _mtime(info), info.get("crc32c"))

    def read_bytes(self, path: str) -> bytes:
        if self.is_local:
            with open(path, "rb") as fh:
                return fh.read()
        return self.fs.cat_file(path)

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    # -- writing ---------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        if self.is_local:
            os.makedirs(path, exist_ok=True)
        else:
            self.fs.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Overwriting write; locally durable (fsync) before it returns."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return
        self.fs.pipe_file(path, data)

    def create_only(self, path: str, data: bytes) -> bool:
        """Write ``path`` only if it does not exist yet. False when it already did.

        This is the one primitive that makes claims and the ledger safe between
        processes and machines: ``O_EXCL`` locally, a generation-0 precondition
        on GCS, ``If-None-Match: *`` on S3.
        """
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(os.path.dirname(path))
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:
            raise PipelineError(
                f"storage '{self.protocol}' offers no create-only write, which claims need: {self.url(path)}"
            ) from None
        except OSError as err:
            if _is_precondition_failure(err):
                return False
            raise
        return True

    def rm(self, path: str, recursive: bool = False) -> None:
        if self.is_local:
            if os.path.isdir(path):
                import shutil
                shutil.rmtree(path, ignore_errors=False)
            elif os.path.exists(path):
                os.remove(path)
            return
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        self.invalidate(path)

    def invalidate(self, path: str | None = None) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "updated", "LastModified", "last_modified", "timeCreated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            from datetime import datetime

            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def _is_precondition_failure(err: OSError) -> bool:
    code = getattr(err, "code", None) or getattr(err, "errno", None)
    return code in (412, errno.EEXIST) or "412" in str(err) or "precondition" in str(err).lower()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush every file and directory below ``path`` to disk, children before parents."""
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def open_storage(url: str, storage_options: dict[str, Any] | None = None) -> Storage:
    return Storage(url, storage_options)
