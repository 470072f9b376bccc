"""Amazon S3 and S3-compatible servers (``s3://``, ``s3a://``), their server-side guarantees used directly.

Example::

    from tf_export_pipeline.storage import open_storage
    store = open_storage("s3://my-bucket/models/m", {"endpoint_url": "http://127.0.0.1:8333"})
    store.create_only(store.join(store.root, "_exports", "claims", "17"), b"owner")
    print([e.name for e in store.list_dir(store.root)])

s3fs provides the session, the credentials and the per-request retries
(botocore's and its own); each operation that matters is one S3 API call made
through s3fs's client (``s3_objects.py``), so that it costs a known number of
requests and keeps the guarantee the server offers:

- listings: ListObjectsV2, one request per page of 1000 keys; each entry has
  the object's size and ETag, with no per-object look-ups;
- create-only writes: one PutObject with ``If-None-Match: *``, with a nonce
  in the object's metadata to tell a lost-answer retry of our own write from a
  rival's object; a 409 (a concurrent conditional write of the same key) is
  retried. Before the first one per bucket, a probe checks that the server
  refuses a second create-only write of one key (``s3_conditions.py``): a
  server that accepts the header and ignores it is refused, never trusted;
- copies: CopyObject (no byte through the client), the destination
  ``If-None-Match: *``, the source ``x-amz-copy-source-if-match`` its listed
  ETag; objects above 5 GiB in parts;
- deletes: DeleteObject ``If-Match`` the listed ETag, so an object rewritten
  since is left alone;
- transfers: every upload sends Content-MD5 and ``x-amz-checksum-crc32c``,
  which the server checks before it stores anything; every download is checked
  against the crc32c the server returns for the object (else the ETag, the md5
  of a single-part upload: ``s3_checksums.py``);
- errors: ``s3_errors.py`` names S3's error codes in one line; a missing
  bucket is named as such. No message carries a credential.

Credentials and the endpoint come from ``storage_options`` (``key``,
``secret``, ``token``, ``endpoint_url``, ``client_kwargs``, ``config_kwargs``:
s3fs's keywords) or botocore's usual sources (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``, instance roles).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import posixpath
import secrets
from typing import Any, NoReturn

import fsspec

from tf_export_pipeline.errors import ConditionIgnored, PipelineError
from tf_export_pipeline.storage import s3_objects
from tf_export_pipeline.storage.bucket import BucketStore, listed_name, split
from tf_export_pipeline.storage.entry import Entry, mtime_of
from tf_export_pipeline.storage.errors import ChecksumMismatch
from tf_export_pipeline.storage.s3_checksums import body_matches, etag_of
from tf_export_pipeline.storage.s3_conditions import (
    PROBE_PREFIX,
    check_parameters,
    create_only_known,
    probe_create_only,
)
from tf_export_pipeline.storage.s3_errors import Conflict as _Conflict
from tf_export_pipeline.storage.s3_errors import client_error, s3_reason
from tf_export_pipeline.storage.s3_folders import emptied_folders, is_folder_marker
from tf_export_pipeline.storage.transfers import CONCURRENCY, backoff, gather

log = logging.getLogger("tf_export_pipeline.storage")
logging.getLogger("s3fs").addHandler(logging.NullHandler())

NONCE_KEY = "tf-export-nonce"
LIST_PAGE_SIZE = 1000
PART_SIZE = 64 << 20            # uploads above this go in parts of this size
COPY_PART_SIZE = 1 << 30        # CopyObject copies up to 5 GiB; larger objects are copied in parts
COPY_LIMIT = 5 << 30
CONFLICT_ATTEMPTS = 5           # 409 ConditionalRequestConflict: another conditional write of the key in flight
TRANSFER_LIMIT = 8              # files moved at once by one upload_dir or download_files

__all__ = ["PROBE_PREFIX", "S3Store"]


class S3Store(BucketStore):
    """A bucket (and a root prefix in it) on Amazon S3 or an S3-compatible server."""

    protocols = ("s3", "s3a")
    conditional_overwrite = True
    # A 409 is retried by the write that got it, not reported.
    _passed_through = (FileExistsError, PipelineError, _Conflict)

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        options = dict(storage_options or {})
        super().__init__(url, options)
        client_kwargs = options.get("client_kwargs") or {}
        self.endpoint = (options.get("endpoint_url") or client_kwargs.get("endpoint_url")
                         or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "")
        self._parameters_checked = False

    # -- errors ----------------------------------------------------------------
    def _not_found(self, path: str, write: bool, err: BaseException | None = None) -> None:
        if client_error(err)[0] == "NoSuchBucket":
            raise self._bucket_missing(path) from None
        if write or not split(path)[1]:
            self._raise_if_bucket_missing(path)

    def _raise_if_bucket_missing(self, path: str) -> None:
        bucket = split(path)[0]
        if bucket in self._buckets_seen:
            return
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise self._bucket_missing(path) from None
        except Exception as err:  # noqa: BLE001 - classified; unknown errors propagate
            raise self._translate(err, "reading the bucket", path) or err from None
        self._buckets_seen.add(bucket)

    def _translate(self, err: BaseException, action: str, path: str) -> PipelineError | None:
        reason = self.error_reason(err)
        if reason is None:
            return None
        return PipelineError(f"{reason} while {action}: {self.url(path)}")

    def error_reason(self, err: BaseException) -> str | None:
        """The cause of a failed S3 request in a few words; None when it is not one we know."""
        return s3_reason(err, self.bucket, self.endpoint)

    # -- requests ----------------------------------------------------------------
    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return self.fs.call_s3(method, **kwargs)

    def _check_parameters(self) -> None:
        """Refuse a botocore that would silently drop the conditions this store depends on."""
        if not self._parameters_checked:
            check_parameters(self.fs.s3.meta.service_model, self.url(self.root))
            self._parameters_checked = True

    async def _put_async(self, path: str, data: bytes, metadata: dict[str, str] | None = None,
                         **condition: str) -> dict[str, Any]:
        """One checked PutObject (see :func:`~tf_export_pipeline.storage.s3_objects.put_object`)."""
        return await s3_objects.put_object(self.fs, path, data, metadata, **condition)

    def _put(self, path: str, data: bytes, metadata: dict[str, str] | None, action: str,
             **condition: str) -> dict[str, Any]:
        with self._errors(action, path, write=True):
            return fsspec.asyn.sync(self.fs.loop, self._put_async, path, data, metadata, **condition)

    def _head(self, path: str) -> dict[str, Any]:
        bucket, key = split(path)
        with self._errors("reading object metadata", path):
            try:
                return self._call("head_object", Bucket=bucket, Key=key)
            except Exception as err:  # noqa: BLE001 - a bare 403 is asked again, the rest re-raised
                code, status = client_error(err)
                if status not in (401, 403) or code:
                    raise
                # A refused HEAD carries no error document: a one-key listing of the same key
                # tells a wrong secret from an unknown key or a missing permission.
                self._call("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
                raise

    # -- listings --------------------------------------------------------------
    def _list_page(self, bucket: str, prefix: str, delimiter: str | None, max_results: int | None,
                   token: str | None) -> tuple[list[dict], list[str], str | None]:
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_results or LIST_PAGE_SIZE}
        if delimiter:
            kw["Delimiter"] = delimiter
        if token:
            kw["ContinuationToken"] = token
        page = self._call("list_objects_v2", **kw)
        following = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        return (page.get("Contents") or [], [p["Prefix"] for p in page.get("CommonPrefixes") or []],
                following)

    def _entry(self, bucket: str, obj: dict, base_key: str = "", relative: bool = False) -> Entry:
        name = obj["Key"]
        return Entry(listed_name(name, base_key, relative), f"{bucket}/{name}", False, int(obj.get("Size") or 0),
                     mtime_of(obj), None, etag_of(obj.get("ETag")))

    def _is_folder_marker(self, obj: dict) -> bool:
        return is_folder_marker(obj)

    def _file_stat(self, path: str) -> dict[str, Any]:
        return self._head(path)

    def _stat_entry(self, path: str, head: dict[str, Any]) -> Entry:
        return Entry(posixpath.basename(path.rstrip("/")), path.rstrip("/"), False,
                     int(head.get("ContentLength") or 0), mtime_of(head), head.get("ChecksumCRC32C"),
                     etag_of(head.get("ETag")), head.get("Metadata") or None)

    # -- reading ---------------------------------------------------------------
    def isdir(self, path: str) -> bool:
        # The bucket itself costs one HeadBucket per process (remembered), not a listing per call.
        if not split(path)[1]:
            self._raise_if_bucket_missing(path)
            return True
        return super().isdir(path)

    def read_bytes(self, path: str) -> bytes:
        data, _ = self._get(path)
        return data

    def _get(self, path: str) -> tuple[bytes, str | None]:
        """The object's bytes, checked against the server's checksum, and its ETag."""
        for attempt in range(3):
            with self._errors("reading", path):
                out, data = fsspec.asyn.sync(self.fs.loop, s3_objects.get_object, self.fs, path)
            if body_matches(out, hashlib.md5(data).digest(), data):
                return data, etag_of(out.get("ETag"))
            if attempt < 2:
                backoff(attempt)
        raise ChecksumMismatch(f"downloaded object does not match its checksum after retries: {self.url(path)}")

    # -- writing ---------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        self._put(path, data, None, "writing")

    def create_only(self, path: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        self._require_create_only(path)
        # A 412 does not prove that somebody else holds the key: when the answer to our own
        # PutObject is lost, the client's retry finds our object and gets 412 too. The
        # object's metadata carries a nonce of this write, read back on 412.
        nonce = secrets.token_hex(16)
        meta = {k: v for k, v in (metadata or {}).items() if str(v).isascii()}
        meta[NONCE_KEY] = nonce
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                self._put(path, data, meta, "writing (create-only)", IfNoneMatch="*")
                return True
            except _Conflict:
                backoff(attempt)
                continue
            except FileExistsError:
                try:
                    head = self._head(path)
                except FileNotFoundError:
                    return False  # released by its owner in the meantime: not ours either
                return (head.get("Metadata") or {}).get(NONCE_KEY) == nonce
        raise PipelineError(f"create-only write kept conflicting with concurrent writes (HTTP 409 "
                            f"ConditionalRequestConflict, {CONFLICT_ATTEMPTS} attempts): {self.url(path)}")

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        data, etag = self._get(path)  # one GetObject: the bytes and the ETag of the same object
        return data, etag or ""

    def write_if(self, path: str, data: bytes, token: str | None, metadata: dict[str, str] | None = None) -> str:
        self._check_parameters()
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": etag_of(token)}
        meta = {k: v for k, v in (metadata or {}).items() if str(v).isascii()}
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                out = self._put(path, data, meta, "writing (conditional)", **condition)
                return etag_of(out.get("ETag")) or ""
            except _Conflict:
                backoff(attempt)
        raise PipelineError(f"conditional write kept conflicting with concurrent writes (HTTP 409 "
                            f"ConditionalRequestConflict, {CONFLICT_ATTEMPTS} attempts): {self.url(path)}")

    def token_of(self, path: str) -> tuple[str, dict[str, str]]:
        head = self._head(path)
        return etag_of(head.get("ETag")) or "", dict(head.get("Metadata") or {})

    def _require_create_only(self, path: str) -> None:
        """Refuse a server that accepts ``If-None-Match: *`` and ignores it (probed once per bucket and
        process, beside ``path``)."""
        self._check_parameters()
        if create_only_known(self.endpoint, split(path)[0]):
            return
        # Errors name the path the caller asked for: the probe's name means nothing to a user.
        with self._errors("writing (create-only)", path, write=True):
            honoured = fsspec.asyn.sync(self.fs.loop, probe_create_only, self.fs, self.endpoint,
                                        posixpath.dirname(path))
        if not honoured:
            raise ConditionIgnored(f"storage ignores If-None-Match (a second create-only write of one key was "
                                   f"accepted), so version claims and the ledger would not be safe: "
                                   f"{self.url(path)}")

    def _read_for_removal(self, path: str) -> tuple[bytes, Entry]:
        data, etag = self._get(path)
        return data, Entry(posixpath.basename(path), path, False, len(data), None, None, etag)

    def _remove_seen(self, path: str, seen: Entry) -> bool:
        # The delete is matched to the ETag read: a rewrite since then stays.
        return not self._delete([seen])

    def _delete_key(self, path: str) -> None:
        bucket, key = split(path)
        with self._errors("deleting", path):
            self._call("delete_object", Bucket=bucket, Key=key)

    # -- whole directories -------------------------------------------------------
    def _put_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        def job(lpath: str, rpath: str):
            async def run():
                if os.path.getsize(lpath) <= PART_SIZE:
                    with open(lpath, "rb") as fh:
                        data = fh.read()
                    await self._put_async(rpath, data)
                else:
                    await s3_objects.upload_parts(self.fs, lpath, rpath, PART_SIZE)
            return run

        return gather(self.fs.loop, [job(lp, rp) for lp, rp in pairs], limit=TRANSFER_LIMIT)

    def _get_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        jobs = [functools.partial(s3_objects.download_object, self.fs, rp, lp) for rp, lp in pairs]
        return gather(self.fs.loop, jobs, limit=TRANSFER_LIMIT)

    # -- server-side copies and deletes ---------------------------------------------
    def copy_objects(self, pairs: list[tuple[Entry, str]], created: list[Entry] | None = None,
                     limit: int = CONCURRENCY) -> int:
        """Server-side CopyObject, ``limit`` at a time, each destination ``If-None-Match: *``.

        The source must still have the ETag it was listed with. A destination
        that exists with the source's size and ETag counts as copied and is not
        appended to ``created``: not ours to undo.
        """
        self._check_parameters()
        return super().copy_objects(pairs, created, limit)

    async def _copy_one(self, src: Entry, dst: str, created: list[Entry]) -> int:
        try:
            if src.size > COPY_LIMIT:
                etag = await s3_objects.copy_parts(self.fs, src, dst, COPY_PART_SIZE)
            else:
                etag = await s3_objects.copy_object(self.fs, src, dst)
        except Exception as err:  # noqa: BLE001 - a refused condition is examined, the rest re-raised
            if client_error(err)[1] != 412:
                raise
            db, dk = split(dst)
            try:
                have = await self.fs._call_s3("head_object", Bucket=db, Key=dk)
            except FileNotFoundError:
                # The destination is free, so the source failed its condition: it changed or went.
                raise FileNotFoundError(self.url(src.path)) from None
            same_etag = not src.generation or etag_of(have.get("ETag")) == src.generation
            if int(have.get("ContentLength") or 0) == src.size and same_etag:
                return 0  # already there, identical: not ours to undo
            raise FileExistsError(self.url(dst)) from None
        created.append(Entry(posixpath.basename(dst), dst, False, src.size, None, None, etag_of(etag)))
        return src.size

    def _copy_failed(self, err: BaseException, src: Entry) -> NoReturn:
        if isinstance(err, FileNotFoundError):
            if client_error(err)[0] == "NoSuchBucket":
                raise self._bucket_missing(src.path)
            raise FileNotFoundError(self.url(src.path))
        raise self._translate(err, "copying", src.path) or err

    def delete_objects(self, entries: list[Entry], limit: int = CONCURRENCY) -> list[str]:
        kept = self._delete(entries, limit)
        self._remove_folder_markers(entries)
        return kept

    def _delete(self, entries: list[Entry], limit: int = CONCURRENCY) -> list[str]:
        """DeleteObject each entry, ``If-Match`` its listed ETag; the paths left because they changed."""
        self._check_parameters()
        jobs = [functools.partial(s3_objects.delete_if_match, self.fs, e.path, e.generation) for e in entries]
        kept: list[str] = []
        for e, res in zip(entries, gather(self.fs.loop, jobs, limit=limit)):
            if res is None or (isinstance(res, FileNotFoundError) and client_error(res)[0] != "NoSuchBucket"):
                continue
            if isinstance(res, FileExistsError):
                kept.append(e.path)
                continue
            if isinstance(res, FileNotFoundError):
                raise self._bucket_missing(e.path)
            raise self._translate(res, "deleting", e.path) or res
        return kept

    def _remove_folder_markers(self, entries: list[Entry]) -> None:
        """Remove the empty folders a removed tree leaves on servers that keep them (see ``s3_folders.py``)."""
        for folder in emptied_folders(e.path for e in entries):
            b, k = split(folder)
            try:
                self._call("delete_object", Bucket=b, Key=k + "/")
            except Exception as err:  # noqa: BLE001 - tidying only: what stays is an empty prefix
                log.debug("folder %s not removed (%s)", self.url(folder), type(err).__name__)
