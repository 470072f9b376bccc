"""The Blob service client an Azure store talks through: its credential, its retries, one per process.

Example::

    from tf_export_pipeline.storage.azure_client import client_of, open_filesystem
    options = {"connection_string": "..."}
    fs, root = open_filesystem("az://models/serving/demo", options)
    print(root, client_of(fs, options).account_name)

adlfs parses the URLs and finds the default credential; the requests that
matter go through an asyncio ``BlobServiceClient`` made here, on adlfs's event
loop. The credential is chosen once (:func:`credentials`): what
``storage_options`` name wins as a whole over the environment. The client's
retries are bounded (:data:`RETRY_TOTAL` tries with a short back-off, a
:data:`CONNECTION_TIMEOUT`), so an unreachable endpoint fails in seconds, not
minutes. A client is kept on the filesystem, which fsspec caches per options:
one client and one connection pool per process and options, closed when the
filesystem goes. Nothing here quotes a credential in a message.
"""

from __future__ import annotations

import os
import random
import weakref
from typing import Any

import fsspec

from tf_export_pipeline.errors import ConfigError

# Retries of each request (waits of 0.5 s, 2.5 s, 4.5 s, 8.5 s, each within RETRY_JITTER), and a connect
# timeout: the SDK's defaults (15 s first back-off, 300 s to connect) would hold a run for minutes on an
# unreachable endpoint. ``retry_total`` in storage_options overrides the count.
RETRY_TOTAL = 4
RETRY_INITIAL_BACKOFF = 0.5
RETRY_INCREMENT_BASE = 2
RETRY_JITTER = 0.25
CONNECTION_TIMEOUT = 20
READ_TIMEOUT = 120
#: storage_options for the client rather than for adlfs.
CLIENT_OPTIONS = ("retry_total", "connection_timeout", "read_timeout")

_ENV_KEYS = (("connection_string", "AZURE_STORAGE_CONNECTION_STRING"),
             ("account_name", "AZURE_STORAGE_ACCOUNT_NAME"),
             ("account_key", "AZURE_STORAGE_KEY"),
             ("account_key", "AZURE_STORAGE_ACCOUNT_KEY"),
             ("sas_token", "AZURE_STORAGE_SAS_TOKEN"))
# The filesystem's attribute holding its clients, by client options.
_CLIENTS = "_tf_export_clients"


