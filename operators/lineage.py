"""The stage operators' OpenLineage methods, which Airflow's OpenLineage provider calls around a task.

On start: the checkpoint the task was handed (when it names one) as input, the
export base as output. On completion: what the stages did (each checkpoint
taken, each version published with its version, symlink, size and type facets,
the validation report as run facets). On failure: the same, with the error
message. The provider and openlineage-python are imported inside the methods,
so they stay an optional extra; what the methods need after the task ran is
kept in plain attributes of the hook (its stage outcomes).

Example::

    class ExportCheckpointOperator(OpenLineageMethods, PipelineOperator): ...
"""

from __future__ import annotations

from typing import Any

# The operator attributes that may hold the record a task was handed.
_HANDED = ("checkpoint", "staged", "validated")


def _handed_checkpoints(operator: Any) -> list[str]:
    from tf_export_pipeline.lineage import checkpoints_in

    found: list[str] = []
    for name in _HANDED:
        found += [p for p in checkpoints_in(getattr(operator, name, None)) if p not in found]
    return found


class OpenLineageMethods:
    """``get_openlineage_facets_on_start/complete/failure`` of an operator with a ``hook``
    (:class:`tf_export_pipeline.operators.hooks.ExportHook`)."""

    def get_openlineage_facets_on_start(self):
        from airflow.providers.openlineage.extractors import OperatorLineage

        from tf_export_pipeline.lineage import checkpoint_dataset, export_base_dataset

        cfg = self.hook.config
        return OperatorLineage(inputs=[checkpoint_dataset(cfg, p) for p in _handed_checkpoints(self)],
                               outputs=[export_base_dataset(cfg)])

    def _lineage(self, error: str | None):
        from airflow.providers.openlineage.extractors import OperatorLineage

        from tf_export_pipeline.lineage import lineage_of

        outcomes = list(self.hook.outcomes)
        if error is not None:
            error = next((o.error for o in outcomes if o.error), None) or error
        found = lineage_of(self.hook.config, outcomes, error, wanted=_handed_checkpoints(self))
        return OperatorLineage(inputs=found.inputs, outputs=found.outputs, run_facets=found.run_facets)

    def get_openlineage_facets_on_complete(self, task_instance):
        return self._lineage(None)

    def get_openlineage_facets_on_failure(self, task_instance):
        return self._lineage(f"task {task_instance.task_id} failed")
