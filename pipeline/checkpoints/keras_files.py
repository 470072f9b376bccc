"""Keras ``.keras`` files as checkpoints: what ``keras.callbacks.ModelCheckpoint`` writes.

Example (config)::

    training_dir: ./train            # model-1.keras, model-2.keras, ... from ModelCheckpoint
    export_base: ./serving/my_model
    model:
      format: keras                  # or auto: detected from the files
      step_pattern: 'model-(\\d+)'    # the epoch or step in the file name (default: its first number)

A ``.keras`` file carries the architecture with the weights, so no factory is
needed: each file is loaded with ``keras.saving.load_model`` and exported.
Its identity is its path plus its size and a CRC32C: the object's on object
stores, that of its zip directory (which holds every member's CRC-32) on local
disk. Its step is the number the pattern finds in its name (else none, and
files are ordered by write time).

``ModelCheckpoint`` writes a local file in place, so a file being written is
seen before it is whole: a ``.keras`` file is a zip archive whose directory is
written last. A local file without it is taken to be still being written while
it is younger than :data:`WRITING_GRACE_SECONDS`, and is broken after that.
Object stores show an object only once it is whole.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Iterable

from tf_export_pipeline.checkpoints.checkpoint import Checkpoint, crc32c_b64
from tf_export_pipeline.checkpoints.checkpoint import step_of as _step_in
from tf_export_pipeline.errors import CheckpointError
from tf_export_pipeline.storage import ChecksumMismatch, Entry, Storage

SUFFIX = ".keras"
DEFAULT_STEP_PATTERN = r"(\d+)"
WRITING_GRACE_SECONDS = 120.0


def is_keras_dir(names: Iterable[str]) -> bool:
    """``format: auto``: .keras files and no TF checkpoint (no ``checkpoint`` state file, no ``*.index``)."""
    names = set(names)
    return any(n.endswith(SUFFIX) for n in names) and "checkpoint" not in names and \
        not any(n.endswith(".index") for n in names)


def step_of(name: str, pattern: str | None) -> int | None:
    """The step in a file's name (its stem): the pattern's group, by default its first number."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    return _step_in(stem, pattern or DEFAULT_STEP_PATTERN)


def _inspect(path: str) -> tuple[str | None, str | None]:
    """(why a local .keras file is not a whole Keras archive or None, a CRC32C of its zip directory).

    The zip directory lists every member with its CRC-32 and sizes, so its
    checksum changes whenever any content does; reading it costs a few hundred
    bytes where a checksum of the whole file would read every weight.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except zipfile.BadZipFile:
        return "a zip directory (the file is truncated, still being written, or not a .keras file)", None
    except OSError as err:
        return f"a readable file ({err.strerror or err})", None
    listing = "\n".join(f"{m.filename}|{m.CRC}|{m.file_size}|{m.compress_size}" for m in members)
    crc = "zipdir:" + crc32c_b64(listing.encode())
    names = {m.filename for m in members}
    if "config.json" not in names:
        return "config.json in the archive (not a Keras model file)", crc
    if not any(n.startswith("model.weights.") for n in names):
        return "model.weights.* in the archive (saved without weights)", crc
    return None, crc


def archive_problem(path: str) -> str | None:
    return _inspect(path)[0]


def discover(store: Storage, directory: str, by_name: dict[str, Entry], step_pattern: str | None = None,
             now: float | None = None) -> list[Checkpoint]:
    """The ``.keras`` files among the files ``by_name`` as checkpoints, sorted by step, then write time."""
    now = time.time() if now is None else now
    found = []
    for e in by_name.values():
        if e.is_dir or not e.name.endswith(SUFFIX):
            continue
        missing: list[str] = []
        writing = False
        crc = e.crc32c
        if store.is_local:
            if not os.path.exists(e.path):
                continue  # removed since the listing
            problem, crc = _inspect(e.path)
            if problem:
                missing.append(problem)
                writing = e.mtime is not None and now - e.mtime < WRITING_GRACE_SECONDS
        elif crc is None:
            crc = crc32c_b64(store.read_bytes(e.path))
        found.append(Checkpoint(
            prefix=store.url(store.join(directory, e.name)),
            name=e.name,
            step=step_of(e.name, step_pattern),
            written_at=e.mtime,
            complete=not missing,
            missing=missing,
            index_size=e.size,
            index_crc32c=crc,
            kind="keras",
            writing=writing,
        ))
    found.sort(key=lambda c: (c.step if c.step is not None else -1, c.written_at or 0.0, c.name))
    return found


def changed_since_discovery(store: Storage, ckpt: Checkpoint) -> bool:
    """Whether the local file ``ckpt`` is no longer the one discovery saw (its size, its zip directory)."""
    try:
        size = os.path.getsize(ckpt.prefix)
    except FileNotFoundError:
        return True
    return size != ckpt.index_size or _inspect(ckpt.prefix)[1] != ckpt.index_crc32c


def local_copy(store: Storage, ckpt: Checkpoint, scratch: str) -> str:
    """A local path of the .keras file; downloaded (checked against the server's crc32c) from object stores."""
    if store.is_local:
        return ckpt.prefix

    remote = store.strip(ckpt.prefix)
    try:
        entry = store.info(remote)
    except FileNotFoundError:
        raise CheckpointError(f"Keras file vanished while reading: {ckpt.prefix}") from None
    if ckpt.index_crc32c and entry.crc32c and entry.crc32c != ckpt.index_crc32c:
        raise CheckpointError(f"Keras file changed since it was discovered (another crc32c): {ckpt.prefix}")
    local_dir = os.path.join(scratch, "keras")
    try:
        store.download_files([entry], local_dir)
    except FileNotFoundError:
        raise CheckpointError(f"Keras file vanished while reading: {ckpt.prefix}") from None
    except ChecksumMismatch:
        raise CheckpointError(f"Keras file does not match its crc32c after retries: {ckpt.prefix}") from None
    return os.path.join(local_dir, ckpt.name)
