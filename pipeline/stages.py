"""One export end to end, and backfills over many; the stages the CLI and Airflow call.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import run_once
    record = run_once(load_config("serving.yaml"))
    print(record["status"], record["version"])

Every stage function takes the config and the small dict the stage before
returned, and returns a small JSON-serialisable dict, so each can run as its
own Airflow task on a different worker: staging lives in the export base's own
storage.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from typing import Any

from tf_export_pipeline import faults
from tf_export_pipeline.checkpoints import (
    Checkpoint,
    being_written,
    discover_checkpoints,
    find_checkpoint,
    require_unchanged,
    shards_changed,
)
from tf_export_pipeline.checkpoints.keras_files import local_copy
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import CheckpointError, ConfigError, ExportError, PipelineError
from tf_export_pipeline.export import Exporter, sample_inputs
from tf_export_pipeline.export.keras_exporter import KerasFileExporter
from tf_export_pipeline.export.samples import fit_samples, load_samples
from tf_export_pipeline.gate import GateError, compare, metric_path, read_metric, require_finite
from tf_export_pipeline.layout import ASSETS_EXTRA, EXPORTS_DIR, FILES_NAME, SAVED_MODEL_PB, STAGING_PREFIX, WORK_DIR
from tf_export_pipeline.observe import stage as observed
from tf_export_pipeline.publish import UNKNOWN, Publisher
from tf_export_pipeline.publish.staging import (
    LeaseHeartbeat,
    StagingGone,
    drop_lease,
    file_list,
    model_size,
    staging_name,
)
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.records import PUBLIC_KEYS, StageRecord, Status, nothing_to_do
from tf_export_pipeline.redaction import redact
from tf_export_pipeline.retention import prune
from tf_export_pipeline.run_info import RUN_KEY, summary_of
from tf_export_pipeline.run_info import current as current_run
from tf_export_pipeline.run_info import section as run_section
from tf_export_pipeline.serving import ServingControl, newest_advice, served_version
from tf_export_pipeline.storage import ChecksumMismatch, Storage, open_storage
from tf_export_pipeline.validate import ValidationSession, check_signatures, require_ok, validate_saved_model
from tf_export_pipeline.validate.contract import load_contract
from tf_export_pipeline.validate.performance import (
    Baseline,
    apply_performance_gate,
    ratios_of,
    reference_figures,
    sizes_of,
    timing_request,
)
from tf_export_pipeline.validate.signatures import signatures_from_bytes
from tf_export_pipeline.validate.warmup import write_warmup

_EXPORTERS: dict[tuple, Any] = {}


class Context:
    """The two storages of a config and the publisher of its export base."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.train = open_storage(cfg.training_dir, cfg.storage_options)
        self.base = open_storage(cfg.export_base, cfg.storage_options)
        if self.base.isfile(self.base.root):
            raise ConfigError(f"export_base is a file, not a directory: {cfg.export_base}")
        if self.base.is_local:
            parent = os.path.dirname(os.path.abspath(self.base.root))
            while parent and not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if parent and not os.path.isdir(parent):
                raise ConfigError(f"export_base lies below a file ({parent}), not a directory: {cfg.export_base}")
        self.publisher = Publisher(self.base, promotion=cfg.promotion)

    def serving(self):
        """The model's entry in TF Serving's model config file (None without a serving: section)."""
        if self.cfg.serving is None:
            return None

        return ServingControl.from_config(self.cfg, self.base)

    def reference_version(self) -> int | None:
        """The version a new export is compared with: stable under serving labels, else the highest."""
        control = self.serving()
        stable = control.reference_version() if control is not None else None
        return stable if stable is not None else self.publisher.live_version()

    def checkpoints(self) -> list[Checkpoint]:
        found = discover_checkpoints(self.train, fmt=self.cfg.model.format, step_pattern=self.cfg.model.step_pattern)
        if not found:
            raise CheckpointError(f"training directory holds no checkpoints: {self.cfg.training_dir}")
        return found

    def exporter(self, ckpt: Checkpoint | None = None):

        import_tensorflow_quietly()  # before a model factory imports it, with its start-up chatter
        if ckpt is not None and ckpt.kind == "keras":

            return KerasFileExporter(self.cfg)  # each file carries its own model
        key = (self.cfg.model.factory, self.cfg.model.checkpoint_key, self.cfg.config_hash, self.cfg.config_dir)
        if key not in _EXPORTERS:

            _EXPORTERS[key] = Exporter.from_config(self.cfg)
        return _EXPORTERS[key]


