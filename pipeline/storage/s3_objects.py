"""The S3 requests on one object that the store is made of, each checked by the server or against its answer.

Example::

    import fsspec
    from tf_export_pipeline.storage.s3_objects import get_object, put_object
    fs = fsspec.filesystem("s3", endpoint_url="http://127.0.0.1:8333", key="...", secret="...")
    fsspec.asyn.sync(fs.loop, put_object, fs, "bucket/m/claims/17", b"owner", None, IfNoneMatch="*")
    out, data = fsspec.asyn.sync(fs.loop, get_object, fs, "bucket/m/claims/17")

Each is a coroutine on s3fs's event loop, through s3fs's client (its session,
credentials and retries), on a ``bucket/key`` path:

- :func:`put_object`: one PutObject with Content-MD5 and
  ``x-amz-checksum-crc32c``, which the server checks before it stores anything;
  a refused condition is FileExistsError (412) or :class:`Conflict` (409);
- :func:`get_object` / :func:`download_object`: GetObject with the server's
  checksum, the bytes checked against it;
- :func:`upload_parts` / :func:`copy_parts`: a multipart upload or server-side
  copy (each part's body checked, the whole aborted on failure, so no part is
  left billed);
- :func:`copy_object`: CopyObject, the destination ``If-None-Match: *`` and
  the source ``x-amz-copy-source-if-match`` its listed ETag;
- :func:`delete_if_match`: DeleteObject ``If-Match`` the listed ETag.

What a failure means for the caller (a missing bucket, a translated error) is
the store's to decide.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

from tf_export_pipeline.storage.bucket import split
from tf_export_pipeline.storage.entry import Entry
from tf_export_pipeline.storage.errors import ChecksumMismatch
from tf_export_pipeline.storage.s3_checksums import MD5_ETAG, b64, body_matches, crc32c_b64, md5_etag
from tf_export_pipeline.storage.s3_errors import Conflict, client_error

DOWNLOAD_CHUNK = 1 << 20


async def put_object(fs: Any, path: str, data: bytes, metadata: dict[str, str] | None = None,
                     **condition: str) -> dict[str, Any]:
    """One PutObject whose body the server checks (Content-MD5, CRC32C) before storing it.

    A refused condition (412) raises FileExistsError, a 409 :class:`Conflict`.
    """
    bucket, key = split(path)
    digest = hashlib.md5(data).digest()
    try:
        out = await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                ContentMD5=b64(digest), ChecksumCRC32C=crc32c_b64(data),
                                **({"Metadata": metadata} if metadata else {}), **condition)
    except Exception as err:  # noqa: BLE001 - conditions are told apart, the rest re-raised
        _, status = client_error(err)
        if status == 412:
            raise FileExistsError(fs.unstrip_protocol(path)) from None
        if status == 409:
            raise Conflict(fs.unstrip_protocol(path)) from None
        raise
    etag = str(out.get("ETag") or "").strip('"')
    if MD5_ETAG.match(etag) and etag != digest.hex():
        raise ChecksumMismatch(f"upload does not match its md5: {fs.unstrip_protocol(path)}")
    return out


async def get_object(fs: Any, path: str) -> tuple[dict[str, Any], bytes]:
    """One GetObject asking for the server's checksum: its answer and the bytes (the caller checks them)."""
    bucket, key = split(path)
    out = await fs._call_s3("get_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    async with out["Body"] as body:
        data = await body.read()
    return out, data


async def download_object(fs: Any, rpath: str, lpath: str) -> None:
    """GetObject into the local file ``lpath``, streamed; ChecksumMismatch when the bytes are not the server's."""
    import google_crc32c

    bucket, key = split(rpath)
    out = await fs._call_s3("get_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    md5, crc = hashlib.md5(), google_crc32c.Checksum()
    size = 0
    with open(lpath, "wb") as fh:
        async with out["Body"] as body:
            while True:
                chunk = await body.read(DOWNLOAD_CHUNK)
                if not chunk:
                    break
                md5.update(chunk)
                crc.update(chunk)
                fh.write(chunk)
                size += len(chunk)
    expected = out.get("ContentLength")
    if (expected is not None and size != int(expected)) or \
            not body_matches(out, md5.digest(), None, b64(crc.digest())):
        raise ChecksumMismatch(f"downloaded file does not match its checksum: {fs.unstrip_protocol(rpath)}")


@contextlib.asynccontextmanager
async def multipart(fs: Any, bucket: str, key: str) -> AsyncIterator[str]:
    """A new multipart upload's id; the upload is aborted when the block fails, so no part is left billed."""
    mpu = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    upload_id = mpu["UploadId"]
    try:
        yield upload_id
    except BaseException:
        try:
            await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the block's own error is the one to report
            pass
        raise


async def upload_parts(fs: Any, lpath: str, rpath: str, part_size: int) -> None:
    """A multipart upload of ``part_size`` parts, each part's body checked by the server (Content-MD5), the
    result by its ETag."""
    bucket, key = split(rpath)
    async with multipart(fs, bucket, key) as upload_id:
        parts, digests = [], []
        with open(lpath, "rb") as fh:
            number = 1
            while True:
                chunk = fh.read(part_size)
                if not chunk and number > 1:
                    break
                digest = hashlib.md5(chunk).digest()
                out = await fs._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                        PartNumber=number, Body=chunk, ContentMD5=b64(digest))
                parts.append({"PartNumber": number, "ETag": out["ETag"]})
                digests.append(digest)
                number += 1
                if len(chunk) < part_size:
                    break
        out = await fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                                MultipartUpload={"Parts": parts})
    etag = str(out.get("ETag") or "").strip('"')
    if etag and etag != md5_etag(digests):
        raise ChecksumMismatch(f"upload does not match its md5: {fs.unstrip_protocol(rpath)}")


