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

from tf_export_pipeline.checkpoints import keras_files, tf_checkpoints
from tf_export_pipeline.checkpoints.checkpoint import Checkpoint, being_written, crc32c_b64, names_checkpoint, step_of
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


def find_checkpoint(checkpoints: list[Checkpoint], wanted: str) -> Checkpoint | None:
    """The checkpoint named by ``wanted``: its full prefix, its base name, or its step."""
    by_name = [c for c in checkpoints if names_checkpoint(c.prefix, c.name, None, wanted)]
    if by_name:
        return by_name[0]
    return next((c for c in checkpoints if names_checkpoint(c.prefix, c.name, c.step, wanted)), None)


__all__ = ["Checkpoint", "FORMATS", "being_written", "crc32c_b64", "discover_checkpoints", "find_checkpoint",
           "names_checkpoint", "step_of"]
