"""What the bucket stores (GCS, S3, Azure Blob) share: paths are ``bucket/key``, directories are prefixes.

Each of those servers lists a prefix a page at a time, answers for one object
in one request, and copies and deletes objects on its side. :class:`BucketStore`
builds the listings, look-ups, removals and copies of the :class:`Store`
interface from those answers; a subclass says how its server is asked (the
hooks :meth:`~BucketStore._list_page`, :meth:`~BucketStore._file_stat`,
:meth:`~BucketStore._entry`, :meth:`~BucketStore._delete_key`,
:meth:`~BucketStore._copy_one`; or all of :meth:`~BucketStore._list`, where
the server's SDK does the paging) and what its failures mean.
"""

from __future__ import annotations

import functools
import logging
import posixpath
from typing import Any, NoReturn

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage.base import Store
from tf_export_pipeline.storage.entry import Entry
from tf_export_pipeline.storage.transfers import CONCURRENCY, gather

log = logging.getLogger("tf_export_pipeline.storage")


def split(path: str) -> tuple[str, str]:
    """``bucket/key`` as (bucket, key); the key is empty for the bucket itself."""
    bucket, _, key = path.strip("/").partition("/")
    return bucket, key


def listed_name(key: str, base_key: str = "", relative: bool = False) -> str:
    """An object's :attr:`Entry.name`: its base name, or (``relative``) its key below ``base_key``."""
    if relative:
        return key[len(base_key):].lstrip("/") if base_key else key
    return posixpath.basename(key.rstrip("/"))


def dir_entry(path: str) -> Entry:
    """The entry of a prefix (a "directory"): no size, no time."""
    path = path.rstrip("/")
    return Entry(posixpath.basename(path), path, True, 0, None)


