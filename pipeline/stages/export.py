"""Export: a checkpoint restored and written as a SavedModel into a staging directory of the export base.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import stage_export
    staged = stage_export(load_config("serving.yaml"))   # the newest checkpoint with no version
    print(staged.status, staged.staging)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from typing import Any

from tf_export_pipeline import faults
from tf_export_pipeline.checkpoints import Checkpoint, require_unchanged, shards_changed
from tf_export_pipeline.checkpoints.keras_files import local_copy
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import CheckpointError
from tf_export_pipeline.export import sample_inputs
from tf_export_pipeline.export.keras_exporter import KerasFileExporter
from tf_export_pipeline.export.samples import fit_samples, load_samples
from tf_export_pipeline.gate import GateError, compare, metric_path, read_metric, require_finite
from tf_export_pipeline.layout import ASSETS_EXTRA, FILES_NAME, STAGING_PREFIX
from tf_export_pipeline.observe import stage as observed
from tf_export_pipeline.publish.staging import LeaseHeartbeat, file_list
from tf_export_pipeline.records import Discovered, ExportRecord, Status
from tf_export_pipeline.run_info import current as current_run
from tf_export_pipeline.stages.context import Context, discard, require_complete
from tf_export_pipeline.stages.discover import choose
from tf_export_pipeline.storage import ChecksumMismatch, Storage
from tf_export_pipeline.validate import ValidationSession
from tf_export_pipeline.validate.contract import load_contract
from tf_export_pipeline.validate.warmup import write_warmup


@observed("export")
def stage_export(cfg: Config, checkpoint: str | Discovered | None = None, force: bool = False,
                 session: ValidationSession | None = None) -> ExportRecord:
    """Restore a checkpoint and write its SavedModel into a staging directory of the export base.

    ``checkpoint`` names one (prefix, name or step), or is a record from
    discovery; None takes the newest complete checkpoint with no version yet.
    With a metric gate, a checkpoint worse than the live version is reported
    ``gated`` and not exported, unless ``force``. A ``session`` (a
    :class:`tf_export_pipeline.validate.ValidationSession` that will validate
    this export) is started once there is something to export, so its process
    starts while the export runs.
    """
    ctx = Context(cfg)
    if isinstance(checkpoint, Discovered):
        ckpt: Checkpoint | None = checkpoint.checkpoint
        require_complete(checkpoint.checkpoint)  # discovery does not list the training directory again
    else:
        ckpt = choose(ctx, checkpoint)
    if ckpt is None:
        return ExportRecord(Status.NO_NEW_CHECKPOINT)
    key = ckpt.ledger_key(cfg.config_hash)
    done = ctx.publisher.resolve(key)
    if done is not None:
        # A publish whose process died after its ledger entry was just finished.
        status = Status.PUBLISHED if done["state"] == Status.ROLLED_FORWARD else Status.SKIPPED
        return ExportRecord(status, ckpt.prefix, ckpt.step, done["version"], done["path"], ledger_key=key)

    _check_before_export(ctx)
    try:
        gate = _gate(ctx, ckpt)
    except GateError:
        if not force:
            raise
        gate = None  # forced: publish without a recorded metric
    if gate is not None and gate["worse"] and not force:
        return ExportRecord(Status.GATED, ckpt.prefix, ckpt.step, gate=gate, ledger_key=key)

    if session is not None:
        session.start()
    exporter = ctx.exporter(ckpt)
    if cfg.validation.samples and not isinstance(exporter, KerasFileExporter):  # a .keras file's inputs come later
        _sample_inputs(cfg, exporter)
    started = time.time()
    name = f"{STAGING_PREFIX}{int(started)}-{secrets.token_hex(4)}"
    staging = ctx.base.join(ctx.base.root, name)
    work = ctx.work_dir(name)
    scratch = tempfile.mkdtemp(prefix="tf-export-")
    try:
        with LeaseHeartbeat(ctx.base, name):
            _export_into(ctx, cfg, ckpt, exporter, staging, work, scratch)
    except BaseException:
        discard(ctx.base, staging, work)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    faults.hold("exported")
    return ExportRecord(Status.STAGED, ckpt.prefix, ckpt.step, gate=gate, ledger_key=key,
                        staging=ctx.base.url(staging), work=ctx.base.url(work), checkpoint_info=ckpt,
                        exported_at=started, export_seconds=round(time.time() - started, 3),
                        exported_by=current_run().to_json())


def _gate(ctx: Context, ckpt: Checkpoint) -> dict[str, Any] | None:
    """The metric gate's verdict for ``ckpt`` against the live version (None without a gate)."""
    gate = ctx.cfg.gate
    if gate is None:
        return None
    value = read_metric(gate.source, gate.metric, step=ckpt.step, name=ckpt.name,
                        storage_options=ctx.cfg.storage_options)
    require_finite(value, gate.metric, ckpt.name, metric_path(gate.source, ckpt.step, ckpt.name))
    live = ctx.reference_version()
    live_value = None
    if live is not None:
        recorded = (ctx.publisher.manifest(live) or {}).get("gate") or {}
        number = recorded.get("value")
        if recorded.get("metric") == gate.metric and isinstance(number, (int, float)) and not isinstance(number, bool):
            live_value = float(number)
    return {"metric": gate.metric, "mode": gate.mode, "live_version": live,
            **compare(gate.mode, value, live_value, live)}


