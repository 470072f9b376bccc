"""Whether the canary has soaked long enough, and held its metric, to become stable.

The promote DAG's scheduled check (``export_promote__<model>``) asks this
after each interval; a ``ready`` verdict is then carried out by
:meth:`tf_export_pipeline.serving.ServingControl.promote`. Nothing here writes.

Example::

    from tf_export_pipeline.canary import soak_verdict
    from tf_export_pipeline.config import load_config

    verdict = soak_verdict(load_config("serving.yaml"), soak_seconds=86400)
    print(verdict["status"], verdict["reason"])   # ready | soaking | held | ...
"""

from __future__ import annotations

import time

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.gate import GateError, compare, read_metric
from tf_export_pipeline.publish import Publisher
from tf_export_pipeline.serving import CANARY, STABLE, ServingControl

#: Verdicts: only ``ready`` leads to a promotion.
READY, SOAKING, HELD, NO_CANARY, ALREADY_STABLE, WAS_STABLE = (
    "ready", "soaking", "held", "no_canary", "already_stable", "was_stable")


def canary_since(history: list[dict], canary: int) -> float | None:
    """When the label ``canary`` last moved to ``canary`` (from the history), or None."""
    for rec in reversed(history):
        if (rec.get("labels_after") or {}).get("canary") == canary and \
                (rec.get("labels_before") or {}).get("canary") != canary:
            return rec.get("at")
    return None


def stable_since(history: list[dict], version: int, since: float) -> bool:
    """Whether ``version`` was made stable at or after ``since`` (promoted, then maybe rolled back)."""
    return any((rec.get("labels_after") or {}).get("stable") == version and (rec.get("at") or 0) >= since
               for rec in history)


def metric_of(cfg, publisher, version: int) -> float | None:
    """The gate metric of a published version: read again from the gate's source for its checkpoint
    (a value updated during the soak counts), else the value recorded at publish time."""

    manifest = publisher.manifest(version) or {}
    ck = manifest.get("checkpoint") or {}
    if ck.get("name"):
        try:
            return read_metric(cfg.gate.source, cfg.gate.metric, step=ck.get("step"), name=ck["name"],
                               storage_options=cfg.storage_options)
        except GateError:
            pass
    recorded = manifest.get("gate") or {}
    if recorded.get("metric") == cfg.gate.metric and recorded.get("value") is not None:
        return float(recorded["value"])
    return None


def soak_verdict(cfg, soak_seconds: float, now: float | None = None, control=None) -> dict:
    """Whether the version labelled canary may become stable now.

    ``ready`` when it has been canary for ``soak_seconds`` and, with a
    ``gate:`` in the config, its metric is not worse than the stable
    version's. Never ``ready`` for a version that was made stable after it
    became canary (it was promoted, then rolled back from: a person decided).
    Returns ``{"status", "version", "stable", "since", "soaked_seconds",
    "reason"}`` plus ``metric``, ``value``, ``stable_value`` with a gate.
    """

    control = control or ServingControl.from_config(cfg)
    if control.serving.policy != "labels":
        raise ConfigError(f"serving.policy is '{control.serving.policy}': a canary needs policy: labels: "
                          f"{cfg.source or cfg.export_base}")
    now = time.time() if now is None else now
    labels = control.own_state().labels
    canary, stable = labels.get(CANARY), labels.get(STABLE)
    out = {"version": canary, "stable": stable, "since": None, "soaked_seconds": None}
    if canary is None:
        return {**out, "status": NO_CANARY, "reason": "no version is labelled canary"}
    if canary == stable:
        return {**out, "status": ALREADY_STABLE, "reason": f"canary {canary} is stable already"}
    history = control.history()
    publisher = Publisher(control.base)
    since = canary_since(history, canary)
    if since is None:  # labelled by hand: the soak counts from its publish
        since = ((publisher.manifest(canary) or {}).get("times") or {}).get("claimed_at")
    if since is None:
        return {**out, "status": HELD, "reason": f"when canary {canary} was labelled is unknown"}
    out.update(since=since, soaked_seconds=round(max(0.0, now - since), 3))
    if stable_since(history, canary, since):
        return {**out, "status": WAS_STABLE,
                "reason": f"canary {canary} was stable already and rolled back from; promote it by hand"}
    if now - since < soak_seconds:
        return {**out, "status": SOAKING,
                "reason": f"canary {canary} has soaked {now - since:.0f} of {soak_seconds:g} s"}
    if cfg.gate is None:
        return {**out, "status": READY, "reason": f"canary {canary} soaked {now - since:.0f} s"}


    value = metric_of(cfg, publisher, canary)
    stable_value = metric_of(cfg, publisher, stable) if stable is not None else None
    out.update(metric=cfg.gate.metric, value=value, stable_value=stable_value)
    if value is None:
        return {**out, "status": HELD, "reason": f"no {cfg.gate.metric} for canary {canary}"}
    if compare(cfg.gate.mode, value, stable_value)["worse"]:
        return {**out, "status": HELD, "reason": f"canary {canary} has {cfg.gate.metric}={value:g}, worse than "
                                                 f"{stable_value:g} of stable {stable}"}
    return {**out, "status": READY,
            "reason": f"canary {canary} soaked {now - since:.0f} s; {cfg.gate.metric}={value:g}"
                      + (f" (stable {stable}: {stable_value:g})" if stable_value is not None else "")}
