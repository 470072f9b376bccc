"""The newest runs' outcomes, kept in the export base: what ``tf-export report`` and the Airflow page show.

A version's manifest says who made it, but a run that failed made nothing: its
one-line error lived only in a terminal or a task log. So every ``tf-export
run`` and ``backfill``, and every Airflow task over a stage, leaves one small
record in ``_exports/runs/`` (see :mod:`tf_export_pipeline.layout`) when it
reached a verdict: ``published``, ``skipped``, ``gated``, ``no_new_checkpoint``
or ``failed`` (with the stage, the checkpoint and the one-line error). Runs
that only handed work on (an export task whose validation is another task's)
leave nothing. The newest :data:`RUNS_KEPT` are kept, so reading them costs one
listing and a bounded number of reads whatever the history.

Both callers go through :func:`recording`, which watches the stages called
inside it (:func:`tf_export_pipeline.observe.watching`) and takes an exception
that escapes as a failure; :func:`note` adds results that did not come from a
stage call in this thread (a backfill's checkpoints validated in a thread or in
worker processes). Writing a record never fails nor holds up a run: a store
that refuses it costs the record, nothing else.

Example::

    from tf_export_pipeline import runs
    with runs.recording(lambda: cfg):
        run_once(cfg)
    print(runs.recent(cfg, limit=5)[0]["status"])
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from tf_export_pipeline import observe
from tf_export_pipeline.layout import RUNS_DIR, RUNS_KEPT
from tf_export_pipeline.lineage import checkpoints_in
from tf_export_pipeline.metrics import COUNTED, FAILED
from tf_export_pipeline.records import Status, json_of
from tf_export_pipeline.redaction import redact
from tf_export_pipeline.run_info import AIRFLOW, current

log = logging.getLogger(__name__)

RECORD_METADATA_KEY = "tf-export-run"  # on GCS the listing carries each record: one request per page
ERROR_MAX = 300
_AIRFLOW_KEYS = ("dag_id", "run_id", "task_id", "try_number", "map_index")
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")
# Which verdict names a run that did several things: a failure first, then what it published.
_RANK = {FAILED: 0, Status.PUBLISHED.value: 1, Status.GATED.value: 2, Status.SKIPPED.value: 3,
         Status.NO_NEW_CHECKPOINT.value: 4}

_NOTED: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("tf_export_noted", default=())


def one_line(message: Any) -> str:
    """``message`` redacted, on one line, at most :data:`ERROR_MAX` characters."""
    text = " ".join(_CONTROL.sub(" ", redact(str(message))).split())
    return text if len(text) <= ERROR_MAX else text[:ERROR_MAX - 3] + "..."


def _step_of(record: Any) -> int | None:
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if step is None:
        step = (record.get("checkpoint_info") or {}).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _item(stage: str | None, status: str, record: Any, error: str | None = None) -> dict:
    paths = checkpoints_in(record) or ([record] if isinstance(record, str) and record else [])
    version = record.get("version") if isinstance(record, dict) else None
    return {"stage": stage, "status": status, "checkpoint": paths[0] if paths else None, "step": _step_of(record),
            "version": version if status == Status.PUBLISHED.value else None,
            "error": one_line(error) if error else None}


def items_of(outcomes: list[observe.StageOutcome], results: list[Any], error: BaseException | None) -> list[dict]:
    """Each verdict the watched stages, the noted results and an escaping exception reached, once."""
    found: list[dict] = []
    for o in outcomes:
        if o.error is not None:
            found.append(_item(o.stage, FAILED, o.given, o.error))
        elif isinstance(o.result, dict) and o.result.get("status") in COUNTED:
            found.append(_item(o.stage, o.result["status"], o.result))
    for r in results:
        if isinstance(r, dict) and r.get("status") in COUNTED:
            found.append(_item(None, r["status"], r, r.get("error")))
    if error is not None and not any(i["status"] == FAILED for i in found):
        found.append(_item(None, FAILED, None, str(error) or type(error).__name__))
    unique: list[dict] = []
    for item in found:
        key = (item["status"], item["checkpoint"], item["error"])
        if not any((u["status"], u["checkpoint"], u["error"]) == key for u in unique):
            unique.append(item)
    return unique


def summary(items: list[dict], now: float | None = None) -> dict | None:
    """One record of a run from its verdicts (None when it reached none)."""
    if not items:
        return None
    at = time.time() if now is None else now
    lead = min(items, key=lambda i: _RANK.get(i["status"], 9))
    counts: dict[str, int] = {}
    for item in items:
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    run = current()
    rec = {"id": f"{int(at * 1000):013d}-{secrets.token_hex(4)}", "at": at, "status": lead["status"],
           "stage": lead["stage"], "error": one_line(lead["error"]) if lead["error"] else None,
           "checkpoint": lead["checkpoint"], "step": lead["step"],
           "versions": sorted({i["version"] for i in items if i["version"] is not None}), "counts": counts,
           "run": run.summary(), "kind": run.kind}
    if run.kind == AIRFLOW:
        rec["airflow"] = {k: getattr(run, k) for k in _AIRFLOW_KEYS if getattr(run, k) is not None}
    return rec


def _store(cfg):
    from tf_export_pipeline.storage import open_storage  # the backends load only when a record is written

    return open_storage(cfg.export_base, cfg.storage_options)


def write(cfg, rec: dict) -> None:
    """Keep ``rec`` in the export base and drop the records older than the newest :data:`RUNS_KEPT`."""
    store = _store(cfg)
    directory = store.join(store.root, *RUNS_DIR)
    text = json.dumps(rec, sort_keys=True)
    store.create_only(store.join(directory, rec["id"] + ".json"), text.encode(),
                      metadata={RECORD_METADATA_KEY: text} if store.is_gcs else None)
    names = sorted(e.name for e in store.list_dir(directory) if not e.is_dir and _is_record(e.name))
    for name in names[:-RUNS_KEPT]:
        store.rm(store.join(directory, name))  # another run's prune may have taken it: gone counts as removed


def _is_record(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".")


def recent(cfg, limit: int = 20, store=None) -> list[dict]:
    """The newest ``limit`` records, newest first; one that does not read as one is left out."""
    store = store or _store(cfg)
    directory = store.join(store.root, *RUNS_DIR)
    entries = sorted((e for e in store.list_dir(directory) if not e.is_dir and _is_record(e.name)),
                     key=lambda e: e.name, reverse=True)
    out: list[dict] = []
    for e in entries:  # as many as the newest RUNS_KEPT (and a few left by concurrent writers)
        if len(out) == limit:
            break
        try:
            rec = json.loads((e.metadata or {}).get(RECORD_METADATA_KEY) or store.read_bytes(e.path))
        except (FileNotFoundError, ValueError):
            continue  # removed since the listing by a newer run's prune, or not JSON
        if isinstance(rec, dict) and isinstance(rec.get("at"), (int, float)) and isinstance(rec.get("status"), str):
            out.append(rec)
    return out


def note(results: list[Any] | Any) -> None:
    """Count ``results`` (stage records, typed or JSON) in every :func:`recording` open in this context."""
    found = json_of(results if isinstance(results, list) else [results])
    for seen in _NOTED.get():
        seen.extend(found)


@contextlib.contextmanager
def recording(config: Callable[[], Any]) -> Iterator[None]:
    """Record the run of the block (see the module's docstring); ``config`` gives the config when the block
    is done (a config that does not load has no export base to record in)."""
    noted: list[Any] = []
    token = _NOTED.set((*_NOTED.get(), noted))
    error: BaseException | None = None
    with observe.watching() as outcomes:
        try:
            yield
        except BaseException as err:
            error = err
            raise
        finally:
            _NOTED.reset(token)
            try:
                rec = summary(items_of(outcomes, noted, error))
                if rec is not None:
                    write(config(), rec)
            except Exception as err:  # noqa: BLE001 - a record is never worth a failed run, nor a line of output
                log.debug("run outcome not recorded: %s", redact(str(err)))


RECORDED_COMMANDS = ("run", "backfill")


def for_command(command: str, cfg) -> contextlib.AbstractContextManager:
    """:func:`recording` for a ``tf-export`` command that runs exports; nothing for the others."""
    if command in RECORDED_COMMANDS and cfg is not None:
        return recording(lambda: cfg)
    return contextlib.nullcontext()
