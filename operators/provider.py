"""What ``airflow providers list`` and the connection form learn of this package.

Registered through the ``apache_airflow_provider`` entry point in
``pyproject.toml``; Airflow calls :func:`get_provider_info` without importing
anything else of the package, so this module imports nothing.
"""

from __future__ import annotations

from typing import Any

PACKAGE = "tf-export-pipeline"
INTEGRATION = "TF Export Pipeline"
CONN_TYPE = "tf_export_storage"
#: Where the models page's app is mounted in Airflow's API server; its links are made with it.
MODELS_PAGE_PREFIX = "/tf-export"
_MODULES = "tf_export_pipeline.operators"


def get_provider_info() -> dict[str, Any]:
    from tf_export_pipeline import __version__  # the package's root imports neither Airflow nor TensorFlow

    return {
        "package-name": PACKAGE,
        "name": INTEGRATION,
        "description": "Exports a continuous-training job's checkpoints as TensorFlow Serving versions, "
                       "atomically, on local disk or cloud storage.",
        "versions": [__version__],
        "integrations": [{"integration-name": INTEGRATION, "tags": ["software"]}],
        "operators": [{"integration-name": INTEGRATION,
                       "python-modules": [f"{_MODULES}.export", f"{_MODULES}.serving"]}],
        "sensors": [{"integration-name": INTEGRATION, "python-modules": [f"{_MODULES}.sensors"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": [f"{_MODULES}.triggers"]}],
        "hooks": [{"integration-name": INTEGRATION, "python-modules": [f"{_MODULES}.hooks"]}],
        "connection-types": [{
            "connection-type": CONN_TYPE,
            "hook-class-name": f"{_MODULES}.hooks.ExportHook",
            "hook-name": "TF export storage",
            "ui-field-behaviour": {
                "hidden-fields": ["host", "schema", "port", "login", "password"],
                "relabeling": {},
                "placeholders": {"extra": '{"storage_options": {"endpoint_url": "http://127.0.0.1:4443"}}'},
            },
            "conn-fields": {
                "keyfile_dict": {"label": "Service account key (JSON)",
                                 "description": "gs://: the key itself; leave empty for Application Default "
                                                "Credentials",
                                 "schema": {"type": ["string", "null"], "format": "password"}},
                "key_path": {"label": "Service account key file",
                             "description": "gs://: path of a key file on the workers",
                             "schema": {"type": ["string", "null"]}},
                "project": {"label": "Project", "schema": {"type": ["string", "null"]}},
                "endpoint_url": {"label": "Endpoint URL",
                                 "description": "a storage emulator or private endpoint",
                                 "schema": {"type": ["string", "null"]}},
                "anonymous": {"label": "Anonymous", "description": "no credentials (public buckets, emulators)",
                              "schema": {"type": ["boolean", "null"]}},
                "storage_options": {"label": "Storage options (JSON)",
                                    "description": "fsspec options laid over everything above",
                                    "schema": {"type": ["string", "null"], "format": "password"}},
            },
        }],
    }
