"""The Airflow plugin of the models page: ``/tf-export`` in Airflow's UI, listed by ``airflow plugins``.

Its FastAPI app (:mod:`tf_export_pipeline.operators.models_app`: the list of
models, a page per model, the same as JSON under ``/tf-export/api/models``,
behind Airflow's authentication) is imported only when asked for, by the
api-server or ``airflow plugins``: every other component that loads plugins
(the scheduler, a task) pays nothing for it. The menu entry is an external view
under Browse.

Registered through the ``airflow.plugins`` entry point in ``pyproject.toml``,
so the plugin is there wherever the package is installed, with no file in
Airflow's plugins folder.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.plugins_manager import AirflowPlugin

from tf_export_pipeline.operators.provider import MODELS_PAGE_PREFIX as PREFIX

PLUGIN_NAME = "tf_export_models"


class ModelsPlugin(AirflowPlugin):
    """The models page: its app under :data:`PREFIX` and its entry in the UI's menu."""

    name = PLUGIN_NAME
    external_views = [{"name": "TF export models", "href": f"{PREFIX}/", "destination": "nav",
                       "category": "browse", "url_route": "tf-export"}]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        from tf_export_pipeline.operators.models_app import app

        return [{"app": app, "url_prefix": PREFIX, "name": "TF export: models"}]
