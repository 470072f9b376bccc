"""The Blob service requests on one blob that the Azure store is made of, each checked by the service.

Example::

    from tf_export_pipeline.storage.azure_objects import put_blob, read_blob
    blob = service_client.get_blob_client("models", "serving/demo/_exports/claims/17")  # an aio BlobServiceClient
    await put_blob(blob, b"owner", {"tf_export_nonce": "..."}, overwrite=False)  # If-None-Match: *
    data, etag = await read_blob(blob)

Each is a coroutine on a blob client of azure-storage-blob's asyncio API. The
SDK's exceptions come out as they are: what they mean for the caller
(FileNotFoundError, FileExistsError, one line) is the store's to decide.

- :func:`put_blob` / :func:`upload_file`: Put Blob (or blocks, for a large
  file) with ``validate_content``: the service checks each body against its
  Content-MD5; a file's whole MD5 is stored as the blob's, its crc32c recorded
  beside it (``azure_blobs.py``);
- :func:`read_blob` / :func:`download_file`: Get Blob, the bytes and the ETag
  of one version; a file checked against the blob's stored MD5;
- :func:`wait_for_copy`: a server-side Copy Blob polled until it ends;
- :func:`delete_if_match`: Delete Blob ``If-Match`` the listed ETag.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import os
import time
from typing import Any

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage.azure_blobs import CRC32C_KEY, MD5_KEY, checksums, content_md5
from tf_export_pipeline.storage.errors import ChecksumMismatch

COPY_TIMEOUT = 600.0
BLOCK_CONCURRENCY = 4  # blocks of one large file moved at once


def _content_settings(name: str, md5: str | None = None) -> Any:
    from azure.storage.blob import ContentSettings

    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return ContentSettings(content_type=ctype, content_md5=bytearray(base64.b64decode(md5)) if md5 else None)


async def put_blob(blob: Any, data: bytes, metadata: dict[str, str], overwrite: bool,
                   **condition: Any) -> dict[str, Any]:
    """One Put Blob of ``data``, checked by the service against its Content-MD5, which it keeps."""
    return await blob.upload_blob(data, overwrite=overwrite, metadata=metadata, validate_content=True,
                                  content_settings=_content_settings(blob.blob_name), **condition)


async def read_blob(blob: Any) -> tuple[bytes, str]:
    """One Get Blob: the bytes and the ETag of the same version."""
    stream = await blob.download_blob()
    return await stream.readall(), stream.properties.etag


async def upload_file(blob: Any, lpath: str, crc32c: str, md5: str) -> None:
    """The local file ``lpath`` (whose digests are ``crc32c`` and ``md5``) as the blob, overwriting it.

    The service checks each block's Content-MD5 and stores ``md5`` as the
    blob's; the crc32c is recorded beside it in the metadata.
    """
    with open(lpath, "rb") as fh:
        await blob.upload_blob(fh, length=os.path.getsize(lpath), overwrite=True, validate_content=True,
                               content_settings=_content_settings(lpath, md5),
                               metadata={CRC32C_KEY: crc32c, MD5_KEY: md5}, max_concurrency=BLOCK_CONCURRENCY)


async def download_file(blob: Any, lpath: str, where: str) -> ChecksumMismatch | None:
    """The blob into the local file ``lpath``; a ChecksumMismatch (naming ``where``) when the file does not
    have the MD5 the service holds for the blob (where it holds one)."""
    stream = await blob.download_blob(max_concurrency=BLOCK_CONCURRENCY)
    with open(lpath, "wb") as fh:
        await stream.readinto(fh)
    want = content_md5(stream.properties)
    if want and await asyncio.to_thread(lambda: checksums(lpath)[1]) != want:
        return ChecksumMismatch(f"downloaded file does not match its MD5: {where}")
    return None


async def wait_for_copy(target: Any, started: dict[str, Any], where: str) -> None:
    """Poll the copy ``started`` (Copy Blob's answer) into ``target`` until it ends; PipelineError naming
    ``where`` when it fails or outlasts :data:`COPY_TIMEOUT`."""
    status = started.get("copy_status")
    deadline = time.monotonic() + COPY_TIMEOUT
    delay = 0.05
    while status == "pending":
        if time.monotonic() > deadline:
            raise PipelineError(f"server-side copy did not finish within {COPY_TIMEOUT:.0f} s: {where}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
        status = (await target.get_blob_properties()).copy.status
    if status != "success":
        raise PipelineError(f"server-side copy ended '{status}': {where}")


async def delete_if_match(blob: Any, etag: str | None) -> None:
    """Delete Blob ``If-Match`` ``etag`` (unconditional without one)."""
    from azure.core import MatchConditions

    condition = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
    await blob.delete_blob(**condition)
