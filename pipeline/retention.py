"""Retention: keep the newest versions, every pinned one and the live one; collect what no publish needs.

Example::

    from tf_export_pipeline.retention import prune
    from tf_export_pipeline.storage import open_storage
    print(prune(open_storage("/srv/models/m"), keep=5, dry_run=True))

Any number of prunes (``tf-export gc``, the prune after each run) may run at
once with each other and with publishes: whatever another process removed
first counts as removed. Staging is removed only when its lease has run out
and no ledger entry still needs it to finish a publish.
"""

from __future__ import annotations

import os
import re
import secrets
import time

from tf_export_pipeline.layout import (
    CLAIMS_DIR,
    DELETING_PREFIX,
    EXPORTS_DIR,
    LEASES_DIR,
    LEDGER_DIR,
    REMOVED_DIR,
    SAVED_MODEL_PB,
    STAGING_PREFIX,
    TEMP_MARK,
    WORK_DIR,
)
from tf_export_pipeline.publish import CLAIM_TTL_SECONDS, Publisher
from tf_export_pipeline.publish.staging import last_renewed, lease_times, staging_name
from tf_export_pipeline.storage import Storage

_DELETING = re.compile(rf"^{re.escape(DELETING_PREFIX)}\d+-[0-9a-z]+$")
# A create-only write's temporary name lives for milliseconds; one this old was left by a kill.
TEMP_FILE_SECONDS = 3600.0


def versions_to_remove(versions: list[int], keep: int, pinned: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The versions retention removes: all but the newest ``keep``, the pinned and the highest."""
    ordered = sorted(versions)
    kept = set(ordered[-keep:]) | set(pinned)
    if ordered:
        kept.add(ordered[-1])
    return [v for v in ordered if v not in kept]


def prune(store: Storage, *, keep: int, pinned: list[int] | tuple[int, ...] = (), lease_seconds: float = 86400,
          dry_run: bool = False, now: float | None = None) -> dict:
    """Apply retention to the export base at ``store.root``. Returns what was (or would be) removed."""
    now = time.time() if now is None else now
    pub = Publisher(store)
    if not dry_run:
        pub.finish_committed()  # before anything is judged: a publish killed after its commit is finished here
    versions = pub.versions()
    doomed = versions_to_remove(versions, keep, pinned)
    ledger = pub.ledger()
    needed_by = {staging_name(str(e["staging"])): int(e["version"]) for e in ledger.values() if e.get("staging")}
    leases = lease_times(store)

    stale: list[str] = []
    for entry in store.list_dir(store.root):
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        if _DELETING.match(entry.name):
            stale.append(entry.name)
            continue
        renewed = last_renewed(store, entry.name, leases)
        if renewed is None and entry.mtime is not None:
            renewed = entry.mtime
        if renewed is None or now - renewed <= lease_seconds:
            continue
        version = needed_by.get(entry.name)
        if version is not None and not pub.is_whole(pub.version_path(version)):
            continue  # committed: the next run (or any) promotes it
        stale.append(entry.name)

    removed_claims: list[int] = []
    live_claims = set(versions) | {int(e["version"]) for e in ledger.values()}
    for version, note in pub.claims().items():
        claimed = float(note.get("claimed_at") or note.get("mtime") or now)
        if version not in live_claims and now - claimed > CLAIM_TTL_SECONDS:
            removed_claims.append(version)

    if not dry_run:
        for version in doomed:
            _remove_version(store, pub, version)
            pub.retire(version)
        for name in stale:
            store.rm(store.join(store.root, name), recursive=True)
            store.rm(store.join(store.root, EXPORTS_DIR, WORK_DIR, name), recursive=True)
            store.rm(store.join(store.root, EXPORTS_DIR, LEASES_DIR, name))
        for version in removed_claims:
            if not pub.is_whole(pub.version_path(version)):
                pub.release(version)
        _collect_leftovers(store, leases, lease_seconds, now)
    return {"removed_versions": doomed, "removed_staging": sorted(stale), "removed_claims": sorted(removed_claims),
            "dry_run": dry_run}


def _collect_leftovers(store: Storage, leases: dict[str, float], lease_seconds: float, now: float) -> None:
    """Work files and leases whose staging is gone, and temporary names of killed create-only writes."""
    staging = {e.name for e in store.list_dir(store.root) if e.name.startswith(STAGING_PREFIX)}
    work_dir = store.join(store.root, EXPORTS_DIR, WORK_DIR)
    for e in store.list_dir(work_dir):
        renewed = last_renewed(store, e.name, leases)
        if e.name not in staging and renewed is not None and now - renewed > lease_seconds:
            store.rm(store.join(work_dir, e.name), recursive=True)
    for name, renewed in leases.items():
        if name not in staging and now - renewed > lease_seconds:
            store.rm(store.join(store.root, EXPORTS_DIR, LEASES_DIR, name))
    for sub in (CLAIMS_DIR, LEDGER_DIR, LEASES_DIR, REMOVED_DIR):
        directory = store.join(store.root, EXPORTS_DIR, sub)
        for e in store.list_dir(directory):
            if (TEMP_MARK in e.name or ".renew-" in e.name) and e.mtime is not None \
                    and now - e.mtime > TEMP_FILE_SECONDS:
                store.rm(e.path)


def _remove_version(store: Storage, pub: Publisher, version: int) -> None:
    path = pub.version_path(version)
    if store.is_local:
        # Renamed out of TF Serving's sight first, so it never sees a half-deleted version.
        hidden = store.join(store.root, f"{DELETING_PREFIX}{version}-{secrets.token_hex(4)}")
        try:
            os.rename(path, hidden)
        except FileNotFoundError:
            return  # removed by a concurrent prune
        store.rm(hidden, recursive=True)
        return
    # Object stores: one listing, then deletes matched to the listed generations.
    # The SavedModel marker goes first, so the remains never load as a model.
    objects = store.walk(path)
    marker = [e for e in objects if e.name == SAVED_MODEL_PB]
    if marker:
        store.delete_objects(marker)
    store.delete_objects([e for e in objects if e.name != SAVED_MODEL_PB])
