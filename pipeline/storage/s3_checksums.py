"""How S3 names an object's content: ETags, and the md5 and crc32c checksums a body is checked against.

Example::

    import hashlib
    from tf_export_pipeline.storage.s3_checksums import etag_of, md5_etag
    parts = [hashlib.md5(b"a").digest(), hashlib.md5(b"b").digest()]
    md5_etag(parts)  # the ETag of a two-part upload: '<md5 of the two digests>-2'
    etag_of("0cc175b9c0f1b6a831c399e269772661")  # -> '"0cc175b9c0f1b6a831c399e269772661"'

An object uploaded in one piece has the md5 of its bytes as its ETag; one
uploaded in parts, the md5 of the parts' digests and the part count. Where the
server keeps a CRC32C (sent with the upload, returned with ``ChecksumMode``),
that checks a download whatever the upload's shape.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


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


def b64(digest: bytes) -> str:
    """A digest as S3's headers carry it (Content-MD5, x-amz-checksum-crc32c)."""
    return base64.b64encode(digest).decode()


def crc32c_b64(data: bytes) -> str:
    """The CRC32C of ``data`` as S3's headers carry it."""
    import google_crc32c

    return b64(google_crc32c.Checksum(data).digest())


def body_matches(out: dict[str, Any], md5: bytes, data: bytes | None, crc32c: str | None = None) -> bool:
    """Whether downloaded bytes match the checksum the server sent: its CRC32C, else an md5 ETag.

    ``out`` is the GetObject answer; ``md5`` the digest of the bytes, and
    ``crc32c`` their CRC32C where the caller computed it (else it is computed
    from ``data``).
    """
    want = out.get("ChecksumCRC32C")
    if want and "-" not in str(want):
        got = crc32c if crc32c is not None else crc32c_b64(data or b"")
        return got == want
    etag = str(out.get("ETag") or "").strip('"')
    if MD5_ETAG.match(etag):
        return etag == md5.hex()
    return True  # a multipart ETag without a checksum: the size check is all there is

