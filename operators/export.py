"""One operator per pipeline stage: discover, export, validate, publish, prune.

Each takes the config path (templated) and what the stage before returned,
calls the matching function of :mod:`tf_export_pipeline.stages` and returns its small
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

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from tf_export_pipeline.operators.base import NOTHING_TO_DO, PipelineOperator, as_bool, as_int, stage_errors, xcom

SELECT = ("newest", "new", "pending")


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
    """

    template_fields = ("config_path", "select", "from_step", "to_step", "include_removed", "allow_outrank")
    ui_color = "#fef7e0"

    def __init__(self, *, config_path: str, select: str = "newest", from_step: int | str | None = None,
                 to_step: int | str | None = None, include_removed: bool | str = False,
                 allow_outrank: bool | str = False, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.select = select
        self.from_step = from_step
        self.to_step = to_step
        self.include_removed = include_removed
        self.allow_outrank = allow_outrank

    def execute(self, context: Context) -> Any:
        from tf_export_pipeline.operators.selection import new_since_exported, newest, small
        from tf_export_pipeline import stages
        from tf_export_pipeline.errors import CheckpointError, ConfigError

        cfg = self.config()
        with stage_errors():
            if self.select not in SELECT:
                raise ConfigError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
            if self.select == "pending":
                items = [small(r) for r in stages.pending_for_backfill(
                    cfg, as_int(self.from_step), as_int(self.to_step), include_removed=as_bool(self.include_removed),
                    allow_outrank=as_bool(self.allow_outrank))]
            elif self.select == "new":
                items = [small(r) for r in new_since_exported(stages.discover(cfg))]
            if self.select != "newest":
                self.log.info("%d checkpoint(s) to export: %s", len(items), [i["name"] for i in items])
                return xcom(items)
            chosen = newest(stages.discover(cfg))
        if chosen is None:
            self.skip_with(context, {"status": "no_new_checkpoint", "checkpoint": None, "step": None},
                           f"no complete checkpoint in {cfg.training_dir}")
        if chosen["version"] is not None:
            self.skip_with(context, {"status": "skipped", "checkpoint": chosen["prefix"], "step": chosen["step"],
                                     "version": chosen["version"]},
                           f"newest checkpoint {chosen['name']} already has version {chosen['version']}")
        if not chosen["complete"]:
            raise CheckpointError(f"checkpoint is incomplete, missing {', '.join(chosen['missing'])}: "
                                  f"{chosen['prefix']}")
        return xcom({"status": "new", "checkpoint": chosen["prefix"], **small(chosen)})


def _checkpoint_ref(checkpoint: Any) -> str | None:
    if isinstance(checkpoint, dict):
        return checkpoint.get("prefix") or checkpoint.get("checkpoint")
    if checkpoint in (None, "", "None"):
        return None
    return str(checkpoint)


class ExportCheckpointOperator(PipelineOperator):
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
        from tf_export_pipeline import stages

        self.pass_through(context, self.checkpoint)
        cfg = self.config()
        with stage_errors():
            record = stages.stage_export(cfg, _checkpoint_ref(self.checkpoint), force=as_bool(self.force))
        self.pass_through(context, record)
        self.log.info("%s %s -> %s", record["status"], record.get("checkpoint"),
                      record.get("staging") or record.get("path"))
        return xcom(record)


class ValidateExportOperator(PipelineOperator):
    """Validates the staged SavedModel in a fresh process.

    A model that fails is removed from staging and fails the task without
    retries (the report says why). Returns the ``validated`` record.
    """

    template_fields = ("config_path", "staged")
    ui_color = "#e6f4ea"

    def __init__(self, *, config_path: str, staged: dict, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.staged = staged

    def execute(self, context: Context) -> dict:
        from tf_export_pipeline import stages

        self.pass_through(context, self.staged)
        cfg = self.config()
        with stage_errors():
            record = stages.stage_validate(cfg, self.staged)
        report = record.get("validation") or {}
        self.log.info("%s %s (%d checks)", record["status"], record.get("staging") or record.get("path"),
                      len(report.get("checks") or []))
        return xcom(record)


class PublishVersionOperator(PipelineOperator):
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
        from tf_export_pipeline import stages
        from tf_export_pipeline.redaction import redact

        if self.validated is None:  # e.g. a mapped validate task with no instance that succeeded
            self.skip_with(context, [], "nothing to publish")
        if isinstance(self.validated, dict):
            self.pass_through(context, self.validated)
            cfg = self.config()
            record = self._publish(cfg, self.validated)
            if record["status"] != "published":
                self.skip_with(context, record, f"{record['status']}: {record.get('checkpoint')} is version "
                                                f"{record.get('version')}")
            self._announce(context, cfg, [record])
            return xcom(record)

        items = [dict(item) for item in self.validated]  # map-index order: oldest first, newest last
        if not items:
            self.skip_with(context, [], "nothing to publish")
        cfg = self.config()
        records, failures = [], []
        for item in items:
            if item.get("status") in NOTHING_TO_DO:
                records.append(stages.public(item))
                continue
            try:
                records.append(self._publish(cfg, item))
            except AirflowFailException:
                raise
            except Exception as err:  # noqa: BLE001 - the newer ones are still published; the task fails after
                message = redact(str(err))
                self.log.error("publishing %s failed: %s", item.get("checkpoint"), message)
                failures.append(f"{item.get('checkpoint')}: {message}")
                records.append({**stages.public(item), "status": "failed", "error": message})
        if failures:
            # No event is recorded for a failed task; its retry finds these versions published and announces them.
            raise AirflowException(f"{len(failures)} of {len(items)} publishes failed: {'; '.join(failures)}")
        published = [r for r in records if r["status"] == "published"]
        if not published:
            self.skip_with(context, records, "every checkpoint was published already")
        self._announce(context, cfg, published)
        return xcom(records)

    def _publish(self, cfg, validated: dict) -> dict:
        from tf_export_pipeline import stages

        if validated.get("status") == "published":
            return stages.public(validated)  # finished by the export stage (a publish that died)
        with stage_errors():
            record = stages.stage_publish(cfg, validated, versioning=self.versioning or None,
                                          allow_outrank=as_bool(self.allow_outrank))
        if record["status"] == "skipped" and _published_by_earlier_try(cfg, validated, record):
            self.log.info("version %s was published by an earlier try of this task", record["version"])
            record = {**record, "status": "published"}
        if record["status"] == "published":
            self.log.info("published version %s at %s", record["version"], record["path"])
        return record

    def _announce(self, context: Context, cfg, published: list[dict]) -> None:
        from airflow.sdk import AssetAlias

        from tf_export_pipeline.operators.assets import export_asset

        extras = [{k: r.get(k) for k in ("version", "path", "checkpoint", "step")} for r in published]
        for outlet in self.outlets or []:
            if isinstance(outlet, AssetAlias):
                asset = export_asset(cfg)
                for extra in extras:
                    context["outlet_events"][outlet].add(asset, extra=extra)
            else:
                extra = dict(extras[-1])
                if len(extras) > 1:
                    extra["versions"] = [e["version"] for e in extras]
                context["outlet_events"][outlet].extra = extra


def _published_by_earlier_try(cfg, validated: dict, record: dict) -> bool:
    """Whether the ledger names this record's own staging, whole: an earlier try died after its ledger entry."""
    from tf_export_pipeline.stages import Context

    ctx = Context(cfg)
    entry = ctx.publisher.ledger_entry(validated.get("ledger_key") or "") or {}
    staging = validated.get("staging")
    return (staging is not None and entry.get("staging") == ctx.base.strip(staging)
            and record.get("version") is not None
            and ctx.publisher.is_whole(ctx.publisher.version_path(record["version"])))


class PruneVersionsOperator(PipelineOperator):
    """Applies retention: keeps the newest ``retention.keep`` versions, the pinned ones and the live one,
    and removes staging older than the lease. With ``published`` given, skips unless it was published.
    """

    template_fields = ("config_path", "published", "dry_run")
    ui_color = "#fce8e6"

    def __init__(self, *, config_path: str, published: dict | None = None, dry_run: bool | str = False,
                 conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.published = published
        self.dry_run = dry_run

    def execute(self, context: Context) -> dict:
        from tf_export_pipeline import stages

        if isinstance(self.published, dict) and self.published.get("status") != "published":
            self.skip_with(context, {"removed_versions": [], "removed_staging": [], "dry_run": as_bool(self.dry_run)},
                           "nothing was published")
        cfg = self.config()
        just_published = [r.get("version") for r in (self.published if isinstance(self.published, list)
                                                      else [self.published] if isinstance(self.published, dict) else [])
                          if isinstance(r, dict) and r.get("status") == "published" and r.get("version") is not None]
        with stage_errors():
            # What this DAG run published is kept by its own prune, whatever its rank.
            result = stages.stage_prune(cfg, dry_run=as_bool(self.dry_run), keep_versions=tuple(just_published))
        self.log.info("removed versions %s, staging %s", result["removed_versions"], result["removed_staging"])
        return xcom(result)
