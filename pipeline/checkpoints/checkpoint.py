"""A checkpoint, whatever its format: where it is, its step, whether it is whole, and what identifies it.

Example::

    from tf_export_pipeline.checkpoints.checkpoint import names_checkpoint, step_of
    assert step_of("ckpt-300") == 300
    assert names_checkpoint("/data/train/ckpt-300", "ckpt-300", 300, "300")
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import asdict, dataclass, field

from tf_export_pipeline.errors import CheckpointError

# The step in a name: its last number (ckpt-300), or the first match of a format's own pattern.
_TRAILING_NUMBER = r"(\d+)$"


@dataclass
class Checkpoint:
    prefix: str                 # full path (URL for object stores) without .index
    name: str                   # base name, e.g. "ckpt-300"
    step: int | None
    written_at: float | None    # seconds since epoch
    complete: bool
    missing: list[str] = field(default_factory=list)
    index_size: int = 0
    index_crc32c: str | None = None
    listed: bool = False        # named by the `checkpoint` state file
    kind: str = "checkpoint"    # "checkpoint" (tf.train.Checkpoint) or "keras" (a .keras file; index_* are the file's)
    writing: bool = False       # looks like a file still being written
    data_stamp: str | None = None  # the data shards as discovery listed them (stamp_of_shards); not identity

    def identity(self) -> dict:
        """What makes this checkpoint this checkpoint: its index's size and crc32c.

        Not its path: the same files reached through a symlink, a relative path
        or a moved mount are the same checkpoint. The index of a
        ``tf.train.Checkpoint`` records the crc32c of every tensor it saved
        (and the save counter), so two different saves never share it; for a
        ``.keras`` file it is the zip directory's checksum (see
        :mod:`tf_export_pipeline.checkpoints.keras_files`).
        """
        return {"kind": self.kind, "index_size": self.index_size, "index_crc32c": self.index_crc32c}

    def ledger_key(self, config_hash: str) -> str:
        ident = self.identity()
        if not ident["index_crc32c"]:
            raise CheckpointError(f"checkpoint has no index checksum to identify it by: {self.prefix}")
        blob = f"{ident['kind']}|{ident['index_size']}|{ident['index_crc32c']}|{config_hash}".encode()
        return hashlib.sha256(blob).hexdigest()[:40]

    def to_dict(self) -> dict:
        return asdict(self)


def being_written(record: dict) -> bool:
    """Whether a checkpoint (its ``to_dict()`` record) is still being written.

    TensorFlow writes the data shards, then the index, then the state file: data
    with no index that the state file does not list yet is in progress, to be
    left to a later run. A ``.keras`` file without its zip directory is too.
    """
    if record.get("writing"):
        return True
    missing = record.get("missing") or []
    return (not record.get("complete") and not record.get("listed") and record.get("index_crc32c") is None
            and all(m.endswith(".index") for m in missing))


def stamp_of_shards(shards: list) -> str | None:
    """What the data shards (storage entries) were when listed: names, sizes and checksums, or write
    times where the storage keeps no checksum. A rewrite of a shard changes it; listing the same
    files again does not. None without shards."""
    if not shards:
        return None
    lines = sorted(f"{e.name}|{e.size}|{e.crc32c or repr(e.mtime)}" for e in shards)
    return crc32c_b64("\n".join(lines).encode())


def crc32c_b64(data: bytes) -> str:
    """CRC32C as GCS reports it: base64 of the big-endian 4 bytes."""
    import google_crc32c

    value = google_crc32c.value(data)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def step_of(name: str, pattern: str | None = None) -> int | None:
    """The step a checkpoint's name carries: the first group of ``pattern`` (its ``step`` group if named),
    by default the trailing number; None when there is none."""
    m = re.search(pattern or _TRAILING_NUMBER, name)
    if not m:
        return None
    group = m.groupdict().get("step") or next((g for g in m.groups() if g is not None), None)
    try:
        return int(group) if group is not None else None
    except ValueError:
        return None


def names_checkpoint(prefix: str, name: str, step: int | None, wanted: str) -> bool:
    """Whether ``wanted`` (a full prefix, a base name or a step; ``.index`` and a trailing ``/`` ignored)
    names the checkpoint ``prefix``/``name``/``step``."""
    wanted = wanted.strip().rstrip("/")
    if wanted.endswith(".index"):
        wanted = wanted[: -len(".index")]
    if wanted in (prefix, name) or (prefix or "").endswith("/" + wanted):
        return True
    return wanted.isdigit() and step == int(wanted)
