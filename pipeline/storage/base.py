"""The interface every store offers.

Example::

    from tf_export_pipeline.storage import open_storage
    store = open_storage("memory://models/m")
    store.write_bytes(store.join(store.root, "a.txt"), b"a")
    print([(e.name, e.size) for e in store.list_dir(store.root)])

:class:`Store` holds what does not depend on the backend (error translation,
whole-directory transfers checked and sent again until whole, the defaults
that go through fsspec's generic calls); a backend subclass overrides the
rest. Its listings return :class:`~tf_export_pipeline.storage.entry.Entry`.
Kept apart from the package's ``__init__`` so that the backends can subclass
it without importing the module that imports them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from tf_export_pipeline.errors import ConfigError, PipelineError
from tf_export_pipeline.storage.entry import Entry
from tf_export_pipeline.storage.errors import ChecksumMismatch, storage_error_reason, translate
from tf_export_pipeline.storage.transfers import CONCURRENCY, TRANSFER_ATTEMPTS, backoff, crc32c_of_file

log = logging.getLogger("tf_export_pipeline.storage")


class Store:
    """One filesystem (local, gs://, s3://, memory://…) and the root path in it.

    The interface every backend offers. Methods that raise NotImplementedError
    here are the backend's; the rest are shared, and the defaults that go
    through fsspec's generic calls are overridden where a backend does better.
    """

    protocols: tuple[str, ...] = ()  # fsspec protocols this class serves (see open_storage)
    # Kept for callers that choose behaviour outside storage (serving, promotion, retention).
    is_local = False
    is_gcs = False
    #: Whether :meth:`read_versioned`, :meth:`write_if` and :meth:`token_of` are offered (a model config
    #: file read, changed and written back only if nobody wrote it in between).
    conditional_overwrite = False
    #: Exceptions :meth:`_errors` lets through as they are: each already says what callers need.
    _passed_through: tuple[type[BaseException], ...] = (FileExistsError, PipelineError)

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        try:
            fs, root = self._open_fs(url, dict(storage_options or {}))
        except ImportError as err:
            # A package the filesystem needs is missing: installing it mends this, no rerun does.
            detail = " ".join(str(err).split())[:200] or type(err).__name__
            scheme = fsspec.core.split_protocol(url)[0] or "file"
            raise ConfigError(f"storage '{scheme}://' needs a package that is not installed ({detail}): "
                              f"{url}") from None
        except (ValueError, TypeError) as err:
            detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise PipelineError(f"cannot open storage ({detail}): {url}") from None
        self.fs = fs
        protocol = fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        self.root = root.rstrip("/") or "/"

    @classmethod
    def _open_fs(cls, url: str, options: dict[str, Any]) -> tuple[Any, str]:
        # Listings are always fresh: other processes and machines change the bucket.
        options.setdefault("use_listings_cache", False)
        return fsspec.core.url_to_fs(url, **options)

    # -- paths -----------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def url(self, path: str) -> str:
        """The path as a user would write it (with ``gs://`` where it applies)."""
        return self.fs.unstrip_protocol(path)

    def strip(self, url_or_path: str) -> str:
        """A URL of this storage as a path in it (``gs://b/k`` -> ``b/k``)."""
        return self.fs._strip_protocol(url_or_path).rstrip("/")

    # -- errors ----------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, action: str, path: str, write: bool = False) -> Iterator[None]:
        """Turn a permanent or exhausted remote error into a one-line PipelineError."""
        try:
            yield
        except self._passed_through:
            raise
        except FileNotFoundError as err:
            self._not_found(path, write, err)
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised when unknown
            mapped = self._translate(err, action, path)
            if mapped is None:
                raise
            raise mapped from None

    def _translate(self, err: BaseException, action: str, path: str) -> PipelineError | None:
        return translate(err, action, self.url(path))

    def _not_found(self, path: str, write: bool, err: BaseException | None = None) -> None:
        """Called when acting on ``path`` raised FileNotFoundError (``err``, where there is one); raise a
        clearer error if there is one.

        A backend whose paths live in containers (GCS buckets) tells a missing
        container from a missing object here.
        """

    # -- read-modify-write -------------------------------------------------------
    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """The object's bytes and a token naming exactly that content (GCS: its generation; S3 and Azure:
        its ETag), for :meth:`write_if`. FileNotFoundError when there is no such object."""
        raise NotImplementedError(f"{type(self).__name__} offers no conditional overwrite")

    def write_if(self, path: str, data: bytes, token: str | None, metadata: dict[str, str] | None = None) -> str:
        """Write ``data`` only if the object is still the one :meth:`read_versioned` gave ``token`` for
        (``None``: only if there is no object). Raises FileExistsError when it changed or appeared;
        returns the new object's token."""
        raise NotImplementedError(f"{type(self).__name__} offers no conditional overwrite")

    def token_of(self, path: str) -> tuple[str, dict[str, str]]:
        """The object's token (as :meth:`read_versioned` gives it) and its metadata; FileNotFoundError."""
        raise NotImplementedError(f"{type(self).__name__} offers no conditional overwrite")

    # -- reading ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def isdir(self, path: str) -> bool:
        raise NotImplementedError

    def isfile(self, path: str) -> bool:
        raise NotImplementedError

    def list_dir(self, path: str) -> list[Entry]:
        """Children of ``path`` in one listing call (per page); empty when ``path`` is absent."""
        raise NotImplementedError

    def walk(self, path: str) -> list[Entry]:
        """Every file below ``path`` (any depth), named relative to it, sorted by that name."""
        raise NotImplementedError

    def info(self, path: str) -> Entry:
        raise NotImplementedError

    def read_bytes(self, path: str) -> bytes:
        with self._errors("reading", path):
            return self.fs.cat_file(path)

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    # -- writing ---------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        raise NotImplementedError

    def write_bytes(self, path: str, data: bytes) -> None:
        """Overwriting write; locally durable (fsync) before it returns."""
        with self._errors("writing", path, write=True):
            self.fs.pipe_file(path, data)

    def create_only(self, path: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        """Write ``path`` only if it does not exist yet. False when it already did.

        This is the one primitive that makes claims and the ledger safe between
        processes and machines: ``link(2)`` of a flushed temporary file locally,
        a generation-0 precondition on GCS, ``If-None-Match: *`` on S3. The
        object appears whole or not at all.

        ``metadata`` (GCS) is stored as the object's custom metadata, which
        listings return: a reader can learn it without one request per object.
        """
        raise NotImplementedError

    def remove_if_torn(self, path: str, torn: Callable[[bytes], bool]) -> bool:
        """Remove the create-only object at ``path`` if its content is ``torn``; True when removed.

        New create-only writes appear whole or not at all; a torn one is left
        by an older writer or a damaged disk, and blocks its key for ever.
        Where the backend can, the removal is matched to what was read (the
        generation on GCS, the inode locally), so an entry written since is
        left alone.
        """
        try:
            data, seen = self._read_for_removal(path)
        except FileNotFoundError:
            return False
        if not torn(data):
            return False
        return self._remove_seen(path, seen)

    def _read_for_removal(self, path: str) -> tuple[bytes, Any]:
        """The bytes at ``path`` and what a removal of them is matched to (a generation's entry, an ETag,
        an inode; None where the backend has nothing to match). FileNotFoundError when there is nothing."""
        raise NotImplementedError

    def _remove_seen(self, path: str, seen: Any) -> bool:
        """Remove ``path`` if it is still what :meth:`_read_for_removal` saw as ``seen``; True when removed."""
        raise NotImplementedError

    def rm(self, path: str, recursive: bool = False) -> None:
        """Remove ``path`` (a tree with ``recursive``); what is already gone counts as removed."""
        raise NotImplementedError

    def invalidate(self, path: str | None = None) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)

    # -- whole directories -------------------------------------------------------
    def upload_dir(self, local_dir: str, remote_dir: str) -> None:
        """Upload every file below ``local_dir`` into ``remote_dir`` once, then check it.

        The check is one listing of ``remote_dir``: each object must have the size
        and (where the server reports one) the crc32c of its local file. A file
        that does not (an upload cut short and not noticed) is uploaded again,
        up to TRANSFER_ATTEMPTS times.
        """
        files: dict[str, str] = {}
        for dirpath, _dirs, names in os.walk(local_dir):
            for name in names:
                full = os.path.join(dirpath, name)
                files[os.path.relpath(full, local_dir).replace(os.sep, "/")] = full
        want = {rel: (os.path.getsize(p), self._upload_checksum(p)) for rel, p in files.items()}
        todo = sorted(files)
        for attempt in range(TRANSFER_ATTEMPTS):
            errors = self._upload_once([(files[rel], posixpath.join(remote_dir, rel)) for rel in todo])
            have = {e.name: e for e in self.walk(remote_dir)}
            todo = [rel for rel, (size, crc) in want.items()
                    if rel not in have or have[rel].size != size or (crc and have[rel].crc32c != crc)]
            if not todo:
                return
            if attempt + 1 < TRANSFER_ATTEMPTS:
                log.warning("re-uploading %d of %d files into %s", len(todo), len(want), self.url(remote_dir))
                backoff(attempt)
        first = errors[0] if errors else None
        reason = storage_error_reason(first) if first is not None else None
        raise PipelineError(f"upload failed after {TRANSFER_ATTEMPTS} attempts "
                            f"({reason or f'{len(todo)} files missing or corrupt, e.g. {todo[0]}'}): "
                            f"{self.url(remote_dir)}")

    def _upload_once(self, pairs: list[tuple[str, str]]) -> list[BaseException]:
        """One upload attempt per pair; the transient failures, for the caller's check to retry.

        A permanent one (a missing bucket, 403, 401, 400) raises at once: no retry cures it.
        """
        results = self._put_files(pairs)
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if isinstance(err, FileNotFoundError):
                self._not_found(pairs[0][1], write=True)
            if storage_error_reason(err, permanent_only=True):
                raise self._translate(err, "uploading", pairs[0][1]) or err
        return errors

    def download_files(self, entries: list[Entry], local_dir: str, relative_to: str | None = None) -> None:
        """Download ``entries`` into ``local_dir`` (by base name, or relative to ``relative_to``).

        Each file is checked against the crc32c in its entry (the server's) and
        fetched again when it does not match; FileNotFoundError when one is gone.
        """
        targets = {}
        for e in entries:
            rel = posixpath.relpath(e.path, relative_to) if relative_to else posixpath.basename(e.path)
            targets[e.path] = os.path.join(local_dir, *rel.split("/"))
        todo = list(entries)
        last_error: BaseException | None = None
        for attempt in range(TRANSFER_ATTEMPTS):
            pairs = [(e.path, targets[e.path]) for e in todo]
            for _, lpath in pairs:
                os.makedirs(os.path.dirname(lpath), exist_ok=True)
            results = self._get_files(pairs)
            retry = []
            for e, res in zip(todo, results):
                if isinstance(res, FileNotFoundError):
                    raise FileNotFoundError(self.url(e.path))
                if isinstance(res, BaseException):
                    if storage_error_reason(res, permanent_only=True):
                        raise self._translate(res, "downloading", e.path) or res
                    last_error = res
                    retry.append(e)
                    continue
                if e.crc32c and crc32c_of_file(targets[e.path]) != e.crc32c:
                    last_error = ChecksumMismatch(f"downloaded file does not match its crc32c: {self.url(e.path)}")
                    retry.append(e)
            if not retry:
                return
            todo = retry
            if attempt + 1 < TRANSFER_ATTEMPTS:
                backoff(attempt)
        if isinstance(last_error, PipelineError):
            raise last_error
        reason = storage_error_reason(last_error) if last_error else None
        raise PipelineError(f"download failed after {TRANSFER_ATTEMPTS} attempts ({reason or 'unknown error'}): "
                            f"{self.url(todo[0].path)}")

    def download_dir(self, remote_dir: str, local_dir: str) -> None:
        """Every file below ``remote_dir`` into ``local_dir``, checked against its crc32c."""
        entries = self.walk(remote_dir)
        if not entries:
            raise FileNotFoundError(self.url(remote_dir))
        self.download_files(entries, local_dir, relative_to=remote_dir.rstrip("/"))

    def _upload_checksum(self, local_path: str) -> str | None:
        """The crc32c the server will list for the upload of ``local_path``; None where it lists none."""
        return None

    def _put_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        """One upload attempt per (local, remote) pair: None or the exception, per pair."""
        raise NotImplementedError

    def _get_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        """One download attempt per (remote, local) pair: None or the exception, per pair."""
        results: list[Any] = []
        for rp, lp in pairs:
            try:
                self.fs.get_file(rp, lp)
                results.append(None)
            except Exception as err:  # noqa: BLE001 - classified by the caller
                results.append(err)
        return results

    # -- server-side copies and deletes ---------------------------------------------
    def copy_objects(self, pairs: list[tuple[Entry, str]], created: list[Entry] | None = None,
                     limit: int = CONCURRENCY) -> int:
        """Copy each source entry to its destination path on the server.

        The destination is create-only where the server honours it; a
        destination that exists with the source's size (and crc32c, where
        known) counts as copied (the retry of a copy whose answer was lost).
        Each new destination is appended to ``created`` as it lands, so a
        caller can undo a partial copy. Returns the bytes copied; raises the
        first failure.

        This default copies one by one through fsspec and compares sizes only.
        """
        created = created if created is not None else []
        copied = 0
        for src, dst in pairs:
            with self._errors("copying", src.path):
                if self.fs.exists(dst):
                    have = self.fs.info(dst)
                    if int(have.get("size") or 0) == src.size:
                        continue
                    raise FileExistsError(f"destination exists with other content: {self.url(dst)}")
                self.fs.copy(src.path, dst)
            created.append(Entry(posixpath.basename(dst), dst, False, src.size, None, src.crc32c))
            copied += src.size
        return copied

    def delete_objects(self, entries: list[Entry], limit: int = CONCURRENCY) -> list[str]:
        """Delete the listed objects, each only at the generation it was listed with (where there are any).

        An object already gone counts as deleted; one rewritten since it was
        listed is left in place and returned. This default deletes one by one
        and cannot tell a rewritten object: it returns nothing.
        """
        for e in entries:
            try:
                with self._errors("deleting", e.path):
                    self.fs.rm_file(e.path)
            except FileNotFoundError:
                pass
        return []
