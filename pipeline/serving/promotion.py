"""A promotion or rollback as a command runs it: the label moved, and every change it made, to report.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl, move_label
    control = ServingControl.from_config(load_config("serving.yaml"))
    result, changes = move_label(control, version=1732147200, label="canary", now=True)
    print(result["status"], result["previous"], "->", result["version"])     # promoted 1732060800 -> 1732147200
"""

from __future__ import annotations

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.serving.control import ServingControl
from tf_export_pipeline.serving.labels import STABLE


def move_label(control: ServingControl, *, version: int | None, label: str = STABLE, rollback: bool = False,
               to: int | None = None, now: bool = False) -> tuple[dict, list[dict]]:
    """Point ``label`` at ``version``, or roll ``stable`` back (to ``to``, or to the previous stable).

    Returns the result (``status`` ``promoted`` or ``rolled_back``, the label,
    its version before and after, every label after) and one change per label
    that moved (none: it pointed there already).
    """
    label = STABLE if rollback else (str(label or "").strip() or STABLE)
    if rollback:
        rec = control.rollback(to=to, now=now)  # no earlier stable: a ConfigError
    else:
        if version is None:
            raise ConfigError(f"no version to promote was given: {control.cfg.source or control.cfg.export_base}")
        rec = control.promote(version, label=label, now=now)
    before, after = rec.get("labels_before") or {}, rec.get("labels_after") or {}
    result = {"status": "rolled_back" if rollback else "promoted", "command": rec.get("command"),
              "model": rec.get("model"), "label": label, "version": after.get(label),
              "previous": before.get(label), "labels": after, "versions": rec.get("versions_after"),
              "file": rec.get("file")}
    changes = [{**result, "label": name, "version": after.get(name), "previous": before.get(name)}
               for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
    return result, changes
