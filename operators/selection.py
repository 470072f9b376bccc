"""Which checkpoint counts as new: pure functions over :func:`tf_export_pipeline.stages.discover`'s records.

A record is a checkpoint's ``to_dict()`` plus ``version`` (None when it has no
version under the config yet). Nothing here reads storage.
"""

from __future__ import annotations

from typing import Any

from tf_export_pipeline.checkpoints.checkpoint import being_written, names_checkpoint, step_of

RECORD_KEYS = ("prefix", "name", "step", "written_at", "version")

#: Checkpoints per backfill task unless the run says otherwise (bench/RESULTS.md, "Backfill in Airflow"): each
#: task pays a process, a TensorFlow import, a trace and a validation process once, then a fraction of a
#: second per checkpoint.
CHUNK_SIZE = 12


def chunked(records: list[Any], size: int) -> list[list[Any]]:
    """``records`` in order, cut into ceil(n / size) runs whose lengths differ by one at most (no task is left
    with a remainder of one checkpoint to pay its start-up for)."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    count = -(-len(records) // size)
    return [records[i * len(records) // count:(i + 1) * len(records) // count] for i in range(count)]


def small(record: dict[str, Any]) -> dict[str, Any]:
    """What a task hands on about a checkpoint (XCom stays small)."""
    return {k: record.get(k) for k in RECORD_KEYS}


def in_progress(record: dict[str, Any]) -> bool:
    """A checkpoint still being written (the rule ``tf-export run`` applies too)."""
    return being_written(record)


def newest(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest checkpoint not being written (as ``tf-export run`` picks it), or None."""
    settled = [r for r in records if not in_progress(r)]
    return settled[-1] if settled else None


def new_since_exported(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete checkpoints with no version that are newer than every checkpoint with one, oldest first.

    Older unexported checkpoints are left to a backfill, which numbers them
    below the live version; exported after the live one under the config's
    versioning, they would be served in place of a newer model.
    """
    start = 0
    for i, record in enumerate(records):
        if record.get("version") is not None:
            start = i + 1
    return [r for r in records[start:] if r.get("complete") and r.get("version") is None]


def matches(record: dict[str, Any], wanted: str) -> bool:
    """Whether ``wanted`` (a prefix, a base name or a step) names ``record``."""
    return names_checkpoint(record.get("prefix") or "", record.get("name"), record.get("step"), wanted)


def missing(records: list[dict[str, Any]], wanted: str) -> str | None:
    """Why ``wanted`` will not appear, or None while it still may.

    A reference that names no checkpoint, not even one being written, and a
    step below the newest checkpoint present, is a mistake: training writes
    steps in increasing order.
    """
    if any(matches(r, wanted) for r in records):
        return None
    step = step_of(wanted.strip().rstrip("/").rsplit("/", 1)[-1].removesuffix(".index"))
    newer = [r for r in records if r.get("step") is not None and step is not None and r["step"] > step]
    if not newer:
        return None
    return f"checkpoint {wanted} does not exist and is older than the newest one, {newer[-1]['name']}"


def newest_name(records: list[dict[str, Any]]) -> str | None:
    return records[-1]["name"] if records else None


def new_checkpoint(records: list[dict[str, Any]], wanted: str | None = None) -> dict[str, Any] | None:
    """What the sensor waits for; None while there is nothing yet.

    With ``wanted``: that checkpoint, once complete (exported or not: an event
    for a checkpoint exported meanwhile is not a reason to wait).
    Without: a complete checkpoint with no version, newer than every one with
    a version (:func:`new_since_exported`), once no newer one is still being
    written (coalesced events are then served by one run). A partial
    checkpoint older than a complete one was abandoned and is ignored.
    ``pending`` in the result counts the checkpoints :func:`new_since_exported` lists.
    """
    pending = new_since_exported(records)
    if wanted:
        for record in records:
            if matches(record, wanted) and record.get("complete"):
                return {**small(record), "pending": len(pending)}
        return None
    if not pending:
        return None
    newest_complete = max((r.get("step") or -1) for r in records if r.get("complete"))
    if any(in_progress(r) and (r.get("step") or -1) > newest_complete for r in records):
        return None
    return {**small(pending[-1]), "pending": len(pending)}
