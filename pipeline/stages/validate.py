"""Validation: the staged SavedModel loaded in a fresh process, checked, and measured against the reference version.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import stage_export, stage_validate
    cfg = load_config("serving.yaml")
    validated = stage_validate(cfg, stage_export(cfg))
    print(validated.status, validated.validation["ok"])
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile

from tf_export_pipeline import faults
from tf_export_pipeline.config import Config, ValidationConfig
from tf_export_pipeline.layout import FILES_NAME, SAVED_MODEL_PB
from tf_export_pipeline.observe import stage as observed
from tf_export_pipeline.publish.staging import LeaseHeartbeat, StagingGone, staging_name
from tf_export_pipeline.records import ExportRecord, Status
from tf_export_pipeline.stages.context import Context, discard
from tf_export_pipeline.validate import ValidationSession, check_signatures, require_ok, validate_saved_model
from tf_export_pipeline.validate.performance import (
    Baseline,
    apply_performance_gate,
    reference_figures,
    sizes_of,
    timing_request,
)
from tf_export_pipeline.validate.signatures import signatures_from_bytes


def performance_baseline(cfg: Config, ctx: Context | None = None) -> Baseline:
    """The reference version's figures for the performance gate (see :meth:`Context.reference_version`)."""
    ctx = ctx or Context(cfg)
    version = ctx.reference_version()
    if version is None:
        return Baseline(None)
    return Baseline(reference_figures(ctx.base, ctx.publisher.version_path(version), version,
                                      ctx.publisher.manifest(version)))


@observed("validate")
def stage_validate(cfg: Config, staged: ExportRecord, session: ValidationSession | None = None,
                   allow_regression: bool = False, baseline: Baseline | None = None) -> ExportRecord:
    """Validate the staged SavedModel in a fresh process; on failure remove staging and raise.

    ``session`` (a :class:`tf_export_pipeline.validate.ValidationSession`) lets a backfill
    use one validation process for many versions (which keeps the reference version loaded), and
    ``baseline`` (:func:`performance_baseline`) one measurement of the reference version's size.
    ``allow_regression`` lets a model above ``validation.max_size_ratio`` or
    ``validation.max_latency_ratio`` through, never one above ``validation.max_graph_bytes``.
    """
    if staged.status != Status.STAGED or staged.staging is None or staged.work is None:
        return staged
    ctx = Context(cfg)
    staging = ctx.base.strip(staged.staging)
    work = ctx.base.strip(staged.work)
    scratch = tempfile.mkdtemp(prefix="tf-export-validate-")
    heartbeat = LeaseHeartbeat(ctx.base, staging_name(staging))
    try:
        heartbeat.__enter__()
        if ctx.base.is_local:
            local_model, local_work = staging, work
        else:
            local_model, local_work = os.path.join(scratch, "model"), os.path.join(scratch, "work")
            # Validation reads what was uploaded, checked against the server's crc32c.
            ctx.base.download_dir(staging, local_model)
            ctx.base.download_dir(work, local_work)
        faults.hold("validating")
        baseline = baseline or performance_baseline(cfg, ctx)
        report = validate_saved_model(
            local_model,
            samples=os.path.join(local_work, "samples.npz"),
            expected=os.path.join(local_work, "expected.npz"),
            rtol=cfg.validation.rtol,
            atol=cfg.validation.atol,
            timeout=cfg.validation.timeout_seconds,
            session=session,
            timing=timing_request(cfg.validation, _local_reference(ctx, baseline, scratch, session)),
        )
        report["saved_model"] = staged.staging
        if report.get("ok"):
            _check_signatures(ctx, report)
        if report.get("ok"):
            _check_performance(report, local_work, allow_regression, baseline, cfg.validation)
    except FileNotFoundError as err:
        raise StagingGone(f"staging is gone (removed by gc or by hand?); the next run exports the checkpoint "
                          f"again: {staged.staging}") from err
    finally:
        heartbeat.__exit__(*sys.exc_info())
        shutil.rmtree(scratch, ignore_errors=True)
        # A retried task can mend only a transient error (it validates the same staging again); after any
        # other, such as a contract that does not load, the staging is of no use to anyone.
        if getattr(sys.exc_info()[1], "permanent", False):
            discard(ctx.base, staging, work)
    if not report.get("ok"):
        discard(ctx.base, staging, work)
    require_ok(report, staged.staging)
    return dataclasses.replace(staged, status=Status.VALIDATED, validation=report)


def _check_signatures(ctx: Context, report: dict) -> None:
    """The contract and the breaking-change diff against the live version, added to ``report``."""
    live = ctx.reference_version()
    live_signatures = None
    if live is not None:
        try:
            live_signatures = signatures_from_bytes(
                ctx.base.read_bytes(ctx.base.join(ctx.publisher.version_path(live), SAVED_MODEL_PB)))
        except FileNotFoundError:
            live_signatures = None  # removed by retention meanwhile; nothing to compare with
    check_signatures(report, ctx.cfg.validation, live_signatures, live)


def _local_reference(ctx: Context, baseline: Baseline, scratch: str,
                     session: ValidationSession | None) -> str | None:
    """A local directory of the reference version for the latency gate (None: nothing to time against).

    On local disk, the version itself (a published version never changes). On cloud storage a copy: in
    ``scratch``, or once per ``session`` (a backfill's), which then keeps it loaded between checkpoints.
    """
    if baseline.reference is None or ctx.cfg.validation.max_latency_ratio is None:
        return None
    remote = ctx.publisher.version_path(baseline.reference["version"])
    if ctx.base.is_local:
        return remote

    def fetch(local: str) -> None:
        ctx.base.download_dir(remote, local)

    try:
        if session is not None:
            return session.local_reference(ctx.base.url(remote), fetch)
        fetch(os.path.join(scratch, "reference"))
        return os.path.join(scratch, "reference")
    except FileNotFoundError:
        return None  # removed by retention meanwhile: the worker records that nothing was compared


def _check_performance(report: dict, local_work: str, allow_regression: bool, baseline: Baseline,
                       validation: ValidationConfig) -> None:
    """The size and latency gate against the reference version, added to ``report``."""
    with open(os.path.join(local_work, FILES_NAME), encoding="utf-8") as fh:
        candidate = sizes_of(json.load(fh))
    apply_performance_gate(report, candidate, baseline.reference, validation, allow_regression)