def _record(status: Status | str, ckpt: Checkpoint | None = None, version: int | None = None,
            path: str | None = None, **extra: Any) -> dict:
    return StageRecord(Status(status), ckpt.prefix if ckpt else None, ckpt.step if ckpt else None, version, path,
                       extra).to_json()


def _in_progress(ckpt: Checkpoint) -> bool:
    return being_written(ckpt.to_dict())


def require_complete_record(record: dict) -> None:
    """:func:`_require_complete` for a discovery record."""
    if not record["complete"]:
        raise CheckpointError(f"checkpoint is incomplete, missing {', '.join(record['missing'])}: {record['prefix']}")


def _require_complete(ckpt: Checkpoint) -> None:
    require_complete_record(ckpt.to_dict())


# -- discovery -------------------------------------------------------------------
@observed("discover")
def discover(cfg: Config) -> list[dict]:
    """Every checkpoint with the version it was exported to under this config (or None).

    A checkpoint whose publish was committed but whose version is not there
    (killed before its promotion) has no version here and ``"committed":
    true``: it is pending, and exporting it finishes or redoes the publish.
    A checkpoint whose version retention removed has no version and
    ``"removed": {"version", "removed_at"}``; a backfill leaves it out unless
    asked to export removed checkpoints again. ``run`` names, in one line, the
    run that published it (see :mod:`tf_export_pipeline.run_info`). Three
    listings, whatever the history's length.
    """
    ctx = Context(cfg)
    out = []
    ledger = ctx.publisher.ledger()
    removed = ctx.publisher.removed()
    listed = set(ctx.publisher.whole_versions())
    for ckpt in ctx.checkpoints():
        key = ckpt.ledger_key(cfg.config_hash) if ckpt.index_crc32c else None
        entry = ledger.get(key) if key else None
        version = entry.get("version") if entry else None
        gone = removed.get(key) if key and entry is None else None
        out.append({**ckpt.to_dict(), "ledger_key": key, "version": version if version in listed else None,
                    "run": summary_of((entry or gone or {}).get(RUN_KEY)),
                    "committed": entry is not None and version not in listed,
                    "removed": ({"version": gone.get("version"), "removed_at": gone.get("removed_at")}
                                if gone else None)})
    return out


def list_pending(cfg: Config, from_step: int | None = None, to_step: int | None = None,
                 include_removed: bool = False, items: list[dict] | None = None) -> list[dict]:
    """Complete checkpoints in the step range that have no version for this config yet, oldest first.

    Checkpoints whose version retention removed are left out unless
    ``include_removed``. ``items`` is a discovery already made.
    """
    pending = []
    for item in discover(cfg) if items is None else items:
        step = item["step"]
        if from_step is not None and (step is None or step < from_step):
            continue
        if to_step is not None and (step is None or step > to_step):
            continue
        if item.get("removed") and not include_removed:
            continue
        if item["complete"] and item["version"] is None:
            pending.append(item)
    return pending


def _choose(ctx: Context, wanted: str | None) -> Checkpoint | None:
    found = ctx.checkpoints()
    if wanted:
        ckpt = find_checkpoint(found, wanted)
        if ckpt is None:
            raise ConfigError(f"checkpoint not found: {wanted}")
        _require_complete(ckpt)
        return ckpt
    settled = [c for c in found if not _in_progress(c)]
    if not settled:
        return None
    newest = settled[-1]
    # An index without its data is broken, not in progress: say so rather than
    # quietly serving an older model. Older unexported checkpoints are left to backfill.
    _require_complete(newest)
    return newest


# -- stages ----------------------------------------------------------------------
def _work_dir(ctx: Context, staging_name: str) -> str:
    return ctx.base.join(ctx.base.root, EXPORTS_DIR, WORK_DIR, staging_name)


