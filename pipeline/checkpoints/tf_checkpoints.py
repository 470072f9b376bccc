"""TensorFlow checkpoints (``tf.train.Checkpoint``, ``CheckpointManager``) as :class:`Checkpoint` records.

A checkpoint is a prefix ``<dir>/ckpt-<n>`` with ``<prefix>.index`` and shards
``<prefix>.data-0000k-of-0000N``. The ``checkpoint`` state file lists the ones the
manager still keeps; older ones it no longer lists are found by their index.
"""

from __future__ import annotations

import os
import re

from tf_export_pipeline.checkpoints.checkpoint import Checkpoint, crc32c_b64, stamp_of_shards, step_of
from tf_export_pipeline.storage import Entry, Storage

STATE_FILE = "checkpoint"
_SHARD = re.compile(r"^(?P<prefix>.+)\.data-(?P<k>\d{5})-of-(?P<n>\d{5})$")
_STATE_LINE = re.compile(r'^\s*(?P<key>[a-z_]+)\s*:\s*(?P<value>"(?:[^"\\]|\\.)*"|[-0-9.eE+]+)\s*$')


def is_format_of(names: set[str]) -> bool:
    """Any TF checkpoint file: a state file, an index or a data shard."""
    return STATE_FILE in names or any(n.endswith(".index") or _SHARD.match(n) for n in names)


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


def discover(store: Storage, directory: str, by_name: dict[str, Entry], step_pattern: str | None = None
             ) -> list[Checkpoint]:
    """The TF checkpoints among the files ``by_name`` of ``directory``, sorted by step, then write time."""
    listed: list[str] = []
    times: dict[str, float] = {}
    if STATE_FILE in by_name:
        try:
            listed, raw_times = parse_state_file(store.read_text(store.join(directory, STATE_FILE)))
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
    shard_entries: dict[str, list[Entry]] = {}
    for name, entry in by_name.items():
        if name.endswith(".index"):
            prefixes.add(name[: -len(".index")])
        m = _SHARD.match(name)
        if m:
            prefixes.add(m.group("prefix"))
            shards.setdefault(m.group("prefix"), {})[int(m.group("k"))] = int(m.group("n"))
            shard_entries.setdefault(m.group("prefix"), []).append(entry)

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
                step=step_of(name),
                written_at=written,
                complete=not missing,
                missing=missing,
                index_size=index.size if index is not None else 0,
                index_crc32c=crc,
                listed=name in listed,
                data_stamp=stamp_of_shards(shard_entries.get(name, [])),
            )
        )
    found.sort(key=lambda c: (c.step if c.step is not None else -1, c.written_at or 0.0, c.name))
    return found


def shard_entries(entries: list[Entry], name: str) -> list[Entry]:
    """The data shards of the checkpoint ``name`` among a directory's entries."""
    out = []
    for e in entries:
        m = _SHARD.match(e.name)
        if m and not e.is_dir and m.group("prefix") == name:
            out.append(e)
    return out


def changed_since_discovery(store: Storage, ckpt: Checkpoint) -> bool:
    """Whether the files of ``ckpt`` on local disk are no longer those discovery saw: its index
    (size and crc32c, its identity) or its data shards (see :func:`stamp_of_shards`)."""
    try:
        with open(ckpt.prefix + ".index", "rb") as fh:
            index = fh.read()
    except FileNotFoundError:
        return True
    if len(index) != ckpt.index_size or (ckpt.index_crc32c and crc32c_b64(index) != ckpt.index_crc32c):
        return True
    if ckpt.data_stamp is None:
        return False  # a record from before shards were stamped: the index is all there is to compare
    return stamp_of_shards(shard_entries(store.list_dir(os.path.dirname(ckpt.prefix)), ckpt.name)) != ckpt.data_stamp
