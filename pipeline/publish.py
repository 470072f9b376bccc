"""Publishing: version numbers are claimed, not guessed; each checkpoint is published once.

Example::

    from pipeline.publish import Publisher
    from pipeline.storage import open_storage
    pub = Publisher(open_storage("/srv/models/m"))
    print(pub.versions(), pub.live_version())

The export base holds, besides the integer version directories TF Serving loads::

    _exports/claims/<version>        create-only: who owns a version number
    _exports/ledger/<ledger-key>     create-only: checkpoint identity + config -> version

The order of a publish is: claim a number, write the manifest into staging,
record the ledger entry (the commit point), promote. A process that dies after
the ledger entry is finished by the next run ("roll forward"); one that dies
before it leaves only staging, which the next run ignores and ``gc`` removes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from pipeline import __version__, faults
from pipeline.checkpoints import Checkpoint
from pipeline.errors import PublishError
from pipeline.promotion import PromotionStrategy, VersionExistsError, choose_strategy
from pipeline.storage import Storage

MANIFEST = "assets.extra/export_manifest.json"
EXPORTS_DIR = "_exports"
STAGING_PREFIX = "temp-"
# A publisher on another machine that wrote its ledger entry this long ago and
# has not promoted is taken for dead; promotion itself takes seconds.
PUBLISH_LEASE_SECONDS = 900


def owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _owner_alive(entry: dict) -> bool:
    who = entry.get("owner") or {}
    if who.get("host") == socket.gethostname():
        pid = who.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - float(entry.get("created_at", 0)) < PUBLISH_LEASE_SECONDS


def first_candidate(policy: str, checkpoint: Checkpoint, now: float, live: int | None) -> int:
    """The first version number a policy proposes for ``checkpoint``."""
    if policy == "timestamp":
        start = int(now)
        return max(start, live + 1) if live is not None else start
    if policy == "checkpoint_time":
        if checkpoint.written_at is None:
            raise PublishError(f"checkpoint has no write time for versioning 'checkpoint_time': {checkpoint.prefix}")
        return int(checkpoint.written_at)
    if policy == "step":
        if checkpoint.step is None:
            raise PublishError(f"checkpoint name carries no step for versioning 'step': {checkpoint.prefix}")
        return int(checkpoint.step)
    raise PublishError(f"unknown versioning policy '{policy}'")


class Publisher:
    """Claims, ledger and promotion for one export base."""

    def __init__(self, store: Storage, strategy: PromotionStrategy | None = None, promotion: str = "auto"):
        self.store = store
        self.base = store.root
        self.strategy = strategy or choose_strategy(store, promotion)

    # -- layout ----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return self.store.join(self.base, *parts)

    def claim_path(self, version: int) -> str:
        return self.path(EXPORTS_DIR, "claims", str(version))

    def ledger_path(self, key: str) -> str:
        return self.path(EXPORTS_DIR, "ledger", key)

    def version_path(self, version: int) -> str:
        return self.path(str(version))

    # -- what is there ---------------------------------------------------------
    def versions(self) -> list[int]:
        """Published versions: integer-named directories, as TF Serving sees them."""
        out = []
        for entry in self.store.list_dir(self.base):
            if entry.is_dir and entry.name.isdigit():
                out.append(int(entry.name))
        return sorted(out)

    def live_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def manifest(self, version: int) -> dict | None:
        try:
            return json.loads(self.store.read_text(self.path(str(version), MANIFEST)))
        except (FileNotFoundError, ValueError, OSError):
            return None

    def ledger_entry(self, key: str) -> dict | None:
        try:
            return json.loads(self.store.read_text(self.ledger_path(key)))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {"version": None, "corrupt": True}

    def ledger(self) -> dict[str, dict]:
        out = {}
        for entry in self.store.list_dir(self.path(EXPORTS_DIR, "ledger")):
            got = self.ledger_entry(entry.name)
            if got is not None:
                out[entry.name] = got
        return out

    # -- exactly once ----------------------------------------------------------
    def resolve(self, key: str) -> dict | None:
        """What the ledger says of ``key``, finishing a publish whose process died.

        Returns None when the checkpoint has not been published under this
        config, else ``{"version": V, "path": ..., "state": "published"|"in_progress"|"rolled_forward"}``.
        """
        entry = self.ledger_entry(key)
        if entry is None:
            return None
        version = entry.get("version")
        if version is None:
            raise PublishError(f"ledger entry is unreadable; remove it to re-export: {self.store.url(self.ledger_path(key))}")
        final = self.version_path(version)
        if self.is_whole(final):
            return {"version": version, "path": self.store.url(final), "state": "published"}
        if _owner_alive(entry):
            return {"version": version, "path": self.store.url(final), "state": "in_progress"}
        staging = entry.get("staging")
        if staging and self.store.exists(self.store.join(staging, MANIFEST)):
            try:
                self.strategy.promote(self.store, staging, final)
            except (FileNotFoundError, VersionExistsError):
                if not self.is_whole(final):
                    raise
            return {"version": version, "path": self.store.url(final), "state": "rolled_forward"}
        # The process died after its ledger entry, and its staging is gone (or
        # the version was pruned): the entry stands, the version was published.
        return {"version": version, "path": self.store.url(final), "state": "published"}

    def is_whole(self, final: str) -> bool:
        """Whether a version directory is complete. On object stores a version
        being moved is listed before it is whole; ``saved_model.pb`` moves last."""
        if self.store.is_local:
            return self.store.isdir(final)
        return self.store.isfile(self.store.join(final, "saved_model.pb"))

    def taken(self) -> set[int]:
        """Numbers already claimed or published, from one listing of each."""
        claims = {int(e.name) for e in self.store.list_dir(self.path(EXPORTS_DIR, "claims")) if e.name.isdigit()}
        return claims | set(self.versions())

    def claim(self, start: int, attempts: int, note: dict) -> tuple[int, int]:
        """Claim the first free number from ``start``; returns (version, attempts used).

        Numbers that the listings show as taken are skipped without a try, so a
        run of checkpoints written within one second (``checkpoint_time``) gets
        consecutive numbers; ``attempts`` bounds the create-only writes lost to
        writers racing for the same number.
        """
        taken = self.taken()
        version = start
        for i in range(attempts):
            while version in taken:
                version += 1
            if not self.store.exists(self.version_path(version)) and \
                    self.store.create_only(self.claim_path(version), json.dumps(note).encode()):
                # A claim file is written after the version directory only by a
                # foreign writer; never promote over one that is there.
                if not self.store.exists(self.version_path(version)):
                    return version, i + 1
            taken.add(version)
        raise PublishError(
            f"could not claim a version number in {attempts} attempts from {start} "
            f"(raise max_claim_attempts, or look for a stuck writer): {self.store.url(self.path(EXPORTS_DIR, 'claims'))}"
        )

    def release(self, version: int) -> None:
        self.store.rm(self.claim_path(version))

    def publish(self, *, staging: str, checkpoint: Checkpoint, ledger_key: str, config_hash: str,
                versioning: str, max_claim_attempts: int, validation: dict | None,
                guard_outrank: bool = False, extra: dict | None = None, now: float | None = None) -> dict:
        """Claim, manifest, ledger, promote. Returns the run record."""
        faults.hold("publishing")
        done = self.resolve(ledger_key)
        if done is not None:
            self._discard(staging)  # gone already if it was the staging just rolled forward
            # A publish that died after its ledger entry was just finished by this run.
            status = "published" if done["state"] == "rolled_forward" else "skipped"
            return {"status": status, "version": done["version"], "path": done["path"], "claim_attempts": 0}

        live = self.live_version()
        now = time.time() if now is None else now
        start = first_candidate(versioning, checkpoint, now, live)
        note = {"owner": owner(), "staging": staging, "checkpoint": checkpoint.prefix, "claimed_at": time.time()}
        version, attempts = self.claim(start, max_claim_attempts, note)
        if guard_outrank and live is not None and version > live:
            live_manifest = self.manifest(live) or {}
            live_written = (live_manifest.get("checkpoint") or {}).get("written_at")
            if live_written is not None and checkpoint.written_at is not None and checkpoint.written_at < live_written:
                self.release(version)
                self._discard(staging)
                raise PublishError(
                    f"versioning '{versioning}' would serve an older checkpoint ({checkpoint.name}) above the live "
                    f"version {live}; use versioning 'checkpoint_time' or allow it explicitly: {checkpoint.prefix}"
                )
        faults.hold("claimed")

        manifest = {
            "format": 1,
            "version": version,
            "checkpoint": {**checkpoint.identity(), "name": checkpoint.name, "step": checkpoint.step,
                           "written_at": checkpoint.written_at},
            "config_hash": config_hash,
            "ledger_key": ledger_key,
            "versioning": versioning,
            "validation": validation,
            "tool": {"name": "tf-export-pipeline", "version": __version__},
            "times": {"claimed_at": note["claimed_at"], **((extra or {}).get("times") or {})},
        }
        for key, value in (extra or {}).items():
            if key != "times":
                manifest[key] = value
        self.store.write_bytes(self.store.join(staging, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())

        entry = {"version": version, "staging": staging, "checkpoint": checkpoint.prefix, "step": checkpoint.step,
                 "config_hash": config_hash, "owner": owner(), "created_at": time.time()}
        if not self.store.create_only(self.ledger_path(ledger_key), json.dumps(entry).encode()):
            # Another process published this checkpoint while we exported it.
            self._discard(staging)
            self.release(version)
            done = self.resolve(ledger_key) or {}
            return {"status": "skipped", "version": done.get("version"), "path": done.get("path"),
                    "claim_attempts": attempts}
        faults.hold("ledgered")
        final = self.version_path(version)
        self.strategy.promote(self.store, staging, final)
        return {"status": "published", "version": version, "path": self.store.url(final), "claim_attempts": attempts}

    def _discard(self, staging: str) -> None:
        try:
            self.store.rm(staging, recursive=True)
        except OSError:
            pass  # gc removes it after the lease
