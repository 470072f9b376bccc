"""Storage credentials from an Airflow connection, as fsspec ``storage_options``.

A config names a connection (``airflow.conn_id``, e.g. ``google_cloud_default``);
the operators, the sensor and the trigger turn it into the keyword arguments
of the fsspec filesystem that :mod:`tf_export_pipeline.storage` opens, so no secret has
to live in the YAML file. What the connection gives is laid over the config's
own ``storage_options``.

Example::

    from tf_export_pipeline.operators.connections import config_with_connection
    cfg = config_with_connection(load_config(path), "google_cloud_default")

Connection types understood (the extras may also carry the
``extra__<type>__`` prefix of older Airflow versions):

``google_cloud_platform`` (gcsfs)
    ``keyfile_dict`` (service-account JSON) or ``key_path`` (a file) become the
    token; neither means Application Default Credentials (``google_default``);
    ``anonymous: true`` means no credentials (``anon``). ``project`` (or
    ``project_id``) is the project. The Google provider's filesystem keys are
    read too: ``gcs.endpoint``, ``gcs.requester-pays``, ``gcs.session-kwargs``,
    ``gcs.consistency``, ``gcs.cache-timeout``.
``tf_export_storage`` (this package's own type; any backend)
    ``keyfile_dict``, ``key_path``, ``anonymous`` and ``project`` as for
    Google, when set; ``endpoint_url``; and ``storage_options``.
``aws`` (s3fs)
    login/password (or ``aws_access_key_id``/``aws_secret_access_key`` in
    extra), ``aws_session_token``, ``endpoint_url`` and ``region_name``.
any type
    an extra ``storage_options`` object is passed through as is, last, so it
    can set whatever the filesystem accepts (for example an emulator's
    ``endpoint_url`` and ``token: anon``).

Every secret of a connection (its password, login and extras, and the
options made of them, by the rules of :mod:`tf_export_pipeline.redaction`) is
registered for redaction as the connection is read, and handed to Airflow's
own log masker (:func:`protect`).
"""

from __future__ import annotations

import json
from typing import Any

from tf_export_pipeline.redaction import REDACTOR, install, register

GCP_TYPES = ("google_cloud_platform", "gcpcloudstorage", "gcp")
AWS_TYPES = ("aws", "s3")
PLAIN_TYPES = ("fs", "file", "generic")
STORAGE_TYPES = ("tf_export_storage",)  # this package's own (see tf_export_pipeline.operators.hooks)

_GCS_KEYS = {  # the Google provider's ObjectStoragePath keys -> gcsfs arguments
    "gcs.endpoint": "endpoint_url",
    "gcs.requester-pays": "requester_pays",
    "gcs.session-kwargs": "session_kwargs",
    "gcs.consistency": "consistency",
    "gcs.cache-timeout": "cache_timeout",
}


class ConnectionOptionsError(ValueError):
    """A connection that cannot be turned into storage options."""


def _extra(extras: dict[str, Any], conn_type: str, key: str) -> Any:
    for name in (key, f"extra__{conn_type}__{key}"):
        if extras.get(name) not in (None, ""):
            return extras[name]
    return None


def _as_dict(value: Any, what: str, conn_id: str) -> dict:
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ConnectionOptionsError(f"connection '{conn_id}': {what} is not a JSON object")
    return parsed


