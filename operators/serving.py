"""Operators over TF Serving's model config file: move a label, roll back, decide on a soaked canary.

Thin wrappers over :class:`tf_export_pipeline.serving.ServingControl` and
:func:`tf_export_pipeline.canary.soak_verdict`: the config is read when the task runs,
the result goes to XCom as a small record, and a task with nothing to do
keeps its record and ends as *skipped* (no Asset event).

Example::

    from tf_export_pipeline.operators.assets import serving_asset
    from tf_export_pipeline.operators.serving import CheckCanaryOperator, PromoteVersionOperator

    PromoteVersionOperator(task_id="promote", config_path=CONFIG, version="{{ params.version }}",
                           version_label="{{ params.label }}", outlets=[serving_asset(cfg)])
    PromoteVersionOperator(task_id="rollback", config_path=CONFIG, rollback=True,
                           outlets=[serving_asset(cfg)])
    soaked = CheckCanaryOperator(task_id="check_canary", config_path=CONFIG, soak_seconds=86400)
    PromoteVersionOperator(task_id="promote_canary", config_path=CONFIG, version=soaked.output,
                           outlets=[serving_asset(cfg)])
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context

from tf_export_pipeline.operators.assets import serving_asset
from tf_export_pipeline.operators.base import PipelineOperator, as_bool, as_int, stage_errors, xcom

EVENT_KEYS = ("model", "label", "version", "previous", "command")


class PromoteVersionOperator(PipelineOperator):
    """Points ``version_label`` (default ``stable``) at ``version`` in TF Serving's model config file, or
    rolls back. (``version_label`` is TF Serving's own name for it, ``ModelSpec.version_label``; an operator's
    ``label`` is its display name in Airflow.)

    ``version`` is a version number (or a rendered template of one), or the
    record of a task before it that names one (``CheckCanaryOperator``'s).
    With ``rollback``, ``stable`` goes back to ``to`` or, without it, to the
    stable version before the current one (from the history); ``version``
    and ``version_label`` are then not used. TF Serving lets a label point only at a
    version it has loaded, so a version not yet listed is listed first and
    the label moves after ``serving.reload_seconds`` plus a margin, unless
    ``now`` (then the server needs ``--allow_version_labels_for_unavailable_models``).

    Returns ``{"status": "promoted"|"rolled_back", "command", "model",
    "label", "version", "previous", "labels", "versions", "file"}``. Each
    ``Asset`` in ``outlets`` gets an event whose extra names the model, the
    label, the version and the previous one; each ``AssetAlias`` one event per
    label changed, for the Asset of the model config file. A label that
    points at the version already skips the task (no event). A version that
    does not exist or is not whole, a bad label, a config without
    ``serving.policy: labels`` or nothing to roll back to fail the task
    without retries.
    """

    template_fields = ("config_path", "version", "version_label", "rollback", "to", "now")
    ui_color = "#fde7c8"

    def __init__(self, *, config_path: str, version: int | str | dict | None = None, version_label: str = "stable",
                 rollback: bool | str = False, to: int | str | None = None, now: bool | str = False,
                 conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.version = version
        self.version_label = version_label
        self.rollback = rollback
        self.to = to
        self.now = now

    def execute(self, context: Context) -> dict:
        version = self.version.get("version") if isinstance(self.version, dict) else self.version
        with stage_errors():
            result, changes = self.hook.move_label(as_int(version), self.version_label, as_bool(self.rollback),
                                                   as_int(self.to), as_bool(self.now))
        if not changes:
            self.skip_with(context, {**result, "status": "unchanged"},
                           f"{result['label']} points at version {result['version']} already")
        self.log.info("%s: %s", result["status"],
                      "; ".join(f"{c['label']} {c['previous']} -> {c['version']}" for c in changes))
        self._announce(context, self.hook.config, changes)
        return xcom(result)

    def _announce(self, context: Context, cfg, changes: list[dict]) -> None:
        from airflow.sdk import AssetAlias


        extras = [xcom({k: c.get(k) for k in EVENT_KEYS}) for c in changes]
        for outlet in self.outlets or []:
            if isinstance(outlet, AssetAlias):
                for extra in extras:
                    context["outlet_events"][outlet].add(serving_asset(cfg), extra=extra)
            else:
                extra = dict(extras[-1])
                if len(extras) > 1:
                    extra["changes"] = extras
                context["outlet_events"][outlet].extra = extra


class CheckCanaryOperator(PipelineOperator):
    """Whether the version labelled canary may become stable: it has been canary for ``soak_seconds``
    and, when the config has a ``gate:``, its metric is not worse than the stable version's.

    Returns ``{"status": "ready", "version", "stable", "since",
    "soaked_seconds", "reason", "label": "stable"}`` (with a gate also
    ``metric``, ``value``, ``stable_value``) for ``PromoteVersionOperator``'s
    ``version``. Otherwise keeps the verdict as XCom and skips: ``soaking``,
    ``held`` (its metric is worse, or unknown), ``no_canary``,
    ``already_stable``, or ``was_stable`` (it was promoted and rolled back
    from: only a person promotes it again).
    """

    template_fields = ("config_path", "soak_seconds")
    ui_color = "#fde7c8"

    def __init__(self, *, config_path: str, soak_seconds: int | float | str = 86400, conn_id: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(config_path=config_path, conn_id=conn_id, **kwargs)
        self.soak_seconds = soak_seconds

    def execute(self, context: Context) -> dict:
        from tf_export_pipeline.canary import HELD, READY  # loads the stages: not at DAG parsing

        with stage_errors():
            verdict = self.hook.soak_verdict(float(self.soak_seconds))
        if verdict["status"] == HELD:
            self.log.warning("canary held back: %s", verdict["reason"])
        if verdict["status"] != READY:
            self.skip_with(context, verdict, f"{verdict['status']}: {verdict['reason']}")
        self.log.info("%s", verdict["reason"])
        return xcom({**verdict, "label": "stable"})
