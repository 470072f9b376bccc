"""From a version to everything behind it: what ``tf-export lineage VERSION`` shows.

The checkpoint it came from (path, step, identity, when it was written), the
config (hash, file), the validation report in brief, the run that made it
(Airflow task or command line, with its OpenLineage run id), its ledger entry,
and its serving history (listed, labelled, promoted, rolled back). A version
retention removed has no manifest any more: what its removal record keeps
(checkpoint, step, when, and the run) is shown instead.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.trace import trace
    print(trace(load_config("m.yaml"), 1732147200)["run"])
"""

from __future__ import annotations

from typing import Any

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.redaction import redact
from tf_export_pipeline.run_info import RUN_KEY, summary_of


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def validation_brief(report: dict | None) -> dict[str, Any] | None:
    """A validation report in a few fields: the verdict, the loader, the checks passed, parity, the ratios."""
    if not isinstance(report, dict):
        return None
    checks = [c for c in report.get("checks") or [] if isinstance(c, dict)]
    parity = next((c for c in checks if c.get("name") == "parity_with_checkpoint"), None)
    section = report.get("performance")
    performance: dict = section if isinstance(section, dict) else {}
    return {"ok": bool(report.get("ok")), "reason": report.get("reason"), "loader": report.get("loader"),
            "checks_passed": sum(1 for c in checks if c.get("ok")), "checks_total": len(checks),
            "parity": None if parity is None else bool(parity.get("ok")),
            "parity_max_abs_diff": _number(report.get("parity_max_abs_diff")),
            "size_ratio": _number(performance.get("size_ratio")),
            "latency_ratio": _number(performance.get("latency_ratio")),
            "failed_checks": [c.get("name") for c in checks if not c.get("ok")]}


def serving_events(records: list[dict], version: int) -> list[dict]:
    """The writes of the model config file that changed what it says of ``version``, oldest first."""
    out = []
    for rec in records:
        before, after = rec.get("versions_before") or [], rec.get("versions_after") or []
        labels_before, labels_after = rec.get("labels_before") or {}, rec.get("labels_after") or {}
        changes = []
        if version in after and version not in before:
            changes.append("listed")
        if version in before and version not in after:
            changes.append("unlisted")
        for label in sorted(set(labels_before) | set(labels_after)):
            was, now = labels_before.get(label), labels_after.get(label)
            if now == version and was != version:
                changes.append(f"{label} -> {version}" + (f" (from {was})" if was is not None else ""))
            elif was == version and now != version:
                changes.append(f"{label} moved to {now}" if now is not None else f"{label} removed")
        if changes:
            out.append({"at": rec.get("at"), "command": rec.get("command"), "phase": rec.get("phase"),
                        "changes": changes})
    return out


def _ledger_of(publisher, version: int, key: str | None) -> tuple[str | None, dict | None]:
    """The ledger entry that names ``version``: by the manifest's key, else by a scan of the ledger."""
    if key:
        entry = publisher.ledger_entry(key)
        if entry is not None and entry.get("version") == version:
            return key, entry
    for k, entry in publisher.ledger().items():
        if entry.get("version") == version:
            return k, publisher.ledger_entry(k) or entry
    return None, None