def _gcp(conn_id: str, conn_type: str, extras: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    keyfile = _extra(extras, conn_type, "keyfile_dict")
    key_path = _extra(extras, conn_type, "key_path")
    if keyfile is not None:
        opts["token"] = _as_dict(keyfile, "keyfile_dict", conn_id)
    elif key_path is not None:
        opts["token"] = str(key_path)
    elif str(_extra(extras, conn_type, "anonymous")).lower() == "true":
        opts["token"] = "anon"
    else:
        opts["token"] = "google_default"
    project = _extra(extras, conn_type, "project") or _extra(extras, conn_type, "project_id")
    if project:
        opts["project"] = project
    for key, arg in _GCS_KEYS.items():
        if extras.get(key) not in (None, ""):
            opts[arg] = extras[key]
    if isinstance(opts.get("requester_pays"), str):
        opts["requester_pays"] = opts["requester_pays"].lower() == "true"
    if "session_kwargs" in opts:
        opts["session_kwargs"] = _as_dict(opts["session_kwargs"], "gcs.session-kwargs", conn_id)
    return opts


def _own(conn_id: str, conn_type: str, extras: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if any(_extra(extras, conn_type, key) is not None for key in ("keyfile_dict", "key_path", "anonymous")):
        opts = {k: v for k, v in _gcp(conn_id, conn_type, extras).items() if k == "token"}
    project = _extra(extras, conn_type, "project")
    if project:
        opts["project"] = project
    endpoint = _extra(extras, conn_type, "endpoint_url")
    if endpoint:
        opts["endpoint_url"] = endpoint
    own = _extra(extras, conn_type, "storage_options")
    if own is not None:
        opts.update(_as_dict(own, "storage_options", conn_id))
    return opts


def _aws(conn_type: str, login: str | None, password: str | None, extras: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    key = login or _extra(extras, conn_type, "aws_access_key_id")
    secret = password or _extra(extras, conn_type, "aws_secret_access_key")
    if key and secret:
        opts["key"], opts["secret"] = key, secret
    token = _extra(extras, conn_type, "aws_session_token")
    if token:
        opts["token"] = token
    endpoint = _extra(extras, conn_type, "endpoint_url")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = _extra(extras, conn_type, "region_name")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def options_from_connection(conn: Any) -> dict[str, Any]:
    """fsspec storage options from an Airflow ``Connection`` (no I/O; its secrets are registered for redaction)."""

    conn_id = getattr(conn, "conn_id", None) or "?"
    conn_type = (getattr(conn, "conn_type", None) or "").replace("-", "_").lower()
    extras = conn.extra_dejson if hasattr(conn, "extra_dejson") else {}
    extras = extras or {}
    # Before anything can fail: an error about this connection must not print its secrets.
    register({"login": getattr(conn, "login", None), "password": getattr(conn, "password", None),
              "extra": extras, "raw_extra": getattr(conn, "extra", None)})
    if conn_type in GCP_TYPES:
        opts = _gcp(conn_id, "google_cloud_platform", extras)
    elif conn_type in STORAGE_TYPES:
        opts = _own(conn_id, conn_type, extras)
    elif conn_type in AWS_TYPES:
        opts = _aws("aws", getattr(conn, "login", None), getattr(conn, "password", None), extras)
    elif conn_type in PLAIN_TYPES or "storage_options" in extras:
        opts = {}
    else:
        raise ConnectionOptionsError(
            f"connection '{conn_id}' has type '{conn_type}', which names no storage; use a "
            f"tf_export_storage, google_cloud_platform or aws connection, or put the options under the extra "
            f"'storage_options'")
    if "storage_options" in extras:
        opts.update(_as_dict(extras["storage_options"], "extra 'storage_options'", conn_id))
    register(opts)
    return opts


def _mask_in_airflow(secret: str) -> None:
    from airflow.sdk.log import mask_secret

    mask_secret(secret)


def protect() -> None:
    """Redact this process's logs, and have Airflow's masker hide every secret the pipeline registers.

    Airflow masks the password and the sensitively named extras of the
    connections it hands out, but knows nothing of a config file's
    ``storage_options`` or of an extra named otherwise; structlog's own
    loggers (``self.log`` of a task) bypass the stdlib filter of
    :func:`tf_export_pipeline.redaction.install`, so Airflow's masker is told too.
    """

    install()
    REDACTOR.add_listener(_mask_in_airflow)


def storage_options(conn_id: str) -> dict[str, Any]:
    """The storage options of connection ``conn_id`` (inside a task: through the Task SDK)."""
    from airflow.sdk import BaseHook

    return options_from_connection(BaseHook.get_connection(conn_id))


async def astorage_options(conn_id: str) -> dict[str, Any]:
    """The same, for async code (a trigger in the triggerer's event loop)."""
    from airflow.sdk import BaseHook

    return options_from_connection(await BaseHook.aget_connection(conn_id))


def with_options(cfg, options: dict[str, Any]):
    """``cfg`` with ``options`` laid over its ``storage_options``."""
    if not options:
        return cfg
    return cfg.with_overrides(storage_options={**cfg.storage_options, **options})


def config_with_connection(cfg, conn_id: str | None = None):
    """``cfg`` with the storage options of ``conn_id`` (default: the config's ``airflow.conn_id``)."""
    conn_id = conn_id or cfg.airflow.conn_id
    if not conn_id:
        return cfg
    return with_options(cfg, storage_options(conn_id))
