"""The Airflow Assets of a config: its training directory and its export base.

A training DAG that declares ``training_asset(cfg)`` as an outlet, or a
training job that posts an event for its URI (``POST /api/v2/assets/events``),
starts ``export_after_training__<model>`` at once. Every publish emits an
event for ``export_asset(cfg)``, on which a deploy or canary DAG can be
scheduled; every label change of ``export_promote__<model>`` one for
``serving_asset(cfg)``, the model config file. An Asset's name is its URI, so
``Asset("gs://bucket/train")`` in another DAG is the same Asset.

Example::

    from tf_export_pipeline.operators.assets import training_asset
    from tf_export_pipeline.config import load_config

    @task(outlets=[training_asset(load_config("/opt/airflow/dags/configs/demo.yaml"))])
    def train(): ...
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset


def asset_uri(path: str) -> str:
    """``gs://b/p`` stays as is; a local path becomes ``file:///abs/path`` (no trailing slash)."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else path
    import os

    return "file://" + os.path.abspath(path).rstrip("/")


def training_asset(cfg) -> Asset:
    return Asset(asset_uri(cfg.training_dir))


def export_asset(cfg) -> Asset:
    return Asset(asset_uri(cfg.export_base))


def serving_asset(cfg) -> Asset:
    """The Asset of TF Serving's model config file (``serving.model_config_file``): every label change
    made by a promote task is an event of it, its extra naming the model, label and version."""
    return Asset(asset_uri(cfg.serving.model_config_file))


def requested_checkpoint(params: Any = None, triggering_asset_events: Any = None) -> str:
    """The checkpoint a run was asked for: ``params.checkpoint`` (run conf), else the newest
    ``checkpoint`` named in the extra of the asset events that triggered it; "" when none is named.

    For use as a template macro: ``"{{ requested_checkpoint(params, triggering_asset_events) }}"``.
    """
    wanted = (params or {}).get("checkpoint") if hasattr(params, "get") else None
    if wanted:
        return str(wanted)
    named: list[tuple[Any, str]] = []
    for events in (triggering_asset_events or {}).values():
        for event in events:
            extra = getattr(event, "extra", None) or {}
            if extra.get("checkpoint"):
                named.append((getattr(event, "timestamp", None), str(extra["checkpoint"])))
    if not named:
        return ""
    named.sort(key=lambda item: (item[0] is not None, item[0]))
    return named[-1][1]
