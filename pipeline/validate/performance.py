"""The performance gate: a candidate SavedModel against the reference version, before it is published.

Example::

    from tf_export_pipeline.config import ValidationConfig
    from tf_export_pipeline.validate import validate_saved_model
    from tf_export_pipeline.validate.performance import apply_performance_gate, local_sizes, timing_request
    gate = ValidationConfig()
    reference_dir = "/srv/models/m/1732147200"
    report = validate_saved_model("/tmp/candidate", timing=timing_request(gate, reference_dir))
    reference = {"version": 1732147200, **local_sizes(reference_dir)}
    apply_performance_gate(report, local_sizes("/tmp/candidate"), reference, gate)
    print(report["performance"]["latency_ratio"], report["performance"]["size_ratio"], report["ok"])

The reference version is the one labelled ``stable`` under serving labels,
else the highest published one (none on the first publish). Size is measured
from file lists (no byte is read): the candidate's from the list made when
staging was written, the reference's from its manifest or, without one, a
listing of its directory. Latency is measured by the validation worker, which
loads both SavedModels as TF Serving does and times them in interleaved rounds
(:mod:`tf_export_pipeline.validate.latency`); this module turns the figures
into checks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from tf_export_pipeline.layout import MANIFEST, SAVED_MODEL_PB

SIZE_CHECK = "size_ratio"
GRAPH_CHECK = "graph_size"
LATENCY_CHECK = "latency_ratio"
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


def _override(allow_regression: bool, validation) -> tuple[bool, str]:
    """Whether the ratios yield, and to which setting (named in the check's detail)."""
    if allow_regression:
        return True, "--allow-regression"
    return bool(validation.allow_regression), "validation.allow_regression"


def _ratio_detail(detail: str, above: bool, setting: str, limit, overridden: bool, by: str) -> str:
    if not above:
        return detail
    detail += f" is above {setting} {float(limit)!r}"
    return f"allowed by {by}: {detail}" if overridden else f"{detail} (--allow-regression to publish anyway)"


def _latency_detail(latency: dict, ratio: float, reference_version) -> str:
    """The worse batch size's figures: ``latency ratio 3.02 (batch of 8: candidate median 6.1 ms, reference
    version 17 2.0 ms)``."""
    label = max(latency["ratios"], key=latency["ratios"].get)
    cand, ref = latency["candidate"][label]["median"], latency["reference"][label]["median"]
    return (f"latency ratio {ratio:.2f} ({label.replace('_', ' of ')}: candidate median {cand:.3g} ms, reference "
            f"version {reference_version} {ref:.3g} ms, over {latency['rounds']} interleaved rounds)")


def apply_performance_gate(report: dict, candidate: dict[str, int], reference: dict | None, validation,
                           allow_regression: bool = False) -> dict:
    """Add the ``performance`` section and the graph, size and latency checks to ``report``; a failing one
    sets its reason.

    ``candidate`` and ``reference`` are sizes (:func:`sizes_of`; the reference's with its ``version``);
    the latency figures are those the worker measured (``report["latency"]``, taken out of the report).
    ``validation.max_graph_bytes`` holds whatever the override: TF Serving cannot load a larger graph.
    ``validation.max_size_ratio`` and ``validation.max_latency_ratio`` (None: off) yield to
    ``allow_regression`` or ``validation.allow_regression``.
    """
    overridden, by = _override(allow_regression, validation)
    checks = report.setdefault("checks", [])
    graph = candidate["graph_bytes"]
    max_graph = validation.max_graph_bytes
    graph_ok = graph <= max_graph
    checks.append({"name": GRAPH_CHECK, "ok": graph_ok,
                   "detail": f"{SAVED_MODEL_PB} is {human_bytes(graph)}" + (
                       "" if graph_ok else f", above validation.max_graph_bytes {human_bytes(max_graph)} "
                                           f"(TF Serving refuses a larger one)")})

    max_size = validation.max_size_ratio
    size_ratio = candidate["bytes"] / reference["bytes"] if reference is not None and reference.get("bytes") else None
    size_above = size_ratio is not None and max_size is not None and size_ratio > max_size
    if size_ratio is None:
        detail = "no reference version to compare with" if reference is None else "reference version is empty"
    else:
        assert reference is not None  # a ratio is taken only against a reference
        detail = _ratio_detail(f"size ratio {size_ratio:.2f} (candidate {human_bytes(candidate['bytes'])}, reference "
                               f"version {reference['version']} {human_bytes(reference['bytes'])})",
                               size_above, "validation.max_size_ratio", max_size, overridden, by)
    checks.append({"name": SIZE_CHECK, "ok": not size_above or overridden, "detail": detail})

    latency = report.pop("latency", None) or {}
    max_latency = validation.max_latency_ratio
    latency_ratio = latency.get("latency_ratio") if reference is not None else None
    latency_above = latency_ratio is not None and max_latency is not None and latency_ratio > max_latency
    if latency_ratio is not None:
        assert reference is not None  # a ratio is taken only against a reference
        detail = _ratio_detail(_latency_detail(latency, latency_ratio, reference["version"]), latency_above,
                               "validation.max_latency_ratio", max_latency, overridden, by)
    elif max_latency is None:
        detail = "off (validation.max_latency_ratio is null)"
    else:
        detail = latency.get("note") or ("no reference version to compare with" if reference is None
                                         else "not measured")
    checks.append({"name": LATENCY_CHECK, "ok": not latency_above or overridden, "detail": detail})

    reference_section = None
    if reference is not None:
        reference_section = {**reference, "latency_ms": latency.get("reference") if latency_ratio is not None
                             else None}
    report["performance"] = {
        "loader": report.get("loader"),
        "rounds": latency.get("rounds"),
        "candidate": {**candidate, "latency_ms": latency.get("candidate")},
        "reference": reference_section,
        "latency_ratio": latency_ratio,
        "latency_ratios": latency.get("ratios") if latency_ratio is not None else None,
        "latency_confirmed": bool(latency.get("confirmed")),
        "reference_load_seconds": latency.get("reference_load_seconds"),
        "max_latency_ratio": max_latency,
        "size_ratio": None if size_ratio is None else round(size_ratio, 4),
        "max_size_ratio": max_size,
        "overridden": bool((size_above or latency_above) and overridden),
    }
    if latency.get("note"):
        report["performance"]["note"] = latency["note"]
    if latency.get("skipped"):
        report["performance"]["skipped"] = latency["skipped"]
    reason = next((c["detail"] or c["name"] for c in checks if not c["ok"]), None)
    report["ok"] = reason is None
    if reason:
        report["reason"] = reason
    return report


def timing_request(validation, reference_dir: str | None) -> dict:
    """What the validation worker needs to time the candidate (see :func:`validate_saved_model`): the
    reference's local directory only while the latency gate is on."""
    on = validation.max_latency_ratio is not None
    return {"reference": reference_dir if on else None, "rounds": validation.latency_rounds,
            "max_ratio": validation.max_latency_ratio}


def ratios_of(manifest: dict | None) -> dict[str, float | None]:
    """The size and latency ratios a version's manifest recorded when it was validated (None when not
    measured: before this gate, or on a first publish)."""
    performance = ((manifest or {}).get("validation") or {}).get("performance") or {}
    out = {}
    for key in ("size_ratio", "latency_ratio"):
        value = performance.get(key)
        out[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out
