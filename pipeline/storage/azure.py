"""Azure Blob Storage (``az://``, ``abfs://``), its server-side guarantees used directly.

Example::

    from tf_export_pipeline.storage import open_storage
    store = open_storage("az://models/serving/demo", {"account_name": "myaccount", "account_key": "..."})
    store.create_only(store.join(store.root, "_exports", "claims", "17"), b"owner")
    print([e.name for e in store.list_dir(store.root)])

adlfs parses the URLs and finds the credentials; every operation that matters
goes to the Blob service through azure-storage-blob's asyncio client, on
adlfs's event loop, so that each costs a known number of requests and keeps
the guarantee the service offers:

- listings: List Blobs, one request per page of 5000 names, with metadata; an
  entry carries the size, the ETag (as its ``generation``), and the crc32c
  recorded when this store uploaded the blob (trusted only while the blob's
  Content-MD5 is the one recorded beside it);
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

import asyncio
import base64
import logging
import mimetypes
import os
import posixpath
import re
import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

import fsspec

from tf_export_pipeline.errors import ConfigError, PipelineError
from tf_export_pipeline.storage.azure_errors import azure_reason, error_code
from tf_export_pipeline.storage.base import Entry
from tf_export_pipeline.storage.bucket import BucketStore, listed_name, split
from tf_export_pipeline.storage.errors import ChecksumMismatch
from tf_export_pipeline.storage.transfers import CONCURRENCY, file_digests, gather

# The SDK logs retried requests; with no logging set up, Python would print those to stderr beside our
# one-line error. Where logging is configured (Airflow, --verbose), they still reach its handlers.
logging.getLogger("azure").addHandler(logging.NullHandler())

# Metadata names are C# identifiers: no hyphens, unlike GCS's "tf-export-nonce".
NONCE_KEY = "tf_export_nonce"
CRC32C_KEY = "tf_export_crc32c"
MD5_KEY = "tf_export_md5"
_OWN_KEYS = (NONCE_KEY, CRC32C_KEY, MD5_KEY)
# Directory markers: adlfs's, and those of accounts with a hierarchical namespace.
_DIR_MARKERS = (("is_directory", "true"), ("hdi_isfolder", "true"))
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
METADATA_LIMIT = 4096  # bytes of caller metadata; the service allows 8 KiB in all

LIST_PAGE_SIZE = 5000
COPY_TIMEOUT = 600.0
# Retries of each request (azure-storage's ExponentialRetry: 0.5 s, 2.5 s, 4.5 s, 8.5 s, with jitter), and
# a connect timeout: the SDK's defaults (15 s first back-off, 300 s to connect) would hold a run for minutes
# on an unreachable endpoint. ``retry_total`` in storage_options overrides the count.
RETRY_TOTAL = 4
RETRY_INITIAL_BACKOFF = 0.5
RETRY_INCREMENT_BASE = 2
CONNECTION_TIMEOUT = 20
READ_TIMEOUT = 120
_CLIENT_OPTIONS = ("retry_total", "connection_timeout", "read_timeout")

_ENV_KEYS = (("connection_string", "AZURE_STORAGE_CONNECTION_STRING"),
             ("account_name", "AZURE_STORAGE_ACCOUNT_NAME"),
             ("account_key", "AZURE_STORAGE_KEY"),
             ("account_key", "AZURE_STORAGE_ACCOUNT_KEY"),
             ("sas_token", "AZURE_STORAGE_SAS_TOKEN"))
_SECRET_OPTIONS = ("connection_string", "account_key", "sas_token", "credential", "client_secret")


def credentials(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the credential chosen once: what storage_options name, else the environment.

    A credential in storage_options wins as a whole, so that a variable left in
    the environment never mixes with it (adlfs would let a connection string
    from the environment override an account key given explicitly).
    """
    out = dict(options)
    given = any(out.get(k) for k in ("connection_string", "account_key", "sas_token", "credential", "anon",
                                     "client_id"))
    if not given:
        if os.environ.get("AZURE_STORAGE_CONNECTION_STRING") and not out.get("account_name"):
            out["connection_string"] = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        else:
            for key, var in _ENV_KEYS[1:]:
                if not out.get(key) and os.environ.get(var):
                    out[key] = os.environ[var]
    if out.get("connection_string"):
        for key in ("account_name", "account_key", "sas_token", "credential"):
            out.pop(key, None)
    return out


def _md5_b64(value: Any) -> str | None:
    if not value:
        return None
    if isinstance(value, str):  # already base64, as some responses deserialize it
        return value
    return base64.b64encode(bytes(value)).decode()


def checksums(path: str) -> tuple[str, str]:
    """(crc32c, md5) of a local file, base64, in one read."""
    return file_digests(path)


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


