"""A backfill task's chunk: its checkpoints exported and validated, not published, resumable by a retry.

Example::

    from tf_export_pipeline.backfill import export_chunk
    from tf_export_pipeline.config import load_config
    records = export_chunk(load_config("serving.yaml"), ["/data/train/ckpt-100", "/data/train/ckpt-200"],
                           run_key="backfill__2026-01-01")
    print([(r.step, r.status) for r in records])
"""

from __future__ import annotations

import dataclasses
import json

from tf_export_pipeline.backfill.overlap import Checks, Result, failed_record, in_this_process
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import CheckpointError, PipelineError
from tf_export_pipeline.layout import EXPORTS_DIR, RESUME_NAME, WORK_DIR
from tf_export_pipeline.records import Discovered, ExportRecord, Status, from_json, to_json
from tf_export_pipeline.stages import discover, performance_baseline
from tf_export_pipeline.storage import open_storage


def export_chunk(cfg: Config, checkpoints: list[str], run_key: str, resume: bool = False,
                 allow_regression: bool = False) -> list[ExportRecord]:
    """Export and validate a chunk of a backfill's checkpoints (by path), as :func:`backfill` does in one
    process, without publishing; one record per checkpoint, in the order given (``validated``, ``failed``,
    or ``skipped`` / ``published`` for a checkpoint that has a version meanwhile).

    This is a backfill task's work: one TensorFlow import, one trace of the
    model, one validation process, checkpoint i+1 exported while version i is
    validated. Each export's work folder records, under ``run_key``, how far it
    got (staged, then validated), so that with ``resume`` (a retry of the task,
    on any host) a checkpoint already validated is taken as it is and one
    already staged is only validated: nothing is exported twice. A checkpoint
    that fails for good (a permanent error: the wrong model, a failed
    validation) is recorded and the chunk goes on; any other error is raised,
    for a retry.
    """
    found = {item.prefix: item for item in discover(cfg)}
    earlier = _resumable(cfg, run_key) if resume else {}
    results: dict[str, ExportRecord] = {}
    todo: list[Discovered] = []
    prestaged: dict[str, ExportRecord] = {}
    for prefix in checkpoints:
        item = found.get(prefix)
        if item is None:
            results[prefix] = failed_record(prefix, CheckpointError(f"checkpoint not found: {prefix}"))
            continue
        before = earlier.get(item.ledger_key or "")
        if before is not None and before.status == Status.VALIDATED:
            results[prefix] = dataclasses.replace(before, resumed=True)
            continue
        if before is not None:  # staged by the try before: validated here, not exported again
            prestaged[item.ledger_key or ""] = dataclasses.replace(before, resumed=True)
        todo.append(item)
    checks = Checks(allow_regression, performance_baseline(cfg) if todo else None)

    def finish(item: Discovered, validated: Result) -> None:
        if isinstance(validated, PipelineError) and validated.permanent:
            results[item.prefix] = failed_record(item, validated)
        elif isinstance(validated, BaseException):
            raise validated  # storage, a race: the task's retry resumes from the records kept
        else:
            results[item.prefix] = validated

    if todo:
        in_this_process(cfg, todo, finish, checks, keep=lambda record: _remember(cfg, run_key, record),
                        prestaged=prestaged)
    return [results[prefix] for prefix in checkpoints]


def _remember(cfg: Config, run_key: str, record: ExportRecord) -> None:
    """Keep ``record`` in its export's work folder, for a retry of the task under ``run_key``."""
    if record.work is None:
        return
    store = open_storage(cfg.export_base, cfg.storage_options)
    data = {"run_key": run_key, "record": to_json(dataclasses.replace(record, resumed=None))}
    store.write_bytes(store.join(store.strip(record.work), RESUME_NAME), json.dumps(data).encode())


def _resumable(cfg: Config, run_key: str) -> dict[str, ExportRecord]:
    """What earlier tries under ``run_key`` exported, by ledger key: staged or validated records whose
    staging is still there. One listing of the work folders, one read for each (exports not yet published)."""
    store = open_storage(cfg.export_base, cfg.storage_options)
    root = store.join(store.root, EXPORTS_DIR, WORK_DIR)
    out: dict[str, ExportRecord] = {}
    for entry in store.list_dir(root):
        if not entry.is_dir:
            continue
        try:
            data = json.loads(store.read_bytes(store.join(root, entry.name, RESUME_NAME)))
            kept = data.get("record") if isinstance(data, dict) and data.get("run_key") == run_key else None
            record = from_json(kept, ExportRecord) if isinstance(kept, dict) else None
        except (FileNotFoundError, ValueError, TypeError, OSError, PipelineError):
            continue  # not a backfill task's, cut short, or removed meanwhile
        if record is None or not record.ledger_key or not record.staging:
            continue
        if not store.exists(store.strip(record.staging)):
            continue  # removed by gc: exported again
        before = out.get(record.ledger_key)
        if before is None or record.status == Status.VALIDATED:
            out[record.ledger_key] = record
    return out
