"""What every stage works with: a config's two storages, the publisher of its export base, and its exporter.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages.context import Context
    ctx = Context(load_config("serving.yaml"))
    print(ctx.publisher.live_version(), ctx.reference_version())
"""

from __future__ import annotations

import os
from typing import Any

from tf_export_pipeline.checkpoints import Checkpoint, being_written, discover_checkpoints
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import CheckpointError, ConfigError, ExportError, PipelineError
from tf_export_pipeline.export import Exporter
from tf_export_pipeline.export.keras_exporter import KerasFileExporter
from tf_export_pipeline.layout import EXPORTS_DIR, WORK_DIR
from tf_export_pipeline.publish import Publisher
from tf_export_pipeline.publish.staging import drop_lease, staging_name
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.serving import ServingControl
from tf_export_pipeline.storage import Storage, open_storage

# One exporter (the model built and traced) per model and config in a process: a backfill's
# checkpoints then cost a restore each, not a trace.
_EXPORTERS: dict[tuple, Any] = {}


class Context:
    """The two storages of a config and the publisher of its export base."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.train = open_storage(cfg.training_dir, cfg.storage_options)
        self.base = open_storage(cfg.export_base, cfg.storage_options)
        if self.base.isfile(self.base.root):
            raise ConfigError(f"export_base is a file, not a directory: {cfg.export_base}")
        if self.base.is_local:
            parent = os.path.dirname(os.path.abspath(self.base.root))
            while parent and not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if parent and not os.path.isdir(parent):
                raise ConfigError(f"export_base lies below a file ({parent}), not a directory: {cfg.export_base}")
        self.publisher = Publisher(self.base, promotion=cfg.promotion)

    def serving(self) -> ServingControl | None:
        """The model's entry in TF Serving's model config file (None without a serving: section)."""
        if self.cfg.serving is None:
            return None
        return ServingControl.from_config(self.cfg, self.base)

    def reference_version(self) -> int | None:
        """The version a new export is compared with: stable under serving labels, else the highest."""
        control = self.serving()
        stable = control.reference_version() if control is not None else None
        return stable if stable is not None else self.publisher.live_version()

    def checkpoints(self) -> list[Checkpoint]:
        found = discover_checkpoints(self.train, fmt=self.cfg.model.format, step_pattern=self.cfg.model.step_pattern)
        if not found:
            raise CheckpointError(f"training directory holds no checkpoints: {self.cfg.training_dir}")
        return found

    def exporter(self, ckpt: Checkpoint | None = None) -> Any:
        """The exporter of ``ckpt``'s model: one per model and config in this process (a ``.keras`` file
        carries its own model, so gets one of its own)."""
        import_tensorflow_quietly()  # before a model factory imports it, with its start-up chatter
        if ckpt is not None and ckpt.kind == "keras":
            return KerasFileExporter(self.cfg)
        key = (self.cfg.model.factory, self.cfg.model.checkpoint_key, self.cfg.config_hash, self.cfg.config_dir)
        if key not in _EXPORTERS:
            _EXPORTERS[key] = Exporter.from_config(self.cfg)
        return _EXPORTERS[key]

    def work_dir(self, staging_name: str) -> str:
        """The work folder (samples, expected outputs, file list) of the staging named ``staging_name``."""
        return self.base.join(self.base.root, EXPORTS_DIR, WORK_DIR, staging_name)


def in_progress(ckpt: Checkpoint) -> bool:
    return being_written(ckpt.to_dict())


def require_complete(ckpt: Checkpoint) -> None:
    """Refuse an incomplete checkpoint, naming what it misses."""
    if not ckpt.complete:
        raise CheckpointError(f"checkpoint is incomplete, missing {', '.join(ckpt.missing)}: {ckpt.prefix}")


def discard(store: Storage, staging: str, work: str) -> None:
    """Remove an export that will not be published (its staging and work folder) and its lease."""
    for path in (staging, work):
        try:
            store.rm(path, recursive=True)
        except (OSError, PipelineError):
            pass
    drop_lease(store, staging_name(staging))


def after_commit(err: Exception) -> str:
    """A failure after the commit point, as the warning that reports it: an expected error says
    what it is; anything else also names its kind."""
    if isinstance(err, (ExportError, OSError)):  # a model config file that does not parse is a ConfigError
        return str(err)
    return f"unexpected {type(err).__name__}: {err}"
