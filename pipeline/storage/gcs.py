"""Google Cloud Storage (``gs://``), its server-side guarantees used directly.

gcsfs provides the session, the credentials and the per-request retries; the
operations that matter go to the JSON API here, so that each costs a known
number of requests and keeps the guarantee the server offers:

- listings: one request per page of 1000 names, no per-object look-ups; each
  entry carries the object's size, crc32c, generation and custom metadata;
- create-only writes: ``ifGenerationMatch=0``, with a nonce in the object's
  metadata to tell a lost-answer retry of our own write from a rival's object;
- copies: server-side rewrites (no byte goes through the client);
- deletes: matched to the generation that was listed, so an object rewritten
  since is left alone;
- transfers: checked against the crc32c the server computed (see transfers.py);
- a missing bucket is named as such, once per bucket and process;
- folder renames in buckets with hierarchical namespace (:meth:`GcsStore.rename_folder`).
"""

from __future__ import annotations

import logging
import mimetypes
import os
import posixpath
import secrets
import time
from typing import Any, NoReturn
from urllib.parse import urlsplit

import fsspec

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage.bucket import BucketStore, listed_name, split
from tf_export_pipeline.storage.entry import Entry, mtime_of
from tf_export_pipeline.storage.transfers import CONCURRENCY, crc32c_of_file, gather

# gcsfs logs every exhausted retry with a traceback; with no logging set up,
# Python would print those to stderr beside our one-line error. Where logging
# is configured (Airflow, --verbose), they still reach its handlers.
logging.getLogger("gcsfs").addHandler(logging.NullHandler())

NONCE_KEY = "tf-export-nonce"
LIST_PAGE_SIZE = 1000
RENAME_TIMEOUT = 600.0

_GOOGLE_HOSTS = ("googleapis.com", "storage.mtls.googleapis.com")
# Bucket layouts, by (API location, bucket): a bucket's namespace never changes, so one request per process.
_LAYOUTS: dict[tuple[str, str], str] = {}


def _is_google_endpoint(endpoint: str) -> bool:
    host = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint).hostname or ""
    return any(host == h or host.endswith("." + h) for h in _GOOGLE_HOSTS)


READ_VERSIONED_ATTEMPTS = 8  # a generation that changes between the reads of its metadata and its bytes