def _sample_inputs(cfg: Config, exporter: Any) -> dict[str, Any]:
    """The validation samples: ``validation.samples`` if given, else generated from the TensorSpecs."""
    specs = exporter.serving.input_specs()
    if not cfg.validation.samples:
        return sample_inputs(specs)
    path = cfg.validation.samples
    return _plain_arrays(fit_samples(load_samples(path), specs, path))


def _plain_arrays(arrays: dict[str, Any]) -> dict[str, Any]:
    """String tensors as fixed-width bytes arrays: object arrays cannot be read back with allow_pickle=False."""
    import numpy as np

    return {k: (np.asarray(v).astype(bytes) if np.asarray(v).dtype == object else v) for k, v in arrays.items()}


def _check_before_export(ctx: Context) -> None:
    """Read what validation and publishing will read, so that a mistake in it is a config error before any
    staging exists, not after the export (leaving its staging to the next gc, one more with every retry)."""
    cfg = ctx.cfg
    if cfg.validation.contract:
        load_contract(cfg.validation.contract)
    if cfg.validation.samples:
        load_samples(cfg.validation.samples)
    control = ctx.serving()
    if control is not None:
        control.current()  # the model config file parses


def _export_into(ctx: Context, cfg: Config, ckpt: Checkpoint, exporter: Any, staging: str, work: str,
                 scratch: str) -> None:
    """Restore, write the SavedModel and its file list, the samples and the reference outputs."""
    import numpy as np

    local_prefix = local_checkpoint(ctx.train, ckpt, scratch)
    exporter.restore(local_prefix)
    faults.hold("restored")
    # The weights are in memory now; they must be those of the checkpoint the ledger will name.
    require_unchanged(ctx.train, ckpt)
    inputs = _sample_inputs(cfg, exporter)
    expected = exporter.reference_outputs(inputs)
    local_model = staging if ctx.base.is_local else os.path.join(scratch, "saved_model")
    exporter.write(local_model)
    if cfg.validation.warmup:
        write_warmup(os.path.join(local_model, ASSETS_EXTRA), inputs)
    local_work = work if ctx.base.is_local else os.path.join(scratch, "work")
    os.makedirs(local_work, exist_ok=True)
    np.savez(os.path.join(local_work, "samples.npz"), **_plain_arrays(inputs))
    np.savez(os.path.join(local_work, "expected.npz"), **_plain_arrays(expected))
    # What staging must hold when it is committed: checked just before the ledger entry.
    with open(os.path.join(local_work, FILES_NAME), "w", encoding="utf-8") as fh:
        json.dump(file_list(local_model), fh)
    if not ctx.base.is_local:
        # Uploaded once, each file checked against the crc32c the server computed.
        ctx.base.upload_dir(local_work, work)
        ctx.base.upload_dir(local_model, staging)


def local_checkpoint(store: Storage, ckpt: Checkpoint, scratch: str) -> str:
    """A local path of ``ckpt`` that TensorFlow can read.

    On object stores the index and data shards are downloaded into ``scratch``
    (one listing, then the files concurrently), each checked against the
    crc32c the server holds; the index must still be the one discovery saw,
    since its crc32c is part of the checkpoint's identity in the ledger.
    """
    if ckpt.kind == "keras":
        return local_copy(store, ckpt, scratch)
    if store.is_local:
        return ckpt.prefix

    remote_prefix = store.strip(ckpt.prefix)
    directory = remote_prefix.rsplit("/", 1)[0]
    local_dir = os.path.join(scratch, "checkpoint")
    files = [e for e in store.list_dir(directory)
             if not e.is_dir and (e.name == ckpt.name + ".index" or e.name.startswith(ckpt.name + ".data-"))]
    index = next((e for e in files if e.name == ckpt.name + ".index"), None)
    if index is None:
        raise CheckpointError(f"checkpoint index vanished while reading: {ckpt.prefix}")
    if ckpt.index_crc32c and index.crc32c and index.crc32c != ckpt.index_crc32c:
        raise CheckpointError(f"checkpoint changed since it was discovered (its index has another crc32c): "
                              f"{ckpt.prefix}")
    shards = [e for e in files if e.name != index.name]
    if not shards:
        raise CheckpointError(f"checkpoint data vanished while reading: {ckpt.prefix}")
    if shards_changed(ckpt, files):
        raise CheckpointError(f"checkpoint changed since it was discovered (its data shards differ): "
                              f"{ckpt.prefix}")
    try:
        store.download_files(files, local_dir)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file vanished while reading (removed by the training job?): "
                              f"{ckpt.prefix}") from None
    except ChecksumMismatch:
        raise CheckpointError(f"checkpoint file does not match its crc32c after retries (corrupt, or being "
                              f"rewritten): {ckpt.prefix}") from None
    return os.path.join(local_dir, ckpt.name)
