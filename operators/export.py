"""One operator per pipeline stage: discover, export, validate, publish, prune.

Each takes the config path (templated) and what the stage before returned,
makes the matching call of :class:`~tf_export_pipeline.operators.hooks.ExportHook` and returns its small
JSON-serialisable record to XCom. Staging lives in the export base's own
storage, so consecutive tasks may run on different workers, and a retry of
any task is safe: the ledger and the version claims make each stage
idempotent.

A stage that has nothing to do (no new checkpoint, a checkpoint already
published, one held back by the metric gate) keeps its record as XCom and
ends as *skipped*, and so do the stages after it.

Example::

    found = DiscoverCheckpointsOperator(task_id="discover", config_path=CONFIG)
    staged = ExportCheckpointOperator(task_id="export", config_path=CONFIG, checkpoint=found.output)
    validated = ValidateExportOperator(task_id="validate", config_path=CONFIG, staged=staged.output)
    published = PublishVersionOperator(task_id="publish", config_path=CONFIG, validated=validated.output,
                                       outlets=[export_asset(CONFIG)])
    PruneVersionsOperator(task_id="prune", config_path=CONFIG, published=published.output)
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import AssetAlias, Context
from airflow.sdk.exceptions import AirflowException

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.operators.assets import export_asset
from tf_export_pipeline.operators.base import PipelineOperator, as_bool, as_int, checkpoint_ref, stage_errors, xcom
from tf_export_pipeline.operators.lineage import OpenLineageMethods
from tf_export_pipeline.operators.selection import chunked, small
from tf_export_pipeline.records import Status

SELECT = ("newest", "new", "pending")
EVENT_KEYS = ("version", "path", "checkpoint", "step")


class DiscoverCheckpointsOperator(PipelineOperator):
    """Finds the checkpoints to export.

    ``select="newest"`` returns the newest checkpoint not being written, as
    ``{"status": "new", "checkpoint": PREFIX, "prefix", "name", "step",
    "written_at", "version"}``, and skips when it has a version already (or
    there is none). The other two return a list for ``.expand()``, oldest
    first: ``select="new"``, the complete checkpoints with no version that
    are newer than every checkpoint with one (older ones are left to a
    backfill: under the config's versioning they would be served above a
    newer model); ``select="pending"``, every complete checkpoint with no
    version in ``[from_step, to_step]`` (a backfill: those whose versions
    retention removed only with ``include_removed``, and refused when the next
    run's retention would remove what it publishes, unless ``allow_outrank``).
    With ``select="pending"``, ``versioning`` is the backfill's (refused when
    its numbers would mix units with the live version's, unless
    ``allow_outrank``), and ``chunk_size`` returns the list cut into chunks
    (lists, in order) for :class:`ExportChunkOperator`.
    """

    template_fields = ("config_path", "select", "from_step", "to_step", "include_removed", "allow_outrank",
                       "versioning", "chunk_size")
    ui_color = "#fef7e0"

    def __init__(self, *, config_path: str, select: str = "newest", from_step: int | str | None = None,
                 to_step: int | str | None = None, include_removed: bool | str = False,
                 allow_outrank: bool | str = False, versioning: str | None = None,
                 chunk_size: int | str | None = None, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.select, self.from_step, self.to_step = select, from_step, to_step
        self.include_removed, self.allow_outrank = include_removed, allow_outrank
        self.versioning, self.chunk_size = versioning, chunk_size

    def execute(self, context: Context) -> Any:

        hook = self.hook
        with stage_errors():
            if self.select not in SELECT:
                raise ConfigError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
            if self.select == "pending" and self.versioning not in (None, "", "None"):
                versioning, note = hook.backfill_versioning(self.versioning, as_bool(self.allow_outrank))
                self.log.info("versioning %s%s", versioning, f": {note}" if note else "")
            size = as_int(self.chunk_size)
            if size is not None and size < 1:
                raise ConfigError(f"chunk_size must be at least 1, got {size}: {self.config_path}")
            if self.select != "newest":
                found = hook.new() if self.select == "new" else hook.pending(
                    as_int(self.from_step), as_int(self.to_step), as_bool(self.include_removed),
                    as_bool(self.allow_outrank))
                self.log.info("%d checkpoint(s) to export: %s", len(found), [c["name"] for c in found])
                listed = [small(c) for c in found]
                if size is None:
                    return xcom(listed)
                parts = chunked(listed, size)
                self.log.info("in %d chunk(s) of %s", len(parts), sorted({len(p) for p in parts}))
                return xcom(parts)
            chosen = hook.newest()
        if chosen is None:
            self.skip_with(context, {"status": Status.NO_NEW_CHECKPOINT.value, "checkpoint": None, "step": None},
                           f"no complete checkpoint in {hook.config.training_dir}")
        if chosen["version"] is not None:
            self.skip_with(context, {"status": Status.SKIPPED.value, "checkpoint": chosen["prefix"],
                                     "step": chosen["step"], "version": chosen["version"]},
                           f"newest checkpoint {chosen['name']} already has version {chosen['version']}")
        with stage_errors():
            hook.require_complete(chosen)
        return xcom({"status": Status.NEW.value, "checkpoint": chosen["prefix"], **small(chosen)})


class ExportCheckpointOperator(OpenLineageMethods, PipelineOperator):
    """Restores a checkpoint and writes its SavedModel into staging in the export base.

    ``checkpoint`` is a prefix, a name or a step, or a record from discovery
    or the sensor; None takes the newest complete checkpoint. ``force``
    exports a checkpoint the metric gate would hold back. Returns the
    ``staged`` record (or skips: already published, gated).
    """

    template_fields = ("config_path", "checkpoint")
    ui_color = "#e6f4ea"

    def __init__(self, *, config_path: str, checkpoint: str | dict | None = None, force: bool = False,
                 conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.checkpoint = checkpoint
        self.force = force

    def execute(self, context: Context) -> dict:
        self.pass_through(context, self.checkpoint)
        with stage_errors():
            record = self.hook.export(checkpoint_ref(self.checkpoint), force=as_bool(self.force))
        self.pass_through(context, record)
        self.log.info("%s %s -> %s", record["status"], record.get("checkpoint"),
                      record.get("staging") or record.get("path"))
        return xcom(record)


class ExportChunkOperator(PipelineOperator):
    """Exports and validates a chunk of a backfill's checkpoints in one process, publishing nothing.

    ``checkpoints`` is a list of discovery records (a chunk of
    :class:`DiscoverCheckpointsOperator`'s ``chunk_size`` output). One
    TensorFlow import, one trace and one validation process serve the whole
    chunk, as in ``tf-export backfill``. A retry (on any worker) takes what an
    earlier try of the same run already exported and validated, and exports
    only the rest. A checkpoint that fails for good is recorded ``failed`` and
    the others go on; the publish passes it on and the run's last task fails.
    ``allow_regression`` is :class:`ValidateExportOperator`'s. Returns the list
    of records, in order, each with its ``size_ratio`` and ``latency_ratio``.
    """

    template_fields = ("config_path", "checkpoints", "allow_regression")
    ui_color = "#e6f4ea"

    def __init__(self, *, config_path: str, checkpoints: list, allow_regression: bool | str = False,
                 conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.checkpoints = checkpoints
        self.allow_regression = allow_regression

    def execute(self, context: Context) -> list:
        ti = context["ti"]
        with stage_errors():
            # Keyed by the run, not the try: a retry finds what the tries before it exported.
            wanted = [str(checkpoint_ref(item)) for item in self.checkpoints or []]
            records = self.hook.export_chunk(wanted, f"{ti.dag_id}/{ti.run_id}",
                                             resume=ti.try_number > 1,
                                             allow_regression=as_bool(self.allow_regression))
        out = []
        for record in records:
            performance = (record.get("validation") or {}).get("performance") or {}
            self.log.info("%s %s%s%s", record["status"], record.get("checkpoint"),
                          " (from an earlier try)" if record.get("resumed") else "",
                          f": {record['error']}" if record.get("error") else "")
            out.append({**record, **{key: performance.get(key) for key in ("size_ratio", "latency_ratio")}})
        return xcom(out)


class ValidateExportOperator(OpenLineageMethods, PipelineOperator):
    """Validates the staged SavedModel in a fresh process.

    A model that fails is removed from staging and fails the task without
    retries (the report says why). ``allow_regression`` lets a model above
    ``validation.max_size_ratio`` or ``validation.max_latency_ratio`` through
    (never one above ``validation.max_graph_bytes``). Returns the ``validated``
    record, with ``size_ratio`` and ``latency_ratio`` against the reference
    version (None on a first publish).
    """

    template_fields = ("config_path", "staged", "allow_regression")
    ui_color = "#e6f4ea"

    def __init__(self, *, config_path: str, staged: dict, allow_regression: bool | str = False,
                 conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.staged = staged
        self.allow_regression = allow_regression

    def execute(self, context: Context) -> dict:
        self.pass_through(context, self.staged)
        with stage_errors():
            record = self.hook.validate(self.staged, allow_regression=as_bool(self.allow_regression))
        report = record.get("validation") or {}
        checks = report.get("checks") or []
        performance = report.get("performance") or {}
        ratios = {key: performance.get(key) for key in ("size_ratio", "latency_ratio")}
        self.log.info("%s %s (%d checks, size ratio %s, latency ratio %s)", record["status"],
                      record.get("staging") or record.get("path"), len(checks), ratios["size_ratio"],
                      ratios["latency_ratio"])
        return xcom({**record, **ratios})


class PublishVersionOperator(OpenLineageMethods, PipelineOperator):
    """Claims a version number, records the ledger entry and promotes staging into place.

    ``validated`` is one record (the result is then one record), or a list
    of them, e.g. the output of a mapped validate task (the result is then
    the list of records; Airflow hands on a single value when only one
    instance ran): those are published one after the other in list order,
    so the last (the newest checkpoint) gets the highest version, whatever
    order their exports finished in. ``versioning`` overrides the config's
    policy. A version that would break training order (an older checkpoint
    above a newer one, or a newer one below an older one) is refused unless
    ``allow_outrank``.

    On success each ``Asset`` in ``outlets`` gets an event whose extra names
    the version, its path, the checkpoint and the step (the newest, with
    ``versions`` listing all, when a list published several); each
    ``AssetAlias`` gets one event per published version, for the Asset of the
    export base. Nothing published (a checkpoint published meanwhile by
    someone else) skips the task: no event.
    """

    template_fields = ("config_path", "validated", "versioning", "allow_outrank")
    ui_color = "#d2e3fc"

    def __init__(self, *, config_path: str, validated: dict | list, versioning: str | None = None,
                 allow_outrank: bool | str = False, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.validated = validated
        self.versioning = versioning
        self.allow_outrank = allow_outrank

    def execute(self, context: Context) -> dict | list:
        options = {"versioning": self.versioning or None, "allow_outrank": as_bool(self.allow_outrank)}
        if isinstance(self.validated, dict):
            self.pass_through(context, self.validated)
            with stage_errors():
                record = self.hook.publish(self.validated, **options)
            if record["status"] != Status.PUBLISHED:
                self.skip_with(context, record, f"{record['status']}: {record.get('checkpoint')} is version "
                                                f"{record.get('version')}")
            self._announce(context, [record])
            return xcom(record)
        # Map-index order, oldest first and newest last; a mapped chunk task hands on a list per chunk.
        items = [dict(item) for group in self.validated or []
                 for item in (group if isinstance(group, list) else [group])]
        if not items:  # e.g. a mapped validate task with no instance that succeeded
            self.skip_with(context, [], "nothing to publish")
        with stage_errors():
            records, failures = self.hook.publish_in_order(items, **options)
        if failures:
            # No event is recorded for a failed task; its retry finds these versions published and announces them.
            raise AirflowException(f"{len(failures)} of {len(items)} publishes failed: {'; '.join(failures)}")
        published = [r for r in records if r["status"] == Status.PUBLISHED]
        if not published:
            self.skip_with(context, records, "every checkpoint was published already")
        self._announce(context, published)
        return xcom(records)

    def _announce(self, context: Context, published: list[dict]) -> None:

        extras = [{k: r.get(k) for k in EVENT_KEYS} for r in published]
        for outlet in self.outlets or []:
            if isinstance(outlet, AssetAlias):  # one event per version, for the export base's Asset
                for extra in extras:
                    context["outlet_events"][outlet].add(export_asset(self.hook.config), extra=extra)
            else:
                versions = {"versions": [e["version"] for e in extras]} if len(extras) > 1 else {}
                context["outlet_events"][outlet].extra = {**extras[-1], **versions}


class PruneVersionsOperator(PipelineOperator):
    """Applies retention: keeps the newest ``retention.keep`` versions, the pinned ones and the live one,
    and removes staging older than the lease. With ``published`` given, skips unless it was published.
    """

    template_fields = ("config_path", "published", "dry_run")
    ui_color = "#fce8e6"

    def __init__(self, *, config_path: str, published: dict | list | None = None, dry_run: bool | str = False,
                 conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.published = published
        self.dry_run = dry_run

    def execute(self, context: Context) -> dict:
        records = self.published if isinstance(self.published, list) else [self.published] if self.published else []
        if isinstance(self.published, dict) and self.published.get("status") != Status.PUBLISHED:
            self.skip_with(context, {"removed_versions": [], "removed_staging": [], "dry_run": as_bool(self.dry_run)},
                           "nothing was published")
        # What this DAG run published is kept by its own prune, whatever its rank.
        mine = tuple(r["version"] for r in records if isinstance(r, dict) and r.get("status") == Status.PUBLISHED
                     and r.get("version") is not None)
        with stage_errors():
            result = self.hook.prune(dry_run=as_bool(self.dry_run), keep_versions=mine)
        self.log.info("removed versions %s, staging %s", result["removed_versions"], result["removed_staging"])
        return xcom(result)


class FinishPublishesOperator(PipelineOperator):
    """Finishes every publish whose promotion was cut short (a process killed while it moved a version's
    objects on an object store), so TF Serving does not keep meeting a partial version until the next
    export. Returns ``{"finished": [versions]}``; nothing to do is a success."""

    template_fields = ("config_path",)
    ui_color = "#e6f4ea"

    def execute(self, context: Context) -> dict:
        with stage_errors():
            finished = self.hook.finish_cut_short()
        if finished:
            self.log.info("finished the promotion of versions %s, cut short earlier", finished)
        return {"finished": finished}

