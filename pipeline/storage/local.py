"""Local disk with POSIX semantics where they matter.

A create-only write is a flushed temporary file linked to its name
(``link(2)`` never replaces), so a claim or a ledger entry appears whole or not
at all, even on a full disk or after a kill. Overwrites are flushed before
they return; :func:`fsync_dir` and :func:`fsync_tree` make a rename durable.
Removal tolerates what another process removed meanwhile.
"""

from __future__ import annotations

import os
import secrets
import shutil
from typing import Any

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.layout import TEMP_MARK
from tf_export_pipeline.storage.base import Store
from tf_export_pipeline.storage.entry import Entry


class LocalStore(Store):
    """A directory tree on local disk (``/path`` or ``file://``)."""

    protocols = ("file", "local")
    is_local = True

    @classmethod
    def _open_fs(cls, url: str, options: dict[str, Any]) -> tuple[Any, str]:
        # Unlike remote stores, no listings cache to turn off: every listing here is os.scandir.
        import fsspec

        return fsspec.core.url_to_fs(url, **options)

    # -- paths -----------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def url(self, path: str) -> str:
        return path

    def strip(self, url_or_path: str) -> str:
        return url_or_path

    # -- reading ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def list_dir(self, path: str) -> list[Entry]:
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

    def walk(self, path: str) -> list[Entry]:
        out = []
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                out.append(Entry(os.path.relpath(full, path), full, False, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.name)

    def info(self, path: str) -> Entry:
        st = os.stat(path)
        return Entry(os.path.basename(path), path, os.path.isdir(path), st.st_size, st.st_mtime)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    # -- writing ---------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def create_only(self, path: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        """Create ``path`` with ``data`` unless it exists: whole or not at all (``metadata`` is ignored).

        The bytes go to a temporary name in the same directory first, are flushed,
        then linked to ``path`` (``link(2)`` never replaces). A full disk or a
        kill leaves at most the temporary name, which no reader lists and ``gc``
        removes; never an empty or torn entry.
        """
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        if os.path.lexists(path):
            return False
        tmp = os.path.join(directory, f".{os.path.basename(path)}{TEMP_MARK}{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            fsync_dir(directory)
            return True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _read_for_removal(self, path: str) -> tuple[bytes, Any]:
        # Matched by inode: a file linked to this name since it was read is not the torn one.
        with open(path, "rb") as fh:
            seen = os.fstat(fh.fileno()).st_ino
            return fh.read(), seen

    def _remove_seen(self, path: str, seen: Any) -> bool:
        try:
            if os.stat(path).st_ino == seen:
                os.unlink(path)
                fsync_dir(os.path.dirname(path))
                return True
        except FileNotFoundError:
            return False
        return False

    def rm(self, path: str, recursive: bool = False) -> None:
        # A tree is removed whatever ``recursive`` says, as always; what another
        # process removed meanwhile counts as removed.
        def gone_already(_func, _path, exc):
            err = exc[1] if isinstance(exc, tuple) else exc
            if not isinstance(err, FileNotFoundError):
                raise err

        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=gone_already)
            return
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    # -- whole directories -------------------------------------------------------
    def upload_dir(self, local_dir: str, remote_dir: str) -> None:
        raise PipelineError(f"upload_dir is for object stores; copy local files directly: {remote_dir}")


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a link, a rename, an unlink in it) to disk."""
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