def _from_discovery(record) -> Checkpoint | None:
    """The checkpoint a discovery record describes, so a backfill does not list the
    training directory again for each checkpoint."""
    import dataclasses

    if not isinstance(record, dict):
        return None
    names = [f.name for f in dataclasses.fields(Checkpoint)]
    if not all(n in record for n in names):
        return None
    ckpt = Checkpoint(**{n: record[n] for n in names})
    _require_complete(ckpt)
    return ckpt


def _gate(ctx: Context, ckpt: Checkpoint) -> dict | None:
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


def _sample_inputs(cfg: Config, exporter) -> dict:
    """The validation samples: ``validation.samples`` if given, else generated from the TensorSpecs."""
    specs = exporter.serving.input_specs()
    if not cfg.validation.samples:
        return sample_inputs(specs)
    path = cfg.validation.samples
    return _plain_arrays(fit_samples(load_samples(path), specs, path))


def _plain_arrays(arrays: dict) -> dict:
    """String tensors as fixed-width bytes arrays: object arrays cannot be read back with allow_pickle=False."""
    import numpy as np

    return {k: (np.asarray(v).astype(bytes) if np.asarray(v).dtype == object else v) for k, v in arrays.items()}


@observed("export")
def stage_export(cfg: Config, checkpoint: str | dict | None = None, force: bool = False,
                 session=None) -> dict:
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
    ckpt = _from_discovery(checkpoint)
    if ckpt is None:
        if isinstance(checkpoint, dict):
            checkpoint = checkpoint.get("prefix") or checkpoint.get("checkpoint")
        ckpt = _choose(ctx, checkpoint)
    if ckpt is None:
        return _record(Status.NO_NEW_CHECKPOINT)
    key = ckpt.ledger_key(cfg.config_hash)
    done = ctx.publisher.resolve(key)
    if done is not None:
        # A publish whose process died after its ledger entry was just finished.
        status = Status.PUBLISHED if done["state"] == Status.ROLLED_FORWARD else Status.SKIPPED
        return _record(status, ckpt, done["version"], done["path"], ledger_key=key)

    _check_before_export(ctx)
    try:
        gate = _gate(ctx, ckpt)
    except GateError:
        if not force:
            raise
        gate = None  # forced: publish without a recorded metric
    if gate is not None and gate["worse"] and not force:
        return _record(Status.GATED, ckpt, ledger_key=key, gate=gate, metric=gate["metric"],
                       value=gate["value"], live_value=gate["live_value"], live_version=gate["live_version"])

    if session is not None:
        session.start()
    exporter = ctx.exporter(ckpt)
    if cfg.validation.samples and not isinstance(exporter, KerasFileExporter):  # a .keras file's inputs come later
        _sample_inputs(cfg, exporter)
    started = time.time()
    name = f"{STAGING_PREFIX}{int(started)}-{secrets.token_hex(4)}"
    staging = ctx.base.join(ctx.base.root, name)
    work = _work_dir(ctx, name)
    scratch = tempfile.mkdtemp(prefix="tf-export-")
    try:
        with LeaseHeartbeat(ctx.base, name):
            _export_into(ctx, cfg, ckpt, exporter, staging, work, scratch)
    except BaseException:
        _discard(ctx.base, staging, work)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    faults.hold("exported")
    return _record(Status.STAGED, ckpt, staging=ctx.base.url(staging), work=ctx.base.url(work), ledger_key=key,
                   checkpoint_info=ckpt.to_dict(), exported_at=started, export_seconds=round(time.time() - started, 3),
                   gate=gate, exported_by=current_run().to_json())


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


def _export_into(ctx: Context, cfg: Config, ckpt: Checkpoint, exporter, staging: str, work: str,
                 scratch: str) -> None:
    """Restore, write the SavedModel and its file list, the samples and the reference outputs."""
    import numpy as np

    local_prefix = _local_checkpoint(ctx.train, ckpt, scratch)
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


def _local_checkpoint(store: Storage, ckpt: Checkpoint, scratch: str) -> str:
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


def _discard(store: Storage, staging: str, work: str) -> None:
    for path in (staging, work):
        try:
            store.rm(path, recursive=True)
        except (OSError, PipelineError):
            pass
    drop_lease(store, staging_name(staging))


def _strip(store: Storage, url: str) -> str:
    return store.strip(url)


