"""Storage access through fsspec: the same calls for local disk and object stores.

Example::

    from tf_export_pipeline.storage import open_storage
    store = open_storage("/srv/models/my_model")
    store.create_only(store.join(store.root, "_exports", "claims", "17"), b"owner")

    gcs = open_storage("gs://my-bucket/models/m", {"project": "my-project"})
    print([e.name for e in gcs.list_dir(gcs.root)])

Local paths get POSIX semantics where they matter (``O_EXCL`` for create-only
writes, ``fsync`` before a rename). Google Cloud Storage (``gs://``, through
gcsfs) gets its server-side guarantees, used directly through the JSON API so
that each operation costs a known number of requests:

- listings: one request per page of 1000 names, no per-object look-ups; each
  entry carries the object's size, crc32c and generation;
- create-only writes: ``ifGenerationMatch=0``, with a nonce in the object's
  metadata to tell a lost-answer retry of our own write from a rival's object;
- copies: server-side rewrites (no byte goes through the client);
- deletes: matched to the generation that was listed, so an object rewritten
  since is left alone;
- transfers: a directory is uploaded once, then checked against the crc32c the
  server computed; downloads are checked the same way;
- errors: a 403, a 401 or a missing bucket become a one-line
  :class:`PipelineError`; transient errors (429, 5xx, dropped connections) are
  retried with backoff by gcsfs per request and, for whole-file transfers, once
  more here.

Any other fsspec URL (``s3://``, ``memory://``…) goes through the generic
fsspec calls. Storage options (credentials among them) are handed to fsspec
and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import mimetypes
import os
import posixpath
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import fsspec

from tf_export_pipeline.layout import TEMP_MARK
from tf_export_pipeline.errors import PipelineError

log = logging.getLogger(__name__)
# gcsfs logs every exhausted retry with a traceback; with no logging set up,
# Python would print those to stderr beside our one-line error. Where logging
# is configured (Airflow, --verbose), they still reach its handlers.
logging.getLogger("gcsfs").addHandler(logging.NullHandler())

NONCE_KEY = "tf-export-nonce"
LIST_PAGE_SIZE = 1000
CONCURRENCY = 16
TRANSFER_ATTEMPTS = 3
RETRY_BASE_DELAY = 0.5  # seconds, doubled per attempt, with jitter
RENAME_TIMEOUT = 600.0

_GOOGLE_HOSTS = ("googleapis.com", "storage.mtls.googleapis.com")
# fsspec backends whose ``pipe_file(mode="create")`` is one conditional request
# (S3's If-None-Match). Elsewhere fsspec emulates it with exists-then-write,
# which two writers can both pass.
ATOMIC_CREATE_PROTOCOLS = ("s3", "s3a")
_LAYOUTS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Entry:
    name: str          # base name (for walk(): the path relative to the walked directory)
    path: str          # full path, without protocol
    is_dir: bool
    size: int
    mtime: float | None
    crc32c: str | None = None
    generation: str | None = None
    metadata: dict[str, str] | None = None  # custom object metadata (GCS), from the listing


@dataclass
class TransferStats:
    files: int = 0
    bytes: int = 0
    attempts: int = 0
    seconds: float = 0.0
    paths: list[str] = field(default_factory=list)


class ChecksumMismatch(PipelineError):
    """A transferred file does not match the crc32c the server holds for it."""


# -- crc32c ----------------------------------------------------------------------
def crc32c_of_bytes(data: bytes) -> str:
    """CRC32C as GCS reports it: base64 of the big-endian 4 bytes."""
    import google_crc32c

    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def crc32c_of_file(path: str, chunk: int = 8 << 20) -> str:
    import google_crc32c

    c = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            c.update(block)
    return base64.b64encode(c.digest()).decode()


# -- opening ---------------------------------------------------------------------
def _is_google_endpoint(endpoint: str) -> bool:
    host = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint).hostname or ""
    return any(host == h or host.endswith("." + h) for h in _GOOGLE_HOSTS)


def _open_fs(url: str, options: dict[str, Any]):
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    opts = dict(options)
    if protocol not in ("file", "local"):
        # Listings are always fresh: other processes and machines change the bucket.
        opts.setdefault("use_listings_cache", False)
    if protocol in ("gs", "gcs"):
        endpoint = opts.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint and not _is_google_endpoint(endpoint):
            # An emulator or a proxy: gcsfs's extended class would first probe the
            # bucket type over gRPC (Storage Control), which such servers lack, for
            # a minute per call. The plain class speaks the JSON API only.
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            from gcsfs.core import GCSFileSystem

            fs = GCSFileSystem(**opts)
            return fs, fs._strip_protocol(url)
    return fsspec.core.url_to_fs(url, **opts)


class Storage:
    """One filesystem (local, gs://, s3://, memory://…) and the root path in it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url_in = url
        try:
            self.fs, self.root = _open_fs(url, storage_options or {})
        except (ImportError, ValueError, TypeError) as err:
            detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise PipelineError(f"cannot open storage ({detail}): {url}") from None
        protocol = self.fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        self.is_local = self.protocol in ("file", "local")
        self.is_gcs = self.protocol in ("gs", "gcs")
        self.root = self.root.rstrip("/") or "/"
        self._buckets_seen: set[str] = set()

    # -- paths -----------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return posixpath.join(*parts) if not self.is_local else os.path.join(*parts)

    def url(self, path: str) -> str:
        """The path as a user would write it (with ``gs://`` where it applies)."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    def rel(self, *parts: str) -> str:
        return self.join(self.root, *parts)

    def strip(self, url_or_path: str) -> str:
        """A URL of this storage as a path in it (``gs://b/k`` -> ``b/k``)."""
        if self.is_local:
            return url_or_path
        return self.fs._strip_protocol(url_or_path).rstrip("/")

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.strip("/").partition("/")
        return bucket, key

    @property
    def bucket(self) -> str:
        return self._split(self.root)[0]

    # -- errors ----------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, action: str, path: str, write: bool = False) -> Iterator[None]:
        """Turn a permanent or exhausted remote error into a one-line PipelineError."""
        try:
            yield
        except FileExistsError:
            raise
        except FileNotFoundError:
            if write or not self._split(path)[1]:
                self._raise_if_bucket_missing(path)
            raise
        except PipelineError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised when unknown
            mapped = self._translate(err, action, path)
            if mapped is None:
                raise
            raise mapped from None

    def _translate(self, err: BaseException, action: str, path: str) -> PipelineError | None:
        where = self.url(path)
        reason = storage_error_reason(err)
        if reason is None:
            return None
        return PipelineError(f"{reason} while {action}: {where}")

    def _raise_if_bucket_missing(self, path: str) -> None:
        bucket = self._split(path)[0]
        if not self.is_gcs or bucket in self._buckets_seen:
            return
        try:
            self.fs.call("GET", "b/{}", bucket, json_out=True)
        except FileNotFoundError:
            raise PipelineError(f"bucket '{bucket}' does not exist: {self.url(path)}") from None
        except Exception as err:  # noqa: BLE001 - classified; unknown errors propagate
            raise self._translate(err, "reading the bucket", bucket) or err from None
        self._buckets_seen.add(bucket)

    def _sync(self, coro_fn: Callable[[], Awaitable[Any]]) -> Any:
        return fsspec.asyn.sync(self.fs.loop, coro_fn)

    def _gather(self, jobs: list[Callable[[], Awaitable[Any]]], limit: int = CONCURRENCY) -> list[Any]:
        """Run async jobs on the filesystem's loop, ``limit`` at a time; exceptions are returned."""
        if not jobs:
            return []

        async def run():
            sem = asyncio.Semaphore(limit)

            async def one(job):
                async with sem:
                    return await job()

            return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)

        return self._sync(run)

    # -- GCS primitives (JSON API through gcsfs's session, auth and retries) -----
    def _gcs_list(self, path: str, delimiter: str | None, max_results: int | None = None
                  ) -> tuple[list[dict], list[str]]:
        """Objects and sub-prefixes under ``path/``: one request per page; a missing bucket raises."""
        bucket, key = self._split(path)
        prefix = key.rstrip("/") + "/" if key else ""
        items: list[dict] = []
        prefixes: list[str] = []
        token = None
        while True:
            params: dict[str, Any] = {"prefix": prefix or None, "maxResults": max_results or LIST_PAGE_SIZE,
                                      "delimiter": delimiter, "pageToken": token}
            try:
                with self._errors("listing", path):
                    page = self.fs.call("GET", "b/{}/o", bucket, json_out=True, **params)
            except FileNotFoundError:
                raise PipelineError(f"bucket '{bucket}' does not exist: {self.url(path)}") from None
            self._buckets_seen.add(bucket)
            items.extend(page.get("items", []))
            prefixes.extend(page.get("prefixes", []))
            token = page.get("nextPageToken")
            if not token or max_results:
                return items, prefixes

    def _gcs_object(self, path: str) -> dict:
        bucket, key = self._split(path)
        with self._errors("reading object metadata", path):
            return self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)

    def _entry(self, bucket: str, obj: dict, base_key: str = "", relative: bool = False) -> Entry:
        name = obj["name"]
        full = f"{bucket}/{name}"
        if relative:
            shown = name[len(base_key):].lstrip("/") if base_key else name
        else:
            shown = posixpath.basename(name.rstrip("/"))
        return Entry(shown, full, False, int(obj.get("size") or 0), _mtime(obj), obj.get("crc32c"),
                     str(obj["generation"]) if obj.get("generation") is not None else None,
                     obj.get("metadata"))

    # -- reading ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)
        if self.is_gcs:
            return self.isfile(path) or self.isdir(path)
        with self._errors("checking", path):
            return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        if self.is_local:
            return os.path.isdir(path)
        if self.is_gcs:
            bucket, key = self._split(path)
            items, prefixes = self._gcs_list(path, "/", max_results=1)
            return bool(items or prefixes) or not key
        with self._errors("checking", path):
            return self.fs.isdir(path)

    def isfile(self, path: str) -> bool:
        if self.is_local:
            return os.path.isfile(path)
        if self.is_gcs:
            if not self._split(path)[1]:
                return False
            try:
                self._gcs_object(path)
            except FileNotFoundError:
                return False
            return True
        with self._errors("checking", path):
            return self.fs.isfile(path)

    def list_dir(self, path: str) -> list[Entry]:
        """Children of ``path`` in one listing call (per page); empty when ``path`` is absent."""
        if self.is_local:
            out = []
            try:
                with os.scandir(path) as it:
                    for de in it:
                        try:
                            st = de.stat()
                        except FileNotFoundError:
                            continue  # removed while listing
                        out.append(Entry(de.name, de.path, de.is_dir(), st.st_size, st.st_mtime))
            except (FileNotFoundError, NotADirectoryError):
                return []
            return out
        if self.is_gcs:
            bucket, key = self._split(path)
            items, prefixes = self._gcs_list(path, "/")
            out = [Entry(posixpath.basename(p.rstrip("/")), f"{bucket}/{p.rstrip('/')}", True, 0, None)
                   for p in prefixes]
            base = key.rstrip("/") + "/" if key else ""
            out += [self._entry(bucket, o) for o in items if o["name"] != base and not o["name"].endswith("/")]
            return out
        self.invalidate(path)
        try:
            with self._errors("listing", path):
                infos = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            full = info["name"].rstrip("/")
            if full == path.rstrip("/"):
                continue
            out.append(Entry(posixpath.basename(full), full, info.get("type") == "directory",
                             int(info.get("size") or 0), _mtime(info), info.get("crc32c")))
        return out

    def walk(self, path: str) -> list[Entry]:
        """Every file below ``path`` (any depth), named relative to it; one listing per page on GCS."""
        if self.is_local:
            out = []
            for dirpath, _dirs, files in os.walk(path):
                for name in files:
                    full = os.path.join(dirpath, name)
                    st = os.stat(full)
                    out.append(Entry(os.path.relpath(full, path), full, False, st.st_size, st.st_mtime))
            return sorted(out, key=lambda e: e.name)
        if self.is_gcs:
            bucket, key = self._split(path)
            items, _ = self._gcs_list(path, None)
            base = key.rstrip("/") + "/" if key else ""
            return sorted((self._entry(bucket, o, base, relative=True) for o in items
                           if not o["name"].endswith("/")), key=lambda e: e.name)
        try:
            with self._errors("listing", path):
                infos = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        root = path.rstrip("/") + "/"
        return sorted((Entry(name[len(root):], name, False, int(i.get("size") or 0), _mtime(i), i.get("crc32c"))
                       for name, i in infos.items() if name.startswith(root)), key=lambda e: e.name)

    def info(self, path: str) -> Entry:
        if self.is_local:
            st = os.stat(path)
            return Entry(os.path.basename(path), path, os.path.isdir(path), st.st_size, st.st_mtime)
        if self.is_gcs:
            bucket, _ = self._split(path)
            try:
                return self._entry(bucket, self._gcs_object(path))
            except FileNotFoundError:
                if self.isdir(path):
                    return Entry(posixpath.basename(path.rstrip("/")), path.rstrip("/"), True, 0, None)
                raise
        self.invalidate(path)
        with self._errors("reading metadata", path):
            info = self.fs.info(path)
        return Entry(posixpath.basename(path.rstrip("/")), path, info.get("type") == "directory",
                     int(info.get("size") or 0), _mtime(info), info.get("crc32c"))

    def read_bytes(self, path: str) -> bytes:
        if self.is_local:
            with open(path, "rb") as fh:
                return fh.read()
        with self._errors("reading", path):
            return self.fs.cat_file(path)

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    # -- writing ---------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        if self.is_local:
            os.makedirs(path, exist_ok=True)
        elif not self.is_gcs:  # object stores have no directories; gcsfs would create buckets
            with self._errors("creating a directory", path, write=True):
                self.fs.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Overwriting write; locally durable (fsync) before it returns."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return
        with self._errors("writing", path, write=True):
            self.fs.pipe_file(path, data)

    def create_only(self, path: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        """Write ``path`` only if it does not exist yet. False when it already did.

        This is the one primitive that makes claims and the ledger safe between
        processes and machines: ``O_EXCL`` locally, a generation-0 precondition
        on GCS, ``If-None-Match: *`` on S3.

        On GCS a 412 does not prove that somebody else holds the object: when the
        answer to our own upload is lost, the retry finds our object and gets 412
        too. The object's metadata carries a nonce of this write, read back on 412.

        ``metadata`` (GCS) is stored as the object's custom metadata, which
        listings return: a reader can learn it without one request per object.
        """
        if self.is_local:
            return _create_only_local(path, data)
        if self.is_gcs:
            nonce = secrets.token_hex(16)
            try:
                with self._errors("writing (create-only)", path, write=True):
                    self._gcs_create(path, data, {**(metadata or {}), NONCE_KEY: nonce})
            except FileExistsError:
                try:
                    meta = self._gcs_object(path).get("metadata") or {}
                except FileNotFoundError:
                    return False  # released by its owner in the meantime: not ours either
                return meta.get(NONCE_KEY) == nonce
            return True
        if self.protocol not in ATOMIC_CREATE_PROTOCOLS:
            raise PipelineError(
                f"storage '{self.protocol}' offers no atomic create-only write, which version claims and the "
                f"ledger need (use local disk, gs:// or s3://): {self.url(path)}")
        try:
            with self._errors("writing (create-only)", path, write=True):
                self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:
            raise PipelineError(
                f"storage '{self.protocol}' offers no create-only write, which claims need: {self.url(path)}"
            ) from None
        except OSError as err:
            if _is_precondition_failure(err):
                return False
            raise
        return True

    def _gcs_create(self, path: str, data: bytes, metadata: dict[str, str]) -> None:
        self._gcs_upload(path, data, metadata, if_generation_match=0)

    def _gcs_upload(self, path: str, data: bytes, metadata: dict[str, str] | None = None,
                    if_generation_match: int | str | None = None) -> dict:
        """One JSON API multipart upload, conditional on the object's generation (0: must not exist).

        Built here rather than through gcsfs's ``pipe_file``: its extended
        (zonal/HNS) class routes uploads to zonal buckets over gRPC, where
        ``mode="create"`` is not honoured. This request is either conditional
        or refused by the server, never a silent overwrite. A precondition
        failure raises FileExistsError.
        """
        import json as _json
        from urllib.parse import quote

        bucket, key = self._split(path)
        head = {"name": key, **({"metadata": metadata} if metadata else {})}
        body = (b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n" + _json.dumps(head).encode()
                + b"\n--==0==\nContent-Type: application/octet-stream\n\n" + data + b"\n--==0==--")
        kw = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
        fs = self.fs

        async def upload():
            return await fs._call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                                  uploadType="multipart", headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                                  data=body, json_out=True, **kw)

        out = self._sync(upload)
        self.invalidate(path)
        return out

    def remove_if_torn(self, path: str, torn: Callable[[bytes], bool]) -> bool:
        """Remove the create-only object at ``path`` if its content is ``torn``; True when removed.

        New create-only writes appear whole or not at all; a torn one is left
        by an older writer or a damaged disk, and blocks its key for ever.
        The removal is matched to what was read (the generation on GCS, the
        inode locally), so an entry written since is left alone.
        """
        if self.is_local:
            try:
                with open(path, "rb") as fh:
                    seen = os.fstat(fh.fileno()).st_ino
                    data = fh.read()
            except FileNotFoundError:
                return False
            if not torn(data):
                return False
            try:
                if os.stat(path).st_ino == seen:
                    os.unlink(path)
                    fsync_dir(os.path.dirname(path))
                    return True
            except FileNotFoundError:
                return False
            return False
        if self.is_gcs:
            try:
                obj = self._gcs_object(path)
                data = self.read_bytes(path)
            except FileNotFoundError:
                return False
            if not torn(data):
                return False
            entry = self._entry(self._split(path)[0], obj)
            return not self.delete_objects([entry])
        try:
            data = self.read_bytes(path)
        except FileNotFoundError:
            return False
        if not torn(data):
            return False
        self.rm(path)
        return True

    # -- whole directories -------------------------------------------------------
    def upload_dir(self, local_dir: str, remote_dir: str) -> TransferStats:
        """Upload every file below ``local_dir`` into ``remote_dir`` once, then check it.

        The check is one listing of ``remote_dir``: each object must have the size
        and crc32c of its local file. A file that does not (an upload cut short
        and not noticed) is uploaded again, up to TRANSFER_ATTEMPTS times.
        """
        started = time.monotonic()
        files: dict[str, str] = {}
        for dirpath, _dirs, names in os.walk(local_dir):
            for name in names:
                full = os.path.join(dirpath, name)
                files[os.path.relpath(full, local_dir).replace(os.sep, "/")] = full
        stats = TransferStats()
        if self.is_local:
            raise PipelineError(f"upload_dir is for object stores; copy local files directly: {remote_dir}")
        want = {rel: (os.path.getsize(p), crc32c_of_file(p) if self.is_gcs else None) for rel, p in files.items()}
        todo = sorted(files)
        for attempt in range(TRANSFER_ATTEMPTS):
            stats.attempts = attempt + 1
            errors = self._put_files([(files[rel], posixpath.join(remote_dir, rel)) for rel in todo])
            stats.files += len(todo) - len(errors)
            stats.bytes += sum(want[rel][0] for rel in todo)
            have = {e.name: e for e in self.walk(remote_dir)}
            todo = [rel for rel, (size, crc) in want.items()
                    if rel not in have or have[rel].size != size or (crc and have[rel].crc32c != crc)]
            if not todo:
                stats.seconds = time.monotonic() - started
                stats.paths = sorted(want)
                return stats
            if attempt + 1 < TRANSFER_ATTEMPTS:
                log.warning("re-uploading %d of %d files into %s", len(todo), len(want), self.url(remote_dir))
                _backoff(attempt)
        first = errors[0] if errors else None
        reason = storage_error_reason(first) if first is not None else None
        raise PipelineError(f"upload failed after {TRANSFER_ATTEMPTS} attempts "
                            f"({reason or f'{len(todo)} files missing or corrupt, e.g. {todo[0]}'}): "
                            f"{self.url(remote_dir)}")

    def _put_files(self, pairs: list[tuple[str, str]]) -> list[BaseException]:
        if self.is_gcs:
            fs = self.fs

            def job(lpath, rpath):
                async def run():
                    ctype = mimetypes.guess_type(lpath)[0] or "application/octet-stream"
                    await fs._put_file(lpath, rpath, content_type=ctype)
                return run

            results = self._gather([job(lp, rp) for lp, rp in pairs], limit=8)
        else:
            results = []
            for lp, rp in pairs:
                try:
                    self.fs.put_file(lp, rp)
                    results.append(None)
                except Exception as err:  # noqa: BLE001 - checked and retried by the caller
                    results.append(err)
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if isinstance(err, FileNotFoundError):
                self._raise_if_bucket_missing(pairs[0][1])
            if storage_error_reason(err, permanent_only=True):
                raise self._translate(err, "uploading", pairs[0][1]) or err
        return errors

    def download_files(self, entries: list[Entry], local_dir: str, relative_to: str | None = None) -> TransferStats:
        """Download ``entries`` into ``local_dir`` (by base name, or relative to ``relative_to``).

        Each file is checked against the crc32c in its entry (the server's) and
        fetched again when it does not match; FileNotFoundError when one is gone.
        """
        started = time.monotonic()
        stats = TransferStats()
        targets = {}
        for e in entries:
            rel = posixpath.relpath(e.path, relative_to) if relative_to else posixpath.basename(e.path)
            targets[e.path] = os.path.join(local_dir, *rel.split("/"))
        todo = list(entries)
        last_error: BaseException | None = None
        for attempt in range(TRANSFER_ATTEMPTS):
            stats.attempts = attempt + 1
            results = self._get_files([(e.path, targets[e.path]) for e in todo])
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
                local = targets[e.path]
                stats.files += 1
                stats.bytes += os.path.getsize(local)
                if e.crc32c and crc32c_of_file(local) != e.crc32c:
                    last_error = ChecksumMismatch(f"downloaded file does not match its crc32c: {self.url(e.path)}")
                    retry.append(e)
            if not retry:
                stats.seconds = time.monotonic() - started
                return stats
            todo = retry
            if attempt + 1 < TRANSFER_ATTEMPTS:
                _backoff(attempt)
        if isinstance(last_error, PipelineError):
            raise last_error
        reason = storage_error_reason(last_error) if last_error else None
        raise PipelineError(f"download failed after {TRANSFER_ATTEMPTS} attempts ({reason or 'unknown error'}): "
                            f"{self.url(todo[0].path)}")

    def _get_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        for _, lpath in pairs:
            os.makedirs(os.path.dirname(lpath), exist_ok=True)
        if self.is_gcs:
            fs = self.fs

            def job(rpath, lpath):
                async def run():
                    await fs._get_file(rpath, lpath)
                return run

            return self._gather([job(rp, lp) for rp, lp in pairs], limit=8)
        results = []
        for rp, lp in pairs:
            try:
                self.fs.get_file(rp, lp)
                results.append(None)
            except Exception as err:  # noqa: BLE001 - classified by the caller
                results.append(err)
        return results

    def download_dir(self, remote_dir: str, local_dir: str) -> TransferStats:
        """Every file below ``remote_dir`` into ``local_dir``, checked against its crc32c."""
        entries = self.walk(remote_dir)
        if not entries:
            raise FileNotFoundError(self.url(remote_dir))
        return self.download_files(entries, local_dir, relative_to=remote_dir.rstrip("/"))

    # -- server-side copies and deletes ---------------------------------------------
    def copy_objects(self, pairs: list[tuple[Entry, str]], created: list[Entry] | None = None,
                     limit: int = CONCURRENCY) -> int:
        """Copy each source entry to its destination path on the server, concurrently.

        The destination is create-only (``ifGenerationMatch=0``) where the server
        honours it; a destination that exists with the source's size and crc32c
        counts as copied (the retry of a copy whose answer was lost). Each new
        destination is appended to ``created`` as it lands, so a caller can undo
        a partial copy. Returns the bytes copied; raises the first failure.
        """
        created = created if created is not None else []
        copied = 0
        if self.is_gcs:
            fs = self.fs

            def job(src: Entry, dst: str):
                async def run():
                    sb, sk = self._split(src.path)
                    db, dk = self._split(dst)
                    params: dict[str, Any] = {"ifGenerationMatch": 0, "sourceGeneration": src.generation}
                    try:
                        out = await fs._call("POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", sb, sk, db, dk,
                                             headers={"Content-Type": "application/json"}, json_out=True, **params)
                        while not out.get("done"):
                            out = await fs._call("POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", sb, sk, db, dk,
                                                 headers={"Content-Type": "application/json"}, json_out=True,
                                                 rewriteToken=out["rewriteToken"], **params)
                    except FileExistsError:
                        have = await fs._call("GET", "b/{}/o/{}", db, dk, json_out=True)
                        if int(have.get("size") or 0) == src.size and have.get("crc32c") == src.crc32c:
                            return None, 0  # already there, identical: not ours to undo
                        raise
                    resource = out.get("resource") or {}
                    entry = self._entry(db, resource) if resource else Entry(posixpath.basename(dk), dst, False,
                                                                             src.size, None, src.crc32c)
                    created.append(entry)
                    return entry, int(out.get("totalBytesRewritten") or src.size)
                return run

            results = self._gather([job(s, d) for s, d in pairs], limit=limit)
            for (src, dst), res in zip(pairs, results):
                if isinstance(res, BaseException):
                    if isinstance(res, FileExistsError):
                        raise FileExistsError(f"destination exists with other content: {self.url(dst)}")
                    if isinstance(res, FileNotFoundError):
                        raise FileNotFoundError(self.url(src.path))
                    raise self._translate(res, "copying", src.path) or res
                copied += res[1]
            return copied
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
        """Delete the listed objects, each only at the generation it was listed with.

        An object already gone counts as deleted; one rewritten since it was
        listed is left in place and returned.
        """
        kept: list[str] = []
        if self.is_gcs:
            fs = self.fs

            def job(e: Entry):
                async def run():
                    b, k = self._split(e.path)
                    await fs._call("DELETE", "b/{}/o/{}", b, k, ifGenerationMatch=e.generation)
                return run

            results = self._gather([job(e) for e in entries], limit=limit)
            for e, res in zip(entries, results):
                if isinstance(res, FileNotFoundError) or res is None:
                    continue
                if isinstance(res, FileExistsError):  # 412: a newer generation is there
                    kept.append(e.path)
                    continue
                raise self._translate(res, "deleting", e.path) or res
            return kept
        for e in entries:
            try:
                with self._errors("deleting", e.path):
                    self.fs.rm_file(e.path)
            except FileNotFoundError:
                pass
        return kept

    def rm(self, path: str, recursive: bool = False) -> None:
        if self.is_local:
            _rm_local(path)
            return
        if self.is_gcs:
            if recursive:
                entries = self.walk(path)
                if entries:
                    kept = self.delete_objects(entries)
                    if kept:
                        log.warning("left %d objects rewritten since listing under %s", len(kept), self.url(path))
                    return
            bucket, key = self._split(path)
            if key:
                try:
                    with self._errors("deleting", path):
                        self.fs.call("DELETE", "b/{}/o/{}", bucket, key)
                except FileNotFoundError:
                    pass
            return
        try:
            with self._errors("deleting", path):
                self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        self.invalidate(path)

    # -- bucket layout and folder rename (GCS) ------------------------------------------
    def gcs_layout(self) -> str:
        """``"hierarchical"`` or ``"flat"``: whether the bucket has a hierarchical namespace.

        One ``storageLayout`` request per bucket and process. A server without
        that call (an emulator) answers 404 for an existing bucket: flat.
        """
        bucket = self.bucket
        key = (str(getattr(self.fs, "_location", "")), bucket)
        if key in _LAYOUTS:
            return _LAYOUTS[key]
        try:
            with self._errors("reading the bucket layout", self.root):
                out = self.fs.call("GET", "b/{}/storageLayout", bucket, json_out=True)
            layout = "hierarchical" if (out.get("hierarchicalNamespace") or {}).get("enabled") else "flat"
        except FileNotFoundError:
            self._raise_if_bucket_missing(self.root)
            layout = "flat"
        _LAYOUTS[key] = layout
        return layout

    def rename_folder(self, src: str, dst: str, timeout: float = RENAME_TIMEOUT) -> None:
        """Rename folder ``src`` to ``dst`` in a hierarchical-namespace bucket, atomically.

        JSON API ``folders.rename`` (a long-running operation, polled to its end).
        FileExistsError when ``dst`` exists, FileNotFoundError when ``src`` does not.
        """
        sb, sk = self._split(src)
        db, dk = self._split(dst)
        if sb != db:
            raise PipelineError(f"a folder rename stays within one bucket: {self.url(src)} -> {self.url(dst)}")
        try:
            op = self.fs.call("POST", "b/{}/folders/{}/renameTo/folders/{}", sb, sk.rstrip("/") + "/",
                              dk.rstrip("/") + "/", json_out=True)
        except (FileExistsError, FileNotFoundError):
            raise
        except Exception as err:  # noqa: BLE001 - a conflict is a 409; the rest is classified
            if getattr(err, "code", None) == 409:
                raise FileExistsError(self.url(dst)) from None
            raise self._translate(err, "renaming a folder", src) or err
        deadline = time.monotonic() + timeout
        delay = 0.1
        while not op.get("done"):
            if time.monotonic() > deadline:
                raise PipelineError(f"folder rename did not finish within {timeout:.0f} s: {self.url(src)}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            op_id = str(op.get("name", "")).rsplit("/", 1)[-1]
            with self._errors("waiting for a folder rename", src):
                op = self.fs.call("GET", "b/{}/operations/{}", sb, op_id, json_out=True)
        error = op.get("error")
        if error:
            code = error.get("code")
            message = str(error.get("message", ""))[:200]
            if code == 6 or (code == 9 and "exist" in message.lower()):  # ALREADY_EXISTS
                raise FileExistsError(self.url(dst))
            if code == 5:  # NOT_FOUND
                raise FileNotFoundError(self.url(src))
            raise PipelineError(f"folder rename failed (code {code}: {message}): {self.url(src)}")

    def invalidate(self, path: str | None = None) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)


