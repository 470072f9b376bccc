"""Serving control: TF Serving's model config file, with stable and canary labels, promotion and rollback.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl
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
versions no label needs, keeping those another promotion has just listed and
is about to label (dropping one would make the server unload what it just
loaded, and that promotion start over). Every write is atomic (a temporary
name, then a rename, under a lock file, on local disk; one upload conditional
on the previous generation on GCS, or on the previous ETag on S3 and Azure
Blob), so two promotions at once never lose an update: the one that loses
re-reads the file and tries again. Every change is recorded in the export
base, ``_exports/serving/history/``, one create-only record per write, in the
order of the writes; a record that does not read as one (edited by hand, torn)
is skipped with a warning naming it.

An entry belongs to the export base its ``base_path`` names: a config whose
model name's entry serves another export base (a copied config that kept the
model name) is refused, and the entry is left to the config that wrote it.
The entry follows ``serving.policy``: the first publish after the policy
changed rewrites it (``latest``: the highest version, no list and no labels;
``labels``: a ``specific`` list with the labels a publish sets; ``newest``: a
``specific`` list of one version, no labels).

Under ``policy: newest`` each publish lists its version alone once the version
is whole against its manifest's file list: TF Serving's ``latest``, except that
the server meets a version only through the file. Where a version folder is
listed from its first copied object (promotion ``object_move``), watching the
folders would let the server load a version still being copied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tf_export_pipeline.errors import ConfigError, PipelineError
from tf_export_pipeline.layout import HISTORY_DIR, SAVED_MODEL_PB
from tf_export_pipeline.publish import Publisher
from tf_export_pipeline.publish.versioning import MAX_VERSION
from tf_export_pipeline.storage import Storage, open_storage

STABLE, CANARY = "stable", "canary"
LABEL_PATTERN = re.compile(r"^[a-zA-Z0-9_]+$")
WRITE_ATTEMPTS = 8
RELOAD_MARGIN_MAX_SECONDS = 30.0
WRITE_NONCE_KEY = "tf_export_write"  # an identifier: Azure Blob metadata names allow no hyphen
HISTORY_METADATA_KEY = "tf-export-record"
# How long past its reload wait a version listed by a promotion counts as about to be labelled. A
# promotion that died between its two writes leaves its version listed this long, no longer.
PENDING_GRACE_SECONDS = 60.0

log = logging.getLogger(__name__)


class ConcurrentChange(Exception):
    """The file changed between our read and our write: read it again."""


class ForeignEntry(ConfigError):
    """The model name's entry in the file serves another export base: it is that config's, not ours."""


KEEP = object()  # what a change function returns to leave the entry as it is


def _protos():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return model_server_config_pb2, text_format


# -- the file ---------------------------------------------------------------------------
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


def _name_time(name: str) -> float:
    """The time a history record's name starts with (nanoseconds); +inf when it has none."""
    try:
        return int(name.split("-", 1)[0]) / 1e9
    except ValueError:
        return float("inf")


