"""The serving history: one create-only record per write of the model config file, kept in the export base.

Example::

    from tf_export_pipeline.serving.history import read_history
    from tf_export_pipeline.storage import open_storage
    for rec in read_history(open_storage("/srv/models/demo"), "demo_regressor"):
        print(rec["command"], rec["phase"], rec["labels_before"], "->", rec["labels_after"])

Every change is recorded under ``_exports/serving/history/``, one record per
write, named from the time it was taken (nanoseconds) and a nonce, so records
sort in the order of the writes. A record that does not read as one (edited by
hand, torn) is skipped with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import socket
import time
from typing import Any

from tf_export_pipeline.layout import HISTORY_DIR
from tf_export_pipeline.serving.config_file import EntryState
from tf_export_pipeline.storage import Storage

HISTORY_METADATA_KEY = "tf-export-record"

log = logging.getLogger(__name__)


def _name_time(name: str) -> float:
    """The time a history record's name starts with (nanoseconds); +inf when it has none."""
    try:
        return int(name.split("-", 1)[0]) / 1e9
    except ValueError:
        return float("inf")


_RECORD_TEXT_FIELDS = ("id", "command", "phase", "model", "file", "host", "generation")
_warned_records: set[str] = set()


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def record_problem(rec: Any) -> str | None:
    """Why a parsed history record cannot be used (a field of the wrong type), or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    at = rec.get("at", 0)
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        return "'at' is not a time in seconds"
    for key in _RECORD_TEXT_FIELDS:
        if key in rec and not isinstance(rec[key], str):
            return f"'{key}' is not text"
    if "written" in rec and not isinstance(rec["written"], bool):
        return "'written' is not true or false"
    for key in ("versions_before", "versions_after"):
        value = rec.get(key)
        if value is not None and not (isinstance(value, list) and all(map(_is_version, value))):
            return f"'{key}' is not a list of versions"
    for key in ("labels_before", "labels_after"):
        value = rec.get(key)
        if value is not None and not (isinstance(value, dict)
                                      and all(isinstance(k, str) and _is_version(v) for k, v in value.items())):
            return f"'{key}' is not a mapping of labels to versions"
    return None


def _skip_record(url: str, why: str) -> None:
    """Warn once per process of a history record that is left out."""
    if url not in _warned_records:
        _warned_records.add(url)
        log.warning("skipping unreadable serving history record (%s): %s", why, url)


def new_record(*, command: str, phase: str, model: str, file: str, before: EntryState, after: EntryState,
               written: bool, at: float | None = None, generation: str | None = None) -> dict:
    """The record of one write (or of a write found unneeded: ``written`` false) of ``model``'s entry."""
    at = time.time() if at is None else at
    rec = {"id": f"{int(at * 1e9)}-{secrets.token_hex(4)}", "at": at, "command": command,
           "phase": phase, "model": model, "file": file,
           "versions_before": before.listed, "versions_after": after.listed,
           "labels_before": before.labels, "labels_after": after.labels,
           "host": socket.gethostname(), "written": written}
    if generation is not None:
        rec["generation"] = str(generation)  # of the file this write made (GCS generation, S3/Azure ETag)
    return rec


def store_record(base: Storage, rec: dict) -> None:
    """Keep ``rec`` in the export base's history, create-only."""
    path = base.join(base.root, *HISTORY_DIR, rec["id"] + ".json")
    text = json.dumps(rec, sort_keys=True)
    base.create_only(path, text.encode(), metadata={HISTORY_METADATA_KEY: text} if base.is_gcs else None)


def read_history(base: Storage, model: str, since: float | None = None) -> list[dict]:
    """Every recorded write of ``model``'s entry, oldest first (``since``: written at or after it).

    ``at`` is taken between the read a write is based on and the write
    itself (under the lock on local disk), so a write based on another's
    result sorts after it: the records form a chain, each one's
    ``*_before`` being the previous one's ``*_after``.
    """
    directory = base.join(base.root, *HISTORY_DIR)
    records = []
    for e in base.list_dir(directory):
        if e.is_dir or e.name.startswith("."):
            continue
        if since is not None and _name_time(e.name) < since:
            continue  # the name starts with the record's time: no need to read it
        try:
            # On GCS the listing carries each record in its metadata: one request per page, not
            # one per record, for a history that grows by two records every night.
            text = (e.metadata or {}).get(HISTORY_METADATA_KEY) or base.read_bytes(e.path)
        except FileNotFoundError:
            continue  # removed since the listing
        try:
            rec = json.loads(text)
        except ValueError:  # not JSON, or not UTF-8
            rec = None
        # One record edited by hand must not stop every command that reads the history.
        problem = "not JSON" if rec is None else record_problem(rec)
        if problem is not None:
            _skip_record(base.url(e.path), problem)
            continue
        # The export base keeps the history of the entry it serves; a renamed model starts anew.
        if rec.get("model", model) == model:
            records.append(rec)
    return sorted(records, key=lambda r: (r.get("at", 0), r.get("id", "")))
