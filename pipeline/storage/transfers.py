"""What moving whole files between local disk and a store shares, whatever the backend.

Example::

    from tf_export_pipeline.storage.transfers import crc32c_of_file, gather
    crc32c_of_file("/tmp/export/saved_model.pb")  # -> 'yZRlqg==': base64, as GCS lists it
    gather(fs.loop, [lambda: fs._cat_file("bucket/a"), lambda: fs._cat_file("bucket/b")], limit=2)

The store interface (``base.Store.upload_dir`` / ``download_files``) sends a
file again when its check fails, up to :data:`TRANSFER_ATTEMPTS` times with
:func:`backoff` between attempts: gcsfs already retries each request, but a
file cut short without an error is only seen by the check. Backends run their
requests :data:`CONCURRENCY` at a time on their filesystem's event loop
(:func:`gather`) and check what they move with :func:`file_digests`.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import fsspec

CONCURRENCY = 16
TRANSFER_ATTEMPTS = 3
RETRY_BASE_DELAY = 0.5  # seconds, doubled per attempt, with jitter


def backoff(attempt: int) -> None:
    # Jitter, so that processes that failed together do not retry together.
    time.sleep(RETRY_BASE_DELAY * (2 ** attempt) * (0.5 + random.random()))


def crc32c_of_file(path: str, chunk: int = 8 << 20) -> str:
    """CRC32C of a local file as GCS reports it: base64 of the big-endian 4 bytes."""
    return file_digests(path, md5=False, chunk=chunk)[0]


def file_digests(path: str, md5: bool = True, chunk: int = 8 << 20) -> tuple[str, str | None]:
    """(crc32c, md5) of a local file, each base64, in one read; md5 None unless asked for."""
    import hashlib

    import google_crc32c

    crc = google_crc32c.Checksum()
    md5_hash = hashlib.md5(usedforsecurity=False) if md5 else None
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            crc.update(block)
            if md5_hash is not None:
                md5_hash.update(block)
    return (base64.b64encode(crc.digest()).decode(),
            base64.b64encode(md5_hash.digest()).decode() if md5_hash is not None else None)


def gather(loop: Any, jobs: Sequence[Callable[[], Awaitable[Any]]], limit: int = CONCURRENCY) -> list[Any]:
    """Run async jobs on an fsspec filesystem's ``loop``, ``limit`` at a time; exceptions are returned."""
    if not jobs:
        return []

    async def run():
        sem = asyncio.Semaphore(limit)

        async def one(job):
            async with sem:
                return await job()

        return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)

    return fsspec.asyn.sync(loop, run)