class GcsStore(BucketStore):
    """A bucket (and a root prefix in it) on Google Cloud Storage or an emulator of it."""

    protocols = ("gs", "gcs")
    is_gcs = True
    conditional_overwrite = True

    @classmethod
    def _open_fs(cls, url: str, options: dict[str, Any]) -> tuple[Any, str]:
        options.setdefault("use_listings_cache", False)
        endpoint = options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint and not _is_google_endpoint(endpoint):
            # An emulator or a proxy: gcsfs's extended class would first probe the
            # bucket type over gRPC (Storage Control), which such servers lack, for
            # a minute per call. The plain class speaks the JSON API only.
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            from gcsfs.core import GCSFileSystem

            fs = GCSFileSystem(**options)
            return fs, fs._strip_protocol(url)
        return fsspec.core.url_to_fs(url, **options)

    # -- errors ----------------------------------------------------------------
    def _not_found(self, path: str, write: bool, err: BaseException | None = None) -> None:
        # A write, or a look at the bucket itself, that finds nothing may mean no bucket at all.
        if write or not split(path)[1]:
            self._raise_if_bucket_missing(path)

    def _raise_if_bucket_missing(self, path: str) -> None:
        bucket = split(path)[0]
        if bucket in self._buckets_seen:
            return
        try:
            self.fs.call("GET", "b/{}", bucket, json_out=True)
        except FileNotFoundError:
            raise self._bucket_missing(path) from None
        except Exception as err:  # noqa: BLE001 - classified; unknown errors propagate
            raise self._translate(err, "reading the bucket", bucket) or err from None
        self._buckets_seen.add(bucket)

    # -- JSON API primitives (through gcsfs's session, auth and retries) ---------
    def _list_page(self, bucket: str, prefix: str, delimiter: str | None, max_results: int | None,
                   token: str | None) -> tuple[list[dict], list[str], str | None]:
        params: dict[str, Any] = {"prefix": prefix or None, "maxResults": max_results or LIST_PAGE_SIZE,
                                  "delimiter": delimiter, "pageToken": token}
        page = self.fs.call("GET", "b/{}/o", bucket, json_out=True, **params)
        return page.get("items", []), page.get("prefixes", []), page.get("nextPageToken")

    def object_info(self, path: str) -> dict[str, Any]:
        """The object's JSON API resource (``generation``, ``metadata``, ``crc32c``…); FileNotFoundError if absent."""
        bucket, key = split(path)
        with self._errors("reading object metadata", path):
            return self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        # The generation is read before and after the bytes: equal, the bytes are that generation's.
        for _ in range(READ_VERSIONED_ATTEMPTS):
            before = self.object_info(path)
            try:
                data = self.read_bytes(path)
                same = self.object_info(path).get("generation") == before.get("generation")
            except FileNotFoundError:
                continue  # replaced or removed between the two requests: read it again
            if same:
                return data, str(before["generation"])
        raise PipelineError(f"object keeps changing while it is read: {self.url(path)}")

    def write_if(self, path: str, data: bytes, token: str | None, metadata: dict[str, str] | None = None) -> str:
        out = self.upload(path, data, metadata, if_generation_match=0 if token is None else token,
                          action="writing (conditional)")
        return str((out or {}).get("generation"))

    def token_of(self, path: str) -> tuple[str, dict[str, str]]:
        info = self.object_info(path)
        return str(info.get("generation")), dict(info.get("metadata") or {})

    def _entry(self, bucket: str, obj: dict, base_key: str = "", relative: bool = False) -> Entry:
        name = obj["name"]
        return Entry(listed_name(name, base_key, relative), f"{bucket}/{name}", False, int(obj.get("size") or 0),
                     mtime_of(obj), obj.get("crc32c"),
                     str(obj["generation"]) if obj.get("generation") is not None else None,
                     obj.get("metadata"))

    def _is_folder_marker(self, obj: dict) -> bool:
        return obj["name"].endswith("/")

    def _file_stat(self, path: str) -> dict[str, Any]:
        return self.object_info(path)

    # -- writing ---------------------------------------------------------------
    def create_only(self, path: str, data: bytes, metadata: dict[str, str] | None = None) -> bool:
        # A 412 does not prove that somebody else holds the object: when the answer
        # to our own upload is lost, gcsfs's retry finds our object and gets 412 too.
        # The object's metadata carries a nonce of this write, read back on 412.
        nonce = secrets.token_hex(16)
        try:
            self.upload(path, data, {**(metadata or {}), NONCE_KEY: nonce}, if_generation_match=0,
                        action="writing (create-only)")
        except FileExistsError:
            try:
                meta = self.object_info(path).get("metadata") or {}
            except FileNotFoundError:
                return False  # released by its owner in the meantime: not ours either
            return meta.get(NONCE_KEY) == nonce
        return True

    def upload(self, path: str, data: bytes, metadata: dict[str, str] | None = None, *,
               if_generation_match: int | str | None = None, action: str = "uploading") -> dict[str, Any]:
        """One JSON API multipart upload, conditional on the object's generation (0: must not exist).

        Returns the new object's resource. A precondition failure raises
        FileExistsError; other known errors become a PipelineError naming
        ``action``.

        Built here rather than through gcsfs's ``pipe_file``: its extended
        (zonal/HNS) class routes uploads to zonal buckets over gRPC, where
        ``mode="create"`` is not honoured. This request is either conditional
        or refused by the server, never a silent overwrite.
        """
        import json as _json
        from urllib.parse import quote

        bucket, key = split(path)
        head = {"name": key, **({"metadata": metadata} if metadata else {})}
        body = (b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n" + _json.dumps(head).encode()
                + b"\n--==0==\nContent-Type: application/octet-stream\n\n" + data + b"\n--==0==--")
        kw = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
        fs = self.fs

        async def run():
            return await fs._call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                                  uploadType="multipart",
                                  headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                                  data=body, json_out=True, **kw)

        with self._errors(action, path, write=True):
            out = fsspec.asyn.sync(fs.loop, run)
            self.invalidate(path)
        return out

    def _read_for_removal(self, path: str) -> tuple[bytes, Entry]:
        obj = self.object_info(path)
        return self.read_bytes(path), self._entry(split(path)[0], obj)

    def _remove_seen(self, path: str, seen: Entry) -> bool:
        # The delete is matched to the generation read: a rewrite since then stays.
        return not self.delete_objects([seen])

    def _delete_key(self, path: str) -> None:
        with self._errors("deleting", path):
            self.fs.call("DELETE", "b/{}/o/{}", *split(path))

    # -- whole directories -------------------------------------------------------
    def _upload_checksum(self, local_path: str) -> str | None:
        return crc32c_of_file(local_path)

    def _put_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        fs = self.fs

        def job(lpath, rpath):
            async def run():
                ctype = mimetypes.guess_type(lpath)[0] or "application/octet-stream"
                await fs._put_file(lpath, rpath, content_type=ctype)
            return run

        return gather(fs.loop, [job(lp, rp) for lp, rp in pairs], limit=8)

    def _get_files(self, pairs: list[tuple[str, str]]) -> list[Any]:
        fs = self.fs

        def job(rpath, lpath):
            async def run():
                await fs._get_file(rpath, lpath)
            return run

        return gather(fs.loop, [job(rp, lp) for rp, lp in pairs], limit=8)

    # -- server-side copies and deletes ---------------------------------------------
    async def _copy_one(self, src: Entry, dst: str, created: list[Entry]) -> int:
        """A server-side rewrite, the destination ``ifGenerationMatch=0``, the source at its listed generation.

        A destination that exists with the source's size and crc32c counts as copied.
        """
        fs = self.fs
        sb, sk = split(src.path)
        db, dk = split(dst)
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
                return 0  # already there, identical: not ours to undo
            raise
        resource = out.get("resource") or {}
        created.append(self._entry(db, resource) if resource
                       else Entry(posixpath.basename(dk), dst, False, src.size, None, src.crc32c))
        return int(out.get("totalBytesRewritten") or src.size)

    def _copy_failed(self, err: BaseException, src: Entry) -> NoReturn:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(self.url(src.path))
        raise self._translate(err, "copying", src.path) or err

    def delete_objects(self, entries: list[Entry], limit: int = CONCURRENCY) -> list[str]:
        kept: list[str] = []
        fs = self.fs

        def job(e: Entry):
            async def run():
                b, k = split(e.path)
                await fs._call("DELETE", "b/{}/o/{}", b, k, ifGenerationMatch=e.generation)
            return run

        results = gather(fs.loop, [job(e) for e in entries], limit=limit)
        for e, res in zip(entries, results):
            if isinstance(res, FileNotFoundError) or res is None:
                continue
            if isinstance(res, FileExistsError):  # 412: a newer generation is there
                kept.append(e.path)
                continue
            raise self._translate(res, "deleting", e.path) or res
        return kept

    # -- bucket layout and folder rename ------------------------------------------
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
        sb, sk = split(src)
        db, dk = split(dst)
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
            translated = self._translate(err, "renaming a folder", src)
            if translated is None:
                raise
            raise translated from err
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
