"""The publishing records' object metadata: what a GCS listing returns with each ledger entry and claim,
typed back on the way in, or the record read when it does not; and what a torn record (left by a damaged
write) looks like.

Example::

    from tf_export_pipeline.publish.metadata import from_metadata, to_metadata
    assert from_metadata(to_metadata({"version": 7, "step": 300})) == {"version": 7, "step": 300}
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tf_export_pipeline.storage import Entry, Storage


def is_torn(data: bytes) -> bool:
    try:
        entry = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return True
    return not isinstance(entry, dict) or not isinstance(entry.get("version"), int)


def to_metadata(values: dict[str, Any]) -> dict[str, str]:
    """Values for object metadata (strings), which listings return on GCS."""
    return {k: str(v) for k, v in values.items() if v is not None}


_TYPES = {"version": int, "step": int, "written_at": float, "claimed_at": float, "removed_at": float}


def from_metadata(meta: dict[str, str] | None) -> dict:
    """Object metadata back into typed values; {} when one does not parse (then the object is read)."""
    out: dict[str, Any] = dict(meta or {})
    try:
        for key, kind in _TYPES.items():
            if key in out:
                out[key] = kind(out[key])
    except ValueError:
        return {}
    return out


def read_record(store: Storage, entry: Entry, present: str) -> dict | None:
    """A small record from its listing's metadata when that carries ``present``, else read; None when
    it cannot be read (gone, or not a JSON object)."""
    got = from_metadata(entry.metadata)
    if present not in got:
        try:
            got = json.loads(store.read_bytes(entry.path))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
    return got if isinstance(got, dict) else None