def performance_baseline(cfg: Config, ctx: Context | None = None) -> Baseline:
    """The reference version's figures for the performance gate (see :meth:`Context.reference_version`)."""
    ctx = ctx or Context(cfg)
    version = ctx.reference_version()
    if version is None:
        return Baseline(None)
    return Baseline(reference_figures(ctx.base, ctx.publisher.version_path(version), version,
                                      ctx.publisher.manifest(version)))


def stage_validate(cfg: Config, staged: dict, session=None, allow_regression: bool = False,
                   baseline: Baseline | None = None) -> dict:
    """Validate the staged SavedModel in a fresh process; on failure remove staging and raise.

    ``session`` (a :class:`tf_export_pipeline.validate.ValidationSession`) lets a backfill
    use one validation process for many versions (which keeps the reference version loaded), and
    ``baseline`` (:func:`performance_baseline`) one measurement of the reference version's size.
    ``allow_regression`` lets a model above ``validation.max_size_ratio`` or
    ``validation.max_latency_ratio`` through, never one above ``validation.max_graph_bytes``.
    """
    if staged.get("status") != Status.STAGED:
        return staged
    ctx = Context(cfg)
    staging = _strip(ctx.base, staged["staging"])
    work = _strip(ctx.base, staged["work"])
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
        report["saved_model"] = staged["staging"]
        if report.get("ok"):
            _check_signatures(ctx, report)
        if report.get("ok"):
            _check_performance(report, local_work, allow_regression, baseline, cfg.validation)
    except FileNotFoundError as err:
        raise StagingGone(f"staging is gone (removed by gc or by hand?); the next run exports the checkpoint "
                          f"again: {staged['staging']}") from err
    finally:
        heartbeat.__exit__(*sys.exc_info())
        shutil.rmtree(scratch, ignore_errors=True)
        # A retried task can mend only a transient error (it validates the same staging again); after any
        # other, such as a contract that does not load, the staging is of no use to anyone.
        if getattr(sys.exc_info()[1], "permanent", False):
            _discard(ctx.base, staging, work)
    if not report.get("ok"):
        _discard(ctx.base, staging, work)
    require_ok(report, staged["staging"])
    return {**staged, "status": Status.VALIDATED.value, "validation": report}


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


def _local_reference(ctx: Context, baseline: Baseline, scratch: str, session) -> str | None:
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
                       validation) -> None:
    """The size and latency gate against the reference version, added to ``report``."""
    with open(os.path.join(local_work, FILES_NAME), encoding="utf-8") as fh:
        candidate = sizes_of(json.load(fh))
    apply_performance_gate(report, candidate, baseline.reference, validation, allow_regression)


