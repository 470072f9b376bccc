"""The performance gate: a candidate SavedModel against the reference version, before it is published.

Example::

    from tf_export_pipeline.config import ValidationConfig
    from tf_export_pipeline.validate.performance import apply_size_gate, local_sizes
    reference = {"version": 1732147200, **local_sizes("/srv/models/m/1732147200")}
    report = apply_size_gate({"ok": True}, local_sizes("/tmp/candidate"), reference, ValidationConfig())
    print(report["performance"]["size_ratio"], report["ok"], report.get("reason"))

The reference version is the one labelled ``stable`` under serving labels,
else the highest published one (none on the first publish). Size is measured
from file lists (no byte is read): the candidate's from the list made when
staging was written, the reference's from its manifest or, without one, a
listing of its directory. The report's ``performance`` section holds both
figures, so a latency part can sit beside them later.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from tf_export_pipeline.layout import MANIFEST, SAVED_MODEL_PB

SIZE_CHECK = "size_ratio"
GRAPH_CHECK = "graph_size"
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


@dataclass(frozen=True)
class Baseline:
    """The reference version's figures (``reference`` None when nothing is published yet), measured once
    for all the checkpoints of a backfill; a plain value, so it travels to worker processes."""

    reference: dict | None


def human_bytes(count: int) -> str:
    """``count`` bytes in binary units, one decimal: 12.4 MiB."""
    value = float(count)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def sizes_of(files: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Total bytes and ``saved_model.pb`` bytes of a file list (relative path -> {"size", ...}).

    The manifest is left out: staging has none yet, so counting a version's would skew every ratio.
    """
    kept = {rel: int(meta.get("size") or 0) for rel, meta in files.items() if rel != MANIFEST}
    return {"bytes": sum(kept.values()), "graph_bytes": kept.get(SAVED_MODEL_PB, 0)}


def reference_figures(store, version_dir: str, version: int | str, manifest: dict | None) -> dict | None:
    """The reference version's figures, from its manifest's ``files``, else a listing of its directory;
    None when the version is gone (removed by retention meanwhile)."""
    files = (manifest or {}).get("files")
    if not isinstance(files, dict) or not files:
        try:
            files = {e.name: {"size": e.size} for e in store.walk(version_dir)}
        except FileNotFoundError:
            return None
    if not files:
        return None
    return {"version": version, **sizes_of(files)}


def local_sizes(directory: str) -> dict[str, int]:
    """The sizes of a local SavedModel directory: from its manifest's ``files`` when it has one (a
    published version), else from a listing."""
    manifest = None
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        pass
    files = (manifest or {}).get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        files = {}
        for dirpath, _dirs, names in os.walk(directory):
            for name in names:
                full = os.path.join(dirpath, name)
                files[os.path.relpath(full, directory).replace(os.sep, "/")] = {"size": os.path.getsize(full)}
    return sizes_of(files)


def apply_size_gate(report: dict, candidate: dict[str, int], reference: dict | None, validation,
                    allow_regression: bool = False) -> dict:
    """Add the ``performance`` section and the two size checks to ``report``; a failing one sets its reason.

    ``validation.max_graph_bytes`` holds whatever the override: TF Serving cannot load a larger graph.
    ``validation.max_size_ratio`` (None: off) yields to ``allow_regression`` or ``validation.allow_regression``.
    """
    max_ratio = validation.max_size_ratio
    max_graph = validation.max_graph_bytes
    overridden = bool(allow_regression or validation.allow_regression)
    ratio = None
    if reference is not None and reference.get("bytes"):
        ratio = candidate["bytes"] / reference["bytes"]
    checks = report.setdefault("checks", [])
    graph = candidate["graph_bytes"]
    graph_ok = graph <= max_graph
    checks.append({"name": GRAPH_CHECK, "ok": graph_ok,
                   "detail": f"{SAVED_MODEL_PB} is {human_bytes(graph)}" + (
                       "" if graph_ok else f", above validation.max_graph_bytes {human_bytes(max_graph)} "
                                           f"(TF Serving refuses a larger one)")})
    above = ratio is not None and max_ratio is not None and ratio > max_ratio
    if ratio is None:
        detail = "no reference version to compare with" if reference is None else "reference version is empty"
    else:
        detail = (f"size ratio {ratio:.2f} (candidate {human_bytes(candidate['bytes'])}, reference version "
                  f"{reference['version']} {human_bytes(reference['bytes'])})")
        if above:
            detail += f" is above validation.max_size_ratio {float(max_ratio)!r}"
            by = "--allow-regression" if allow_regression else "validation.allow_regression"
            detail = f"allowed by {by}: {detail}" if overridden else f"{detail} (--allow-regression to publish anyway)"
    checks.append({"name": SIZE_CHECK, "ok": not above or overridden, "detail": detail})
    report["performance"] = {
        "reference": reference,
        "candidate": dict(candidate),
        "size_ratio": None if ratio is None else round(ratio, 4),
        "max_size_ratio": max_ratio,
        "overridden": bool(above and overridden),
    }
    reason = next((c["detail"] or c["name"] for c in checks if not c["ok"]), None)
    report["ok"] = reason is None
    if reason:
        report["reason"] = reason
    return report


def size_ratio_of(manifest: dict | None) -> float | None:
    """The size ratio a version's manifest recorded when it was validated (None before this gate)."""
    performance = ((manifest or {}).get("validation") or {}).get("performance") or {}
    ratio = performance.get("size_ratio")
    return ratio if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else None