class AzureBlobStore(BucketStore):
    """A container (and a root prefix in it) in Azure Blob Storage or Azurite."""

    protocols = ("az", "abfs", "abfss")
    conditional_overwrite = True
    object_noun = "blobs"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        super().__init__(url, storage_options)
        scheme = fsspec.core.split_protocol(url)[0] or "az"
        self.protocol = scheme if scheme in self.protocols else "az"
        self.client = self.fs._tf_export_clients[_client_key(storage_options or {})]

    @classmethod
    def _open_fs(cls, url: str, options: dict[str, Any]) -> tuple[Any, str]:
        from adlfs import AzureBlobFileSystem

        options = credentials(options)
        options.setdefault("use_listings_cache", False)
        client_options = {k: options.pop(k) for k in _CLIENT_OPTIONS if k in options}
        try:
            # fsspec caches the filesystem per options: one client, one connection pool, per process.
            fs = AzureBlobFileSystem(**options)
            clients = fs.__dict__.setdefault("_tf_export_clients", {})
            key = _client_key(client_options)
            if key not in clients:
                clients[key] = client = _service_client(fs, options, client_options)
                weakref.finalize(fs, _close_client, fs.loop, client)
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001 - the SDK's text may quote the connection string
            raise ConfigError(f"cannot open Azure Blob storage ({_open_problem(err, options)}): "
                              f"{_without_query(url)}") from None
        return fs, fs._strip_protocol(url)

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
        md5 = _md5_b64(getattr(blob.content_settings, "content_md5", None))
        # The recorded crc32c is this store's claim about the bytes; it holds while the MD5 the server
        # checked at upload is still the blob's (any rewrite replaces both the MD5 and the metadata).
        crc = meta.get(CRC32C_KEY) if md5 and meta.get(MD5_KEY) == md5 else None
        own = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
        mtime = blob.last_modified.timestamp() if blob.last_modified else None
        return Entry(shown, f"{container}/{name}", False, int(blob.size or 0), mtime, crc, _etag(blob.etag),
                     own or None)

    def _is_folder_marker(self, blob: Any) -> bool:
        meta = {k.lower(): str(v).lower() for k, v in (blob.metadata or {}).items()}
        return blob.name.endswith("/") or any(meta.get(k) == v for k, v in _DIR_MARKERS)

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
    async def _put(self, path: str, data: bytes, metadata: dict[str, str], overwrite: bool,
                   **condition: Any) -> dict[str, Any]:
        from azure.storage.blob import ContentSettings

        # validate_content: the server checks the body against its Content-MD5 and keeps that MD5.
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return await self._blob(path).upload_blob(data, overwrite=overwrite, metadata=metadata,
                                                  validate_content=True,
                                                  content_settings=ContentSettings(content_type=ctype), **condition)

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
        async def read():
            stream = await self._blob(path).download_blob()  # one Get Blob: bytes and ETag together
            return await stream.readall(), stream.properties.etag

        return self._run("reading", path, read)

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
        async def read():
            stream = await self._blob(path).download_blob()
            etag = stream.properties.etag
            return await stream.readall(), etag

        return self._run("reading", path, read)

    def _remove_seen(self, path: str, seen: str) -> bool:
        from azure.core import MatchConditions

        # Deleted only at the ETag whose bytes were read: a rewrite since then stays.
        try:
            self._run("deleting", path, lambda: self._blob(path).delete_blob(
                etag=seen, match_condition=MatchConditions.IfNotModified))
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
        """One upload per pair: Content-MD5 checked by the server (per block for large files), the
        whole file's MD5 stored as the blob's, its crc32c recorded beside it in the metadata."""
        from azure.storage.blob import ContentSettings

        sums = {lp: self._checksums(lp) for lp, _ in pairs}

        def job(lp: str, rp: str):
            async def run():
                crc, md5 = sums[lp]
                settings = ContentSettings(content_type=mimetypes.guess_type(lp)[0] or "application/octet-stream",
                                           content_md5=bytearray(base64.b64decode(md5)))
                with open(lp, "rb") as fh:
                    await self._blob(rp).upload_blob(fh, length=os.path.getsize(lp), overwrite=True,
                                                     validate_content=True, content_settings=settings,
                                                     metadata={CRC32C_KEY: crc, MD5_KEY: md5}, max_concurrency=4)
            return run

        results = gather(self.fs.loop, [job(lp, rp) for lp, rp in pairs], limit=8)
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
        def job(rp: str, lp: str):
            async def run():
                stream = await self._blob(rp).download_blob(max_concurrency=4)
                with open(lp, "wb") as fh:
                    await stream.readinto(fh)
                want = _md5_b64(getattr(stream.properties.content_settings, "content_md5", None))
                if want and await asyncio.to_thread(lambda: checksums(lp)[1]) != want:
                    return ChecksumMismatch(f"downloaded file does not match its MD5: {self.url(rp)}")
                return None
            return run

        results = gather(self.fs.loop, [job(rp, lp) for rp, lp in pairs], limit=8)
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
            if int(have.size or 0) == src.size and _same_content(src, have):
                return 0  # already there, identical: not ours to undo
            raise FileExistsError(self.url(dst)) from None
        status = out.get("copy_status")
        deadline = time.monotonic() + COPY_TIMEOUT
        delay = 0.05
        while status == "pending":
            if time.monotonic() > deadline:
                raise PipelineError(f"server-side copy did not finish within {COPY_TIMEOUT:.0f} s: {self.url(dst)}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            status = (await target.get_blob_properties()).copy.status
        if status != "success":
            raise PipelineError(f"server-side copy ended '{status}': {self.url(dst)}")
        created.append(Entry(posixpath.basename(dst), dst, False, src.size, None, src.crc32c, _etag(out.get("etag"))))
        return src.size

    def _copy_failed(self, err: BaseException, src: Entry) -> NoReturn:
        if isinstance(err, PipelineError):
            raise err
        self._raise(err, "copying", src.path)

    def delete_objects(self, entries: list[Entry], limit: int = CONCURRENCY) -> list[str]:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        def job(e: Entry):
            async def run():
                condition = {"etag": e.generation, "match_condition": MatchConditions.IfNotModified} \
                    if e.generation else {}
                await self._blob(e.path).delete_blob(**condition)
            return run

        kept: list[str] = []
        results = gather(self.fs.loop, [job(e) for e in entries], limit=limit)
        for e, res in zip(entries, results):
            if res is None or (isinstance(res, ResourceNotFoundError) and error_code(res) != "ContainerNotFound"):
                continue
            if isinstance(res, ResourceModifiedError):  # 412: rewritten since it was listed
                kept.append(e.path)
                continue
            self._raise(res, "deleting", e.path)
        return kept


def _etag(value: Any) -> str | None:
    """An ETag in its quoted form: listings give it bare, responses' headers quoted."""
    if not value:
        return None
    return '"' + str(value).strip('"') + '"'


def _same_content(src: Entry, have: Any) -> bool:
    meta = have.metadata or {}
    md5 = _md5_b64(getattr(have.content_settings, "content_md5", None))
    crc = meta.get(CRC32C_KEY) if md5 and meta.get(MD5_KEY) == md5 else None
    return src.crc32c is None or crc is None or crc == src.crc32c


def _client_key(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, options[k]) for k in _CLIENT_OPTIONS if k in options))