@observed("publish")
def stage_publish(cfg: Config, validated: dict, versioning: str | None = None, allow_outrank: bool = False) -> dict:
    """Check staging, claim a version, write the manifest, record the ledger entry, promote.

    ``allow_outrank`` lets the checkpoint's version break training order (an
    older checkpoint above a newer one); without it such a publish is refused.
    """
    if nothing_to_do(validated):
        return public(validated)
    if validated.get("status") != Status.VALIDATED:
        raise PipelineError(f"refusing to publish a model that was not validated: {validated.get('staging')}")
    ctx = Context(cfg)
    ckpt = Checkpoint(**validated["checkpoint_info"])
    staging = _strip(ctx.base, validated["staging"])
    work = _strip(ctx.base, validated["work"])
    try:
        files = _file_list_of(ctx, staging, work)
        result = ctx.publisher.publish(
            staging=staging,
            files=files,
            checkpoint=ckpt,
            ledger_key=validated["ledger_key"],
            config_hash=cfg.config_hash,
            versioning=versioning or cfg.versioning,
            max_claim_attempts=cfg.max_claim_attempts,
            validation=validated.get("validation"),
            allow_outrank=allow_outrank,
            lease_seconds=cfg.retention.lease_seconds,
            run=run_section(validated.get("exported_by"), cfg.source),
            extra={"times": {"exported_at": validated.get("exported_at"),
                             "export_seconds": validated.get("export_seconds"),
                             "validated_at": time.time()},
                   "model": {"factory": cfg.model.factory, "checkpoint_key": cfg.model.checkpoint_key},
                   **({"gate": validated["gate"]} if validated.get("gate") else {})},
        )
    except BaseException:
        # Staging that made it into the ledger is finished by the next run; any other is garbage.

        if ctx.publisher.committed_staging(validated["ledger_key"]) not in (staging, UNKNOWN):
            _discard(ctx.base, staging, work)
        raise
    try:
        ctx.base.rm(work, recursive=True)
    except Exception:  # noqa: BLE001 - published; gc removes the work files after the lease
        pass
    record = _record(result["status"], ckpt, result["version"], result["path"],
                     claim_attempts=result.get("claim_attempts", 0))
    if result["status"] == Status.PUBLISHED:
        record["model_size"] = model_size(files)
    if result["status"] == Status.PUBLISHED and (validated.get("gate") or {}).get("warning"):
        record["gate_warning"] = validated["gate"]["warning"]  # e.g. the live metric was not finite
    if result["status"] == Status.PUBLISHED and cfg.serving is not None:
        # The version is published whatever happens to its label: a failure here is reported, not raised.
        try:
            # Only the highest version gets a label: a backfilled (older) version must not take canary
            # from the new one.
            if result["version"] == ctx.publisher.live_version():
                change = ctx.serving().on_publish(result["version"])
                record["labels"] = (change or {}).get("labels_after")
        except Exception as err:  # noqa: BLE001 - past the commit point nothing fails the run
            record["serving_error"] = _after_commit(err)
    if result["status"] == Status.PUBLISHED:
        advice = newest_advice(ctx.publisher.strategy.name, cfg.serving)
        if advice:
            record["serving_advice"] = advice
    return record


def _after_commit(err: Exception) -> str:
    """A failure after the commit point, as the warning that reports it: an expected error says
    what it is; anything else also names its kind."""
    if isinstance(err, (ExportError, OSError)):  # a model config file that does not parse is a ConfigError
        return str(err)
    return f"unexpected {type(err).__name__}: {err}"


def _file_list_of(ctx: Context, staging: str, work: str) -> dict:
    """The file list written at export time, from the work directory."""
    try:
        return json.loads(ctx.base.read_text(ctx.base.join(work, FILES_NAME)))
    except (FileNotFoundError, ValueError):
        raise StagingGone(f"the file list of staging is gone or unreadable (staging removed by gc or by hand?); "
                          f"the next run exports the checkpoint again: {ctx.base.url(staging)}") from None


def stage_prune(cfg: Config, dry_run: bool = False, keep_versions: tuple[int, ...] = ()) -> dict:
    """Apply retention; ``keep_versions`` are kept whatever their rank (the version a run just published)."""
    ctx = Context(cfg)
    control = ctx.serving()
    named = tuple(sorted(control.protected_versions())) if control is not None else ()
    return prune(ctx.base, keep=cfg.retention.keep, pinned=(*cfg.retention.pinned, *keep_versions, *named),
                 lease_seconds=cfg.retention.lease_seconds, dry_run=dry_run)


# -- whole runs ------------------------------------------------------------------


_GATED = ("metric", "value", "live_value", "live_version")


_SERVING = ("labels", "serving_error")


_WARNINGS = ("gate_warning",)


def public(record: dict) -> dict:
    """The ``tf-export run --json`` record (a gated run also names the metric and both values;
    a publish under a ``serving:`` section the labels it set, or why it set none; a publish whose
    metric could not be compared with the live version's says why). A publish where TF Serving may
    meet a partial version carries ``serving_advice``, which the CLI prints as a warning, not in the record."""
    keys = PUBLIC_KEYS + _GATED if record.get("status") == Status.GATED else PUBLIC_KEYS
    return {k: record.get(k) for k in keys} | {k: record[k] for k in _SERVING + _WARNINGS if k in record}


def publish_validated(cfg: Config, validated: dict, versioning: str | None = None,
                      allow_outrank: bool = False) -> dict:
    """Publish one validated record (:func:`stage_publish`), counting a version an earlier try of the
    same publish committed as this one's: a task retried after dying between its ledger entry and
    its answer reports ``published``, not ``skipped``."""
    if validated.get("status") == Status.PUBLISHED:
        return public(validated)  # finished by the export stage (a publish that died)
    record = stage_publish(cfg, validated, versioning=versioning, allow_outrank=allow_outrank)
    if record["status"] == Status.SKIPPED and _published_by_earlier_try(cfg, validated, record):
        record = {**record, "status": Status.PUBLISHED.value}
    return record


