"""What an Azure store reads and writes beside a blob's bytes: its metadata, its MD5, its ETag.

Example::

    from tf_export_pipeline.storage.azure_blobs import CRC32C_KEY, MD5_KEY, blob_metadata, recorded_crc32c
    blob_metadata({"version": "7", "bad-name": "x"})  # -> {}: all of the caller's metadata, or none
    recorded_crc32c({CRC32C_KEY: "yZRlqg==", MD5_KEY: "DMF1ucDxtqgxw5niaXcmYQ=="}, "DMF1ucDxtqgxw5niaXcmYQ==")
    # -> 'yZRlqg==': trusted while the blob's MD5 is the one recorded beside it

The service checks an upload's body against its Content-MD5 and keeps that
MD5; it computes no crc32c. So this store records the crc32c of what it
uploads in the blob's metadata, beside the MD5 it was computed with: any
rewrite of the blob replaces both its MD5 and its metadata, so a crc32c is
trusted only while the two MD5s agree. Metadata names are C# identifiers (no
hyphens, unlike GCS's ``tf-export-nonce``); a hierarchical namespace or adlfs
marks directory blobs in it.
"""

from __future__ import annotations

import base64
import re
from typing import Any, cast

from tf_export_pipeline.storage.entry import Entry
from tf_export_pipeline.storage.transfers import file_digests

NONCE_KEY = "tf_export_nonce"
CRC32C_KEY = "tf_export_crc32c"
MD5_KEY = "tf_export_md5"
OWN_KEYS = (NONCE_KEY, CRC32C_KEY, MD5_KEY)
# Directory markers: adlfs's, and those of accounts with a hierarchical namespace.
_DIR_MARKERS = (("is_directory", "true"), ("hdi_isfolder", "true"))
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
METADATA_LIMIT = 4096  # bytes of caller metadata; the service allows 8 KiB in all


def blob_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """The caller's metadata as the service accepts it, or none of it.

    Names must be identifiers and values printable ASCII. All or nothing: a
    reader that finds a record's fields missing from the listing reads the
    blob itself, whereas half of them would pass for the whole record.
    """
    meta = dict(metadata or {})
    fits = all(_IDENTIFIER.match(k) and isinstance(v, str) and v.isascii() and v.isprintable()
               and v == v.strip() for k, v in meta.items())
    if not fits or sum(len(k) + len(v) for k, v in meta.items()) > METADATA_LIMIT:
        return {}
    return meta


def md5_b64(value: Any) -> str | None:
    """A blob's Content-MD5 in base64, whichever form the SDK gave it in."""
    if not value:
        return None
    if isinstance(value, str):  # already base64, as some responses deserialize it
        return value
    return base64.b64encode(bytes(value)).decode()


def content_md5(blob: Any) -> str | None:
    """The MD5 the service holds for a listed blob or a blob's properties, in base64."""
    return md5_b64(getattr(blob.content_settings, "content_md5", None))


def recorded_crc32c(metadata: dict[str, str], md5: str | None) -> str | None:
    """The crc32c this store recorded in a blob's metadata, while the blob's MD5 ``md5`` is still the one
    recorded beside it; else None."""
    return metadata.get(CRC32C_KEY) if md5 and metadata.get(MD5_KEY) == md5 else None


def own_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """A blob's metadata without what this store records for itself."""
    return {k: v for k, v in metadata.items() if k not in OWN_KEYS}


def checksums(path: str) -> tuple[str, str]:
    """(crc32c, md5) of a local file, base64, in one read."""
    return cast("tuple[str, str]", file_digests(path, md5=True))


def quoted_etag(value: Any) -> str | None:
    """An ETag in its quoted form: listings give it bare, responses' headers quoted."""
    if not value:
        return None
    return '"' + str(value).strip('"') + '"'


def is_folder_marker(blob: Any) -> bool:
    """Whether a listed blob (or a blob's properties) stands for a directory, not a file."""
    meta = {k.lower(): str(v).lower() for k, v in (blob.metadata or {}).items()}
    return blob.name.endswith("/") or any(meta.get(k) == v for k, v in _DIR_MARKERS)


def same_content(src: Entry, have: Any) -> bool:
    """Whether the blob whose properties are ``have`` holds ``src``'s bytes, as far as the crc32cs tell."""
    crc = recorded_crc32c(have.metadata or {}, content_md5(have))
    return src.crc32c is None or crc is None or crc == src.crc32c
