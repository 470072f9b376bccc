"""The typed records stages hand each other, and their one JSON form (XCom, ``--json``, a backfill's resume file).

Example::

    from tf_export_pipeline.records import ExportRecord, Status, from_json, to_json
    record = ExportRecord(Status.STAGED, checkpoint="/data/train/ckpt-300", step=300,
                          staging="/srv/models/m/temp-1700000300-ab12cd34")
    assert from_json(to_json(record)) == record

Stage functions take and return these dataclasses; only the edges turn them
into JSON and back, through :func:`to_json` and :func:`from_json`: an Airflow
task's return value and the next task's argument, the CLI's ``--json``
(:func:`public`), a backfill task's resume file. Every record names its
:class:`Status`, the checkpoint it is about (path and step) and, once there is
one, the version and its path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the checkpoints package loads the storage backends, which DAG parsing must not
    from tf_export_pipeline.checkpoints.checkpoint import Checkpoint


class Status(str, Enum):
    """Where a checkpoint's export stands; the value is what JSON carries."""

    NEW = "new"                              # found, not exported yet
    NO_NEW_CHECKPOINT = "no_new_checkpoint"  # nothing to export
    SKIPPED = "skipped"                      # published already (by an earlier run or another process)
    GATED = "gated"                          # held back by the metric gate
    STAGED = "staged"                        # exported into staging
    VALIDATED = "validated"                  # staging passed validation
    PUBLISHED = "published"                  # a version of its own
    ROLLED_FORWARD = "rolled_forward"        # a publish cut short, finished by this one
    FAILED = "failed"                        # this checkpoint failed (a backfill goes on)

    def __str__(self) -> str:
        return self.value


# Records with one of these carry nothing for the next stage to do.
NOTHING_TO_DO = frozenset({Status.SKIPPED, Status.NO_NEW_CHECKPOINT, Status.GATED})

# What every ``--json`` record and task result names; the rest is stage-specific.
PUBLIC_KEYS = ("status", "version", "path", "checkpoint", "step")

# What a gated record names besides: the metric, its value, and the live version's.
GATED_KEYS = ("metric", "value", "live_value", "live_version")

# What ``--json`` adds to a publish when it is there: the serving labels set (or why none) and a gate warning.
PUBLIC_EXTRAS = ("labels", "serving_error", "gate_warning")


@dataclass
class StageRecord:
    """What every record shares: its status, its checkpoint (path and step), its version and that version's path.

    ``gate`` is the metric gate's verdict (a gated record's JSON names its
    metric and both values); ``error`` the one line a failed checkpoint
    reports.
    """

    status: Status
    checkpoint: str | None = None
    step: int | None = None
    version: int | None = None
    path: str | None = None
    gate: dict[str, Any] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    @property
    def nothing_to_do(self) -> bool:
        return self.status in NOTHING_TO_DO

    def shared(self) -> dict[str, Any]:
        """The fields every record has, for making a record of another kind about the same checkpoint."""
        return {"status": self.status, "checkpoint": self.checkpoint, "step": self.step, "version": self.version,
                "path": self.path, "gate": self.gate, "error": self.error}


@dataclass
class Discovered:
    """A checkpoint as discovery found it, and what the export base knows of it under this config.

    ``version`` is the whole version it was published to (None: none yet);
    ``committed`` says its publish was committed but its version is not
    there (killed before its promotion: exporting it finishes the publish);
    ``removed`` (``version``, ``removed_at``) that retention removed its
    version; ``run`` names in one line the run that published it.
    """

    checkpoint: Checkpoint
    ledger_key: str | None = None
    version: int | None = None
    run: str | None = None
    committed: bool = False
    removed: dict[str, Any] | None = None

    @property
    def prefix(self) -> str:
        return self.checkpoint.prefix

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def step(self) -> int | None:
        return self.checkpoint.step

    @property
    def complete(self) -> bool:
        return self.checkpoint.complete


@dataclass
class ExportRecord(StageRecord):
    """A checkpoint on its way through export and validation to the publisher.

    Export makes it ``staged`` (``staging`` and ``work`` are the URLs of its
    SavedModel and of its samples and file list; ``checkpoint_info`` the
    checkpoint as discovery saw it; ``exported_by`` the run that exported it);
    validation makes it ``validated`` and adds its report. ``gated``,
    ``skipped`` and ``published`` (a publish cut short, finished) come straight
    from export. ``timings`` are each stage's seconds; ``resumed`` marks a
    record a backfill task's retry took from the try before.
    """

    ledger_key: str | None = None
    staging: str | None = None
    work: str | None = None
    checkpoint_info: Checkpoint | None = None
    exported_at: float | None = None
    export_seconds: float | None = None
    exported_by: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    resumed: bool | None = None


