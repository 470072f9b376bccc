"""Airflow DAGs per model config: nightly, after training, backfill, promote with serving labels, finish.

Every ``<model>.yaml`` in the config folder (``dags/configs/`` beside this
file, or ``$TF_EXPORT_CONFIG_DIR``) yields:

``export_nightly__<model>``
    on the config's ``airflow.schedule`` (default ``@daily``, no catch-up):
    discover -> export -> validate -> publish -> prune. No new checkpoint
    skips the run's tasks; it is not a failure.
``export_after_training__<model>``
    scheduled on the Asset of the training directory, so a training DAG
    with that Asset as an outlet, or a training job posting an asset event
    (``POST /api/v2/assets/events``, optionally with ``{"checkpoint": PREFIX}``
    in its extra), starts it at once; a manual run takes ``{"checkpoint": PREFIX}``
    as its conf. A deferrable sensor waits for the checkpoint to be complete;
    then every complete checkpoint newer than the newest exported one is
    exported (in parallel, up to ``airflow.max_active_tis_per_dagrun``) and
    published in order, oldest first and newest last, so coalesced events
    lose nothing and the newest model is the one served. Older unexported
    checkpoints are left to the backfill DAG.
``export_backfill__<model>``
    manual, with params ``from_step``, ``to_step``, ``versioning`` (default
    the config's, ``checkpoint_time`` where that is ``timestamp``), ``chunk_size``,
    ``allow_outrank``, ``allow_regression`` and ``include_removed``: lists
    the checkpoints (refusing a range whose versions the next run's retention
    would remove, and a versioning whose numbers would mix units with the live
    version's), cuts them into chunks of at most ``chunk_size``, exports and
    validates each chunk in one mapped task (one TensorFlow import and one
    trace per chunk, as ``tf-export backfill``), at most
    ``airflow.max_active_tis_per_dagrun`` at a time, then one task publishes
    them all in checkpoint order.
``export_promote__<model>``
    only for a config with ``serving.policy: labels``. By hand, with params
    ``version``, ``label`` (``stable``) and ``rollback``: points the label at
    the version, or with ``rollback`` moves ``stable`` back to ``version`` or,
    without one, to the previous stable version. Runs with neither (every
    scheduled run, on ``airflow.promote_schedule``; none by default) check the
    canary instead: once it has been canary for ``airflow.soak_seconds`` and,
    with a ``gate:``, its metric is not worse than stable's, it becomes stable.
``export_finish__<model>``
    on ``airflow.finish_schedule``: by default (``auto``) every 3 minutes for
    an export base on cloud storage and not at all on local disk. Finishes a
    publish whose promotion was cut short (a process killed while it moved
    the version's objects), within TF Serving's load retries.

The export DAGs (nightly, after training, backfill) take the param
``allow_regression`` (default false): a manual run with it true publishes a
model above ``validation.max_size_ratio`` times the reference version's size
or ``validation.max_latency_ratio`` times its median latency (never one above
``validation.max_graph_bytes``).

Every publish emits an event for the Asset of the export base; every label
change one for the Asset of the model config file (``serving.model_config_file``).

Parsing this file reads the YAML files and nothing else: TensorFlow and
storage are only touched when a task runs. A config that does not load, whose
DAGs cannot be built or checked (a schedule Airflow cannot read), whose file
name cannot be part of a DAG id (only letters, digits, ``_``, ``-`` and ``.``),
or whose DAG ids another config took first has its DAGs left out and its
one-line error listed among the UI's import errors (``/api/v2/importErrors``)
under the config's own path, so the other models' DAGs are unaffected; task
logs do not repeat it.

Tuning through the environment (read when the file is parsed):
``TF_EXPORT_RETRIES`` (2), ``TF_EXPORT_RETRY_DELAY_SECONDS`` (60),
``TF_EXPORT_POKE_SECONDS`` (30: the sensor's poll interval),
``TF_EXPORT_WAIT_SECONDS`` (3600: how long the sensor waits),
``TF_EXPORT_MISSING_GRACE_SECONDS`` (300: how long a checkpoint named by an
event or conf may match nothing before the sensor fails),
``TF_EXPORT_POOL`` (``default_pool``: the pool of the export and validate tasks).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, AssetAlias, Param, task, task_group

from tf_export_pipeline.layout import BACKFILL_VERSIONING, VERSIONINGS
from tf_export_pipeline.operators.assets import export_asset, requested_checkpoint, serving_asset, training_asset
from tf_export_pipeline.operators.export import (
    DiscoverCheckpointsOperator,
    ExportCheckpointOperator,
    ExportChunkOperator,
    FinishPublishesOperator,
    PruneVersionsOperator,
    PublishVersionOperator,
    ValidateExportOperator,
)
from tf_export_pipeline.operators.selection import CHUNK_SIZE
from tf_export_pipeline.operators.sensors import NewCheckpointSensor
from tf_export_pipeline.operators.serving import CheckCanaryOperator, PromoteVersionOperator

log = logging.getLogger(__name__)

CONFIG_DIR = Path(os.environ.get("TF_EXPORT_CONFIG_DIR") or Path(__file__).resolve().parent / "configs")
START = pendulum.datetime(2024, 1, 1, tz="UTC")
POKE_SECONDS = float(os.environ.get("TF_EXPORT_POKE_SECONDS", "30"))
WAIT_SECONDS = float(os.environ.get("TF_EXPORT_WAIT_SECONDS", "3600"))
MISSING_GRACE_SECONDS = float(os.environ.get("TF_EXPORT_MISSING_GRACE_SECONDS", "300"))
POOL = os.environ.get("TF_EXPORT_POOL") or "default_pool"
ALLOW_REGRESSION = "{{ params.allow_regression }}"


def allow_regression_param() -> Param:
    """The param that lets a model above validation.max_size_ratio or max_latency_ratio be published."""
    return Param(False, type="boolean", description="publish even when the model is more than "
                                                     "validation.max_size_ratio times the reference version's size "
                                                     "or validation.max_latency_ratio times its median latency")


DEFAULT_ARGS = {
    "owner": "tf-export",
    "retries": int(os.environ.get("TF_EXPORT_RETRIES", "2")),
    "retry_delay": timedelta(seconds=float(os.environ.get("TF_EXPORT_RETRY_DELAY_SECONDS", "60"))),
}


def model_dag(dag_id: str, model: str, schedule, **kwargs) -> DAG:
    """A DAG of ``model`` with what all of them share: no catch-up, one run at a time, the retries, the tags.

    Not registered by its ``with`` block: only the DAGs :func:`build_all` hands back (a config's
    DAGs once all of them were built) reach Airflow, never a part of a config that failed.
    """
    return DAG(dag_id=dag_id, schedule=schedule, start_date=START, catchup=False, max_active_runs=1,
               default_args=DEFAULT_ARGS, tags=["tf-export", model], auto_register=False, **kwargs)


# What Airflow accepts in a DAG id, in ASCII; a model's DAG ids are its config file's name behind a prefix.
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MODEL_NAME_RULE = "letters, digits, '_', '-' and '.'"
# Airflow's limit on a DAG id, less the longest prefix (export_after_training__).
MODEL_NAME_MAX = 250 - len("export_after_training__")


def check_model_name(file: Path) -> str:
    """The model a config file names (its name without .yaml), refused when it cannot be part of a DAG id.

    Refused rather than rewritten: two names rewritten alike (``ranker v2``,
    ``ranker+v2``) would give two configs one set of DAG ids.
    """
    from tf_export_pipeline.errors import ConfigError

    model = file.stem
    if not MODEL_NAME.fullmatch(model):
        raise ConfigError(f"config file name '{model}' cannot be part of a DAG id, which may hold only "
                          f"{MODEL_NAME_RULE} (rename the file, e.g. to "
                          f"'{re.sub(r'[^A-Za-z0-9_.-]+', '_', model).strip('_') or 'model'}{file.suffix}'): {file}")
    if len(model) > MODEL_NAME_MAX:
        raise ConfigError(f"config file name is {len(model)} characters long; DAG ids allow "
                          f"{MODEL_NAME_MAX} for it (rename the file): {file}")
    return model


def config_files(folder: Path = CONFIG_DIR) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def nightly(model: str, path: str, cfg) -> DAG:
    with model_dag(
        f"export_nightly__{model}",
        model,
        description=f"Export the newest new checkpoint of {model}, validate, publish, prune",
        schedule=cfg.airflow.schedule or None,
        params={"allow_regression": allow_regression_param()},
        doc_md=f"Config: `{path}`. Exports the newest complete checkpoint of `{cfg.training_dir}` unless it "
               f"has a version already (then every task is skipped), into `{cfg.export_base}`.",
    ) as dag:
        found = DiscoverCheckpointsOperator(task_id="discover", config_path=path)
        staged = ExportCheckpointOperator(task_id="export", config_path=path, checkpoint=found.output, pool=POOL)
        validated = ValidateExportOperator(task_id="validate", config_path=path, staged=staged.output,
                                           allow_regression=ALLOW_REGRESSION, pool=POOL)
        published = PublishVersionOperator(task_id="publish", config_path=path, validated=validated.output,
                                           outlets=[export_asset(cfg)])
        PruneVersionsOperator(task_id="prune", config_path=path, published=published.output)
    return dag


def after_training(model: str, path: str, cfg) -> DAG:
    limit = cfg.airflow.max_active_tis_per_dagrun
    with model_dag(
        f"export_after_training__{model}",
        model,
        description=f"Export {model}'s new checkpoints as soon as training announces one",
        schedule=[training_asset(cfg)],
        params={"checkpoint": Param(None, type=["null", "string"],
                                    description="prefix, name or step of the checkpoint to wait for"),
                "allow_regression": allow_regression_param()},
        user_defined_macros={"requested_checkpoint": requested_checkpoint},
        doc_md=f"Config: `{path}`. Runs on each event of the Asset `{training_asset(cfg).uri}`, or by hand "
               f"with conf `{{\"checkpoint\": PREFIX}}`.",
    ) as dag:
        wait = NewCheckpointSensor(
            task_id="wait_for_checkpoint",
            config_path=path,
            checkpoint="{{ requested_checkpoint(params, triggering_asset_events) }}",
            deferrable=True,
            poke_interval=POKE_SECONDS,
            timeout=WAIT_SECONDS,
            missing_grace=MISSING_GRACE_SECONDS,
        )
        pending = DiscoverCheckpointsOperator(task_id="list_new", config_path=path, select="new")

        @task_group(group_id="export_each")
        def export_each(checkpoint):
            staged = ExportCheckpointOperator(task_id="export", config_path=path, checkpoint=checkpoint,
                                              max_active_tis_per_dagrun=limit, pool=POOL)
            return ValidateExportOperator(task_id="validate", config_path=path, staged=staged.output,
                                          allow_regression=ALLOW_REGRESSION, max_active_tis_per_dagrun=limit,
                                          pool=POOL)

        validated = export_each.expand(checkpoint=pending.output)
        # One task publishes them all, in list order: the newest checkpoint is published last, so it is
        # the one served, whatever order the exports finished in. The checkpoints that validated are
        # published even if another failed; the run still fails (prune does not run). Each version
        # gets its own event for the export base's Asset, through the alias.
        publish = PublishVersionOperator(task_id="publish", config_path=path, validated=validated.output,
                                         outlets=[AssetAlias(f"tf_export__{model}__publish")],
                                         trigger_rule="all_done_min_one_success")
        prune = PruneVersionsOperator(task_id="prune", config_path=path, published=publish.output,
                                      trigger_rule="none_failed_min_one_success")
        wait >> pending
        [validated, publish] >> prune
    return dag


def backfill(model: str, path: str, cfg) -> DAG:
    limit = cfg.airflow.max_active_tis_per_dagrun
    versioning = BACKFILL_VERSIONING[cfg.versioning]
    with model_dag(
        f"export_backfill__{model}",
        model,
        description=f"Re-export a range of {model}'s historic checkpoints, {limit} at a time",
        schedule=None,
        render_template_as_native_obj=True,
        params={
            "from_step": Param(None, type=["null", "integer"], description="first step (inclusive)"),
            "to_step": Param(None, type=["null", "integer"], description="last step (inclusive)"),
            "versioning": Param(versioning, enum=list(VERSIONINGS),
                                description=f"the config's ({cfg.versioning})"
                                            + (", as checkpoint_time: timestamp would number history above the "
                                               "live version" if versioning != cfg.versioning else "")
                                            + "; another unit than the live version's is refused"),
            "chunk_size": Param(CHUNK_SIZE, type="integer", minimum=1,
                                description="checkpoints per export task: each task imports TensorFlow and "
                                            "traces the model once for its whole chunk"),
            "allow_outrank": Param(False, type="boolean",
                                   description="allow an older checkpoint above the live version"),
            "allow_regression": allow_regression_param(),
            "include_removed": Param(False, type="boolean",
                                     description="also export checkpoints whose versions retention removed"),
        },
        doc_md=f"Config: `{path}`. Exports every complete checkpoint with no version in the step range, "
               f"in chunks of `chunk_size` (one task each, at most {limit} at a time), then publishes them in "
               f"checkpoint order. Retention is not applied; a backfill that the next run's retention would "
               f"undo is refused up front.",
    ) as dag:
        listed = DiscoverCheckpointsOperator(task_id="list_checkpoints", config_path=path, select="pending",
                                             from_step="{{ params.from_step }}", to_step="{{ params.to_step }}",
                                             include_removed="{{ params.include_removed }}",
                                             allow_outrank="{{ params.allow_outrank }}",
                                             versioning="{{ params.versioning }}",
                                             chunk_size="{{ params.chunk_size }}")
        # A task per chunk, not per checkpoint: a task's process start, TensorFlow import, trace and
        # validation process cost more than exporting a checkpoint. Historic checkpoints: the metric gate
        # records their metric but does not hold them back.
        validated = ExportChunkOperator.partial(
            task_id="export_chunk", config_path=path, allow_regression=ALLOW_REGRESSION,
            max_active_tis_per_dagrun=limit, pool=POOL).expand(checkpoints=listed.output)
        # As after training: one task publishes them all in checkpoint order, whatever order the
        # chunks finished in, so history is numbered as it was trained.
        publish = PublishVersionOperator(task_id="publish", config_path=path, validated=validated.output,
                                         versioning="{{ params.versioning }}",
                                         allow_outrank="{{ params.allow_outrank }}",
                                         outlets=[AssetAlias(f"tf_export__{model}__backfill")],
                                         trigger_rule="all_done_min_one_success")

        @task(task_id="done", trigger_rule="none_failed")
        def done(published=None) -> int:
            """The run's verdict: a checkpoint that failed fails the run, though the others were published."""
            from airflow.sdk.exceptions import AirflowFailException

            records = published if isinstance(published, list) else [published] if published else []
            failed = [r for r in records if isinstance(r, dict) and r.get("status") == "failed"]
            if failed:
                raise AirflowFailException(f"{len(failed)} of {len(records)} checkpoints failed; first: "
                                           f"{failed[0].get('checkpoint')}: {failed[0].get('error')}")
            return sum(1 for r in records if isinstance(r, dict) and r.get("status") == "published")

        finished = done(publish.output)
        validated >> finished
    return dag


