"""Azure Blob Storage (``az://``, ``abfs://``), its server-side guarantees used directly.

Example::

    from tf_export_pipeline.storage import open_storage
    store = open_storage("az://models/serving/demo", {"account_name": "myaccount", "account_key": "..."})
    store.create_only(store.join(store.root, "_exports", "claims", "17"), b"owner")
    print([e.name for e in store.list_dir(store.root)])

adlfs parses the URLs and finds the credentials; every operation that matters
goes to the Blob service through azure-storage-blob's asyncio client
(``azure_client.py``), on adlfs's event loop, one request per blob
(``azure_objects.py``), so that each costs a known number of requests and
keeps the guarantee the service offers:

- listings: List Blobs, one request per page of 5000 names, with metadata; an
  entry carries the size, the ETag (as its ``generation``), and the crc32c
  recorded when this store uploaded the blob (trusted only while the blob's
  Content-MD5 is the one recorded beside it: ``azure_blobs.py``);
- create-only writes: one Put Blob with ``If-None-Match: *`` (409
  ``BlobAlreadyExists`` when the name is taken), a nonce in the blob's
  metadata to tell a lost-answer retry of our own write from a rival's blob;
- uploads: the server checks each body against its Content-MD5 and stores
  that MD5; downloads are checked against it (and against the crc32c);
- copies: Copy Blob on the server (no byte through the client), the
  destination ``If-None-Match: *``, the source matched to the ETag listed;
- deletes: matched to the ETag listed (``If-Match``), so a blob rewritten
  since is left alone;
- failures: one line from the table in ``azure_errors.py``, never the
  exception's text (it may carry a signature or a SAS token).

There is no rename without a hierarchical namespace: promotion moves each
object (copy, then delete). Credentials come from ``storage_options``
(``connection_string``; or ``account_name`` with ``account_key``,
``sas_token`` or ``credential``) or else from ``AZURE_STORAGE_CONNECTION_STRING``,
or ``AZURE_STORAGE_ACCOUNT_NAME`` with ``AZURE_STORAGE_KEY`` (or
``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_TOKEN``); an account
name alone uses Azure's default credential chain (managed identity, CLI login).
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import fsspec

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage import azure_objects
from tf_export_pipeline.storage.azure_blobs import (
    NONCE_KEY,
    blob_metadata,
    checksums,
    content_md5,
    is_folder_marker,
    own_metadata,
    quoted_etag,
    recorded_crc32c,
    same_content,
)
from tf_export_pipeline.storage.azure_client import client_of, open_filesystem
from tf_export_pipeline.storage.azure_errors import azure_reason, error_code
from tf_export_pipeline.storage.bucket import BucketStore, listed_name, split
from tf_export_pipeline.storage.entry import Entry
from tf_export_pipeline.storage.errors import ChecksumMismatch
from tf_export_pipeline.storage.transfers import CONCURRENCY, gather

# The SDK logs retried requests; with no logging set up, Python would print those to stderr beside our
# one-line error. Where logging is configured (Airflow, --verbose), they still reach its handlers.
logging.getLogger("azure").addHandler(logging.NullHandler())

LIST_PAGE_SIZE = 5000
TRANSFER_LIMIT = 8  # files moved at once by one upload_dir or download_files


class AzureBlobStore(BucketStore):
    """A container (and a root prefix in it) in Azure Blob Storage or Azurite."""

    protocols = ("az", "abfs", "abfss")
    conditional_overwrite = True
    object_noun = "blobs"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        super().__init__(url, storage_options)
        scheme = fsspec.core.split_protocol(url)[0] or "az"
        self.protocol = scheme if scheme in self.protocols else "az"
        self.client = client_of(self.fs, storage_options or {})

    @classmethod
    def _open_fs(cls, url: str, options: dict[str, Any]) -> tuple[Any, str]:
        return open_filesystem(url, options)

    @property
    def container(self) -> str:
        return self.bucket

    # -- paths -----------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"{self.protocol}://{path.lstrip('/')}"

    def invalidate(self, path: str | None = None) -> None:
        """Nothing to do: no listing is cached."""

    # -- errors ----------------------------------------------------------------
    def _translate(self, err: BaseException, action: str, path: str) -> PipelineError | None:
        if error_code(err) == "ContainerNotFound":
            return PipelineError(f"container '{split(path)[0]}' does not exist: {self.url(path)}")
        reason = azure_reason(err)
        if reason is None:
            return super()._translate(err, action, path)
        return PipelineError(f"{reason} while {action}: {self.url(path)}")

    def _raise(self, err: BaseException, action: str, path: str) -> NoReturn:
        """Re-raise an SDK error as what callers expect: FileNotFoundError, FileExistsError or one line."""
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

        if isinstance(err, ResourceNotFoundError) and error_code(err) != "ContainerNotFound":
            raise FileNotFoundError(self.url(path)) from None
        if isinstance(err, (ResourceExistsError, ResourceModifiedError)) and \
                error_code(err) not in ("ContainerBeingDeleted", "ContainerDisabled"):
            raise FileExistsError(self.url(path)) from None
        mapped = self._translate(err, action, path)
        if mapped is None:
            raise err
        raise mapped from None

    def _run(self, action: str, path: str, make: Callable[[], Any]) -> Any:
        """Run the coroutine ``make()`` on the filesystem's loop; errors as :meth:`_raise` has them."""
        async def run():
            return await make()

        try:
            return fsspec.asyn.sync(self.fs.loop, run)
        except (PipelineError, FileNotFoundError, FileExistsError):
            raise
        except Exception as err:  # noqa: BLE001 - classified, or re-raised as it is
            self._raise(err, action, path)

    def _blob(self, path: str):
        container, key = split(path)
        return self.client.get_blob_client(container, key)

    # -- listings --------------------------------------------------------------
    async def _alist(self, path: str, delimiter: str | None, max_results: int | None = None
                     ) -> tuple[list[Any], list[str]]:
        container, key = split(path)
        prefix = key.rstrip("/") + "/" if key else None
        cc = self.client.get_container_client(container)
        per_page = max_results or LIST_PAGE_SIZE
        if delimiter:
            pages = cc.walk_blobs(name_starts_with=prefix, include=["metadata"], delimiter=delimiter,
                                  results_per_page=per_page).by_page()
        else:
            pages = cc.list_blobs(name_starts_with=prefix, include=["metadata"],
                                  results_per_page=per_page).by_page()
        blobs: list[Any] = []
        prefixes: list[str] = []
        async for page in pages:
            async for item in page:
                if hasattr(item, "size"):
                    blobs.append(item)
                else:
                    prefixes.append(item.name)
            if max_results:
                break
        return blobs, prefixes

    def _list(self, path: str, delimiter: str | None, max_results: int | None = None
              ) -> tuple[list[Any], list[str]]:
        return self._run("listing", path, lambda: self._alist(path, delimiter, max_results))

    def _entry(self, container: str, blob: Any, base_key: str = "", relative: bool = False) -> Entry:
        name = blob.name
        shown = listed_name(name, base_key, relative)
        meta = dict(blob.metadata or {})
        crc = recorded_crc32c(meta, content_md5(blob))
        mtime = blob.last_modified.timestamp() if blob.last_modified else None
        return Entry(shown, f"{container}/{name}", False, int(blob.size or 0), mtime, crc, quoted_etag(blob.etag),
                     own_metadata(meta) or None)

    def _is_folder_marker(self, blob: Any) -> bool:
        return is_folder_marker(blob)

    def _listed_files(self, container: str, blobs: list[Any], dirs: list[Entry]) -> list[Entry]:
        # A directory blob beside its prefix (a hierarchical namespace lists both) is shown once, as the directory.
        names = {e.name for e in dirs}
        return [self._entry(container, b) for b in blobs
                if not self._is_folder_marker(b) and posixpath.basename(b.name) not in names]

    def _file_stat(self, path: str) -> Any:
        props = self._run("reading blob properties", path, lambda: self._blob(path).get_blob_properties())
        if self._is_folder_marker(props):
            raise FileNotFoundError(self.url(path))
        return props

    # -- reading ---------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        async def read():
            stream = await self._blob(path).download_blob()
            return await stream.readall()

        return self._run("reading", path, read)

    # -- writing ---------------------------------------------------------------
    def _put(self, path: str, data: bytes, metadata: dict[str, str], overwrite: bool,
             **condition: Any) -> Awaitable[dict[str, Any]]:
        return azure_objects.put_blob(self._blob(path), data, metadata, overwrite, **condition)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._run("writing", path, lambda: self._put(path, data, {}, overwrite=True))

    def create_only(self, path: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        """One Put Blob with ``If-None-Match: *``; False when the name was taken.

        A 409 does not prove that somebody else holds the blob: when the
        answer to our own upload is lost, the client's retry meets our blob.
        The nonce in its metadata tells the two apart.
        """
        nonce = secrets.token_hex(16)
        meta = {**blob_metadata(metadata), NONCE_KEY: nonce}
        try:
            self._run("writing (create-only)", path, lambda: self._put(path, data, meta, overwrite=False))
        except FileExistsError:
            try:
                props = self._run("reading blob properties", path,
                                  lambda: self._blob(path).get_blob_properties())
            except FileNotFoundError:
                return False  # released by its owner in the meantime: not ours either
            return (props.metadata or {}).get(NONCE_KEY) == nonce
        return True

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        return self._run("reading", path, lambda: azure_objects.read_blob(self._blob(path)))

    def write_if(self, path: str, data: bytes, token: str | None, metadata: dict[str, str] | None = None) -> str:
        from azure.core import MatchConditions

        meta = blob_metadata(metadata)
        if token is None:  # If-None-Match: *
            out = self._run("writing (conditional)", path, lambda: self._put(path, data, meta, overwrite=False))
        else:  # If-Match: the ETag read
            out = self._run("writing (conditional)", path, lambda: self._put(
                path, data, meta, overwrite=True, etag=token, match_condition=MatchConditions.IfNotModified))
        return str((out or {}).get("etag") or "")

    def token_of(self, path: str) -> tuple[str, dict[str, str]]:
        props = self._run("reading blob properties", path, lambda: self._blob(path).get_blob_properties())
        return str(props.etag), dict(props.metadata or {})

    def _read_for_removal(self, path: str) -> tuple[bytes, str]:
        return self._run("reading", path, lambda: azure_objects.read_blob(self._blob(path)))

    def _remove_seen(self, path: str, seen: str) -> bool:
        # Deleted only at the ETag whose bytes were read: a rewrite since then stays.
        try:
            self._run("deleting", path, lambda: azure_objects.delete_if_match(self._blob(path), seen))
        except (FileNotFoundError, FileExistsError):
            return False
        return True

    def _delete_key(self, path: str) -> None:
        self._run("deleting", path, lambda: self._blob(path).delete_blob())

    # -- whole directories -------------------------------------------------------
    def _checksums(self, local_path: str) -> tuple[str, str]:
        st = os.stat(local_path)
        key = (local_path, st.st_size, st.st_mtime_ns)
        cache = self.__dict__.setdefault("_checksum_cache", {})
        if key not in cache:
            cache[key] = checksums(local_path)
        return cache[key]

    def _upload_checksum(self, local_path: str) -> str | None:
        return self._checksums(local_path)[0]

    def _put_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        """One upload per pair, checked by the server (see :func:`azure_objects.upload_file`)."""
        sums = {lp: self._checksums(lp) for lp, _ in pairs}
        # Each blob client is made on the loop, as the job starts.
        jobs = [lambda lp=lp, rp=rp: azure_objects.upload_file(self._blob(rp), lp, *sums[lp]) for lp, rp in pairs]
        results = gather(self.fs.loop, jobs, limit=TRANSFER_LIMIT)
        return [self._classified(res, "uploading", rp) for res, (_, rp) in zip(results, pairs)]

    def _classified(self, res: Any, action: str, path: str) -> Any:
        """A transfer's outcome for transfers.py: None, a retryable exception, or raised when no retry cures it."""
        if not isinstance(res, BaseException) or isinstance(res, (ChecksumMismatch, FileNotFoundError)):
            return res
        from azure.core.exceptions import ResourceNotFoundError

        if isinstance(res, ResourceNotFoundError) and error_code(res) != "ContainerNotFound":
            return FileNotFoundError(self.url(path))
        if azure_reason(res, permanent_only=True):
            raise self._translate(res, action, path) or res
        return res

    def _get_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        """One download per pair, checked against the blob's stored MD5 where it has one (the crc32c
        check is transfers.py's)."""
        jobs = [lambda rp=rp, lp=lp: azure_objects.download_file(self._blob(rp), lp, self.url(rp)) for rp, lp in pairs]
        results = gather(self.fs.loop, jobs, limit=TRANSFER_LIMIT)
        return [self._classified(res, "downloading", rp) for res, (rp, _) in zip(results, pairs)]

    # -- server-side copies and deletes ---------------------------------------------
    async def _copy_one(self, src: Entry, dst: str, created: list[Entry]) -> int:
        """Copy Blob on the server, the destination ``If-None-Match: *``, the source matched to its listed
        ETag; polled until the copy ends.

        A destination that exists with the source's size and checksum counts as copied.
        """
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

        target = self._blob(dst)
        source = {"source_etag": src.generation, "source_match_condition": MatchConditions.IfNotModified} \
            if src.generation else {}
        try:
            out = await target.start_copy_from_url(self._blob(src.path).url,
                                                   match_condition=MatchConditions.IfMissing, **source)
        except (ResourceExistsError, ResourceModifiedError) as err:
            changed = PipelineError(f"source blob changed since it was listed: {self.url(src.path)}")
            if error_code(err) == "SourceConditionNotMet":
                raise changed from None
            if error_code(err) not in ("BlobAlreadyExists", "ConditionNotMet"):
                raise
            try:
                have = await target.get_blob_properties()
            except ResourceNotFoundError:
                # No destination: the condition refused was the source's (Azurite names both
                # failures ConditionNotMet).
                raise changed from None
            if int(have.size or 0) == src.size and same_content(src, have):
                return 0  # already there, identical: not ours to undo
            raise FileExistsError(self.url(dst)) from None
        await azure_objects.wait_for_copy(target, out, self.url(dst))
        created.append(Entry(posixpath.basename(dst), dst, False, src.size, None, src.crc32c,
                             quoted_etag(out.get("etag"))))
        return src.size

    def _copy_failed(self, err: BaseException, src: Entry) -> NoReturn:
        if isinstance(err, PipelineError):
            raise err
        self._raise(err, "copying", src.path)

    def delete_objects(self, entries: list[Entry], limit: int = CONCURRENCY) -> list[str]:
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        jobs = [lambda e=e: azure_objects.delete_if_match(self._blob(e.path), e.generation) for e in entries]
        kept: list[str] = []
        results = gather(self.fs.loop, jobs, limit=limit)
        for e, res in zip(entries, results):
            if res is None or (isinstance(res, ResourceNotFoundError) and error_code(res) != "ContainerNotFound"):
                continue
            if isinstance(res, ResourceModifiedError):  # 412: rewritten since it was listed
                kept.append(e.path)
                continue
            self._raise(res, "deleting", e.path)
        return kept

