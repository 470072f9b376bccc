"""What a listing returns: one :class:`Entry` per object or directory, whatever the backend.

Example::

    from tf_export_pipeline.storage.entry import Entry, mtime_of
    mtime = mtime_of({"updated": "2024-05-01T12:00:00Z"})  # 1714564800.0
    entry = Entry("saved_model.pb", "bucket/m/1/saved_model.pb", False, 4096, mtime)

Kept apart from the store interface (``base.py``) so that a backend's helper
modules (its requests, its checksums) can name entries without the interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


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


def mtime_of(info: dict[str, Any]) -> float | None:
    """The modification time in an fsspec info dict or a GCS object resource; each backend names it differently."""
    for key in ("mtime", "updated", "LastModified", "last_modified", "timeCreated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None
