"""Staging: the file list written at export time, its check before commit, and the lease.

Example::

    from tf_export_pipeline.publish.staging import file_list, verify_staging
    from tf_export_pipeline.storage import open_storage
    store = open_storage("/srv/models/m")
    files = file_list("/srv/models/m/temp-1732147260-ab12")
    verify_staging(store, "/srv/models/m/temp-1732147260-ab12", files)

A staging directory ``temp-<ts>-<nonce>`` lives beside the versions until it is
promoted. Two records guard it:

- **the file list** (relative path, size, crc32c of every file), made when the
  SavedModel is written and checked just before the ledger entry: a staging
  directory that lost a file (removed by ``gc``, a hand, a full disk) is never
  committed;
- **the lease** ``_exports/leases/<staging name>``, renewed while export and
  validation run and once more before publishing. ``gc`` removes staging only
  when its lease has run out and no ledger entry needs it; a publish refuses
  staging whose lease had run out, since ``gc`` may be removing it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from tf_export_pipeline.errors import PipelineError, PublishError
from tf_export_pipeline.layout import EXPORTS_DIR, LEASES_DIR
from tf_export_pipeline.storage import Storage, crc32c_of_file

# A publish refuses staging whose lease is this close to running out: gc
# deciding to remove it and the publish renewing it must never both succeed.
LEASE_MARGIN_SECONDS = 60.0
HEARTBEAT_SECONDS = 60.0


class StagingGone(PublishError):
    """Staging is missing, incomplete or past its lease: export the checkpoint again.

    Permanent for the task that meets it (a retry finds the same), not for the
    checkpoint: the next run exports it anew.
    """

    permanent = True


def file_list(local_dir: str) -> dict[str, dict[str, Any]]:
    """Every file below ``local_dir``: relative POSIX path -> size and crc32c (as GCS reports it)."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, _dirs, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            out[rel] = {"size": os.path.getsize(full), "crc32c": crc32c_of_file(full)}
    return dict(sorted(out.items()))


def model_size(files: dict[str, dict[str, Any]]) -> dict[str, int]:
    """A file list's bytes and number of files (what metrics and lineage report of a version)."""
    return {"bytes": sum(int((meta or {}).get("size") or 0) for meta in files.values()), "files": len(files)}


def verify_staging(store: Storage, staging: str, files: dict[str, dict[str, Any]], deep: bool = True) -> None:
    """Raise :class:`StagingGone` unless ``staging`` holds every listed file, unchanged.

    One listing on object stores (size and crc32c come with it); locally each
    file's size, and with ``deep`` its crc32c read back from disk (a second
    check moments later only needs to see that nothing was removed).
    """
    if not files:
        raise StagingGone(f"staging has no file list; export the checkpoint again: {store.url(staging)}")
    present = {e.name: e for e in store.walk(staging)}
    if not present:
        raise StagingGone(f"staging is gone (removed by gc or by hand?); the next run exports the checkpoint "
                          f"again: {store.url(staging)}")
    bad = []
    for rel, want in files.items():
        have = present.get(rel)
        if have is None or have.size != want["size"]:
            bad.append(rel)
            continue
        crc = have.crc32c
        if crc is None and store.is_local and deep:
            crc = crc32c_of_file(have.path)
        if crc is not None and want.get("crc32c") and crc != want["crc32c"]:
            bad.append(rel)
    if bad:
        raise StagingGone(f"staging is incomplete ({len(bad)} of {len(files)} files missing or changed, e.g. "
                          f"{bad[0]}); the next run exports the checkpoint again: {store.url(staging)}")


# -- leases -------------------------------------------------------------------------
def staging_name(path: str) -> str:
    """The name of a staging directory (``temp-<ts>-<nonce>``) from its path or URL."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def lease_path(store: Storage, staging_name: str) -> str:
    return store.join(store.root, EXPORTS_DIR, LEASES_DIR, staging_name)


def renew_lease(store: Storage, staging_name: str) -> None:
    body = json.dumps({"renewed_at": time.time()}).encode()
    path = lease_path(store, staging_name)
    if store.is_local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.renew-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return
    store.write_bytes(path, body)


def drop_lease(store: Storage, staging_name: str) -> None:
    try:
        store.rm(lease_path(store, staging_name))
    except (OSError, PipelineError):
        pass  # gc removes leases of staging that is gone


def lease_times(store: Storage) -> dict[str, float]:
    """Staging name -> when its lease was last renewed, from one listing."""
    out = {}
    for e in store.list_dir(store.join(store.root, EXPORTS_DIR, LEASES_DIR)):
        if not e.is_dir and e.mtime is not None and ".renew-" not in e.name:
            out[e.name] = e.mtime
    return out


def staging_started(name: str) -> float | None:
    """The export time in a staging name ``temp-<ts>-<nonce>``."""
    parts = name.split("-")
    if len(parts) >= 3 and parts[0] == "temp" and parts[1].isdigit():
        return float(parts[1])
    return None


def last_renewed(store: Storage, staging_name: str, leases: dict[str, float] | None = None) -> float | None:
    leases = lease_times(store) if leases is None else leases
    stamps = [t for t in (leases.get(staging_name), staging_started(staging_name)) if t is not None]
    return max(stamps) if stamps else None


def claim_lease_for_publish(store: Storage, staging: str, lease_seconds: float) -> None:
    """Renew the lease of ``staging`` before publishing it, or refuse if it had run out."""
    name = staging_name(staging)
    renewed = last_renewed(store, name)
    margin = min(LEASE_MARGIN_SECONDS, lease_seconds / 2)
    if renewed is not None and time.time() - renewed > lease_seconds - margin:
        raise StagingGone(f"staging lease ran out {time.time() - renewed:.0f} s after its last renewal "
                          f"(retention.lease_seconds is {lease_seconds:.0f}), so gc may remove it; the next run "
                          f"exports the checkpoint again: {store.url(staging)}")
    renew_lease(store, name)


class LeaseHeartbeat:
    """Renews a staging lease in the background while an export or a validation runs.

    Example::

        with LeaseHeartbeat(store, "temp-1732147260-ab12"):
            ...  # write and check the SavedModel
    """

    def __init__(self, store: Storage, staging_name: str, every: float = HEARTBEAT_SECONDS):
        self.store = store
        self.name = staging_name
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{staging_name}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                renew_lease(self.store, self.name)
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease is a day by default
                pass

    def __enter__(self) -> LeaseHeartbeat:
        renew_lease(self.store, self.name)
        self._thread.start()
        return self

    def __exit__(self, exc_type=None, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if exc_type is None:
            # The lease counts from the end of the stage: the next stage may run elsewhere, later.
            renew_lease(self.store, self.name)