async def copy_object(fs: Any, src: Entry, dst: str) -> str | None:
    """One CopyObject, ``If-None-Match: *``, the source matched to its listed ETag; the new ETag."""
    sb, sk = split(src.path)
    db, dk = split(dst)
    cond = {"CopySourceIfMatch": src.generation} if src.generation else {}
    out = await fs._call_s3("copy_object", Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk},
                            IfNoneMatch="*", **cond)
    return (out.get("CopyObjectResult") or {}).get("ETag")


async def copy_parts(fs: Any, src: Entry, dst: str, part_size: int) -> str | None:
    """An object above CopyObject's 5 GiB limit, copied server-side in parts; create-only on completion."""
    sb, sk = split(src.path)
    db, dk = split(dst)
    cond = {"CopySourceIfMatch": src.generation} if src.generation else {}
    async with multipart(fs, db, dk) as upload_id:
        parts = []
        for number, start in enumerate(range(0, src.size, part_size), 1):
            end = min(start + part_size, src.size) - 1
            out = await fs._call_s3("upload_part_copy", Bucket=db, Key=dk, UploadId=upload_id,
                                    PartNumber=number, CopySource={"Bucket": sb, "Key": sk},
                                    CopySourceRange=f"bytes={start}-{end}", **cond)
            parts.append({"PartNumber": number, "ETag": out["CopyPartResult"]["ETag"]})
        out = await fs._call_s3("complete_multipart_upload", Bucket=db, Key=dk, UploadId=upload_id,
                                MultipartUpload={"Parts": parts}, IfNoneMatch="*")
    return out.get("ETag")


async def delete_if_match(fs: Any, path: str, etag: str | None) -> None:
    """DeleteObject ``If-Match`` ``etag`` (unconditional without one); FileExistsError when the object was
    rewritten since (a refusal for a key that is gone is no rewrite)."""
    bucket, key = split(path)
    cond = {"IfMatch": etag} if etag else {}
    try:
        await fs._call_s3("delete_object", Bucket=bucket, Key=key, **cond)
    except Exception as err:  # noqa: BLE001 - a refused condition is examined, the rest re-raised
        if client_error(err)[1] != 412:
            raise
        # Some servers answer 412 for a key that is gone: only a present object was rewritten.
        try:
            await fs._call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return
        raise FileExistsError(path) from None
