"""What every operator over a pipeline stage shares: the config, its connection, skips and errors.

No secret leaves a task: the config's storage options and the connection's
fields are registered for redaction when they are read (:func:`load`), errors
are raised without them (:func:`stage_errors`), and what goes to XCom is
redacted (:func:`xcom`).

Example::

    from tf_export_pipeline.operators.base import load, stage_errors, xcom
    from tf_export_pipeline import stages

    cfg = load("/opt/airflow/dags/configs/demo.yaml", "google_cloud_default")
    with stage_errors():
        result = stages.stage_prune(cfg, dry_run=True)
    print(xcom(result))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from tf_export_pipeline.operators.connections import ConnectionOptionsError
from tf_export_pipeline.operators.hooks import ExportHook
from tf_export_pipeline.records import nothing_to_do
from tf_export_pipeline.redaction import redact, redact_value, scrub_exception


def load(config_path: str, conn_id: str | None = None):
    """The config at ``config_path``, with the storage options of its connection."""
    return ExportHook(config_path, conn_id).config


def checkpoint_ref(checkpoint: Any) -> str | None:
    """A checkpoint as a stage takes it: a record from discovery or the sensor, or a prefix, name or step."""
    if isinstance(checkpoint, dict):
        return checkpoint.get("prefix") or checkpoint.get("checkpoint")
    if checkpoint in (None, "", "None"):
        return None
    return str(checkpoint)


def xcom(value: Any) -> Any:
    """``value`` as it may go to XCom: every string in it redacted."""

    return redact_value(value)


def as_int(value: Any) -> int | None:
    """A rendered template or a param as an optional int ("", "None" and None are None)."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "null")):
        return None
    return int(value)


def as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@contextlib.contextmanager
def stage_errors() -> Iterator[None]:
    """Errors no retry can mend fail the task at once; the rest are left to the retries.

    Errors marked ``permanent`` (a bad config or contract, an unknown factory,
    a checkpoint of another model, a model that failed validation, staging
    that is gone, a version that would break serving order) and a connection
    that is missing or malformed end the task without retrying; storage and
    other errors are raised as they are, so Airflow retries the task (each
    stage is idempotent).

    Neither kind carries a secret: an error that shows one (in its message or
    in a cause's, such as a URL with ``access_token=``) is replaced by a
    redacted stand-in, raised outside the ``except`` block so that the
    original is not attached as its context either.
    """
    from airflow.sdk.exceptions import AirflowNotFoundException


    try:
        yield
        return
    except Exception as err:  # noqa: BLE001 - re-raised, as it is when it shows no secret
        failure: BaseException
        cause: BaseException | None
        if getattr(err, "permanent", False) or isinstance(err, (ConnectionOptionsError, AirflowNotFoundException)):
            failure, cause = AirflowFailException(redact(str(err))), scrub_exception(err)
        else:
            safe = scrub_exception(err)
            if safe is err:
                raise
            failure, cause = safe, None
    raise failure from cause


class PipelineOperator(BaseOperator):
    """Base of the stage operators: ``config_path`` (templated) and an optional connection id.

    ``conn_id`` overrides the config's ``airflow.conn_id``. Nothing is read in
    ``__init__``; the config is loaded when the task runs.
    """

    template_fields: tuple[str, ...] = ("config_path",)
    ui_color = "#e8f0fe"

    def __init__(self, *, config_path: str, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_path = config_path
        self.conn_id = conn_id

    @cached_property
    def hook(self) -> ExportHook:
        """Made when the task runs, after ``config_path`` is rendered."""
        return ExportHook(self.config_path, self.conn_id)

    def config(self):
        with stage_errors():
            return self.hook.config

    def skip_with(self, context: Context, record: dict, reason: str) -> None:
        """Keep ``record`` as the task's XCom, then end the task as skipped."""

        context["ti"].xcom_push(key="return_value", value=xcom(record))
        raise AirflowSkipException(redact(reason))

    def pass_through(self, context: Context, record: Any) -> None:
        """Skip when the stage before had nothing for this one (no new checkpoint, already published, gated)."""
        if nothing_to_do(record):
            self.skip_with(context, self.hook.public(record), f"{record['status']}: {record.get('checkpoint')}")
