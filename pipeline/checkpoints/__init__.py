"""Discovery of TensorFlow checkpoints and their identity.

Example::

    from tf_export_pipeline.checkpoints import discover_checkpoints
    from tf_export_pipeline.storage import open_storage
    for ckpt in discover_checkpoints(open_storage("/data/train")):
        print(ckpt.name, ckpt.step, ckpt.complete)

A checkpoint written by ``tf.train.Checkpoint``/``CheckpointManager`` is a prefix
``<dir>/ckpt-<n>`` with ``<prefix>.index`` and shards
``<prefix>.data-0000k-of-0000N``. The ``checkpoint`` state file lists the ones the
manager still keeps; older ones it no longer lists are found by their index.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import asdict, dataclass, field

from tf_export_pipeline.errors import CheckpointError
from tf_export_pipeline.storage import Entry, Storage

_SHARD = re.compile(r"^(?P<prefix>.+)\.data-(?P<k>\d{5})-of-(?P<n>\d{5})$")
_STEP = re.compile(r"(\d+)$")
_STATE_LINE = re.compile(r'^\s*(?P<key>[a-z_]+)\s*:\s*(?P<value>"(?:[^"\\]|\\.)*"|[-0-9.eE+]+)\s*$')


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


def crc32c_b64(data: bytes) -> str:
    """CRC32C as GCS reports it: base64 of the big-endian 4 bytes."""
    import google_crc32c

    value = google_crc32c.value(data)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def parse_state_file(text: str) -> tuple[list[str], dict[str, float]]:
    """Paths the ``checkpoint`` state file lists, and their timestamps where given."""
    paths: list[str] = []
    stamps: list[float] = []
    latest = None
    for line in text.splitlines():
        m = _STATE_LINE.match(line)
        if not m:
            continue
        key, value = m.group("key"), m.group("value")
        if value.startswith('"'):
            value = bytes(value[1:-1], "utf-8").decode("unicode_escape")
        if key == "model_checkpoint_path":
            latest = value
        elif key == "all_model_checkpoint_paths":
            paths.append(value)
        elif key == "all_model_checkpoint_timestamps":
            stamps.append(float(value))
    if latest and latest not in paths:
        paths.append(latest)
    times = {p: t for p, t in zip(paths, stamps)}
    return paths, times


def _step_of(name: str) -> int | None:
    m = _STEP.search(name)
    return int(m.group(1)) if m else None


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
    if fmt != "checkpoint":
        from tf_export_pipeline.checkpoints import keras_files

        if fmt == "keras" or keras_files.is_keras_dir(by_name):
            return keras_files.discover(store, directory, list(by_name.values()), step_pattern)

    listed: list[str] = []
    times: dict[str, float] = {}
    if "checkpoint" in by_name:
        try:
            listed, raw_times = parse_state_file(store.read_text(store.join(directory, "checkpoint")))
        except (OSError, UnicodeDecodeError):
            listed, raw_times = [], {}
        names = []
        for p in listed:
            base = p.replace("\\", "/").rsplit("/", 1)[-1]
            names.append(base)
            if p in raw_times:
                times[base] = raw_times[p]
        listed = names

    prefixes: set[str] = set(listed)
    shards: dict[str, dict[int, int]] = {}
    for name in by_name:
        if name.endswith(".index"):
            prefixes.add(name[: -len(".index")])
        m = _SHARD.match(name)
        if m:
            prefixes.add(m.group("prefix"))
            shards.setdefault(m.group("prefix"), {})[int(m.group("k"))] = int(m.group("n"))

    found: list[Checkpoint] = []
    for name in prefixes:
        index = by_name.get(name + ".index")
        missing: list[str] = []
        if index is None:
            missing.append(name + ".index")
        got = shards.get(name, {})
        if not got:
            missing.append(name + ".data-00000-of-00001")
        else:
            total = max(got.values())
            if any(n != total for n in got.values()):
                missing.append(f"{name}.data-*-of-{total:05d} (shards disagree on their count)")
            for k in range(total):
                if k not in got:
                    missing.append(f"{name}.data-{k:05d}-of-{total:05d}")
        written = times.get(name)
        if written is None and index is not None:
            written = index.mtime
        crc = index.crc32c if index is not None else None
        if index is not None and crc is None:
            crc = crc32c_b64(store.read_bytes(index.path))
        found.append(
            Checkpoint(
                prefix=store.url(store.join(directory, name)),
                name=name,
                step=_step_of(name),
                written_at=written,
                complete=not missing,
                missing=missing,
                index_size=index.size if index is not None else 0,
                index_crc32c=crc,
                listed=name in listed,
            )
        )
    found.sort(key=lambda c: (c.step if c.step is not None else -1, c.written_at or 0.0, c.name))
    return found


def find_checkpoint(checkpoints: list[Checkpoint], wanted: str) -> Checkpoint | None:
    """The checkpoint named by ``wanted``: its full prefix, its base name, or its step."""
    wanted_clean = wanted.rstrip("/")
    for suffix in (".index",):
        if wanted_clean.endswith(suffix):
            wanted_clean = wanted_clean[: -len(suffix)]
    for c in checkpoints:
        if wanted_clean in (c.prefix, c.name) or c.prefix.endswith("/" + wanted_clean):
            return c
    if wanted_clean.isdigit():
        for c in checkpoints:
            if c.step == int(wanted_clean):
                return c
    return None
