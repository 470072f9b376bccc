"""A task's part in the run records and metrics: who is running (its DAG, run, task, try, map index and
OpenLineage run id) and Airflow's own stats as the metrics' sink.

:func:`task_scope` binds both around a stage call made inside a running task,
and collects the stages' outcomes for the operator's OpenLineage facets. Outside
a task (a hook used from a script) it binds nothing.

Example::

    from tf_export_pipeline.operators.telemetry import task_scope
    with task_scope() as outcomes:
        stages.stage_prune(cfg)
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

from tf_export_pipeline import metrics, observe, run_info


class AirflowStats:
    """:class:`tf_export_pipeline.metrics.Sink` over Airflow's stats, which ``[metrics]`` configures
    (StatsD, OpenTelemetry or none)."""

    def incr(self, name: str, count: int = 1) -> None:
        from airflow.sdk.observability import stats

        stats.incr(name, count=count)

    def timing(self, name: str, millis: float) -> None:
        from airflow.sdk.observability import stats

        stats.timing(name, millis)

    def gauge(self, name: str, value: float) -> None:
        from airflow.sdk.observability import stats

        stats.gauge(name, value)


def openlineage_ids(ti: Any) -> tuple[str | None, str | None, str | None]:
    """(run id, job namespace, job name) the OpenLineage provider gives this task instance's events; Nones
    without the provider."""
    try:
        from airflow.providers.openlineage.plugins.macros import (
            lineage_job_name,
            lineage_job_namespace,
            lineage_run_id,
        )
    except ImportError:
        return None, None, None
    return str(lineage_run_id(ti)), lineage_job_namespace(), lineage_job_name(ti)


def run_of(ti: Any) -> run_info.RunInfo:
    """The run record of a running task instance."""
    ol_run, namespace, job = openlineage_ids(ti)
    map_index = getattr(ti, "map_index", None)
    return run_info.RunInfo(kind=run_info.AIRFLOW, openlineage_run_id=ol_run, started_at=time.time(),
                            openlineage_namespace=namespace, openlineage_job=job, dag_id=ti.dag_id,
                            run_id=ti.run_id, task_id=ti.task_id, try_number=getattr(ti, "try_number", None),
                            map_index=map_index if isinstance(map_index, int) else None,
                            host=socket.gethostname())


@contextlib.contextmanager
def task_scope() -> Iterator[list[observe.StageOutcome]]:
    """Inside a running task: the task's run and Airflow's stats bound, the stages' outcomes collected."""
    from airflow.sdk import get_current_context

    try:
        ti = get_current_context()["ti"]
    except Exception:  # noqa: BLE001 - not in a running task: nothing to bind
        ti = None
    if ti is None:
        with observe.watching() as outcomes:
            yield outcomes
        return
    with run_info.bound(run_of(ti)), metrics.bound(AirflowStats()), observe.watching() as outcomes:
        yield outcomes
