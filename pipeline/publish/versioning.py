"""Version numbering: the first number a publish tries under each policy, and training order.

Example::

    from tf_export_pipeline.publish.versioning import training_order
    assert training_order(300, 1700000000.0) < training_order(400, 1699999999.0)
"""

from __future__ import annotations

from typing import Any

from tf_export_pipeline.checkpoints import Checkpoint
from tf_export_pipeline.errors import PublishError


def first_candidate(policy: str, checkpoint: Checkpoint, now: float, live: int | None) -> int:
    """The first version number a policy proposes for ``checkpoint``."""
    if policy == "timestamp":
        start = int(now)
        return max(start, live + 1) if live is not None else start
    if policy == "checkpoint_time":
        if checkpoint.written_at is None:
            raise PublishError(f"checkpoint has no write time for versioning 'checkpoint_time': {checkpoint.prefix}")
        return int(checkpoint.written_at)
    if policy == "step":
        if checkpoint.step is None:
            raise PublishError(f"checkpoint name carries no step for versioning 'step': {checkpoint.prefix}")
        return int(checkpoint.step)
    raise PublishError(f"unknown versioning policy '{policy}'")


def training_order(step: Any, written_at: Any) -> tuple[int, float]:
    """How checkpoints are ordered in training, as discovery orders them: step, then write time."""
    return (int(step) if step is not None else -1, float(written_at) if written_at is not None else 0.0)
