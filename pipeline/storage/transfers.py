"""Whole-file transfers between local disk and a store: checked, and retried when they are not whole.

A backend moves the bytes (``Store._put_files`` / ``Store._get_files``, one
attempt per file, failures returned rather than raised); this module decides
what counts as done. An upload is done when one listing of the destination
shows every file with its size and, where the server reports one, its crc32c;
a download is done when each local file has the crc32c its entry carries.
What is not done is sent again, up to :data:`TRANSFER_ATTEMPTS` times with
backoff: gcsfs already retries each request, but a file cut short without an
error is only seen by the check.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import posixpath
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import fsspec

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage.errors import ChecksumMismatch, storage_error_reason

if TYPE_CHECKING:
    from tf_export_pipeline.storage.base import Entry, Store

log = logging.getLogger("tf_export_pipeline.storage")

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


def gather(loop: Any, jobs: list[Callable[[], Awaitable[Any]]], limit: int = CONCURRENCY) -> list[Any]:
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


def upload_dir(store: Store, local_dir: str, remote_dir: str) -> None:
    """Every file below ``local_dir`` into ``remote_dir`` once, then checked; see ``Store.upload_dir``."""
    files: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, local_dir).replace(os.sep, "/")] = full
    want = {rel: (os.path.getsize(p), store._upload_checksum(p)) for rel, p in files.items()}
    todo = sorted(files)
    for attempt in range(TRANSFER_ATTEMPTS):
        errors = _put_files(store, [(files[rel], posixpath.join(remote_dir, rel)) for rel in todo])
        have = {e.name: e for e in store.walk(remote_dir)}
        todo = [rel for rel, (size, crc) in want.items()
                if rel not in have or have[rel].size != size or (crc and have[rel].crc32c != crc)]
        if not todo:
            return
        if attempt + 1 < TRANSFER_ATTEMPTS:
            log.warning("re-uploading %d of %d files into %s", len(todo), len(want), store.url(remote_dir))
            backoff(attempt)
    first = errors[0] if errors else None
    reason = storage_error_reason(first) if first is not None else None
    raise PipelineError(f"upload failed after {TRANSFER_ATTEMPTS} attempts "
                        f"({reason or f'{len(todo)} files missing or corrupt, e.g. {todo[0]}'}): "
                        f"{store.url(remote_dir)}")


def _put_files(store: Store, pairs: list[tuple[str, str]]) -> list[BaseException]:
    """One upload attempt per pair; the transient failures, for the caller's check to retry.

    A permanent one (a missing bucket, 403, 401, 400) raises at once: no retry cures it.
    """
    results = store._put_files(pairs)
    errors = [r for r in results if isinstance(r, BaseException)]
    for err in errors:
        if isinstance(err, FileNotFoundError):
            store._not_found(pairs[0][1], write=True)
        if storage_error_reason(err, permanent_only=True):
            raise store._translate(err, "uploading", pairs[0][1]) or err
    return errors


def download_files(store: Store, entries: list[Entry], local_dir: str, relative_to: str | None = None) -> None:
    """``entries`` into ``local_dir``, each checked against its crc32c; see ``Store.download_files``."""
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
        results = store._get_files(pairs)
        retry = []
        for e, res in zip(todo, results):
            if isinstance(res, FileNotFoundError):
                raise FileNotFoundError(store.url(e.path))
            if isinstance(res, BaseException):
                if storage_error_reason(res, permanent_only=True):
                    raise store._translate(res, "downloading", e.path) or res
                last_error = res
                retry.append(e)
                continue
            if e.crc32c and crc32c_of_file(targets[e.path]) != e.crc32c:
                last_error = ChecksumMismatch(f"downloaded file does not match its crc32c: {store.url(e.path)}")
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
                        f"{store.url(todo[0].path)}")