def trace(cfg, version: int) -> dict[str, Any]:
    """Everything behind ``version`` of ``cfg``'s export base (see the module's docstring)."""
    from tf_export_pipeline.stages import Context

    ctx = Context(cfg)
    pub = ctx.publisher
    manifest = pub.manifest(version)
    listed = version in pub.versions()
    key, entry = _ledger_of(pub, version, (manifest or {}).get("ledger_key"))
    removed = None
    if manifest is None and not listed:
        gone = [(k, r) for k, r in pub.removed().items() if r.get("version") == version]
        if not gone:
            raise ConfigError(f"no version {version} in the export base, nor a record of its removal: "
                              f"{cfg.export_base}")
        key, record = max(gone, key=lambda item: item[1].get("removed_at") or 0)
        removed = {**record, RUN_KEY: summary_of(record.get(RUN_KEY))}
    ck = (manifest or {}).get("checkpoint") or {}
    identity = {k: ck.get(k) for k in ("kind", "index_size", "index_crc32c") if ck.get(k) is not None}
    run = (manifest or {}).get(RUN_KEY) or (entry or {}).get(RUN_KEY)
    out: dict[str, Any] = {
        "version": version,
        "export_base": cfg.export_base,
        "path": ctx.base.url(pub.version_path(version)),
        "present": listed,
        "whole": listed and pub.is_whole(pub.version_path(version)),
        "checkpoint": {"path": ck.get("path") or (removed or entry or {}).get("checkpoint"),
                       "name": ck.get("name"), "step": ck.get("step", (removed or entry or {}).get("step")),
                       "written_at": ck.get("written_at", (entry or {}).get("written_at")),
                       "identity": identity or None},
        "config": {"hash": (manifest or {}).get("config_hash") or (entry or {}).get("config_hash"),
                   "file": (run or {}).get("config_file") if isinstance(run, dict) else None,
                   "current_hash": cfg.config_hash},
        "validation": validation_brief((manifest or {}).get("validation")),
        "run": run,
        "run_summary": summary_of(run),
        "ledger": {"key": key, "created_at": (entry or {}).get("created_at")} if key else None,
        "times": (manifest or {}).get("times"),
        "tool": (manifest or {}).get("tool"),
        "removed": removed,
        "serving": None,
    }
    control = ctx.serving()
    if control is not None:
        try:
            state = control.own_state()
            out["serving"] = {"listed": version in state.listed,
                              "labels": sorted(k for k, v in state.labels.items() if v == version),
                              "history": serving_events(control.history(), version)}
        except Exception as err:  # noqa: BLE001 - where a version came from does not depend on the serving file
            out["serving"] = {"error": redact(str(err))}
    return out


def _when(ts: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_trace(t: dict[str, Any]) -> str:
    """:func:`trace`'s answer as lines for a person."""
    ck, cfg, run = t["checkpoint"], t["config"], t["run"] if isinstance(t["run"], dict) else {}
    state = "whole" if t["whole"] else "present, not whole" if t["present"] else "removed"
    lines = [f"version {t['version']}  ({state})  {t['path']}"]
    if t["removed"]:
        lines.append(f"  removed:     {_when(t['removed'].get('removed_at'))} by retention; its removal record keeps "
                     f"the checkpoint, step and run below")
    ident = ck.get("identity") or {}
    lines.append(f"  checkpoint:  {ck.get('path') or '-'} (step {ck.get('step')}, "
                 f"written {_when(ck.get('written_at'))})")
    if ident:
        lines.append(f"               identity: {ident.get('kind')} index {ident.get('index_size')} bytes, "
                     f"crc32c {ident.get('index_crc32c')}")
    same = "" if not cfg.get("hash") else " (the config given)" if cfg["hash"] == cfg["current_hash"] else \
        f" (the config given now hashes to {cfg['current_hash']})"
    lines.append(f"  config:      hash {cfg.get('hash') or '-'}{same}, file {cfg.get('file') or '-'}")
    v = t["validation"]
    if v:
        lines.append(f"  validation:  {'passed' if v['ok'] else 'FAILED: ' + str(v['reason'])}, loader {v['loader']}, "
                     f"{v['checks_passed']}/{v['checks_total']} checks, parity "
                     f"{'-' if v['parity'] is None else 'ok' if v['parity'] else 'FAILED'}"
                     f" (max abs diff {v['parity_max_abs_diff'] if v['parity_max_abs_diff'] is not None else '-'}), "
                     f"size ratio {_ratio(v['size_ratio'])}, latency ratio {_ratio(v['latency_ratio'])}")
    lines.append(f"  made by:     {t['run_summary'] or '- (published before runs were recorded)'}")
    if run.get("openlineage_run_id"):
        lines.append(f"               OpenLineage run {run['openlineage_run_id']}")
    export = run.get("export")
    if isinstance(export, dict):
        lines.append(f"               exported by {summary_of(export)} (OpenLineage run "
                     f"{export.get('openlineage_run_id')})")
    if run.get("started_at"):
        lines.append(f"               started {_when(run['started_at'])}")
    serving = t["serving"]
    if serving is None:
        lines.append("  serving:     no serving: section (TF Serving watches the export base)")
    elif serving.get("error"):
        lines.append(f"  serving:     model config file unreadable: {serving['error']}")
    else:
        lines.append(f"  serving:     {'listed' if serving['listed'] else 'not listed'}; labels "
                     f"{', '.join(serving['labels']) or 'none'}")
        for event in serving["history"]:
            lines.append(f"               {_when(event['at'])}  {event['command']:<9} {event['phase'] or '':<7} "
                         f"{'; '.join(event['changes'])}")
    return "\n".join(lines)
