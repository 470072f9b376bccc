"""The labels of a model's entry: ``stable`` and ``canary``, and the version a rollback goes back to.

Example::

    from tf_export_pipeline.serving.labels import previous_stable
    history = [{"command": "promote", "labels_before": {}, "labels_after": {"stable": 1}},
               {"command": "promote", "labels_before": {"stable": 1}, "labels_after": {"stable": 2}}]
    assert previous_stable(history, current=2) == 1

Under ``policy: labels`` the entry serves a ``specific`` list of versions with
``version_labels``: clients address ``/v1/models/<name>/labels/<label>``. A
publish labels its version ``canary`` (and ``stable`` when nothing is stable
yet); a promotion points a label at a whole version; a rollback points
``stable`` back at the stable version before it, read from the history.
"""

from __future__ import annotations

import re

STABLE, CANARY = "stable", "canary"
LABEL_PATTERN = re.compile(r"^[a-zA-Z0-9_]+$")


def previous_stable(records: list[dict], current: int | None) -> int | None:
    """The stable version before ``current`` in the history ``records`` (oldest first), skipping those
    rolled back from; None when there is none."""
    stack: list[int] = []
    for rec in records:
        before, after = (rec.get("labels_before") or {}).get(STABLE), (rec.get("labels_after") or {}).get(STABLE)
        if after is None or after == before:
            continue
        if rec.get("command") == "rollback" and stack and stack[-1] == before:
            stack.pop()
            if not stack or stack[-1] != after:
                stack.append(after)
        else:
            if not stack and before is not None:
                stack.append(before)
            stack.append(after)
    if current is not None and stack and stack[-1] == current and len(stack) >= 2:
        return stack[-2]
    return None
