"""Who made a version: the ``run`` section of a manifest and of a ledger entry.

A run is an Airflow task (its DAG, run, task, try and map index) or a command
line (host, user, command), each with the OpenLineage run id its events carry,
so a version found on disk leads to the events and logs of the run behind it.

Stages read the run in force with :func:`current`; whoever starts the work
names it with :func:`bound` (the CLI per command, the Airflow hook per task).
Outside both, the run is this process as a command line.

Example::

    from tf_export_pipeline.run_info import bound, cli_run, current
    with bound(cli_run(["run", "--config", "m.yaml"])):
        print(current().summary())   # e.g. "cli: alice@build-7 tf-export run --config m.yaml"
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import getpass
import os
import secrets
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from tf_export_pipeline.redaction import redact

# Final: each keeps its literal type, the one RunInfo.kind takes
AIRFLOW: Final = "airflow"
CLI: Final = "cli"
RUN_KEY = "run"  # the section's name in a manifest, a ledger entry and a removal record
# What Airflow puts in the environment of a process a task starts (a BashOperator running tf-export).
AIRFLOW_ENV = {"dag_id": "AIRFLOW_CTX_DAG_ID", "run_id": "AIRFLOW_CTX_DAG_RUN_ID",
               "task_id": "AIRFLOW_CTX_TASK_ID", "try_number": "AIRFLOW_CTX_TRY_NUMBER"}
# The parent run the OpenLineage integrations hand a child process: "namespace/job name/run id".
PARENT_ENV, ROOT_PARENT_ENV = "OPENLINEAGE_PARENT_ID", "OPENLINEAGE_ROOT_PARENT_ID"
COMMAND_NAME = "tf-export"
_SUMMARY_MAX = 200  # object metadata (S3: 2 KiB in all) carries the summary beside the ledger fields


def new_run_id(now: float | None = None) -> str:
    """A UUID version 7 (time-ordered, as OpenLineage asks of run ids)."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(secrets.token_bytes(10), "big")
    value = (millis << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


@dataclass(frozen=True)
class ParentRun:
    """The OpenLineage run a command runs inside (an Airflow task that started it)."""

    namespace: str
    job: str
    run_id: str
    root_namespace: str | None = None
    root_job: str | None = None
    root_run_id: str | None = None

    @classmethod
    def parse(cls, value: str | None, root: str | None = None) -> ParentRun | None:
        """``namespace/job/run id`` (the OpenLineage provider's ``lineage_parent_id`` macro), or None."""
        parts = (value or "").split("/")
        if len(parts) != 3 or not all(parts):
            return None
        root_parts = (root or "").split("/")
        if len(root_parts) != 3 or not all(root_parts):
            return cls(*parts)  # no root run
        return cls(*parts, *root_parts)


@dataclass(frozen=True)
class RunInfo:
    """The run that made a version (see the module's docstring); ``to_json`` is what records carry."""

    kind: Literal["airflow", "cli"]
    openlineage_run_id: str | None  # None in a task without Airflow's OpenLineage provider
    started_at: float
    openlineage_namespace: str | None = None
    openlineage_job: str | None = None
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    try_number: int | None = None
    map_index: int | None = None
    host: str | None = None
    user: str | None = None
    command: str | None = None
    config_file: str | None = None
    airflow: dict[str, Any] | None = None  # the Airflow task a command line ran inside
    parent: ParentRun | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.parent is not None:
            out["parent"] = {k: v for k, v in dataclasses.asdict(self.parent).items() if v is not None}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RunInfo | None:
        if not isinstance(data, dict) or data.get("kind") not in (AIRFLOW, CLI):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        parent = data.get("parent")
        values["parent"] = ParentRun(**parent) if isinstance(parent, dict) else None
        values.setdefault("openlineage_run_id", None)
        values.setdefault("started_at", 0.0)
        return cls(**values)

    def with_config(self, path: str | None) -> RunInfo:
        return dataclasses.replace(self, config_file=path) if path and not self.config_file else self

    def summary(self) -> str:
        """One line naming the run (what ``discover`` prints, and object metadata carries)."""
        return _summary_line(self.to_json())


def summary_of(run: dict[str, Any] | str | None) -> str | None:
    """One line of a run section (or a summary already made, as object metadata carries it)."""
    if isinstance(run, str) or run is None:
        return run
    return _summary_line(run)


def _summary_line(run: dict[str, Any]) -> str:
    if run.get("kind") == AIRFLOW:
        where = f"{run.get('dag_id')}/{run.get('run_id')}/{run.get('task_id')}"
        if run.get("map_index") not in (None, -1):
            where += f"[{run['map_index']}]"
        text = f"airflow: {where} try {run.get('try_number')}"
    else:
        text = f"cli: {run.get('user')}@{run.get('host')} {run.get('command') or COMMAND_NAME}"
    text = text.encode("ascii", "replace").decode("ascii")
    return text if len(text) <= _SUMMARY_MAX else text[:_SUMMARY_MAX - 3] + "..."


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid, as in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def cli_run(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> RunInfo:
    """This process as a command line: ``tf-export ARGV`` on this host, by this user, with a new
    OpenLineage run id; inside an Airflow task, that task and its OpenLineage run as the parent."""
    env = os.environ if environ is None else environ
    args = list(sys.argv[1:] if argv is None else argv)
    airflow: dict[str, Any] = {key: env.get(name) for key, name in AIRFLOW_ENV.items() if env.get(name)}
    if "try_number" in airflow:
        airflow["try_number"] = _int(airflow["try_number"])
    now = time.time()
    return RunInfo(kind=CLI, openlineage_run_id=new_run_id(now), started_at=now, host=socket.gethostname(),
                   user=_user(), command=redact(shlex.join([COMMAND_NAME, *args])), airflow=airflow or None,
                   parent=ParentRun.parse(env.get(PARENT_ENV), env.get(ROOT_PARENT_ENV)))


_CURRENT: contextvars.ContextVar[RunInfo | None] = contextvars.ContextVar("tf_export_run", default=None)
_PROCESS: list[RunInfo] = []


def current() -> RunInfo:
    """The run in force: the one bound by the caller, else this process as a command line."""
    run = _CURRENT.get()
    if run is not None:
        return run
    if not _PROCESS:
        _PROCESS.append(cli_run())
    return _PROCESS[0]


def section(exported_by: dict[str, Any] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """The ``run`` section of a publish: the run in force, with the config file it used, and the run that
    exported the model when that was another (an Airflow export task, perhaps mapped, before its publish
    task)."""
    run = current().with_config(config_file).to_json()
    if isinstance(exported_by, dict):
        other = {k: v for k, v in exported_by.items() if k not in ("export", "config_file")}
        if other != {k: v for k, v in run.items() if k != "config_file"}:
            run["export"] = other
    return run


@contextlib.contextmanager
def bound(run: RunInfo) -> Iterator[RunInfo]:
    """Make ``run`` the one in force for the stages called inside."""
    token = _CURRENT.set(run)
    try:
        yield run
    finally:
        _CURRENT.reset(token)
