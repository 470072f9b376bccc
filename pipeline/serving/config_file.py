"""TF Serving's model config file, read and written with TF Serving's own protos, and the entries in it.

Example::

    from tf_export_pipeline.serving.config_file import ModelConfigFile, entry_of, state_of
    file = ModelConfigFile("/srv/serving/models.config")
    config, token = file.read()                  # an empty config when the file does not exist yet
    print(state_of(entry_of(config, "demo_regressor")))   # EntryState(listed=[...], labels={...}, policy=...)

TF Serving reads ``--model_config_file`` (a text-format ``ModelServerConfig``)
again every ``--model_config_file_poll_wait_seconds``. Every write is atomic:
a temporary name, then a rename, under a lock file, on local disk; one upload
conditional on the previous generation on GCS, or on the previous ETag on S3
and Azure Blob. A writer that loses meets :class:`ConcurrentChange` and reads
the file again, so two writers never lose each other's change.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.storage import Storage, open_storage

WRITE_NONCE_KEY = "tf_export_write"  # an identifier: Azure Blob metadata names allow no hyphen


class ConcurrentChange(Exception):
    """The file changed between our read and our write: read it again."""


def _protos():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return model_server_config_pb2, text_format


class ModelConfigFile:
    """Read and conditionally write one model config file: on local disk under a lock and replaced in one
    rename; on GCS, S3 or Azure Blob written back only if it is still the object read (its generation or
    ETag), so two writers never lose each other's change."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.store: Storage = open_storage(url, storage_options)
        if not (self.store.is_local or self.store.conditional_overwrite):
            raise ConfigError(f"serving.model_config_file must be a local path or a gs://, s3:// or az:// URL "
                              f"(a store with conditional overwrites): {url}")
        self.path = self.store.root

    def parse(self, data: bytes):
        pb2, text_format = _protos()
        config = pb2.ModelServerConfig()
        try:
            # Bytes that are not UTF-8 are a file that does not parse, not a crash.
            text_format.Parse(data.decode("utf-8"), config)
        except UnicodeDecodeError as err:
            raise ConfigError(f"model config file does not parse (not UTF-8 text at byte {err.start}): "
                              f"{self.url}") from None
        except text_format.ParseError as err:
            raise ConfigError(f"model config file does not parse ({str(err).splitlines()[0][:160]}): "
                              f"{self.url}") from None
        if config.WhichOneof("config") == "custom_model_config":
            raise ConfigError(f"model config file holds a custom_model_config, not a model_config_list: {self.url}")
        return config

    def read(self) -> tuple[Any, Any]:
        """The parsed file (empty if absent) and a token for :meth:`write`'s precondition."""
        pb2, _ = _protos()
        if self.store.is_local:
            try:
                with open(self.path, "rb") as fh:
                    return self.parse(fh.read()), "local"
            except FileNotFoundError:
                return pb2.ModelServerConfig(), "local"
            except IsADirectoryError:
                raise ConfigError(f"model config file is a directory: {self.url}") from None
        try:
            data, token = self.store.read_versioned(self.path)
        except FileNotFoundError:
            return pb2.ModelServerConfig(), None  # the write must then create it
        return self.parse(data), token

    def write(self, config, token: Any) -> str | None:
        """Write ``config`` if the file is still the one read with ``token``; else ConcurrentChange.

        Returns the new generation or ETag on an object store (None on local disk).
        """
        _, text_format = _protos()
        data = text_format.MessageToString(config).encode()
        if self.store.is_local:
            # A symlinked file (a mounted ConfigMap, a deploy tree) stays a link: its target is replaced.
            target = os.path.realpath(self.path)
            directory = os.path.dirname(target)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(target)}.tmp-{secrets.token_hex(6)}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)  # the server never reads a half-written file
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
            return None
        # The upload carries a nonce: when the answer to it is lost and the client retries, the retry
        # meets a precondition failure caused by our own write, which the nonce tells apart.
        nonce = secrets.token_hex(16)
        try:
            return self.store.write_if(self.path, data, token, {WRITE_NONCE_KEY: nonce})
        except (FileExistsError, FileNotFoundError):  # changed, created or removed since it was read
            try:
                now, metadata = self.store.token_of(self.path)
            except FileNotFoundError:
                raise ConcurrentChange(self.url) from None
            if metadata.get(WRITE_NONCE_KEY) == nonce:
                return now
            raise ConcurrentChange(self.url) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise read-modify-write between processes on local disk (object stores use conditions)."""
        if not self.store.is_local:
            yield
            return
        import fcntl

        lock = os.path.realpath(self.path) + ".lock"  # beside the file written, whichever link led to it
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with open(lock, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# -- the entry ----------------------------------------------------------------------------
@dataclass
class EntryState:
    """One model's entry as the file has it: the versions it lists, its labels, and its version policy."""

    listed: list[int]
    labels: dict[str, int]
    policy: str  # "specific", "latest", "all" or "none" (no entry)


def entry_of(config, name: str):
    """The entry of model ``name`` in a parsed file, or None."""
    for entry in config.model_config_list.config:
        if entry.name == name:
            return entry
    return None


def state_of(entry) -> EntryState:
    if entry is None:
        return EntryState([], {}, "none")
    which = entry.model_version_policy.WhichOneof("policy_choice") or "latest"
    listed = sorted(entry.model_version_policy.specific.versions) if which == "specific" else []
    return EntryState(listed, dict(sorted(entry.version_labels.items())), which)

