"""Publishing: a validated export claimed into a version of its own, in training order, then its serving labels.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import stage_export, stage_publish, stage_validate
    cfg = load_config("serving.yaml")
    record = stage_publish(cfg, stage_validate(cfg, stage_export(cfg)))
    print(record.status, record.version, record.path)
"""

from __future__ import annotations

import json
import time
from typing import Any

from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.layout import FILES_NAME
from tf_export_pipeline.observe import stage as observed
from tf_export_pipeline.publish import UNKNOWN
from tf_export_pipeline.publish.staging import StagingGone, model_size
from tf_export_pipeline.records import ExportRecord, PublishRecord, StageRecord, Status
from tf_export_pipeline.redaction import redact
from tf_export_pipeline.run_info import section as run_section
from tf_export_pipeline.serving import newest_advice
from tf_export_pipeline.stages.context import Context, after_commit, discard


@observed("publish")
def stage_publish(cfg: Config, validated: StageRecord, versioning: str | None = None,
                  allow_outrank: bool = False) -> PublishRecord:
    """Check staging, claim a version, write the manifest, record the ledger entry, promote.

    ``allow_outrank`` lets the checkpoint's version break training order (an
    older checkpoint above a newer one); without it such a publish is refused.
    """
    if validated.nothing_to_do:
        return PublishRecord.passed_on(validated)
    if (validated.status != Status.VALIDATED or not isinstance(validated, ExportRecord)
            or validated.staging is None or validated.work is None or validated.checkpoint_info is None):
        raise PipelineError(f"refusing to publish a model that was not validated: "
                            f"{getattr(validated, 'staging', None)}")
    ctx = Context(cfg)
    ckpt = validated.checkpoint_info
    staging = ctx.base.strip(validated.staging)
    work = ctx.base.strip(validated.work)
    ledger_key = validated.ledger_key or ""
    gate = validated.gate
    try:
        files = _file_list_of(ctx, staging, work)
        result = ctx.publisher.publish(
            staging=staging,
            files=files,
            checkpoint=ckpt,
            ledger_key=ledger_key,
            config_hash=cfg.config_hash,
            versioning=versioning or cfg.versioning,
            max_claim_attempts=cfg.max_claim_attempts,
            validation=validated.validation,
            allow_outrank=allow_outrank,
            lease_seconds=cfg.retention.lease_seconds,
            run=run_section(validated.exported_by, cfg.source),
            extra={"times": {"exported_at": validated.exported_at,
                             "export_seconds": validated.export_seconds,
                             "validated_at": time.time()},
                   "model": {"factory": cfg.model.factory, "checkpoint_key": cfg.model.checkpoint_key},
                   **({"gate": gate} if gate else {})},
        )
    except BaseException:
        # Staging that made it into the ledger is finished by the next run; any other is garbage.
        if ctx.publisher.committed_staging(ledger_key) not in (staging, UNKNOWN):
            discard(ctx.base, staging, work)
        raise
    try:
        ctx.base.rm(work, recursive=True)
    except Exception:  # noqa: BLE001 - published; gc removes the work files after the lease
        pass
    record = PublishRecord(result["status"], ckpt.prefix, ckpt.step, result["version"], result["path"],
                           claim_attempts=result.get("claim_attempts", 0))
    if record.status != Status.PUBLISHED:
        return record
    record.model_size = model_size(files)
    if gate and gate.get("warning"):
        record.gate_warning = gate["warning"]  # e.g. the live metric was not finite
    if cfg.serving is not None:
        _label(ctx, record)
    record.serving_advice = newest_advice(ctx.publisher.strategy.name, cfg.serving) or None
    return record


def _label(ctx: Context, record: PublishRecord) -> None:
    """Move the serving labels to the version just published; a failure is reported in ``record``, not raised:
    the version is published whatever happens to its label."""
    try:
        # Only the highest version gets a label: a backfilled (older) version must not take canary from the new one.
        if record.version is not None and record.version == ctx.publisher.live_version():
            control = ctx.serving()
            change = control.on_publish(record.version) if control is not None else None
            record.labels = (change or {}).get("labels_after")
    except Exception as err:  # noqa: BLE001 - past the commit point nothing fails the run
        record.serving_error = after_commit(err)


def _file_list_of(ctx: Context, staging: str, work: str) -> dict[str, Any]:
    """The file list written at export time, from the work directory."""
    try:
        return json.loads(ctx.base.read_text(ctx.base.join(work, FILES_NAME)))
    except (FileNotFoundError, ValueError):
        raise StagingGone(f"the file list of staging is gone or unreadable (staging removed by gc or by hand?); "
                          f"the next run exports the checkpoint again: {ctx.base.url(staging)}") from None


def publish_validated(cfg: Config, validated: StageRecord, versioning: str | None = None,
                      allow_outrank: bool = False) -> PublishRecord:
    """Publish one validated record (:func:`stage_publish`), counting a version an earlier try of the
    same publish committed as this one's: a task retried after dying between its ledger entry and
    its answer reports ``published``, not ``skipped``."""
    if validated.status == Status.PUBLISHED:
        return PublishRecord.passed_on(validated)  # finished by the export stage (a publish that died)
    record = stage_publish(cfg, validated, versioning=versioning, allow_outrank=allow_outrank)
    if record.status == Status.SKIPPED and _published_by_earlier_try(cfg, validated, record):
        record.status = Status.PUBLISHED
    return record


def _published_by_earlier_try(cfg: Config, validated: StageRecord, record: PublishRecord) -> bool:
    """Whether the ledger names this record's own staging, whole: an earlier try died after its ledger entry."""
    if not isinstance(validated, ExportRecord) or validated.staging is None or record.version is None:
        return False
    ctx = Context(cfg)
    entry = ctx.publisher.ledger_entry(validated.ledger_key or "") or {}
    return (entry.get("staging") == ctx.base.strip(validated.staging)
            and ctx.publisher.is_whole(ctx.publisher.version_path(record.version)))


def publish_in_order(cfg: Config, items: list[StageRecord], versioning: str | None = None,
                     allow_outrank: bool = False) -> tuple[list[PublishRecord], list[str]]:
    """Publish validated records one after the other in list order (oldest checkpoint first), so the
    last gets the highest version whatever order their exports finished in.

    Records with nothing to do are passed on, and so are those of checkpoints that failed before
    (a backfill task's ``failed`` records, with their error). A publish that fails is recorded
    (``status: failed``) and the later ones still go ahead; an error no retry
    can mend (``permanent``) stops the list at once. Returns the records and
    one line per failure.
    """
    records: list[PublishRecord] = []
    failures: list[str] = []
    for item in items:
        if item.nothing_to_do or item.status == Status.FAILED:
            records.append(PublishRecord.passed_on(item))
            continue
        try:
            records.append(publish_validated(cfg, item, versioning, allow_outrank))
        except Exception as err:  # noqa: BLE001 - the newer ones are still published; the caller fails after
            if getattr(err, "permanent", False):
                raise
            message = redact(str(err))
            failures.append(f"{item.checkpoint}: {message}")
            records.append(PublishRecord.passed_on(item, status=Status.FAILED, error=message))
    return records, failures
