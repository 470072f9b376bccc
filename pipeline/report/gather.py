"""What the models page shows of one model, read from its export base and its serving file.

Per model: every published version (when it was published, its checkpoint and
step, its size, how long its export took, the size and latency ratios its
validation measured, its labels), the version served, the labels and the
version ``rollback`` would return to, the latest label changes and the
newest runs' outcomes (:mod:`tf_export_pipeline.runs`).

What it reads is bounded by retention, not by history, as ``tf-export status``:
one listing of the export base, one manifest per version (a version's
manifest is its only read), the model config file, the serving history
since the oldest version kept was published, and the newest run records.
Nothing is written, and nothing imports TensorFlow.

A model whose config does not load, or whose storage cannot be read, is a
view with its one-line ``error`` (and whatever was read before it), never an
exception: one broken model must not break the page of the others.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.report.gather import model_view
    view = model_view("ranker", lambda: load_config("ranker.yaml"))
    print(view["served"], view["labels"], [r["status"] for r in view["runs"]])
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from tf_export_pipeline import runs
from tf_export_pipeline.redaction import redact, redact_value
from tf_export_pipeline.run_info import RUN_KEY, summary_of

RUNS_SHOWN = 20
CHANGES_SHOWN = 20
# Serving history read before the oldest version kept was claimed: clocks of other hosts, and a label
# record written just before a version's claim (its two writes straddle it).
HISTORY_MARGIN_SECONDS = 86400.0


def model_name(config_path: str) -> str:
    """A model's name on the page: its config file's name without ``.yaml``, as in the DAG ids."""
    base = os.path.basename(config_path)
    for suffix in (".yaml", ".yml"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _version_row(version: int, manifest: dict | None, whole: bool) -> dict[str, Any]:
    from tf_export_pipeline.publish.staging import model_size
    from tf_export_pipeline.validate.performance import ratios_of

    manifest = manifest or {}
    ck = manifest.get("checkpoint") or {}
    times = manifest.get("times") or {}
    performance = ((manifest.get("validation") or {}).get("performance") or {})
    candidate = performance.get("candidate") or {}
    size = model_size(manifest["files"]) if isinstance(manifest.get("files"), dict) else {}
    exported, export_seconds, validated = (_number(times.get(k)) for k in
                                           ("exported_at", "export_seconds", "validated_at"))
    validate_seconds = None
    if exported is not None and export_seconds is not None and validated is not None:
        validate_seconds = round(max(0.0, validated - exported - export_seconds), 3)
    return {
        "version": version,
        "published_at": _number(times.get("claimed_at")),
        "checkpoint": ck.get("path"), "checkpoint_name": ck.get("name"), "step": ck.get("step"),
        "written_at": _number(ck.get("written_at")),
        "bytes": _number(candidate.get("bytes")) or _number(size.get("bytes")),
        "files": size.get("files"),
        "export_seconds": export_seconds, "validate_seconds": validate_seconds,
        **ratios_of(manifest),
        "run": summary_of(manifest.get(RUN_KEY)),
        "manifest": bool(manifest), "whole": whole, "labels": [],
    }


def _change(rec: dict) -> dict[str, Any]:
    before, after = rec.get("labels_before") or {}, rec.get("labels_after") or {}
    moved = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
             if before.get(k) != after.get(k)}
    return {"at": rec.get("at"), "command": rec.get("command"), "phase": rec.get("phase"), "labels": moved,
            "versions_before": rec.get("versions_before"), "versions_after": rec.get("versions_after")}


def _read_serving(cfg, base, view: dict, oldest: float | None) -> None:
    """Labels, the version served, the rollback target and the latest label changes (from the serving file)."""
    from tf_export_pipeline.serving import ServingControl, served_version

    control = ServingControl.from_config(cfg, base)
    view["serving"] = {"model_name": cfg.serving.model_name, "policy": cfg.serving.policy,
                       "file": redact(control.file.url)}
    state = control.own_state()
    since = None if oldest is None else oldest - HISTORY_MARGIN_SECONDS
    history = control.history(since=since)
    whole = [v["version"] for v in view["versions"] if v["whole"]]
    view["served"] = served_version(whole, state)
    view["labels"] = dict(state.labels)
    view["listed"] = state.listed
    view["entry_policy"] = state.policy
    view["rollback_to"] = control.rollback_target(state, records=history) if cfg.serving.policy == "labels" else None
    view["label_changes"] = [_change(r) for r in history if r.get("written", True)][-CHANGES_SHOWN:][::-1]


def _empty(name: str, config_path: str | None) -> dict[str, Any]:
    return {"model": name, "config": config_path, "export_base": None, "error": None, "errors": {},
            "versions": [], "served": None, "labels": {}, "listed": [], "rollback_to": None, "serving": None,
            "label_changes": [], "runs": [], "read_at": time.time(), "read_seconds": None}


def model_view(name: str, load: Callable[[], Any], config_path: str | None = None) -> dict[str, Any]:
    """Everything the page shows of one model (see the module's docstring); ``load`` gives its config."""
    t0 = time.monotonic()
    view = _empty(name, config_path)
    try:
        cfg = load()
    except Exception as err:  # noqa: BLE001 - one broken config is its own error on the page
        view["error"] = runs.one_line(err)
        return view
    view["config"] = config_path or cfg.source
    view["export_base"] = redact(cfg.export_base)
    try:
        _read_base(cfg, view)
    except Exception as err:  # noqa: BLE001 - storage unreachable, denied, a bucket gone: shown, not raised
        view["error"] = runs.one_line(err)
    view["read_seconds"] = round(time.monotonic() - t0, 3)
    return redact_value(view)


def _read_base(cfg, view: dict) -> None:
    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.serving import served_version
    from tf_export_pipeline.storage import open_storage

    base = open_storage(cfg.export_base, cfg.storage_options)
    pub = Publisher(base, promotion=cfg.promotion)
    listed = pub.versions()
    whole = set(listed) if base.is_local else {v for v in listed if pub.is_whole(pub.version_path(v))}
    view["versions"] = [_version_row(v, pub.manifest(v), v in whole) for v in listed]
    view["served"] = served_version(whole)
    claimed = [v["published_at"] for v in view["versions"] if v["published_at"] is not None]
    # The parts below are read apart: a serving file out of reach still leaves the versions and the runs.
    if cfg.serving is not None:
        try:
            _read_serving(cfg, base, view, min(claimed) if claimed else None)
        except Exception as err:  # noqa: BLE001 - see above
            view["errors"]["serving"] = runs.one_line(err)
    for v in view["versions"]:
        v["labels"] = sorted(k for k, n in view["labels"].items() if n == v["version"])
        v["serving"] = v["version"] == view["served"]
    try:
        view["runs"] = runs.recent(cfg, limit=RUNS_SHOWN, store=base)
    except Exception as err:  # noqa: BLE001 - see above
        view["errors"]["runs"] = runs.one_line(err)