def _published_by_earlier_try(cfg: Config, validated: dict, record: dict) -> bool:
    """Whether the ledger names this record's own staging, whole: an earlier try died after its ledger entry."""
    ctx = Context(cfg)
    entry = ctx.publisher.ledger_entry(validated.get("ledger_key") or "") or {}
    staging = validated.get("staging")
    return (staging is not None and entry.get("staging") == ctx.base.strip(staging)
            and record.get("version") is not None
            and ctx.publisher.is_whole(ctx.publisher.version_path(record["version"])))


def publish_in_order(cfg: Config, items: list[dict], versioning: str | None = None,
                     allow_outrank: bool = False) -> tuple[list[dict], list[str]]:
    """Publish validated records one after the other in list order (oldest checkpoint first), so the
    last gets the highest version whatever order their exports finished in.

    Records with nothing to do are passed on, and so are those of checkpoints that failed before
    (a backfill task's ``failed`` records, with their error). A publish that fails is recorded
    (``status: failed``) and the later ones still go ahead; an error no retry
    can mend (``permanent``) stops the list at once. Returns the records and
    one line per failure.
    """
    records: list[dict] = []
    failures: list[str] = []
    for item in items:
        if nothing_to_do(item):
            records.append(public(item))
            continue
        if item.get("status") == Status.FAILED:
            records.append({**public(item), "error": item.get("error")})
            continue
        try:
            records.append(publish_validated(cfg, item, versioning, allow_outrank))
        except Exception as err:  # noqa: BLE001 - the newer ones are still published; the caller fails after
            if getattr(err, "permanent", False):
                raise

            message = redact(str(err))
            failures.append(f"{item.get('checkpoint')}: {message}")
            records.append({**public(item), "status": Status.FAILED.value, "error": message})
    return records, failures


def export_and_validate(cfg: Config, checkpoint: str | dict | None = None, force: bool = False,
                        session=None, allow_regression: bool = False) -> dict:
    """Export and validate one checkpoint; the record carries ``timings`` in seconds."""
    t0 = time.monotonic()
    staged = stage_export(cfg, checkpoint, force=force, session=session)
    t1 = time.monotonic()
    if staged["status"] != Status.STAGED:
        return staged
    try:
        validated = stage_validate(cfg, staged, session=session, allow_regression=allow_regression)
    except BaseException:
        # Nothing validates this staging again (the next run exports anew): it would only wait for gc.
        base = open_storage(cfg.export_base, cfg.storage_options)
        _discard(base, base.strip(staged["staging"]), base.strip(staged["work"]))
        raise
    validated["timings"] = {"export": round(t1 - t0, 4), "validate": round(time.monotonic() - t1, 4)}
    return validated


def export_one(cfg: Config, checkpoint: str | dict | None = None, versioning: str | None = None,
               allow_outrank: bool = False, force: bool = False, session=None,
               allow_regression: bool = False) -> dict:
    """Export, validate and publish one checkpoint. Without a ``session``, one validation process is
    started as the export begins, so that Python and TensorFlow start up in it while the export runs."""
    if session is None:
        with ValidationSession() as own:
            return export_one(cfg, checkpoint, versioning, allow_outrank, force, session=own,
                              allow_regression=allow_regression)
    validated = export_and_validate(cfg, checkpoint, force=force, session=session,
                                    allow_regression=allow_regression)
    if validated["status"] != Status.VALIDATED:
        return validated
    return publish_timed(cfg, validated, versioning, allow_outrank)


def publish_timed(cfg: Config, validated: dict, versioning: str | None, allow_outrank: bool) -> dict:
    """:func:`stage_publish`, with the publish's seconds added to the record's ``timings``."""
    t0 = time.monotonic()
    record = stage_publish(cfg, validated, versioning=versioning, allow_outrank=allow_outrank)
    record["timings"] = {**validated.get("timings", {}), "publish": round(time.monotonic() - t0, 4)}
    return record


