"""Serving control: TF Serving's model config file, with stable and canary labels, promotion and rollback.

Example::

    from pipeline.config import load_config
    from pipeline.serving import ServingControl
    control = ServingControl.from_config(load_config("serving.yaml"))
    control.promote(1732147200, label="stable", now=True)
    print(control.view()["labels"])      # {'stable': 1732147200, 'canary': ...}
    control.rollback(now=True)           # stable goes back to the previous stable

TF Serving reads ``--model_config_file`` (a text-format ``ModelServerConfig``)
again every ``--model_config_file_poll_wait_seconds``. The pipeline owns one
entry of that file, the one named ``serving.model_name``; entries of other
models are kept as they are. The file is parsed and written with TF Serving's
own protos.

Under ``policy: labels`` the entry serves a ``specific`` list of versions with
``version_labels``. TF Serving lets a label point only at a version it has
loaded, so a label moves in two writes: first a file that adds the new version
to the list; then, once the server has re-read it (``reload_seconds`` plus a
margin, or at once with ``now``), a file that moves the label and drops the
versions no label needs. Every write is atomic (a temporary name, then a
rename, under a lock file, on local disk; one upload conditional on the
previous generation on GCS), so two promotions at once never lose an update:
the one that loses re-reads the file and tries again. Every change is
recorded in the export base, ``_exports/serving/history/``, one create-only
record per write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.errors import ConfigError, PipelineError
from pipeline.storage import Storage, open_storage

STABLE, CANARY = "stable", "canary"
LABEL_PATTERN = re.compile(r"^[a-zA-Z0-9_]+$")
HISTORY_DIR = ("_exports", "serving", "history")
WRITE_ATTEMPTS = 8
RELOAD_MARGIN_MAX_SECONDS = 30.0


class ConcurrentChange(Exception):
    """The file changed between our read and our write: read it again."""


def _protos():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return model_server_config_pb2, text_format


# -- the file ---------------------------------------------------------------------------
class ModelConfigFile:
    """Read and conditionally write one model config file, local or on GCS."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.store: Storage = open_storage(url, storage_options)
        if not (self.store.is_local or self.store.is_gcs):
            raise ConfigError(f"serving.model_config_file must be a local path or a gs:// URL: {url}")
        self.path = self.store.root

    def parse(self, text: str):
        pb2, text_format = _protos()
        config = pb2.ModelServerConfig()
        try:
            text_format.Parse(text, config)
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
                with open(self.path, "r", encoding="utf-8") as fh:
                    return self.parse(fh.read()), "local"
            except FileNotFoundError:
                return pb2.ModelServerConfig(), "local"
            except IsADirectoryError:
                raise ConfigError(f"model config file is a directory: {self.url}") from None
        for _ in range(WRITE_ATTEMPTS):
            try:
                before = self.store._gcs_object(self.path)
            except FileNotFoundError:
                return pb2.ModelServerConfig(), 0
            data = self.store.read_bytes(self.path)
            if self.store._gcs_object(self.path).get("generation") == before.get("generation"):
                return self.parse(data.decode("utf-8")), before["generation"]
        raise PipelineError(f"model config file keeps changing while it is read: {self.url}")

    def write(self, config, token: Any) -> None:
        """Write ``config`` if the file is still the one read with ``token``; else ConcurrentChange."""
        _, text_format = _protos()
        data = text_format.MessageToString(config).encode()
        if self.store.is_local:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(self.path)}.tmp-{secrets.token_hex(6)}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)  # the server never reads a half-written file
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
            return
        try:
            self.store._gcs_upload(self.path, data, if_generation_match=token)
        except FileExistsError:
            raise ConcurrentChange(self.url) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise read-modify-write between processes on local disk (GCS uses generations)."""
        if not self.store.is_local:
            yield
            return
        import fcntl

        lock = os.path.abspath(self.path) + ".lock"
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
    listed: list[int]
    labels: dict[str, int]
    policy: str  # "specific", "latest", "all" or "none" (no entry)


def entry_of(config, name: str):
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


class ServingControl:
    """One model's entry in TF Serving's model config file, and its history."""

    def __init__(self, cfg, base: Storage, file: ModelConfigFile):
        if cfg.serving is None:
            raise ConfigError(f"the config has no serving: section (model_name, model_config_file, policy): "
                              f"{cfg.source or cfg.export_base}")
        self.cfg = cfg
        self.serving = cfg.serving
        self.base = base
        self.file = file

    @classmethod
    def from_config(cls, cfg, base: Storage | None = None) -> "ServingControl":
        if cfg.serving is None:
            raise ConfigError(f"the config has no serving: section (model_name, model_config_file, policy): "
                              f"{cfg.source or cfg.export_base}")
        base = base or open_storage(cfg.export_base, cfg.storage_options)
        return cls(cfg, base, ModelConfigFile(cfg.serving.model_config_file, cfg.storage_options))

    # -- reading -----------------------------------------------------------------------
    def current(self) -> EntryState:
        config, _ = self.file.read()
        return state_of(entry_of(config, self.serving.model_name))

    def view(self) -> dict:
        """The entry, and the checkpoint each labelled or listed version came from."""
        from pipeline.publish import Publisher

        state = self.current()
        pub = Publisher(self.base)
        sources = {}
        for v in sorted(set(state.listed) | set(state.labels.values())):
            ck = (pub.manifest(v) or {}).get("checkpoint") or {}
            sources[v] = {"checkpoint": ck.get("path"), "step": ck.get("step"),
                          "exists": pub.is_whole(pub.version_path(v))}
        return {"model": self.serving.model_name, "file": self.file.url, "policy": self.serving.policy,
                "entry_policy": state.policy, "versions": state.listed, "labels": state.labels,
                "sources": sources, "rollback_to": self.rollback_target(state)}

    def history(self) -> list[dict]:
        directory = self.base.join(self.base.root, *HISTORY_DIR)
        records = []
        for e in self.base.list_dir(directory):
            if e.is_dir or e.name.startswith("."):
                continue
            try:
                records.append(json.loads(self.base.read_bytes(e.path)))
            except (FileNotFoundError, ValueError):
                continue
        return sorted(records, key=lambda r: (r.get("at", 0), r.get("id", "")))

    def rollback_target(self, state: EntryState | None = None) -> int | None:
        """The stable version before the current one, skipping those rolled back from."""
        stack: list[int] = []
        for rec in self.history():
            before, after = (rec.get("labels_before") or {}).get(STABLE), (rec.get("labels_after") or {}).get(STABLE)
            if after is None or after == before:
                continue
            if rec.get("command") == "rollback" and stack and stack[-1] == before:
                stack.pop()
                if not stack or stack[-1] != after:
                    stack.append(after)
            else:
                if not stack and before is not None:
                    stack.append(before)
                stack.append(after)
        state = state or self.current()
        current = state.labels.get(STABLE)
        if current is not None and stack and stack[-1] == current and len(stack) >= 2:
            return stack[-2]
        return None

    def protected_versions(self) -> set[int]:
        """What retention must keep: every version the file lists or labels, and the rollback target."""
        state = self.current()
        kept = set(state.listed) | set(state.labels.values())
        target = self.rollback_target(state)
        if target is not None:
            kept.add(target)
        return kept

    def reference_version(self) -> int | None:
        """The version new exports are compared with: stable under labels, else None (the highest)."""
        if self.serving.policy != "labels":
            return None
        return self.current().labels.get(STABLE)

    # -- changing ------------------------------------------------------------------------
    def on_publish(self, version: int, now: bool = False) -> dict | None:
        """After a publish: label it canary (and stable, if nothing is stable yet), per the config."""
        if self.serving.policy == "latest":
            return self._ensure_latest_entry()
        if not self.serving.canary_on_publish:
            return None
        state = self.current()
        moves = {CANARY: version}
        if STABLE not in state.labels:
            moves[STABLE] = version
        return self.move(moves, command="publish", now=now)

    def promote(self, version: int, label: str = STABLE, now: bool = False, command: str = "promote") -> dict:
        if self.serving.policy != "labels":
            raise ConfigError(f"serving.policy is 'latest': labels need policy: labels: "
                              f"{self.cfg.source or self.file.url}")
        if not LABEL_PATTERN.match(label):
            raise ConfigError(f"a label is letters, digits and _ only, got {label!r}: {self.file.url}")
        self._require_whole(version)
        return self.move({label: version}, command=command, now=now)

    def rollback(self, to: int | None = None, now: bool = False) -> dict:
        if to is None:
            to = self.rollback_target()
            if to is None:
                raise PipelineError(f"no earlier stable version in the history to roll back to (give --to "
                                    f"VERSION): {self.file.url}")
        return self.promote(to, STABLE, now=now, command="rollback")

    def _require_whole(self, version: int) -> None:
        from pipeline.publish import Publisher

        pub = Publisher(self.base)
        final = pub.version_path(version)
        if not pub.is_whole(final) or pub.manifest(version) is None:
            raise ConfigError(f"version {version} does not exist or is not whole: {self.base.url(final)}")

    def move(self, moves: dict[str, int], command: str, now: bool = False) -> dict:
        """Point each label of ``moves`` at its version, in TF Serving's two steps."""
        targets = set(moves.values())
        for _ in range(WRITE_ATTEMPTS):
            if not targets <= set(self.current().listed):
                self._write(lambda s: (sorted(set(s.listed) | targets), s.labels), command, phase="list")
                if not now:
                    time.sleep(self.reload_wait())

            def relabel(s: EntryState):
                if not targets <= set(s.listed):
                    raise ConcurrentChange("a version to label was dropped meanwhile")
                labels = {**s.labels, **moves}
                return sorted(set(labels.values())), labels

            try:
                return self._write(relabel, command, phase="labels")
            except ConcurrentChange:
                continue  # another promotion dropped our version: list it again
        raise PipelineError(f"model config file kept changing under {WRITE_ATTEMPTS} attempts to move "
                            f"{', '.join(moves)}; try again: {self.file.url}")

    def reload_wait(self) -> float:
        """How long the server may take to load a newly listed version: its poll interval plus a margin."""
        seconds = self.serving.reload_seconds
        return seconds + min(seconds * 0.5, RELOAD_MARGIN_MAX_SECONDS)

    def _ensure_latest_entry(self) -> dict | None:
        """Under ``policy: latest`` the entry serves the highest version; written once, then left alone."""
        config, _ = self.file.read()
        if entry_of(config, self.serving.model_name) is not None:
            return None
        return self._write(lambda s: (None, None), "publish", phase="entry")

    def _write(self, change, command: str, phase: str) -> dict:
        """Apply ``change`` (state -> (listed, labels)) to a fresh read and write it conditionally."""
        for _ in range(WRITE_ATTEMPTS):
            with self.file.locked():
                config, token = self.file.read()
                entry = entry_of(config, self.serving.model_name)
                before = state_of(entry)
                listed, labels = change(before)
                if entry is None:
                    entry = config.model_config_list.config.add()
                    entry.name = self.serving.model_name
                    entry.model_platform = "tensorflow"
                entry.base_path = self.base.url(self.base.root)
                if listed is None:
                    entry.model_version_policy.latest.num_versions = 1
                    entry.ClearField("version_labels")
                else:
                    entry.model_version_policy.specific.ClearField("versions")
                    entry.model_version_policy.specific.versions.extend(listed)
                    entry.ClearField("version_labels")
                    for label, version in sorted(labels.items()):
                        entry.version_labels[label] = version
                after = state_of(entry)
                if after == before:
                    return self._record(command, phase, before, after, written=False)
                try:
                    self.file.write(config, token)
                except ConcurrentChange:
                    continue
            return self._record(command, phase, before, after, written=True)
        raise PipelineError(f"model config file kept changing under {WRITE_ATTEMPTS} attempts to write it: "
                            f"{self.file.url}")

    def _record(self, command: str, phase: str, before: EntryState, after: EntryState, written: bool) -> dict:
        rec = {"id": f"{time.time_ns()}-{secrets.token_hex(4)}", "at": time.time(), "command": command,
               "phase": phase, "model": self.serving.model_name, "file": self.file.url,
               "versions_before": before.listed, "versions_after": after.listed,
               "labels_before": before.labels, "labels_after": after.labels,
               "host": socket.gethostname(), "written": written}
        if written:
            path = self.base.join(self.base.root, *HISTORY_DIR, rec["id"] + ".json")
            self.base.create_only(path, json.dumps(rec, sort_keys=True).encode())
        return rec
