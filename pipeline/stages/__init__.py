"""The stages the CLI and Airflow call: discover, export, validate, publish, prune; and one export end to end.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import run_once
    record = run_once(load_config("serving.yaml"))
    print(record.status, record.version)

Every stage function takes the config and the typed record the stage before
returned (:mod:`tf_export_pipeline.records`), and returns one, so each can run
as its own Airflow task on a different worker (staging lives in the export
base's own storage); the records become JSON only at those edges.
"""

from __future__ import annotations

from tf_export_pipeline.stages.context import Context
from tf_export_pipeline.stages.discover import discover, list_pending
from tf_export_pipeline.stages.export import local_checkpoint, stage_export
from tf_export_pipeline.stages.prune import finish_cut_short, stage_prune
from tf_export_pipeline.stages.publish import publish_in_order, publish_validated, stage_publish
from tf_export_pipeline.stages.run import export_and_validate, export_one, publish_timed, run_once
from tf_export_pipeline.stages.status import status
from tf_export_pipeline.stages.validate import performance_baseline, stage_validate

__all__ = ["Context", "discover", "list_pending", "stage_export", "local_checkpoint", "stage_validate",
           "performance_baseline", "stage_publish", "publish_validated", "publish_in_order", "stage_prune",
           "finish_cut_short", "export_and_validate", "export_one", "publish_timed", "run_once", "status"]
