"""Serving control: one model's entry in TF Serving's model config file, changed in TF Serving's two steps.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl
    control = ServingControl.from_config(load_config("serving.yaml"))
    control.promote(1732147200, label="stable", now=True)
    print(control.view()["labels"])      # {'stable': 1732147200, 'canary': ...}
    control.rollback(now=True)           # stable goes back to the previous stable

The pipeline owns one entry of the file, the one named ``serving.model_name``;
entries of other models are kept as they are. TF Serving lets a label point
only at a version it has loaded, so a label moves in two writes: first a file
that adds the new version to the list; then, once the server has re-read it
(``reload_seconds`` plus a margin, or at once with ``now``), a file that moves
the label and drops the versions no label needs, keeping those another
promotion has just listed and is about to label (dropping one would make the
server unload what it just loaded, and that promotion start over). Two
promotions at once never lose an update: the one that loses re-reads the file
and tries again. Every write is recorded in the serving history.

An entry belongs to the export base its ``base_path`` names: a config whose
model name's entry serves another export base (a copied config that kept the
model name) is refused, and the entry is left to the config that wrote it.
The entry follows ``serving.policy``: the first publish after the policy
changed rewrites it (``latest``: the highest version, no list and no labels;
``labels``: a ``specific`` list with the labels a publish sets; ``newest``: a
``specific`` list of one version, no labels).
"""

from __future__ import annotations

import logging
import os
import time

from tf_export_pipeline.errors import ConfigError, PipelineError
from tf_export_pipeline.publish import Publisher
from tf_export_pipeline.serving.config_file import (
    ConcurrentChange,
    EntryState,
    ModelConfigFile,
    entry_of,
    state_of,
)
from tf_export_pipeline.serving.history import new_record, read_history, store_record
from tf_export_pipeline.serving.labels import CANARY, LABEL_PATTERN, STABLE, previous_stable
from tf_export_pipeline.storage import Storage, open_storage

WRITE_ATTEMPTS = 8
RELOAD_MARGIN_MAX_SECONDS = 30.0
# How long past its reload wait a version listed by a promotion counts as about to be labelled. A
# promotion that died between its two writes leaves its version listed this long, no longer.
PENDING_GRACE_SECONDS = 60.0

log = logging.getLogger(__name__)


class ForeignEntry(ConfigError):
    """The model name's entry in the file serves another export base: it is that config's, not ours."""


KEEP = object()  # what a change function returns to leave the entry as it is


def _same_base(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    if a == b:
        return True
    # the same directory spelled through a symlink is the same export base
    return "://" not in a and "://" not in b and os.path.realpath(a) == os.path.realpath(b)



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
                          "exists": pub.why_not_whole(v) is None}
        return {"model": self.serving.model_name, "file": self.file.url, "policy": self.serving.policy,
                "entry_policy": state.policy, "versions": state.listed, "labels": state.labels,
                "sources": sources, "rollback_to": self.rollback_target(state)}

    def history(self, since: float | None = None) -> list[dict]:
        """Every recorded write of this model's entry, oldest first (see :func:`read_history`)."""
        return read_history(self.base, self.serving.model_name, since)

    def rollback_target(self, state: EntryState | None = None, records: list[dict] | None = None) -> int | None:
        """The stable version before the current one, skipping those rolled back from (``records``: the
        history to read, when the caller has read it already)."""
        records = self.history() if records is None else records
        state = state or self.own_state()
        return previous_stable(records, state.labels.get(STABLE))

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
        why = pub.why_not_whole(version)
        if why is not None:
            raise ConfigError(f"version {version} does not exist or is not whole ({why}): "
                              f"{self.base.url(pub.version_path(version))}")

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
            above = [v for v in s.listed if v > version and pub.why_not_whole(v) is None] \
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
        rec = new_record(command=command, phase=phase, model=self.serving.model_name, file=self.file.url,
                         before=before, after=after, written=written, at=at, generation=generation)
        if written:
            store_record(self.base, rec)
        return rec
