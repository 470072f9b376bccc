"""Commands over one SavedModel, a directory or a published version: validate and predict."""

from __future__ import annotations

import os

from tf_export_pipeline.cli.output import EXIT_FAILED, EXIT_OK, emit, error
from tf_export_pipeline.config import ValidationConfig
from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.layout import SAVED_MODEL_PB
from tf_export_pipeline.predict import format_outputs, predict, resolve_target, to_json
from tf_export_pipeline.validate import check_signatures, format_report, signatures_of, validate_saved_model
from tf_export_pipeline.validate.performance import apply_performance_gate, local_sizes, timing_request


def cmd_validate(args, cfg) -> int:
    path = os.path.abspath(args.path)
    if not os.path.isdir(path):
        raise ConfigError(f"not a SavedModel directory: {path}")
    gate = cfg.validation if cfg else ValidationConfig()
    against = os.path.abspath(args.against) if args.against else None
    if against and not os.path.isfile(os.path.join(against, SAVED_MODEL_PB)):
        raise ConfigError(f"--against is not a SavedModel directory: {against}")
    report = validate_saved_model(path, timeout=gate.timeout_seconds, timing=timing_request(gate, against))
    name = os.path.basename(against.rstrip("/")) if against else None
    against_version = int(name) if name and name.isdigit() else name
    if report.get("ok") and (against or (cfg and cfg.validation.contract)):
        check_signatures(report, cfg.validation if cfg else None, signatures_of(against) if against else None,
                         against_version)
    if report.get("ok"):
        reference = {"version": against_version, **local_sizes(against)} if against else None
        apply_performance_gate(report, local_sizes(path), reference, gate, args.allow_regression)
    emit(args, report, format_report(report))
    if not report.get("ok"):
        error(f"validation failed: {report.get('reason')}: {path}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_predict(args, cfg) -> int:
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="tf-export-predict-")
    try:
        path = resolve_target(args.path, cfg, scratch)
        name, outputs = predict(path, inputs_file=args.inputs, examples_file=args.examples, signature=args.signature)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit(args, to_json(name, outputs), format_outputs(outputs))
    return EXIT_OK