def promote(model: str, path: str, cfg) -> DAG:
    soak = cfg.airflow.soak_seconds
    with model_dag(
        f"export_promote__{model}",
        model,
        description=f"Move {model}'s serving labels: promote, roll back, or make a soaked canary stable",
        schedule=cfg.airflow.promote_schedule or None,
        render_template_as_native_obj=True,
        params={
            "version": Param(None, type=["null", "integer"],
                             description="the version to label; with rollback, the version to go back to "
                                         "(none: the previous stable). Neither this nor rollback: check the canary"),
            "label": Param("stable", type="string", pattern="^[a-zA-Z0-9_]+$", description="the label to move"),
            "rollback": Param(False, type="boolean", description="move stable back instead"),
        },
        doc_md=f"Config: `{path}`. Labels of `{cfg.serving.model_name}` in `{cfg.serving.model_config_file}`. "
               f"A run with `version` (and `label`) or `rollback` does that; any other run (the schedule: "
               f"{cfg.airflow.promote_schedule or 'none: by hand only'}) makes the canary stable once it has "
               f"been canary for {soak} s"
               + (f" and its `{cfg.gate.metric}` is not worse than stable's." if cfg.gate else "."),
    ) as dag:
        @task.branch(task_id="choose")
        def choose(params=None) -> str:
            """A run that names a version or asks for a rollback does that; any other checks the canary."""
            params = params or {}
            return "promote" if params.get("version") is not None or params.get("rollback") else "check_canary"

        chosen = choose()
        requested = PromoteVersionOperator(task_id="promote", config_path=path, version="{{ params.version }}",
                                       version_label="{{ params.label }}", rollback="{{ params.rollback }}",
                                       to="{{ params.version }}", outlets=[serving_asset(cfg)])
        soaked = CheckCanaryOperator(task_id="check_canary", config_path=path, soak_seconds=soak)
        promoted = PromoteVersionOperator(task_id="promote_canary", config_path=path, version=soaked.output,
                                          version_label="stable", outlets=[serving_asset(cfg)])
        chosen >> [requested, soaked]
        soaked >> promoted
    return dag