def credentials(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the credential chosen once: what storage_options name, else the environment.

    A credential in storage_options wins as a whole, so that a variable left in
    the environment never mixes with it (adlfs would let a connection string
    from the environment override an account key given explicitly).
    """
    out = dict(options)
    given = any(out.get(k) for k in ("connection_string", "account_key", "sas_token", "credential", "anon",
                                     "client_id"))
    if not given:
        if os.environ.get("AZURE_STORAGE_CONNECTION_STRING") and not out.get("account_name"):
            out["connection_string"] = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        else:
            for key, var in _ENV_KEYS[1:]:
                if not out.get(key) and os.environ.get(var):
                    out[key] = os.environ[var]
    if out.get("connection_string"):
        for key in ("account_name", "account_key", "sas_token", "credential"):
            out.pop(key, None)
    return out


def open_filesystem(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """adlfs's filesystem for ``url`` and the path in it, with a Blob service client for these options
    (:func:`client_of`).

    A client that cannot be made (a malformed connection string, no account)
    is a ConfigError that says why without quoting what was given.
    """
    from adlfs import AzureBlobFileSystem

    options = credentials(storage_options)
    options.setdefault("use_listings_cache", False)
    client_options = {k: options.pop(k) for k in CLIENT_OPTIONS if k in options}
    try:
        fs = AzureBlobFileSystem(**options)
        clients = fs.__dict__.setdefault(_CLIENTS, {})
        key = _client_key(client_options)
        if key not in clients:
            clients[key] = client = _service_client(fs, options, client_options)
            weakref.finalize(fs, _close_client, fs.loop, client)
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - the SDK's text may quote the connection string
        raise ConfigError(f"cannot open Azure Blob storage ({_open_problem(err, options)}): "
                          f"{_without_query(url)}") from None
    return fs, fs._strip_protocol(url)


def client_of(fs: Any, storage_options: dict[str, Any]) -> Any:
    """The Blob service client :func:`open_filesystem` made on ``fs`` for ``storage_options``."""
    return fs.__dict__[_CLIENTS][_client_key(storage_options)]


def _client_key(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, options[k]) for k in CLIENT_OPTIONS if k in options))


def _close_client(loop: Any, client: Any) -> None:
    try:
        fsspec.asyn.sync(loop, client.close, timeout=5)
    except Exception:  # noqa: BLE001 - at exit, a loop already stopped: nothing left to close
        pass


def _retry_policy(retry_total: int) -> Any:
    """An ExponentialRetry that waits ``RETRY_INITIAL_BACKOFF``, then that plus ``RETRY_INCREMENT_BASE**n``.

    The SDK counts the retry before it asks for the wait, so its own schedule
    skips the initial back-off and starts at ``initial + base``; its jitter is
    whole seconds. Both would stretch a failing request to half a minute.
    """
    from azure.storage.blob.aio import ExponentialRetry

    class _BoundedRetry(ExponentialRetry):
        def get_backoff_time(self, settings: dict[str, Any]) -> float:
            count = max(int(settings.get("count", 1)) - 1, 0)
            backoff = RETRY_INITIAL_BACKOFF + (RETRY_INCREMENT_BASE ** count if count else 0)
            return max(backoff + random.uniform(-RETRY_JITTER, RETRY_JITTER), 0.0)

    # The SDK's own back-off fields (typed as whole seconds) are left alone: the schedule is ours.
    return _BoundedRetry(retry_total=retry_total, random_jitter_range=0)


def _service_client(fs: Any, options: dict[str, Any], client_options: dict[str, Any]):
    """An asyncio BlobServiceClient for the credential :func:`credentials` chose, with bounded retries."""
    from azure.storage.blob.aio import BlobServiceClient

    kw = {"retry_policy": _retry_policy(int(client_options.get("retry_total", RETRY_TOTAL))),
          "connection_timeout": client_options.get("connection_timeout", CONNECTION_TIMEOUT),
          "read_timeout": client_options.get("read_timeout", READ_TIMEOUT)}
    if options.get("connection_string"):
        return BlobServiceClient.from_connection_string(options["connection_string"], **kw)
    name = options.get("account_name")
    if not name:
        raise ValueError("no account: set connection_string or account_name in storage_options, or "
                         "AZURE_STORAGE_CONNECTION_STRING / AZURE_STORAGE_ACCOUNT_NAME")
    host = options.get("account_host") or f"{name}.blob.core.windows.net"
    url = host if "://" in host else f"https://{host}"
    if options.get("credential") is not None:
        return BlobServiceClient(url, credential=options["credential"], **kw)
    if options.get("account_key"):
        return BlobServiceClient(url, credential={"account_name": name, "account_key": options["account_key"]},
                                 **kw)
    if options.get("sas_token"):
        return BlobServiceClient(f"{url}?{str(options['sas_token']).lstrip('?')}", **kw)
    if options.get("anon"):
        return BlobServiceClient(url, **kw)
    return BlobServiceClient(url, credential=fs.credential, **kw)  # adlfs's DefaultAzureCredential


def _open_problem(err: BaseException, options: dict[str, Any]) -> str:
    """Why the client could not be made, without quoting what was given."""
    if options.get("connection_string"):
        return "the connection string is malformed or incomplete"
    if not options.get("account_name"):
        return ("no account: set connection_string or account_name in storage_options, or "
                "AZURE_STORAGE_CONNECTION_STRING / AZURE_STORAGE_ACCOUNT_NAME")
    if options.get("account_key"):
        return "the account key is not valid base64"
    return type(err).__name__


def _without_query(url: str) -> str:
    """A URL without its query string, where a SAS token would be."""
    return url.split("?", 1)[0]
