"""Storage access through fsspec: the same calls for local disk and object stores.

Example::

    from tf_export_pipeline.storage import open_storage
    store = open_storage("/srv/models/my_model")
    store.create_only(store.join(store.root, "_exports", "claims", "17"), b"owner")

    gcs = open_storage("gs://my-bucket/models/m", {"project": "my-project"})
    print([e.name for e in gcs.list_dir(gcs.root)])

:func:`open_storage` returns a :class:`Store` (``base.py``: the interface and
what every backend shares; its listings return :class:`Entry`, ``entry.py``)
of the URL's kind. Each backend is one subclass in its own module; the three
bucket stores (GCS, S3, Azure) share
:class:`~tf_export_pipeline.storage.bucket.BucketStore` (``bucket.py``:
listings, look-ups, removals and copies built from one request per page or
object, each store saying how its server is asked):

- :class:`~tf_export_pipeline.storage.local.LocalStore` (``local.py``): POSIX
  semantics where they matter (create-only by ``link(2)``, ``fsync`` before a
  rename);
- :class:`~tf_export_pipeline.storage.gcs.GcsStore` (``gcs.py``): Google Cloud
  Storage (``gs://``, through gcsfs), its server-side guarantees used directly
  through the JSON API, so that each operation costs a known number of
  requests (listings of 1000 names a page, create-only writes by generation,
  server-side copies, deletes matched to generations);
- :class:`~tf_export_pipeline.storage.s3.S3Store` (``s3.py``): Amazon S3 and
  S3-compatible servers (``s3://``, through s3fs), the same way: listings of
  1000 keys a page, create-only writes by ``If-None-Match: *`` (probed once per
  bucket), server-side copies, deletes matched to ETags, uploads checked by
  the server against their md5 and crc32c. Beside it: ``s3_objects.py`` (the
  requests on one object), ``s3_conditions.py`` (the create-only probe),
  ``s3_checksums.py``, ``s3_folders.py`` and ``s3_errors.py`` (S3's error
  codes in one table);
- :class:`~tf_export_pipeline.storage.azure.AzureBlobStore` (``azure.py``):
  Azure Blob Storage (``az://``, ``abfs://``, through adlfs and
  azure-storage-blob) the same way: listings of 5000 names a page,
  create-only writes by ``If-None-Match: *``, server-side copies, deletes
  matched to ETags, uploads checked by the server against their MD5. Beside
  it: ``azure_client.py`` (the credential and the service client),
  ``azure_objects.py`` (the requests on one blob), ``azure_blobs.py`` (what is
  recorded beside a blob) and ``azure_errors.py`` (the service's error codes
  in one table);
- :class:`~tf_export_pipeline.storage.fsspec_generic.FsspecStore`
  (``fsspec_generic.py``): any other fsspec URL (``memory://``…) through the
  generic fsspec calls.

Beside them, ``errors.py`` turns a backend's exceptions into one-line
:class:`PipelineError` messages, and ``transfers.py`` holds what moving whole
files shares (the concurrency, the backoff between attempts, the digests a
transfer is checked with; :class:`Store` checks and retries the transfers).
Storage options (credentials among them) are handed to fsspec and never
logged.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.registry import known_implementations

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.storage.azure import AzureBlobStore
from tf_export_pipeline.storage.base import Store
from tf_export_pipeline.storage.entry import Entry, mtime_of
from tf_export_pipeline.storage.errors import ChecksumMismatch, storage_error_reason
from tf_export_pipeline.storage.fsspec_generic import ATOMIC_CREATE_PROTOCOLS, FsspecStore
from tf_export_pipeline.storage.gcs import GcsStore
from tf_export_pipeline.storage.local import LocalStore, fsync_dir, fsync_tree
from tf_export_pipeline.storage.s3 import S3Store
from tf_export_pipeline.storage.transfers import crc32c_of_file

#: The name callers have always used in type hints; the same class.
Storage = Store

_BACKENDS: tuple[type[Store], ...] = (LocalStore, GcsStore, S3Store, AzureBlobStore)


def _store_class(url: str) -> type[Store]:
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    return next((cls for cls in _BACKENDS if protocol in cls.protocols), FsspecStore)


def _require_implementation(url: str) -> None:
    """Refuse, as a config error, a URL whose scheme fsspec does not know or whose package is missing.

    Installing a package mends it and no rerun does, so it is the config's
    problem (exit 2), and the line says what to install.
    """
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol is None or protocol in LocalStore.protocols:
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(f"unknown storage scheme '{protocol}://' (no fsspec filesystem is registered for "
                          f"it): {url}") from None
    except ImportError as err:
        known = known_implementations.get(protocol) or {}
        package = str(known.get("class") or "").split(".")[0]
        if package and package != "fsspec":
            raise ConfigError(f"storage '{protocol}://' needs the package {package}, which is not installed "
                              f"(pip install {package}): {url}") from None
        detail = " ".join(str(err).split())[:200] or "a package it needs is not installed"
        raise ConfigError(f"storage '{protocol}://' cannot be used here ({detail}): {url}") from None


def open_storage(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The store for ``url``: local disk, GCS, or any other fsspec filesystem."""
    _require_implementation(url)
    return _store_class(url)(url, storage_options)


__all__ = [
    "ATOMIC_CREATE_PROTOCOLS", "AzureBlobStore", "ChecksumMismatch", "Entry", "FsspecStore", "GcsStore", "LocalStore",
    "S3Store", "Storage", "Store", "crc32c_of_file", "fsync_dir", "fsync_tree", "mtime_of", "open_storage",
    "storage_error_reason",
]
