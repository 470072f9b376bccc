"""Discovery of checkpoints and their identity, one module per format.

Example::

    from tf_export_pipeline.checkpoints import discover_checkpoints
    from tf_export_pipeline.storage import open_storage
    for ckpt in discover_checkpoints(open_storage("/data/train")):
        print(ckpt.name, ckpt.step, ckpt.complete)

Formats (``model.format`` in the config): ``checkpoint``, TensorFlow
checkpoints (:mod:`~tf_export_pipeline.checkpoints.tf_checkpoints`);
``keras``, ``.keras`` files (:mod:`~tf_export_pipeline.checkpoints.keras_files`);
``auto`` (default), the second when a folder holds ``.keras`` files and no TF
checkpoint. A new format is a module with ``discover(store, directory,
by_name, step_pattern)`` and a line in :data:`FORMATS`.
"""

from __future__ import annotations

import os

from tf_export_pipeline.checkpoints import keras_files, tf_checkpoints
from tf_export_pipeline.checkpoints.checkpoint import (
    Checkpoint,
    being_written,
    crc32c_b64,
    names_checkpoint,
    stamp_of_shards,
    step_of,
)
from tf_export_pipeline.errors import CheckpointError
from tf_export_pipeline.storage import Entry, Storage

FORMATS = {"checkpoint": tf_checkpoints, "keras": keras_files}


def discover_checkpoints(store: Storage, training_dir: str | None = None, fmt: str = "auto",
                         step_pattern: str | None = None) -> list[Checkpoint]:
    """Every checkpoint in ``training_dir`` (default: the store's root), sorted by step.

    One directory listing, one read of the state file, and one read of each
    index whose checksum the storage does not report itself. ``fmt`` "keras"
    (or "auto" on a folder of ``*.keras`` files only) lists Keras files instead
    (see :mod:`tf_export_pipeline.checkpoints.keras_files`).
    """
    directory = training_dir or store.root
    entries = store.list_dir(directory)
    if not entries and not store.isdir(directory):
        raise CheckpointError(f"training directory does not exist: {store.url(directory)}")
    by_name: dict[str, Entry] = {e.name: e for e in entries if not e.is_dir}
    if fmt == "auto":
        fmt = "keras" if keras_files.is_keras_dir(by_name) else "checkpoint"
    return FORMATS[fmt].discover(store, directory, by_name, step_pattern)


def require_unchanged(store: Storage, ckpt: Checkpoint) -> None:
    """Refuse ``ckpt`` when its local files are no longer those discovery saw.

    Called once the weights are read: a training job that restarted from an
    earlier step and saved the same name again would otherwise have its new
    weights published under the old checkpoint's identity, and the ledger
    would then say the new checkpoint is exported when it never was.
    """
    if not store.is_local:
        return  # object stores: the download itself is checked against what discovery listed
    if FORMATS.get(ckpt.kind, tf_checkpoints).changed_since_discovery(store, ckpt):
        raise CheckpointError(f"checkpoint changed while it was exported (rewritten by the training job?): "
                              f"{ckpt.prefix}")


def shards_changed(ckpt: Checkpoint, entries: list[Entry]) -> bool:
    """Whether the data shards of ``ckpt`` among ``entries`` (a new listing of its directory) differ
    from those discovery listed. False for a record that carries no stamp of them."""
    if ckpt.kind != "checkpoint" or ckpt.data_stamp is None:
        return False
    return stamp_of_shards(tf_checkpoints.shard_entries(entries, ckpt.name)) != ckpt.data_stamp


def find_checkpoint(checkpoints: list[Checkpoint], wanted: str) -> Checkpoint | None:
    """The checkpoint named by ``wanted``: its full prefix, its base name, its step, or a local path to
    it relative to the working directory (``./train/ckpt-30``)."""
    by_name = [c for c in checkpoints if names_checkpoint(c.prefix, c.name, None, wanted)]
    if by_name:
        return by_name[0]
    by_step = next((c for c in checkpoints if names_checkpoint(c.prefix, c.name, c.step, wanted)), None)
    return by_step if by_step is not None else _by_local_path(checkpoints, wanted)


def _by_local_path(checkpoints: list[Checkpoint], wanted: str) -> Checkpoint | None:
    """The local checkpoint ``wanted`` leads to from the working directory, when it leads to one:
    what the path is, not how it is spelled (``./``, ``..``, a symlink)."""
    path = wanted.strip().rstrip("/")
    if not path or "://" in path:
        return None
    if path.endswith(".index"):
        path = path[: -len(".index")]
    if not (os.path.exists(path) or os.path.exists(path + ".index")):
        return None
    real = os.path.realpath(path)
    return next((c for c in checkpoints if "://" not in c.prefix and os.path.realpath(c.prefix) == real), None)


__all__ = ["Checkpoint", "FORMATS", "being_written", "crc32c_b64", "discover_checkpoints", "find_checkpoint",
           "names_checkpoint", "require_unchanged", "shards_changed", "stamp_of_shards", "step_of"]
