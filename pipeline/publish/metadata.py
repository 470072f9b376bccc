"""The publishing records' object metadata: what a GCS listing returns with each ledger entry and claim,
typed back on the way in; and what a torn record (left by a damaged write) looks like.

Example::

    from tf_export_pipeline.publish.metadata import from_metadata, to_metadata
    assert from_metadata(to_metadata({"version": 7, "step": 300})) == {"version": 7, "step": 300}
"""

from __future__ import annotations

import json
from typing import Any


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