def _close_client(loop: Any, client: Any) -> None:
    try:
        fsspec.asyn.sync(loop, client.close, timeout=5)
    except Exception:  # noqa: BLE001 - at exit, a loop already stopped: nothing left to close
        pass


def _service_client(fs: Any, options: dict[str, Any], client_options: dict[str, Any]):
    """An asyncio BlobServiceClient for the credential :func:`credentials` chose, with bounded retries."""
    from azure.storage.blob.aio import BlobServiceClient

    kw = {"retry_total": int(client_options.get("retry_total", RETRY_TOTAL)),
          "initial_backoff": RETRY_INITIAL_BACKOFF, "increment_base": RETRY_INCREMENT_BASE,
          "connection_timeout": client_options.get("connection_timeout", CONNECTION_TIMEOUT),
          "read_timeout": client_options.get("read_timeout", READ_TIMEOUT)}
    if options.get("connection_string"):
        return BlobServiceClient.from_connection_string(options["connection_string"], **kw)
    name = options.get("account_name")
    if not name:
        raise ValueError("no account: set connection_string or account_name in storage_options, or "
                         "AZURE_STORAGE_CONNECTION_STRING / AZURE_STORAGE_ACCOUNT_NAME")
    host = options.get("account_host") or f"{name}.blob.core.windows.net"
    url = host if "://" in host else f"https://{host}"
    if options.get("credential") is not None:
        return BlobServiceClient(url, credential=options["credential"], **kw)
    if options.get("account_key"):
        return BlobServiceClient(url, credential={"account_name": name, "account_key": options["account_key"]},
                                 **kw)
    if options.get("sas_token"):
        return BlobServiceClient(f"{url}?{str(options['sas_token']).lstrip('?')}", **kw)
    if options.get("anon"):
        return BlobServiceClient(url, **kw)
    return BlobServiceClient(url, credential=fs.credential, **kw)  # adlfs's DefaultAzureCredential


def _open_problem(err: BaseException, options: dict[str, Any]) -> str:
    """Why the client could not be made, without quoting what was given."""
    if options.get("connection_string"):
        return "the connection string is malformed or incomplete"
    if not options.get("account_name"):
        return ("no account: set connection_string or account_name in storage_options, or "
                "AZURE_STORAGE_CONNECTION_STRING / AZURE_STORAGE_ACCOUNT_NAME")
    if options.get("account_key"):
        return "the account key is not valid base64"
    return type(err).__name__


def _without_query(url: str) -> str:
    """A URL without its query string, where a SAS token would be."""
    return url.split("?", 1)[0]
