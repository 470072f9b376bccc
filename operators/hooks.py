"""The hook behind the operators: a config, its storage connection, and the storage options they give.

The connection type ``tf_export_storage`` carries storage credentials for any
backend the pipeline writes to, so no secret has to live in a config file;
``google_cloud_platform`` and ``aws`` connections work too (see
:mod:`tf_export_pipeline.operators.connections` for what each field becomes).

Example::

    from tf_export_pipeline.operators.hooks import ExportStorageHook

    hook = ExportStorageHook(conn_id="tf_export_storage_default")
    cfg = hook.config("/opt/airflow/dags/configs/demo.yaml")
    print(cfg.export_base)
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook


class ExportStorageHook(BaseHook):
    """Storage options from an Airflow connection, laid over a config's own.

    ``conn_id=None`` means the config's ``airflow.conn_id``, and no connection
    at all when that is unset too.
    """

    conn_name_attr = "conn_id"
    default_conn_name = "tf_export_storage_default"
    conn_type = "tf_export_storage"
    hook_name = "TF export storage"

    def __init__(self, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id

    def storage_options(self) -> dict[str, Any]:
        """The fsspec ``storage_options`` the connection gives (its secrets registered for redaction)."""
        from tf_export_pipeline.operators.connections import storage_options

        return storage_options(self.conn_id) if self.conn_id else {}

    def config(self, config_path: str):
        """The config at ``config_path`` with this hook's connection (or the config's own) applied."""
        from tf_export_pipeline.operators.base import load

        return load(config_path, self.conn_id)

    def get_conn(self) -> dict[str, Any]:
        return self.storage_options()