def storage_error_reason(err: BaseException | None, permanent_only: bool = False) -> str | None:
    """A short reason for a remote storage error, or None when it is not one we know.

    ``permanent_only``: only errors that no retry can cure (403, 401, 400).
    """
    if err is None:
        return None
    text = str(err)
    first = text.splitlines()[0][:160] if text else type(err).__name__
    if isinstance(err, PermissionError) or (isinstance(err, OSError) and text.startswith("Forbidden")):
        return "permission denied (HTTP 403; check the credentials in storage_options or the environment)"
    try:
        from gcsfs.retry import HttpError
    except ImportError:  # pragma: no cover - gcsfs not installed
        HttpError = ()  # type: ignore[assignment]
    if HttpError and isinstance(err, HttpError):
        code = getattr(err, "code", None)
        if code == 401:
            return "not authenticated (HTTP 401; check the credentials in storage_options or the environment)"
        if code in (408, 429) or (isinstance(code, int) and code >= 500):
            return None if permanent_only else f"storage unavailable after retries (HTTP {code})"
        message = str(getattr(err, "message", "") or "").splitlines()[0][:160] if getattr(err, "message", "") else ""
        return f"storage refused the request (HTTP {code}: {message})"
    if isinstance(err, ValueError) and text.startswith("Bad Request"):
        detail = text.splitlines()[1][:160] if len(text.splitlines()) > 1 else ""
        return f"storage refused the request (HTTP 400: {detail})"
    if permanent_only:
        return None
    try:
        import google.auth.exceptions as auth_exc

        if isinstance(err, auth_exc.DefaultCredentialsError):
            return "no credentials found (set token in storage_options or GOOGLE_APPLICATION_CREDENTIALS)"
        if isinstance(err, auth_exc.GoogleAuthError):
            return f"credentials rejected ({type(err).__name__})"
    except ImportError:  # pragma: no cover
        pass
    try:
        import aiohttp
        import requests

        if isinstance(err, requests.exceptions.ProxyError):
            return "storage unavailable after retries (HTTP 502)"
        if isinstance(err, (aiohttp.ClientError, requests.exceptions.RequestException)):
            return f"storage unreachable after retries ({type(err).__name__})"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(err, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return f"storage unreachable after retries ({type(err).__name__})"
    if isinstance(err, ChecksumMismatch):
        return first
    return None


def _backoff(attempt: int) -> None:
    time.sleep(RETRY_BASE_DELAY * (2 ** attempt) * (0.5 + random.random()))


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "updated", "LastModified", "last_modified", "timeCreated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            from datetime import datetime

            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def _is_precondition_failure(err: OSError) -> bool:
    code = getattr(err, "code", None) or getattr(err, "errno", None)
    return code in (412, errno.EEXIST) or "412" in str(err) or "precondition" in str(err).lower()


def _rm_local(path: str) -> None:
    """Remove a file or a tree; what another process removed meanwhile counts as removed."""
    import shutil

    def gone_already(_func, _path, exc):
        err = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(err, FileNotFoundError):
            raise err

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=gone_already)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _create_only_local(path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists: whole or not at all.

    The bytes go to a temporary name in the same directory first, are flushed,
    then linked to ``path`` (``link(2)`` never replaces). A full disk or a
    kill leaves at most the temporary name, which no reader lists and ``gc``
    removes; never an empty or torn entry.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    if os.path.lexists(path):
        return False
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TEMP_MARK}{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(directory)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush every file and directory below ``path`` to disk, children before parents."""
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def open_storage(url: str, storage_options: dict[str, Any] | None = None) -> Storage:
    return Storage(url, storage_options)
