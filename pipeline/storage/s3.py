"""Amazon S3 and S3-compatible servers (``s3://``, ``s3a://``), their server-side guarantees used directly.

Example::

    from tf_export_pipeline.storage import open_storage
    store = open_storage("s3://my-bucket/models/m", {"endpoint_url": "http://127.0.0.1:8333"})
    store.create_only(store.join(store.root, "_exports", "claims", "17"), b"owner")
    print([e.name for e in store.list_dir(store.root)])

s3fs provides the session, the credentials and the per-request retries
(botocore's and its own); each operation that matters is one S3 API call made
here through s3fs's client, so that it costs a known number of requests and
keeps the guarantee the server offers:

- listings: ListObjectsV2, one request per page of 1000 keys; each entry has
  the object's size and ETag, with no per-object look-ups;
- create-only writes: one PutObject with ``If-None-Match: *``, with a nonce
  in the object's metadata to tell a lost-answer retry of our own write from a
  rival's object; a 409 (a concurrent conditional write of the same key) is
  retried. Before the first one per bucket, a probe checks that the server
  refuses a second create-only write of one key: a server that accepts the
  header and ignores it is refused, never trusted;
- copies: CopyObject (no byte through the client), the destination
  ``If-None-Match: *``, the source ``x-amz-copy-source-if-match`` its listed
  ETag;
- deletes: DeleteObject ``If-Match`` the listed ETag, so an object rewritten
  since is left alone;
- transfers: every upload sends Content-MD5 and ``x-amz-checksum-crc32c``,
  which the server checks before it stores anything; every download is checked
  against the crc32c the server returns for the object (else the ETag, the md5
  of a single-part upload);
- errors: :data:`ERROR_REASONS` names S3's error codes in one line; a missing
  bucket is named as such. No message carries a credential.

Credentials and the endpoint come from ``storage_options`` (``key``,
``secret``, ``token``, ``endpoint_url``, ``client_kwargs``, ``config_kwargs``:
s3fs's keywords) or botocore's usual sources (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``, instance roles).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import posixpath
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any, NoReturn
from urllib.parse import urlsplit

import fsspec

from tf_export_pipeline.errors import ConditionIgnored, PipelineError
from tf_export_pipeline.storage.base import Entry, mtime_of
from tf_export_pipeline.storage.bucket import BucketStore, listed_name, split
from tf_export_pipeline.storage.errors import ChecksumMismatch
from tf_export_pipeline.storage.transfers import CONCURRENCY, backoff, gather

log = logging.getLogger("tf_export_pipeline.storage")
logging.getLogger("s3fs").addHandler(logging.NullHandler())

NONCE_KEY = "tf-export-nonce"
LIST_PAGE_SIZE = 1000
PART_SIZE = 64 << 20            # uploads above this go in parts of this size
COPY_PART_SIZE = 1 << 30        # CopyObject copies up to 5 GiB; larger objects are copied in parts
COPY_LIMIT = 5 << 30
CONFLICT_ATTEMPTS = 5           # 409 ConditionalRequestConflict: another conditional write of the key in flight
PROBE_PREFIX = ".create-only-probe-"
# The request parameters the guarantees rest on. s3fs drops any keyword its botocore does not know,
# which would turn a conditional request into a plain one; so they are checked before the first use.
CONDITIONAL_PARAMETERS = {"PutObject": ("IfNoneMatch", "IfMatch"), "CopyObject": ("IfNoneMatch",),
                          "DeleteObject": ("IfMatch",), "CompleteMultipartUpload": ("IfNoneMatch",)}

# S3 error codes -> the cause, in words a user can act on. Checked in order: code first, then HTTP status.
_CREDENTIALS = "check key and secret in storage_options or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
ERROR_REASONS: dict[str, str] = {
    "AccessDenied": f"permission denied (HTTP 403 AccessDenied; {_CREDENTIALS}, and the bucket policy)",
    "AllAccessDisabled": "permission denied (HTTP 403 AllAccessDisabled: access to the bucket is disabled)",
    "AccountProblem": "permission denied (HTTP 403 AccountProblem: the account cannot be used)",
    "InvalidAccessKeyId": f"credentials rejected (InvalidAccessKeyId: the server knows no such access key; "
                          f"{_CREDENTIALS})",
    "SignatureDoesNotMatch": f"credentials rejected (SignatureDoesNotMatch: the secret does not belong to the "
                             f"access key; {_CREDENTIALS})",
    "ExpiredToken": "credentials rejected (ExpiredToken: the session token has expired)",
    "InvalidToken": "credentials rejected (InvalidToken: the session token is malformed or invalid)",
    "TokenRefreshRequired": "credentials rejected (TokenRefreshRequired: the session token must be refreshed)",
    "RequestTimeTooSkewed": "credentials rejected (RequestTimeTooSkewed: this machine's clock is off)",
    "AuthorizationHeaderMalformed": "credentials rejected (AuthorizationHeaderMalformed: check region_name "
                                    "in client_kwargs)",
    "PermanentRedirect": "wrong endpoint or region for the bucket (PermanentRedirect; set region_name in "
                         "client_kwargs or endpoint_url)",
    "SlowDown": "storage throttled the requests after retries (SlowDown)",
    "Throttling": "storage throttled the requests after retries (Throttling)",
    "ThrottlingException": "storage throttled the requests after retries (ThrottlingException)",
    "RequestLimitExceeded": "storage throttled the requests after retries (RequestLimitExceeded)",
    "TooManyRequests": "storage throttled the requests after retries (HTTP 429)",
    "RequestTimeout": "storage timed out after retries (RequestTimeout)",
    "InternalError": "storage unavailable after retries (HTTP 500 InternalError)",
    "ServiceUnavailable": "storage unavailable after retries (HTTP 503 ServiceUnavailable)",
    "NotImplemented": "storage does not implement a request the pipeline needs (HTTP 501 NotImplemented)",
    "BadDigest": "upload corrupted in transit (BadDigest: the body does not match its checksum)",
    "InvalidDigest": "upload corrupted in transit (InvalidDigest)",
}

# (endpoint, bucket) pairs whose create-only writes were probed, per process.
_PROBED: set[tuple[str, str]] = set()
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


def client_error(err: BaseException | None) -> tuple[str | None, int | None]:
    """S3's error code and HTTP status behind ``err`` (s3fs hides the botocore error as the cause)."""
    seen = 0
    while err is not None and seen < 5:
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            # An answer without a body (to HEAD) has only its status, which botocore puts in as the code.
            code = None if not code or str(code).isdigit() else str(code)
            return code, (int(status) if status else None)
        err = err.__cause__ or err.__context__
        seen += 1
    return None, None