def run_once(cfg: Config, checkpoint: str | None = None, versioning: str | None = None, force: bool = False,
             allow_outrank: bool = False, allow_regression: bool = False) -> dict:
    """Export the newest unexported complete checkpoint (or the one named), then prune.

    ``force`` publishes a checkpoint the metric gate would hold back;
    ``allow_outrank`` one whose version would break training order;
    ``allow_regression`` one above ``validation.max_size_ratio``. The
    version this run publishes is kept by its own prune, whatever its rank
    (the next prune applies retention to it as to any other).
    A prune that fails after a publish does not undo it: the record says
    ``published`` and carries the prune's error.
    """
    record = export_one(cfg, checkpoint, versioning, allow_outrank=allow_outrank, force=force,
                        allow_regression=allow_regression)
    if record["status"] == Status.PUBLISHED:
        try:
            record["pruned"] = stage_prune(cfg, keep_versions=(record["version"],))["removed_versions"]
        except Exception as err:  # noqa: BLE001 - the publish stands, whatever retention meets
            record["prune_error"] = _after_commit(err)
    return record


def finish_cut_short(cfg: Config) -> list[int]:
    """Finish every publish that was committed but whose promotion was cut short; the versions finished.

    On an object store a move cut short (a process killed while it copied the
    version's objects) leaves ``<base>/<V>/`` listed without ``saved_model.pb``,
    which TF Serving may try to load under plain directory watching. ``status``
    and the serving commands run this first, as ``run``, ``backfill`` and ``gc``
    do, so the version does not stay partial until the next export. Safe beside
    any other process: each promotion step happens once or finds it done.
    """
    return Context(cfg).publisher.finish_committed()["finished"]


def status(cfg: Config) -> dict:
    """Published versions with their provenance, the one TF Serving serves (the highest, or with a
    ``serving:`` section what the model config file says: see :func:`served_version`), and the
    versions retention removed (``removed``: version, checkpoint, step, removed_at). Each version's ``run``
    names, in one line, the run that published it. Each version's
    ``size_ratio`` and ``latency_ratio`` are those its validation measured against its reference version
    (None before the performance gate, or on a first publish)."""
    ctx = Context(cfg)
    versions = []
    whole = set(ctx.publisher.whole_versions())
    for v in ctx.publisher.versions():
        manifest = ctx.publisher.manifest(v) or {}
        ck = manifest.get("checkpoint") or {}
        # On an object store a version whose promotion was cut short is listed without saved_model.pb:
        # TF Serving cannot load it; the next run that meets its checkpoint finishes it.
        versions.append({"version": v, "checkpoint": ck.get("path"), "step": ck.get("step"),
                         "run": summary_of(manifest.get(RUN_KEY)),
                         "path": ctx.base.url(ctx.publisher.version_path(v)),
                         "manifest": bool(manifest), "whole": v in whole, **ratios_of(manifest)})
    labels: dict[str, int] = {}
    served = served_version(whole)
    control = ctx.serving()
    if control is not None:
        # The server does what the file says, whatever serving.policy says: a changed policy reaches
        # the file at the next publish. Under a specific list the highest version listed is served.
        entry = control.own_state()
        labels = entry.labels
        served = served_version(whole, entry)
    for item in versions:
        item["labels"] = sorted(k for k, v in labels.items() if v == item["version"])
    present = {v["version"] for v in versions}
    removed = sorted(({"version": r.get("version"), "checkpoint": r.get("checkpoint"), "step": r.get("step"),
                       "removed_at": r.get("removed_at")} for r in ctx.publisher.removed().values()
                      if r.get("version") not in present), key=lambda r: r["version"] or 0)
    return {"export_base": cfg.export_base, "versions": versions, "serving": served, "labels": labels,
            "removed": removed}


# Validation is timed and told like the other stages (tf_export_pipeline.observe); wrapped here rather
# than decorated so that its definition above stays about validating.
stage_validate = observed("validate")(stage_validate)


__all__ = ["publish_validated", "publish_in_order", "discover", "list_pending", "stage_export", "stage_validate",
           "performance_baseline",
           "stage_publish", "stage_prune",
           "export_one", "run_once", "status", "finish_cut_short", "public"]
