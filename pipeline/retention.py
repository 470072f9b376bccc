"""Retention: keep the newest versions, every pinned one and the live one; clear abandoned staging.

Example::

    from pipeline.retention import prune
    from pipeline.storage import open_storage
    print(prune(open_storage("/srv/models/m"), keep=5, dry_run=True))
"""

from __future__ import annotations

import re
import secrets
import time

from pipeline.publish import EXPORTS_DIR, STAGING_PREFIX, Publisher
from pipeline.storage import Storage

_STAGING = re.compile(r"^temp-(?P<ts>\d+)-[0-9a-z]+$")
_DELETING = re.compile(r"^temp-deleting-\d+-[0-9a-z]+$")


def versions_to_remove(versions: list[int], keep: int, pinned: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The versions retention removes: all but the newest ``keep``, the pinned and the highest."""
    ordered = sorted(versions)
    kept = set(ordered[-keep:]) | set(pinned)
    if ordered:
        kept.add(ordered[-1])
    return [v for v in ordered if v not in kept]


def staging_age(name: str, mtime: float | None, now: float) -> float | None:
    m = _STAGING.match(name)
    if m:
        return now - int(m.group("ts"))
    if name.startswith(STAGING_PREFIX) and mtime is not None:
        return now - mtime
    return None


def prune(store: Storage, *, keep: int, pinned: list[int] | tuple[int, ...] = (), lease_seconds: float = 86400,
          dry_run: bool = False, now: float | None = None) -> dict:
    """Apply retention to the export base at ``store.root``. Returns what was (or would be) removed."""
    now = time.time() if now is None else now
    pub = Publisher(store)
    doomed = versions_to_remove(pub.versions(), keep, pinned)
    stale: list[str] = []
    for entry in store.list_dir(store.root):
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        if _DELETING.match(entry.name):
            stale.append(entry.name)
            continue
        age = staging_age(entry.name, entry.mtime, now)
        if age is not None and age > lease_seconds:
            stale.append(entry.name)
    if not dry_run:
        for version in doomed:
            _remove_version(store, pub, version)
        for name in stale:
            store.rm(store.join(store.root, name), recursive=True)
            store.rm(store.join(store.root, EXPORTS_DIR, "work", name), recursive=True)
    return {"removed_versions": doomed, "removed_staging": sorted(stale), "dry_run": dry_run}


def _remove_version(store: Storage, pub: Publisher, version: int) -> None:
    path = pub.version_path(version)
    if store.is_local:
        # Renamed out of TF Serving's sight first, so it never sees a half-deleted version.
        import os

        hidden = store.join(store.root, f"temp-deleting-{version}-{secrets.token_hex(4)}")
        os.rename(path, hidden)
        store.rm(hidden, recursive=True)
        return
    # Object stores: one listing, then deletes matched to the listed generations.
    # The SavedModel marker goes first, so the remains never load as a model.
    objects = store.walk(path)
    marker = [e for e in objects if e.name == "saved_model.pb"]
    if marker:
        store.delete_objects(marker)
    store.delete_objects([e for e in objects if e.name != "saved_model.pb"])