def etag_of(value: Any) -> str | None:
    """An ETag as S3 sends it in conditions (quoted); some servers answer CopyObject without the quotes."""
    if not value:
        return None
    text = str(value).strip()
    return text if text.startswith('"') else f'"{text}"'


def md5_etag(data_md5s: list[bytes]) -> str:
    """The ETag S3 gives an object made of parts with these md5 digests (one part: the plain md5)."""
    if len(data_md5s) == 1:
        return data_md5s[0].hex()
    return f"{hashlib.md5(b''.join(data_md5s)).hexdigest()}-{len(data_md5s)}"


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _crc32c(data: bytes) -> str:
    import google_crc32c

    return _b64(google_crc32c.Checksum(data).digest())


class _Conflict(Exception):
    """HTTP 409 on a conditional request: another conditional write of the same key is in flight."""


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

    def _endpoint_shown(self) -> str:
        """The endpoint as scheme://host:port (no user, path or query): safe in a message."""
        if not self.endpoint:
            return "the AWS default endpoint"
        parts = urlsplit(self.endpoint if "://" in self.endpoint else "https://" + self.endpoint)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"

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
        if isinstance(err, ChecksumMismatch):
            return str(err).split(":")[0]
        code, status = client_error(err)
        if code == "NoSuchBucket":
            return f"bucket '{self.bucket}' does not exist"
        if code in ERROR_REASONS:
            return ERROR_REASONS[code]
        if status is not None:
            if status in (401, 403):
                return f"permission denied (HTTP {status}{' ' + code if code else ''}; {_CREDENTIALS})"
            if status == 429:
                return ERROR_REASONS["TooManyRequests"]
            if status >= 500:
                return f"storage unavailable after retries (HTTP {status}{' ' + code if code else ''})"
            if code:
                return f"storage refused the request (HTTP {status} {code})"
        try:
            import botocore.exceptions as bex
        except ImportError:  # pragma: no cover - s3fs depends on botocore
            return None
        if isinstance(err, bex.NoCredentialsError):
            return "no credentials found (set key and secret in storage_options, or AWS_ACCESS_KEY_ID and " \
                   "AWS_SECRET_ACCESS_KEY)"
        if isinstance(err, bex.PartialCredentialsError):
            return "incomplete credentials (a key without its secret, or the reverse)"
        if isinstance(err, (bex.ConnectTimeoutError, bex.ReadTimeoutError)) or \
                isinstance(err, (asyncio.TimeoutError, TimeoutError)):
            return f"storage timed out after retries ({type(err).__name__}, endpoint {self._endpoint_shown()})"
        if isinstance(err, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.HTTPClientError,
                            ConnectionError)):
            return f"storage endpoint unreachable after retries ({self._endpoint_shown()})"
        try:
            import aiohttp

            if isinstance(err, aiohttp.ClientError):
                return f"storage endpoint unreachable after retries ({self._endpoint_shown()})"
        except ImportError:  # pragma: no cover
            pass
        return None

    # -- requests ----------------------------------------------------------------
    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return self.fs.call_s3(method, **kwargs)

    def _check_parameters(self) -> None:
        """Refuse a botocore that would silently drop the conditions this store depends on."""
        if self._parameters_checked:
            return
        model = self.fs.s3.meta.service_model
        for operation, names in CONDITIONAL_PARAMETERS.items():
            members = model.operation_model(operation).input_shape.members
            missing = [n for n in names if n not in members]
            if missing:
                import botocore

                raise PipelineError(f"botocore {botocore.__version__} cannot send {operation} {missing[0]}, which "
                                    f"create-only writes need (upgrade botocore and aiobotocore): "
                                    f"{self.url(self.root)}")
        self._parameters_checked = True

    async def _put_async(self, path: str, data: bytes, metadata: dict[str, str] | None = None,
                         **condition: str) -> dict[str, Any]:
        """One PutObject whose body the server checks (Content-MD5, CRC32C) before storing it.

        A refused condition (412) raises FileExistsError, a 409 :class:`_Conflict`.
        """
        bucket, key = split(path)
        digest = hashlib.md5(data).digest()
        try:
            out = await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                         ContentMD5=_b64(digest), ChecksumCRC32C=_crc32c(data),
                                         **({"Metadata": metadata} if metadata else {}), **condition)
        except Exception as err:  # noqa: BLE001 - conditions are told apart, the rest re-raised
            _, status = client_error(err)
            if status == 412:
                raise FileExistsError(self.url(path)) from None
            if status == 409:
                raise _Conflict(self.url(path)) from None
            raise
        etag = str(out.get("ETag") or "").strip('"')
        if _MD5_ETAG.match(etag) and etag != digest.hex():
            raise ChecksumMismatch(f"upload does not match its md5: {self.url(path)}")
        return out

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
        # Consoles and some servers (for empty directories) leave such keys.
        return obj["Key"].endswith("/")

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
        bucket, key = split(path)

        async def run():
            out = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            async with out["Body"] as body:
                data = await body.read()
            return out, data

        for attempt in range(3):
            with self._errors("reading", path):
                out, data = fsspec.asyn.sync(self.fs.loop, run)
            if _matches(out, hashlib.md5(data).digest(), data):
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
        """Refuse a server that accepts ``If-None-Match: *`` and ignores it (once per bucket and process).

        Two create-only writes of one fresh key beside ``path``: the second must
        be refused. The probe object is removed after; its name starts with a
        dot, which no reader of claims or the ledger takes for an entry.
        """
        self._check_parameters()
        bucket = split(path)[0]
        if (self.endpoint, bucket) in _PROBED:
            return
        probe = posixpath.join(posixpath.dirname(path), PROBE_PREFIX + secrets.token_hex(8))

        def put() -> None:
            # Errors name the path the caller asked for: the probe's name means nothing to a user.
            with self._errors("writing (create-only)", path, write=True):
                fsspec.asyn.sync(self.fs.loop, self._put_async, probe, b"probe", None, IfNoneMatch="*")

        put()
        try:
            put()
            honoured = False
        except (FileExistsError, _Conflict):  # a 409 is the condition enforced too
            honoured = True
        finally:
            try:
                self._call("delete_object", Bucket=bucket, Key=split(probe)[1])
            except Exception:  # noqa: BLE001 - a probe left behind is a dot-file no reader lists
                pass
        if not honoured:
            raise ConditionIgnored(f"storage ignores If-None-Match (a second create-only write of one key was "
                                f"accepted), so version claims and the ledger would not be safe: {self.url(path)}")
        _PROBED.add((self.endpoint, bucket))

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
                size = os.path.getsize(lpath)
                if size <= PART_SIZE:
                    with open(lpath, "rb") as fh:
                        data = fh.read()
                    await self._put_async(rpath, data)
                else:
                    await self._put_parts(lpath, rpath)
            return run

        return gather(self.fs.loop, [job(lp, rp) for lp, rp in pairs], limit=8)

    @contextlib.asynccontextmanager
    async def _multipart(self, bucket: str, key: str) -> AsyncIterator[str]:
        """A new multipart upload's id; the upload is aborted when the block fails, so no part is left billed."""
        mpu = await self.fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        upload_id = mpu["UploadId"]
        try:
            yield upload_id
        except BaseException:
            try:
                await self.fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the block's own error is the one to report
                pass
            raise

    async def _put_parts(self, lpath: str, rpath: str) -> None:
        """A multipart upload, each part's body checked by the server (Content-MD5), the result by its ETag."""
        bucket, key = split(rpath)
        async with self._multipart(bucket, key) as upload_id:
            parts, digests = [], []
            with open(lpath, "rb") as fh:
                number = 1
                while True:
                    chunk = fh.read(PART_SIZE)
                    if not chunk and number > 1:
                        break
                    digest = hashlib.md5(chunk).digest()
                    out = await self.fs._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                                 PartNumber=number, Body=chunk, ContentMD5=_b64(digest))
                    parts.append({"PartNumber": number, "ETag": out["ETag"]})
                    digests.append(digest)
                    number += 1
                    if len(chunk) < PART_SIZE:
                        break
            out = await self.fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
        etag = str(out.get("ETag") or "").strip('"')
        if etag and etag != md5_etag(digests):
            raise ChecksumMismatch(f"upload does not match its md5: {self.url(rpath)}")

    def _get_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        def job(rpath: str, lpath: str):
            async def run():
                import google_crc32c

                bucket, key = split(rpath)
                out = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
                md5, crc = hashlib.md5(), google_crc32c.Checksum()
                size = 0
                with open(lpath, "wb") as fh:
                    async with out["Body"] as body:
                        while True:
                            chunk = await body.read(1 << 20)
                            if not chunk:
                                break
                            md5.update(chunk)
                            crc.update(chunk)
                            fh.write(chunk)
                            size += len(chunk)
                expected = out.get("ContentLength")
                if (expected is not None and size != int(expected)) or \
                        not _matches(out, md5.digest(), None, _b64(crc.digest())):
                    raise ChecksumMismatch(f"downloaded file does not match its checksum: {self.url(rpath)}")
            return run

        return gather(self.fs.loop, [job(rp, lp) for rp, lp in pairs], limit=8)

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
                etag = await self._copy_parts(src, dst)
            else:
                sb, sk = split(src.path)
                db, dk = split(dst)
                cond = {"CopySourceIfMatch": src.generation} if src.generation else {}
                out = await self.fs._call_s3("copy_object", Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk},
                                             IfNoneMatch="*", **cond)
                etag = (out.get("CopyObjectResult") or {}).get("ETag")
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

    async def _copy_parts(self, src: Entry, dst: str) -> str | None:
        """An object above CopyObject's 5 GiB limit, copied server-side in parts; create-only on completion."""
        sb, sk = split(src.path)
        db, dk = split(dst)
        cond = {"CopySourceIfMatch": src.generation} if src.generation else {}
        async with self._multipart(db, dk) as upload_id:
            parts = []
            for number, start in enumerate(range(0, src.size, COPY_PART_SIZE), 1):
                end = min(start + COPY_PART_SIZE, src.size) - 1
                out = await self.fs._call_s3("upload_part_copy", Bucket=db, Key=dk, UploadId=upload_id,
                                             PartNumber=number, CopySource={"Bucket": sb, "Key": sk},
                                             CopySourceRange=f"bytes={start}-{end}", **cond)
                parts.append({"PartNumber": number, "ETag": out["CopyPartResult"]["ETag"]})
            out = await self.fs._call_s3("complete_multipart_upload", Bucket=db, Key=dk, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        return out.get("ETag")

    def delete_objects(self, entries: list[Entry], limit: int = CONCURRENCY) -> list[str]:
        kept = self._delete(entries, limit)
        self._remove_folder_markers(entries)
        return kept

    def _delete(self, entries: list[Entry], limit: int = CONCURRENCY) -> list[str]:
        """DeleteObject each entry, ``If-Match`` its listed ETag; the paths left because they changed."""
        self._check_parameters()

        def job(e: Entry):
            async def run():
                b, k = split(e.path)
                cond = {"IfMatch": e.generation} if e.generation else {}
                try:
                    await self.fs._call_s3("delete_object", Bucket=b, Key=k, **cond)
                except Exception as err:  # noqa: BLE001 - a refused condition is examined, the rest re-raised
                    if client_error(err)[1] != 412:
                        raise
                    # Some servers answer 412 for a key that is gone: only a present object was rewritten.
                    try:
                        await self.fs._call_s3("head_object", Bucket=b, Key=k)
                    except FileNotFoundError:
                        return None
                    raise FileExistsError(e.path) from None
            return run

        kept: list[str] = []
        for e, res in zip(entries, gather(self.fs.loop, [job(e) for e in entries], limit=limit)):
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
        """Remove the empty folders a removed tree leaves on servers that keep them (SeaweedFS).

        Such a server lists an emptied folder as a prefix until it is deleted by
        its ``key/`` name; left, an emptied version folder would still look like a
        version. Deleting ``key/`` removes only an empty folder (a plain S3 bucket
        has no such key: the request changes nothing), so the folders are deleted
        deepest first, up to the deepest folder common to all entries.
        """
        dirs = {posixpath.dirname(e.path.rstrip("/")) for e in entries}
        if not dirs:
            return
        top = posixpath.commonpath(sorted(dirs)) if len(dirs) > 1 else next(iter(dirs))
        if not split(top)[1]:
            return
        folders: set[str] = set()
        for d in dirs:
            while d.startswith(top) and split(d)[1]:
                folders.add(d)
                if d == top:
                    break
                d = posixpath.dirname(d)
        for folder in sorted(folders, key=lambda f: (-f.count("/"), f)):
            b, k = split(folder)
            try:
                self._call("delete_object", Bucket=b, Key=k + "/")
            except Exception as err:  # noqa: BLE001 - tidying only: what stays is an empty prefix
                log.debug("folder %s not removed (%s)", self.url(folder), type(err).__name__)


def _matches(out: dict[str, Any], md5: bytes, data: bytes | None, crc32c: str | None = None) -> bool:
    """Whether downloaded bytes match the checksum the server sent: its CRC32C, else an md5 ETag."""
    want = out.get("ChecksumCRC32C")
    if want and "-" not in str(want):
        got = crc32c if crc32c is not None else _crc32c(data or b"")
        return got == want
    etag = str(out.get("ETag") or "").strip('"')
    if _MD5_ETAG.match(etag):
        return etag == md5.hex()
    return True  # a multipart ETag without a checksum: the size check is all there is