_RECORD_TEXT_FIELDS = ("id", "command", "phase", "model", "file", "host", "generation")
_warned_records: set[str] = set()


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def record_problem(rec: Any) -> str | None:
    """Why a parsed history record cannot be used (a field of the wrong type), or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    at = rec.get("at", 0)
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        return "'at' is not a time in seconds"
    for key in _RECORD_TEXT_FIELDS:
        if key in rec and not isinstance(rec[key], str):
            return f"'{key}' is not text"
    if "written" in rec and not isinstance(rec["written"], bool):
        return "'written' is not true or false"
    for key in ("versions_before", "versions_after"):
        value = rec.get(key)
        if value is not None and not (isinstance(value, list) and all(map(_is_version, value))):
            return f"'{key}' is not a list of versions"
    for key in ("labels_before", "labels_after"):
        value = rec.get(key)
        if value is not None and not (isinstance(value, dict)
                                      and all(isinstance(k, str) and _is_version(v) for k, v in value.items())):
            return f"'{key}' is not a mapping of labels to versions"
    return None


def _skip_record(url: str, why: str) -> None:
    """Warn once per process of a history record that is left out."""
    if url not in _warned_records:
        _warned_records.add(url)
        log.warning("skipping unreadable serving history record (%s): %s", why, url)


def _same_base(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    if a == b:
        return True
    # the same directory spelled through a symlink is the same export base
    return "://" not in a and "://" not in b and os.path.realpath(a) == os.path.realpath(b)


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


def newest_advice(promotion: str, serving) -> str | None:
    """Why ``serving.policy: newest`` should be set, or None: promotion ``object_move`` makes a version
    folder visible object by object, and TF Serving watching the folders may meet it partial."""
    if promotion != "object_move" or (serving is not None and serving.policy != "latest"):
        return None
    how, fix = (("without a serving: section", "add a serving: section with policy: newest") if serving is None
                else ("under serving.policy: latest", "set serving.policy: newest"))
    return (f"promotion is object_move here, so a version folder is listed from its first copied object and "
            f"TF Serving watching the export base {how} may load a version before it is whole; {fix} "
            f"(TF Serving started on its model config file) to serve each new version only once it is whole")


def served_version(whole: Iterable[int], state: EntryState | None = None) -> int | None:
    """The version TF Serving serves to a request that names none, as the model config file says.

    With a ``specific`` list the highest listed version that is whole; under
    ``latest`` (or ``all``) the highest whole version; with no entry none, as
    a server started on the file does not know the model. ``state`` None: the
    server watches the export base itself (``--model_base_path``), so the
    highest. A name beyond int64 is no version to TF Serving.
    """
    candidates = {v for v in whole if 0 <= v <= MAX_VERSION}
    if state is not None and state.policy == "none":
        return None
    if state is not None and state.policy == "specific":
        candidates &= set(state.listed)
    return max(candidates, default=None)


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
    def from_config(cls, cfg, base: Storage | None = None) -> ServingControl:
        if cfg.serving is None:
            raise ConfigError(f"the config has no serving: section (model_name, model_config_file, policy): "
                              f"{cfg.source or cfg.export_base}")
        base = base or open_storage(cfg.export_base, cfg.storage_options)
        return cls(cfg, base, ModelConfigFile(cfg.serving.model_config_file, cfg.storage_options))

    # -- reading -----------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The export base as the entry's ``base_path`` names it."""
        return self.base.url(self.base.root)

    def _require_own(self, entry) -> None:
        """Refuse an entry that serves another export base: a copied config that kept its model name
        would otherwise point the other config's labels at versions its base does not hold."""
        if entry is not None and entry.base_path and not _same_base(entry.base_path, self.base_url):
            raise ForeignEntry(f"model '{self.serving.model_name}' in the model config file serves export base "
                               f"{entry.base_path}, not this config's export_base {self.base_url} (a model name "
                               f"belongs to one export base: give this config its own serving.model_name, or, if the "
                               f"export base moved, edit the entry's base_path): "
                               f"{self.file.url}")

    def current(self) -> EntryState:
        """The model name's entry as the file has it, whichever export base it serves."""
        config, _ = self.file.read()
        return state_of(entry_of(config, self.serving.model_name))

    def own_state(self) -> EntryState:
        """This config's entry: :meth:`current`, refused (:class:`ForeignEntry`) when the model name's
        entry serves another export base."""
        config, _ = self.file.read()
        entry = entry_of(config, self.serving.model_name)
        self._require_own(entry)
        return state_of(entry)

    def view(self) -> dict:
        """The entry, and the checkpoint each labelled or listed version came from."""

        state = self.own_state()
        pub = Publisher(self.base)
        sources = {}
        for v in sorted(set(state.listed) | set(state.labels.values())):
            ck = (pub.manifest(v) or {}).get("checkpoint") or {}
            sources[v] = {"checkpoint": ck.get("path"), "step": ck.get("step"),
                          "exists": self._not_whole(pub, v) is None}
        return {"model": self.serving.model_name, "file": self.file.url, "policy": self.serving.policy,
                "entry_policy": state.policy, "versions": state.listed, "labels": state.labels,
                "sources": sources, "rollback_to": self.rollback_target(state)}

    def history(self, since: float | None = None) -> list[dict]:
        """Every recorded write of this model's entry, oldest first (``since``: written at or after it).

        ``at`` is taken between the read a write is based on and the write
        itself (under the lock on local disk), so a write based on another's
        result sorts after it: the records form a chain, each one's
        ``*_before`` being the previous one's ``*_after``.
        """
        directory = self.base.join(self.base.root, *HISTORY_DIR)
        records = []
        for e in self.base.list_dir(directory):
            if e.is_dir or e.name.startswith("."):
                continue
            if since is not None and _name_time(e.name) < since:
                continue  # the name starts with the record's time: no need to read it
            try:
                # On GCS the listing carries each record in its metadata: one request per page, not
                # one per record, for a history that grows by two records every night.
                text = (e.metadata or {}).get(HISTORY_METADATA_KEY) or self.base.read_bytes(e.path)
            except FileNotFoundError:
                continue  # removed since the listing
            try:
                rec = json.loads(text)
            except ValueError:  # not JSON, or not UTF-8
                rec = None
            # One record edited by hand must not stop every command that reads the history.
            problem = "not JSON" if rec is None else record_problem(rec)
            if problem is not None:
                _skip_record(self.base.url(e.path), problem)
                continue
            # The export base keeps the history of the entry it serves; a renamed model starts anew.
            if rec.get("model", self.serving.model_name) == self.serving.model_name:
                records.append(rec)
        return sorted(records, key=lambda r: (r.get("at", 0), r.get("id", "")))

    def rollback_target(self, state: EntryState | None = None, records: list[dict] | None = None) -> int | None:
        """The stable version before the current one, skipping those rolled back from (``records``: the
        history to read, when the caller has read it already)."""
        stack: list[int] = []
        for rec in self.history() if records is None else records:
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
        state = state or self.own_state()
        current = state.labels.get(STABLE)
        if current is not None and stack and stack[-1] == current and len(stack) >= 2:
            return stack[-2]
        return None

    def protected_versions(self) -> set[int]:
        """What retention must keep: every version the file lists or labels, and the rollback target."""
        state = self.own_state()
        kept = set(state.listed) | set(state.labels.values())
        target = self.rollback_target(state)
        if target is not None:
            kept.add(target)
        return kept

    def reference_version(self) -> int | None:
        """The version new exports are compared with: stable under labels, else None (the highest).

        None too when the entry serves another export base: the run still
        publishes, and its serving step says why the entry is left alone.
        """
        if self.serving.policy != "labels":
            return None
        try:
            return self.own_state().labels.get(STABLE)
        except ForeignEntry:
            return None

    # -- changing ------------------------------------------------------------------------
    def on_publish(self, version: int, now: bool = False) -> dict | None:
        """After a publish: label it canary (and stable, if nothing is stable yet), per the config.

        An entry written under the other policy is rewritten to this one's.
        """
        if self.serving.policy == "latest":
            return self._ensure_latest_entry()
        if self.serving.policy == "newest":
            return self._serve_newest(version)
        before = self.own_state()
        # An entry that serves the highest version (written under policy: latest, or by hand) would
        # go on serving each new version at once: it gets its specific list and labels now.
        switching = before.policy in ("latest", "all")
        if not (self.serving.canary_on_publish or switching):
            return None
        # Labels a person put on that entry stay, listed first like any version a label moves to.
        moves = dict(before.labels) if switching else {}
        if self.serving.canary_on_publish:
            moves[CANARY] = version
        # "Stable if nothing is stable yet" is decided on the file the label write is based on, not
        # on a read before the reload wait: a promotion made meanwhile is never overwritten.
        rec = self.move(moves, command="publish", now=now, unless_set={STABLE: version})
        if switching:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(rec["labels_after"].items()))
            log.warning("serving.policy is now 'labels': the entry of %s in %s serves versions %s (labels: %s), "
                        "no longer the highest", self.serving.model_name, self.file.url, rec["versions_after"],
                        labels)
        return rec

    def promote(self, version: int, label: str = STABLE, now: bool = False, command: str = "promote") -> dict:
        self._require_labels()
        if not LABEL_PATTERN.match(label):
            raise ConfigError(f"a label is letters, digits and _ only, got {label!r}: {self.file.url}")
        self.own_state()  # an entry of another export base is refused before anything is looked at
        self._require_whole(version)
        return self.move({label: version}, command=command, now=now)

    def rollback(self, to: int | None = None, now: bool = False) -> dict:
        self._require_labels()  # before the history: under latest the reason is the policy, not the history
        if to is None:
            to = self.rollback_target()
            if to is None:
                raise ConfigError(f"no earlier stable version in the history to roll back to (give --to "
                                  f"VERSION): {self.file.url}")
        return self.promote(to, STABLE, now=now, command="rollback")

    def _require_labels(self) -> None:
        if self.serving.policy != "labels":
            raise ConfigError(f"serving.policy is '{self.serving.policy}': labels need policy: labels: "
                              f"{self.cfg.source or self.file.url}")

    def _require_whole(self, version: int) -> None:

        pub = Publisher(self.base)
        why = self._not_whole(pub, version)
        if why is not None:
            raise ConfigError(f"version {version} does not exist or is not whole ({why}): "
                              f"{self.base.url(pub.version_path(version))}")

    def _not_whole(self, pub, version: int) -> str | None:
        """Why ``version`` is not a whole published version, or None: it has its saved_model.pb, its
        manifest, and every file the manifest lists."""
        if not 0 <= version <= MAX_VERSION:
            return "not a number TF Serving reads as a version, 0 to 2**63-1"
        final = pub.version_path(version)
        # is_whole trusts a local directory (a rename made it whole); a directory made by hand is not
        # a publish, and TF Serving fails to load a version without saved_model.pb: check the file.
        if not pub.is_whole(final):
            return "no such version"
        if not self.base.isfile(self.base.join(final, SAVED_MODEL_PB)):
            return f"no {SAVED_MODEL_PB}"
        manifest = pub.manifest(version)
        if manifest is None:
            return "no manifest"
        # A version that lost files since its publish (variables/ removed by hand) would fail to load.
        return pub.check_files(version, manifest)

    def move(self, moves: dict[str, int], command: str, now: bool = False,
             unless_set: dict[str, int] | None = None) -> dict:
        """Point each label of ``moves`` at its version, in TF Serving's two steps.

        Labels of ``unless_set`` are set only if the file has none of that name
        when the label write happens.
        """
        unless_set = unless_set or {}
        targets = set(moves.values()) | set(unless_set.values())
        for _ in range(WRITE_ATTEMPTS):
            if not targets <= set(self.current().listed):
                self._write(lambda s: (sorted(set(s.listed) | targets), s.labels), command, phase="list")
                if not now:
                    time.sleep(self.reload_wait())

            def relabel(s: EntryState):
                if not targets <= set(s.listed):
                    raise ConcurrentChange("a version to label was dropped meanwhile")
                labels = {**unless_set, **s.labels, **moves}
                return sorted(set(labels.values()) | self._pending(s, labels)), labels

            try:
                return self._write(relabel, command, phase="labels")
            except ConcurrentChange:
                continue  # another promotion dropped our version: list it again
        raise PipelineError(f"model config file kept changing under {WRITE_ATTEMPTS} attempts to move "
                            f"{', '.join(moves)}; try again: {self.file.url}")

    def _pending(self, state: EntryState, labels: dict[str, int]) -> set[int]:
        """Listed versions no label names that a promotion listed moments ago and has not labelled yet.

        Read from the history: the last write that added the version to the
        list is recent, and no write since has labelled it.
        """
        unlabelled = set(state.listed) - set(labels.values())
        if not unlabelled:
            return set()
        pending: set[int] = set()
        for rec in self.history(since=time.time() - self.reload_wait() - PENDING_GRACE_SECONDS):
            added = set(rec.get("versions_after") or ()) - set(rec.get("versions_before") or ())
            if rec.get("phase") == "list":
                pending |= added & unlabelled
            pending -= set((rec.get("labels_after") or {}).values())
        return pending

    def reload_wait(self) -> float:
        """How long the server may take to load a newly listed version: its poll interval plus a margin."""
        seconds = self.serving.reload_seconds
        return seconds + min(seconds * 0.5, RELOAD_MARGIN_MAX_SECONDS)

    def _ensure_latest_entry(self) -> dict | None:
        """Under ``policy: latest`` the entry serves the highest version: written once, then left alone
        (labels a person put on it included), unless it lists versions (written under ``policy: labels``):
        then it would never load a new version, so its list and labels go."""
        before = self.own_state()
        if before.policy not in ("none", "specific"):
            return None
        # Decided again on the locked read: an entry written meanwhile (and its labels) is left alone.
        rec = self._write(lambda s: (None, None) if s.policy in ("none", "specific") else KEEP, "publish",
                          phase="entry" if before.policy == "none" else "policy")
        if not rec["written"]:
            return None
        if rec["phase"] == "policy":
            labels = ", ".join(f"{k}={v}" for k, v in sorted(rec["labels_before"].items())) or "none"
            log.warning("serving.policy is now 'latest': the entry of %s in %s serves the highest version and "
                        "no longer lists versions %s or labels (%s)", self.serving.model_name, self.file.url,
                        rec["versions_before"], labels)
        return rec

    def _serve_newest(self, version: int) -> dict | None:
        """Under ``policy: newest`` the entry lists one version, the highest whole one, with no labels.

        A version listed above ``version`` that is still whole stays (serving
        never goes back to an older version); any other entry (written under
        ``latest`` or ``labels``, or by hand) is rewritten.
        """
        before = self.own_state()
        # This write is what lets the server meet the version: on a store without an atomic folder
        # rename the folder was listed long before its last object landed.
        self._require_whole(version)
        pub = Publisher(self.base)

        def newest(s: EntryState):
            # Decided on the locked read: a newer publish that wrote meanwhile keeps its version.
            above = [v for v in s.listed if v > version and self._not_whole(pub, v) is None] \
                if s.policy == "specific" else []
            return [max([version, *above])], {}

        switching = before.policy in ("latest", "all") or bool(before.labels) or len(before.listed) > 1
        rec = self._write(newest, "publish",
                          phase="entry" if before.policy == "none" else "policy" if switching else "version")
        if rec["written"] and rec["phase"] == "policy":
            was = (f"versions {rec['versions_before']}" if before.policy == "specific" else "the highest version")
            labels = ", ".join(f"{k}={v}" for k, v in sorted(rec["labels_before"].items())) or "none"
            log.warning("serving.policy is now 'newest': the entry of %s in %s serves version %s alone, no longer "
                        "%s, and has no labels (had: %s)", self.serving.model_name, self.file.url,
                        rec["versions_after"][0], was, labels)
        return rec

    def _write(self, change, command: str, phase: str) -> dict:
        """Apply ``change`` (state -> (listed, labels), or KEEP) to a fresh read and write it conditionally.

        The history record is written before the lock is let go and its time
        taken after the read: records sort in the order the writes happened.
        """
        for _ in range(WRITE_ATTEMPTS):
            with self.file.locked():
                config, token = self.file.read()
                entry = entry_of(config, self.serving.model_name)
                self._require_own(entry)  # decided on the read the write is based on
                before = state_of(entry)
                wanted = change(before)
                if wanted is KEEP:
                    return self._record(command, phase, before, before, written=False)
                listed, labels = wanted
                if entry is None:
                    entry = config.model_config_list.config.add()
                    entry.name = self.serving.model_name
                    entry.model_platform = "tensorflow"
                entry.base_path = self.base_url
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
                at = time.time()
                try:
                    generation = self.file.write(config, token)
                except ConcurrentChange:
                    continue
                return self._record(command, phase, before, after, written=True, at=at, generation=generation)
        raise PipelineError(f"model config file kept changing under {WRITE_ATTEMPTS} attempts to write it: "
                            f"{self.file.url}")

    def _record(self, command: str, phase: str, before: EntryState, after: EntryState, written: bool,
                at: float | None = None, generation: str | None = None) -> dict:
        at = time.time() if at is None else at
        rec = {"id": f"{int(at * 1e9)}-{secrets.token_hex(4)}", "at": at, "command": command,
               "phase": phase, "model": self.serving.model_name, "file": self.file.url,
               "versions_before": before.listed, "versions_after": after.listed,
               "labels_before": before.labels, "labels_after": after.labels,
               "host": socket.gethostname(), "written": written}
        if generation is not None:
            rec["generation"] = str(generation)  # of the file this write made (GCS generation, S3/Azure ETag)
        if written:
            path = self.base.join(self.base.root, *HISTORY_DIR, rec["id"] + ".json")
            text = json.dumps(rec, sort_keys=True)
            self.base.create_only(path, text.encode(),
                                  metadata={HISTORY_METADATA_KEY: text} if self.base.is_gcs else None)
        return rec


def move_label(control: ServingControl, *, version: int | None, label: str = STABLE, rollback: bool = False,
               to: int | None = None, now: bool = False) -> tuple[dict, list[dict]]:
    """Point ``label`` at ``version``, or roll ``stable`` back (to ``to``, or to the previous stable).

    Returns the result (``status`` ``promoted`` or ``rolled_back``, the label,
    its version before and after, every label after) and one change per label
    that moved (none: it pointed there already).
    """
    label = STABLE if rollback else (str(label or "").strip() or STABLE)
    if rollback:
        rec = control.rollback(to=to, now=now)  # no earlier stable: a ConfigError
    else:
        if version is None:
            raise ConfigError(f"no version to promote was given: {control.cfg.source or control.cfg.export_base}")
        rec = control.promote(version, label=label, now=now)
    before, after = rec.get("labels_before") or {}, rec.get("labels_after") or {}
    result = {"status": "rolled_back" if rollback else "promoted", "command": rec.get("command"),
              "model": rec.get("model"), "label": label, "version": after.get(label),
              "previous": before.get(label), "labels": after, "versions": rec.get("versions_after"),
              "file": rec.get("file")}
    changes = [{**result, "label": name, "version": after.get(name), "previous": before.get(name)}
               for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
    return result, changes