class BucketStore(Store):
    """A bucket (or container) and a root prefix in it, on a server that lists by prefix."""

    #: What the objects are called in a log line (Azure calls them blobs).
    object_noun = "objects"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        super().__init__(url, storage_options)
        # Buckets a request has shown to exist: a missing bucket is looked for once per bucket and store.
        self._buckets_seen: set[str] = set()

    @property
    def bucket(self) -> str:
        return split(self.root)[0]

    def _bucket_missing(self, path: str) -> PipelineError:
        return PipelineError(f"bucket '{split(path)[0]}' does not exist: {self.url(path)}")

    def _list(self, path: str, delimiter: str | None, max_results: int | None = None) -> tuple[list[Any], list[str]]:
        """Objects and sub-prefixes under ``path/`` as the server lists them: one request per page (only
        the first, of ``max_results``, when that is given); a missing bucket raises."""
        bucket, key = split(path)
        prefix = key.rstrip("/") + "/" if key else ""
        items: list[Any] = []
        prefixes: list[str] = []
        token = None
        while True:
            try:
                with self._errors("listing", path):
                    page, page_prefixes, token = self._list_page(bucket, prefix, delimiter, max_results, token)
            except FileNotFoundError:
                raise self._bucket_missing(path) from None
            self._buckets_seen.add(bucket)
            items.extend(page)
            prefixes.extend(page_prefixes)
            if not token or max_results:
                return items, prefixes

    # -- hooks -------------------------------------------------------------------
    def _list_page(self, bucket: str, prefix: str, delimiter: str | None, max_results: int | None,
                   token: str | None) -> tuple[list[Any], list[str], str | None]:
        """One listing request (``max_results`` names at most; else the server's page size) from ``token``:
        the objects, the sub-prefixes, and the token of the next page (None after the last)."""
        raise NotImplementedError

    def _file_stat(self, path: str) -> Any:
        """The properties of the object at ``path``, one request; FileNotFoundError when there is none
        (or only a folder marker)."""
        raise NotImplementedError

    def _stat_entry(self, path: str, stat: Any) -> Entry:
        """The entry of the object at ``path`` from what :meth:`_file_stat` returned for it."""
        return self._entry(split(path)[0], stat)

    def _entry(self, bucket: str, item: Any, base_key: str = "", relative: bool = False) -> Entry:
        """The entry of one listed object (see :func:`listed_name` for its name)."""
        raise NotImplementedError

    def _is_folder_marker(self, item: Any) -> bool:
        """Whether a listed object stands for a folder (``dir/``, which some tools create), not a file."""
        raise NotImplementedError

    def _listed_files(self, bucket: str, items: list[Any], dirs: list[Entry]) -> list[Entry]:
        """The file entries of a one-level listing, beside its ``dirs``."""
        return [self._entry(bucket, o) for o in items if not self._is_folder_marker(o)]

    def _delete_key(self, path: str) -> None:
        """Delete the one object at ``path``, unconditionally; FileNotFoundError when it is gone."""
        raise NotImplementedError

    async def _copy_one(self, src: Entry, dst: str, created: list[Entry]) -> int:
        """Copy ``src`` to ``dst`` on the server, create-only; append the new entry to ``created``.

        Returns the bytes copied (0 for a destination already there with the
        source's content); FileExistsError for one with other content.
        """
        raise NotImplementedError

    def _copy_failed(self, err: BaseException, src: Entry) -> NoReturn:
        """Raise, for a copy of ``src`` that failed with ``err``, the error callers expect."""
        raise NotImplementedError

    # -- reading ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.isfile(path) or self.isdir(path)

    def isdir(self, path: str) -> bool:
        # A "directory" is a prefix with something under it; the bucket itself always is one.
        items, prefixes = self._list(path, "/", 1)
        return bool(items or prefixes) or not split(path)[1]

    def isfile(self, path: str) -> bool:
        if not split(path)[1]:
            return False
        try:
            self._file_stat(path)
        except FileNotFoundError:
            return False
        return True

    def list_dir(self, path: str) -> list[Entry]:
        bucket, _ = split(path)
        items, prefixes = self._list(path, "/")
        dirs = [dir_entry(f"{bucket}/{p}") for p in prefixes]
        return dirs + self._listed_files(bucket, items, dirs)

    def walk(self, path: str) -> list[Entry]:
        bucket, key = split(path)
        items, _ = self._list(path, None)
        base = key.rstrip("/") + "/" if key else ""
        return sorted((self._entry(bucket, o, base, relative=True) for o in items if not self._is_folder_marker(o)),
                      key=lambda e: e.name)

    def info(self, path: str) -> Entry:
        try:
            stat = self._file_stat(path)
        except FileNotFoundError:
            if self.isdir(path):
                return dir_entry(path)
            raise
        return self._stat_entry(path, stat)

    # -- writing ---------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        """Nothing to do: a bucket has no directories (and the fsspec backends' makedirs would create buckets)."""

    def rm(self, path: str, recursive: bool = False) -> None:
        if recursive:
            entries = self.walk(path)
            if entries:
                kept = self.delete_objects(entries)
                if kept:
                    log.warning("left %d %s rewritten since listing under %s", len(kept), self.object_noun,
                                self.url(path))
                return
        if split(path)[1]:
            try:
                self._delete_key(path)
            except FileNotFoundError:
                pass

    # -- server-side copies ----------------------------------------------------------
    def copy_objects(self, pairs: list[tuple[Entry, str]], created: list[Entry] | None = None,
                     limit: int = CONCURRENCY) -> int:
        """Copy each source entry to its destination on the server, ``limit`` at a time (:meth:`_copy_one`).

        A destination that exists with the source's content counts as copied
        and is not appended to ``created``: not ours to undo. Returns the bytes
        copied; raises the first failure.
        """
        created = created if created is not None else []
        results = gather(self.fs.loop, [functools.partial(self._copy_one, s, d, created) for s, d in pairs],
                         limit=limit)
        copied = 0
        for (src, dst), res in zip(pairs, results):
            if isinstance(res, FileExistsError):
                raise FileExistsError(f"destination exists with other content: {self.url(dst)}")
            if isinstance(res, BaseException):
                self._copy_failed(res, src)
            copied += res
        return copied