def finish(model: str, path: str, cfg) -> DAG:
    with model_dag(
        f"export_finish__{model}",
        model,
        description=f"Finish {model}'s promotions cut short on its object store",
        schedule=cfg.finish_schedule,
        doc_md=f"Config: `{path}`. On `{cfg.export_base}` a version is moved object by object; a process "
               f"killed during the move leaves it listed without `saved_model.pb`. This DAG finishes such a "
               f"move ({cfg.finish_schedule}), inside TF Serving's load retries, instead of at the next export.",
    ) as dag:
        FinishPublishesOperator(task_id="finish", config_path=path)
    return dag


def _parsing_bag():
    """The DagBag parsing this file, when a dag-processor (or ``airflow dags``) is parsing it; else None.

    Airflow records import errors per parsed file, and an error recorded under
    this file would mark every model's DAGs as broken; the bag is reached
    through the call stack so that a broken config gets an error of its own.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if any(c.__name__ == "DagBag" for c in type(candidate).__mro__) \
                and isinstance(getattr(candidate, "import_errors", None), dict):  # BundleDagBag too
            return candidate
        frame = frame.f_back
    return None


def report_config_error(file: Path, message: str, kind: str = "ConfigError") -> bool:
    """List ``message`` among the import errors, under the config's path. False when nothing is parsing."""
    bag = _parsing_bag()
    if bag is None:
        return False
    root = getattr(bag, "bundle_path", None) or getattr(bag, "dag_folder", None)
    path = str(file)
    if root:
        try:
            path = str(file.resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass  # a config folder outside the bundle: its absolute path
    bag.import_errors[path] = f"{kind}: {message}"
    return True


# The config key each DAG's schedule comes from, to name it when Airflow cannot read the schedule.
SCHEDULE_KEYS = {"nightly": "airflow.schedule", "promote": "airflow.promote_schedule",
                 "finish": "airflow.finish_schedule"}


def build_model(file: Path, taken: dict[str, Path]) -> dict[str, DAG]:
    """The DAGs of one config file, checked as Airflow will check them; raises if any cannot be built.

    ``taken`` maps the DAG ids of the configs built before to their files.
    """
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.errors import ConfigError

    model = check_model_name(file)
    cfg = load_config(str(file))
    builds = [nightly, after_training, backfill]
    if cfg.serving is not None and cfg.serving.policy == "labels":
        builds.append(promote)
    if cfg.finish_schedule is not None:
        builds.append(finish)
    dags: dict[str, DAG] = {}
    for build in builds:
        dag = build(model, str(file), cfg)
        if dag.dag_id in taken:
            raise ConfigError(f"DAG id {dag.dag_id} is taken by the config {taken[dag.dag_id]} "
                              f"(two files of one name: keep one): {file}")
        try:
            dag.validate()
        except Exception as err:
            key = SCHEDULE_KEYS.get(build.__name__)
            if key and "Timetable" in type(err).__name__:
                value = getattr(cfg.airflow, key.split(".", 1)[1])
                raise ConfigError(f"Airflow cannot read {key} {value!r} ({_one_line(err)}): {file}") from None
            raise
        dags[dag.dag_id] = dag
    return dags


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def build_all(folder: Path = CONFIG_DIR) -> dict[str, DAG]:
    """Every config's DAGs. A config that fails in any way, its DAG ids among them, is an import error of
    its own (under its path) and leaves the other configs' DAGs as they are."""
    from tf_export_pipeline.errors import ConfigError

    dags: dict[str, DAG] = {}
    taken: dict[str, Path] = {}
    for file in config_files(folder):
        try:
            built = build_model(file, taken)
        except Exception as err:  # noqa: BLE001 - whatever breaks one config must not take the others down
            kind = "ConfigError" if isinstance(err, ConfigError) else type(err).__name__
            message = str(err) if isinstance(err, ConfigError) else \
                f"the DAGs of this config cannot be built ({_one_line(err)}): {file}"
            if not report_config_error(file, message, kind):
                log.debug("no DAGs for %s: %s", file, message)  # a task's own parse: the UI has it already
            continue
        dags.update(built)
        taken.update({dag_id: file for dag_id in built})
    return dags


globals().update(build_all())