@dataclass
class PublishRecord(StageRecord):
    """What publishing did: the version it claimed (``claim_attempts`` tries), the model's size, the serving
    labels it set (or ``serving_error``, why none), retention's removals after a run (``pruned``, or
    ``prune_error``), and the stages' ``timings``."""

    claim_attempts: int | None = None
    model_size: dict[str, Any] | None = None
    gate_warning: str | None = None
    labels: dict[str, int] | None = None
    serving_error: str | None = None
    serving_advice: str | None = None
    pruned: list[int] | None = None
    prune_error: str | None = None
    timings: dict[str, float] | None = None

    @classmethod
    def passed_on(cls, record: StageRecord, **changes: Any) -> PublishRecord:
        """``record`` as the publisher passes it on, unpublished (nothing to do, or failed before)."""
        return cls(**{**record.shared(), "timings": getattr(record, "timings", None), **changes})


Record = TypeVar("Record", bound=StageRecord)


# -- the JSON edge ------------------------------------------------------------------

def to_json(record: StageRecord | Discovered) -> dict[str, Any]:
    """The JSON form of a record (what XCom carries and a resume file keeps); see :func:`from_json`."""
    if isinstance(record, Discovered):
        return {**record.checkpoint.to_dict(), "ledger_key": record.ledger_key, "version": record.version,
                "run": record.run, "committed": record.committed, "removed": record.removed}
    out: dict[str, Any] = {"status": record.status.value, "version": record.version, "path": record.path,
                           "checkpoint": record.checkpoint, "step": record.step}
    if record.status == Status.GATED:
        gate = record.gate or {}
        out.update({k: gate.get(k) for k in GATED_KEYS})
    for f in dataclasses.fields(record):
        if f.name in out:
            continue
        value = getattr(record, f.name)
        if f.name == "gate" and not isinstance(record, ExportRecord):
            continue  # past the publisher a gate's verdict is its gated keys
        if value is None and not (f.name == "gate" and getattr(record, "staging", None) is not None):
            continue  # a staged record names its gate verdict even when there was no gate
        out[f.name] = value.to_dict() if f.name == "checkpoint_info" else value
    return out


def from_json(data: dict[str, Any], kind: type[Record] = ExportRecord) -> Record:  # type: ignore[assignment]
    """A record of ``kind`` from its JSON form; keys ``kind`` has no field for are left out."""
    from tf_export_pipeline.checkpoints.checkpoint import Checkpoint

    names = {f.name for f in dataclasses.fields(kind)}
    values = {k: v for k, v in data.items() if k in names}
    if isinstance(values.get("checkpoint_info"), dict):
        values["checkpoint_info"] = Checkpoint(**values["checkpoint_info"])
    return kind(**values)


def discovered_from_json(data: dict[str, Any]) -> Discovered:
    """A :class:`Discovered` from its JSON form (:func:`to_json`)."""
    from tf_export_pipeline.checkpoints.checkpoint import Checkpoint

    names = [f.name for f in dataclasses.fields(Checkpoint)]
    ckpt = Checkpoint(**{n: data[n] for n in names if n in data})
    return Discovered(ckpt, data.get("ledger_key"), data.get("version"), data.get("run"),
                      bool(data.get("committed")), data.get("removed"))


def is_discovery_json(data: Any) -> bool:
    """Whether ``data`` is a discovery record's JSON form (it names every field of a checkpoint)."""
    from tf_export_pipeline.checkpoints.checkpoint import Checkpoint

    return isinstance(data, dict) and all(f.name in data for f in dataclasses.fields(Checkpoint)
                                          if f.default is dataclasses.MISSING
                                          and f.default_factory is dataclasses.MISSING)


def public(record: StageRecord | dict[str, Any]) -> dict[str, Any]:
    """The ``tf-export run --json`` record and an Airflow run's summary, from a record typed or in JSON.

    A gated run also names the metric and both values; a publish under a
    ``serving:`` section the labels it set, or why it set none; a publish
    whose metric could not be compared with the live version's says why. A
    publish where TF Serving may meet a partial version carries
    ``serving_advice``, which the CLI prints as a warning, not in the record.
    """
    full = to_json(record) if isinstance(record, StageRecord) else record
    keys = PUBLIC_KEYS + GATED_KEYS if full.get("status") == Status.GATED.value else PUBLIC_KEYS
    return {k: full.get(k) for k in keys} | {k: full[k] for k in PUBLIC_EXTRAS if k in full}


def status_of(record: Any) -> Status | None:
    """The status of a record, typed or in its JSON form (None for anything else, e.g. a checkpoint's name)."""
    if isinstance(record, StageRecord):
        return record.status
    if isinstance(record, dict) and record.get("status") in Status._value2member_map_:
        return Status(record["status"])
    return None


def nothing_to_do(record: Any) -> bool:
    return status_of(record) in NOTHING_TO_DO


def json_of(result: Any) -> Any:
    """A stage's result (or what it was given) as JSON, for readers of any stage's outcome (metrics, run
    records, lineage); a list item by item, anything else as it is."""
    if isinstance(result, (StageRecord, Discovered)):
        return to_json(result)
    if isinstance(result, list):
        return [json_of(item) for item in result]
    return result


__all__ = ["Status", "StageRecord", "Discovered", "ExportRecord", "PublishRecord", "NOTHING_TO_DO", "PUBLIC_KEYS",
           "to_json", "from_json", "discovered_from_json", "is_discovery_json", "public", "status_of",
           "nothing_to_do", "json_of"]
