"""Any other fsspec filesystem (``memory://``, ``http://``…) through fsspec's generic calls.

Nothing here knows the server, so nothing here promises more than fsspec
does: listings are one ``ls``/``find`` call, copies and deletes go one object
at a time. The one guarantee the pipeline cannot do without, an atomic
create-only write, is used only where it is one conditional request (see
:data:`ATOMIC_CREATE_PROTOCOLS`) and refused elsewhere.
"""

from __future__ import annotations

import posixpath
from typing import Any

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage.base import Store
from tf_export_pipeline.storage.entry import Entry, mtime_of
from tf_export_pipeline.storage.errors import is_precondition_failure

# fsspec backends whose ``pipe_file(mode="create")`` is one conditional request.
# Elsewhere fsspec emulates it with exists-then-write, which two writers can
# both pass. S3 offers it and has a store of its own (s3.py).
ATOMIC_CREATE_PROTOCOLS: tuple[str, ...] = ()


class FsspecStore(Store):
    """A filesystem fsspec opens that is neither local disk nor GCS."""

    # -- reading ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        with self._errors("checking", path):
            return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        with self._errors("checking", path):
            return self.fs.isdir(path)

    def isfile(self, path: str) -> bool:
        with self._errors("checking", path):
            return self.fs.isfile(path)

    def list_dir(self, path: str) -> list[Entry]:
        self.invalidate(path)
        try:
            with self._errors("listing", path):
                infos = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            full = info["name"].rstrip("/")
            if full == path.rstrip("/"):
                continue
            out.append(Entry(posixpath.basename(full), full, info.get("type") == "directory",
                             int(info.get("size") or 0), mtime_of(info), info.get("crc32c")))
        return out

    def walk(self, path: str) -> list[Entry]:
        try:
            with self._errors("listing", path):
                infos = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        root = path.rstrip("/") + "/"
        return sorted((Entry(name[len(root):], name, False, int(i.get("size") or 0), mtime_of(i), i.get("crc32c"))
                       for name, i in infos.items() if name.startswith(root)), key=lambda e: e.name)

    def info(self, path: str) -> Entry:
        self.invalidate(path)
        with self._errors("reading metadata", path):
            info = self.fs.info(path)
        return Entry(posixpath.basename(path.rstrip("/")), path, info.get("type") == "directory",
                     int(info.get("size") or 0), mtime_of(info), info.get("crc32c"))

    # -- writing ---------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        with self._errors("creating a directory", path, write=True):
            self.fs.makedirs(path, exist_ok=True)

    def create_only(self, path: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        if self.protocol not in ATOMIC_CREATE_PROTOCOLS:
            raise PipelineError(
                f"storage '{self.protocol}' offers no atomic create-only write, which version claims and the "
                f"ledger need (use local disk, gs://, s3:// or az://): {self.url(path)}")
        try:
            with self._errors("writing (create-only)", path, write=True):
                self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:
            raise PipelineError(
                f"storage '{self.protocol}' offers no create-only write, which claims need: {self.url(path)}"
            ) from None
        except OSError as err:
            if is_precondition_failure(err):
                return False
            raise
        return True

    def _read_for_removal(self, path: str) -> tuple[bytes, Any]:
        # No generation to match the removal to: what was read torn is removed by name.
        return self.read_bytes(path), None

    def _remove_seen(self, path: str, seen: Any) -> bool:
        self.rm(path)
        return True

    def rm(self, path: str, recursive: bool = False) -> None:
        try:
            with self._errors("deleting", path):
                self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        self.invalidate(path)

    # -- whole directories -------------------------------------------------------
    def _put_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        results: list[Any] = []
        for lp, rp in pairs:
            try:
                self.fs.put_file(lp, rp)
                results.append(None)
            except Exception as err:  # noqa: BLE001 - checked and retried by the caller
                results.append(err)
        return results
