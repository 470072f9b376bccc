"""The records stages hand each other (an Airflow task to the next through XCom, ``--json`` to a script).

A record is JSON: a mapping with a :class:`Status`, the checkpoint it is about,
and what the stage added (staging, the validation report, the version).
:class:`StageRecord` types the fields every stage shares; stage functions take
and return the JSON form, so a record survives XCom unchanged.

Example::

    from tf_export_pipeline.records import StageRecord, Status
    record = StageRecord(Status.STAGED, checkpoint="/data/train/ckpt-300", step=300,
                         extra={"staging": "/srv/models/m/temp-1700000300-ab12cd34"})
    assert StageRecord.from_json(record.to_json()) == record
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


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


@dataclass
class StageRecord:
    """A stage's result: the shared fields, typed, and the stage's own in ``extra``."""

    status: Status
    checkpoint: str | None = None
    step: int | None = None
    version: int | None = None
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "version": self.version, "path": self.path,
                "checkpoint": self.checkpoint, "step": self.step, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRecord:
        extra = {k: v for k, v in data.items() if k not in PUBLIC_KEYS}
        return cls(Status(data["status"]), data.get("checkpoint"), data.get("step"), data.get("version"),
                   data.get("path"), extra)


def status_of(record: Any) -> Status | None:
    """The status of a record in its JSON form (None for anything else, e.g. a bare checkpoint name)."""
    if isinstance(record, dict) and record.get("status") in Status._value2member_map_:
        return Status(record["status"])
    return None


def nothing_to_do(record: Any) -> bool:
    return status_of(record) in NOTHING_TO_DO
