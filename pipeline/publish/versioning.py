"""Version numbering: the first number a publish tries under each policy, and training order.

Example::

    from tf_export_pipeline.publish.versioning import training_order
    assert training_order(300, 1700000000.0) < training_order(400, 1699999999.0)
"""

from __future__ import annotations

from typing import Any

from tf_export_pipeline.checkpoints import Checkpoint
from tf_export_pipeline.errors import ConfigError, PublishError

#: TF Serving reads a version directory's name as an int64 and passes over any other name.
MAX_VERSION = 2**63 - 1

_SOURCE = {"timestamp": "the export time", "checkpoint_time": "its write time", "step": "its step"}


class VersionOutOfRange(ConfigError, PublishError):
    """A version number TF Serving cannot read (exit 2: this checkpoint never gets one under the
    policy, whatever the retries); a backfill records it for the checkpoint and goes on."""


def first_candidate(policy: str, checkpoint: Checkpoint, now: float, live: int | None) -> int:
    """The first version number a policy proposes for ``checkpoint``; one TF Serving can read, or
    :class:`VersionOutOfRange`."""
    if policy == "timestamp":
        start = int(now)
        start = max(start, live + 1) if live is not None else start
    elif policy == "checkpoint_time":
        if checkpoint.written_at is None:
            raise PublishError(f"checkpoint has no write time for versioning 'checkpoint_time': {checkpoint.prefix}")
        start = int(checkpoint.written_at)
    elif policy == "step":
        if checkpoint.step is None:
            raise PublishError(f"checkpoint name carries no step for versioning 'step': {checkpoint.prefix}")
        start = int(checkpoint.step)
    else:
        raise PublishError(f"unknown versioning policy '{policy}'")
    require_in_range(start, policy, checkpoint)
    return start


def require_in_range(version: int, policy: str, checkpoint: Checkpoint) -> None:
    """Refuse a version outside TF Serving's range, naming the version, the policy and the checkpoint."""
    if 0 <= version <= MAX_VERSION:
        return
    others = " or ".join(f"'{p}'" for p in _SOURCE if p != policy)
    raise VersionOutOfRange(
        f"version {version} is outside the range TF Serving reads (0 to 2**63-1), so it would never be "
        f"served; versioning '{policy}' numbers {checkpoint.name} by {_SOURCE.get(policy, 'its policy')} "
        f"(use versioning {others}): {checkpoint.prefix}")


def training_order(step: Any, written_at: Any) -> tuple[int, float]:
    """How checkpoints are ordered in training, as discovery orders them: step, then write time."""
    return (int(step) if step is not None else -1, float(written_at) if written_at is not None else 0.0)
