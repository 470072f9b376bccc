"""Publishing: version numbers are claimed, not guessed; each checkpoint is published once.

Example::

    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage
    pub = Publisher(open_storage("/srv/models/m"))
    print(pub.versions(), pub.live_version())

The export base holds, besides the integer version directories TF Serving loads::

    _exports/claims/<version>        create-only: who owns a version number
    _exports/ledger/<ledger-key>     create-only: checkpoint identity + config -> version
    _exports/leases/<staging name>   renewed while staging is in use (see tf_export_pipeline.publish.staging)

The order of a publish is: renew the staging lease, check staging against its
file list, claim a number (and check the serving order against the other
claims), write the manifest into staging, check staging again, record the
ledger entry (the commit point), promote.

The ledger entry is the commit record. Once it exists, any process on any
host may finish the publish, at any time and concurrently with others: every
promotion step is idempotent (a rename that already happened, a create-only
copy that already landed), and nothing undoes what another finisher relies
on. No step guesses whether another process is alive. Before the ledger entry
nothing is visible; the staging of a publish that died there is collected by
``gc`` once its lease has run out.
"""

from __future__ import annotations

import json
import os
import time

from tf_export_pipeline import __version__, faults
from tf_export_pipeline.checkpoints import Checkpoint
from tf_export_pipeline.errors import PipelineError, PublishError, ServingOrderError
from tf_export_pipeline.layout import (
    CLAIMS_DIR,
    EXPORTS_DIR,
    LEDGER_DIR,
    MANIFEST,
    REMOVED_DIR,
    SAVED_MODEL_PB,
    TEMP_MARK,
)
from tf_export_pipeline.publish.metadata import from_metadata, is_torn, to_metadata
from tf_export_pipeline.publish.promotion import PromotionStrategy, VersionExistsError, choose_strategy
from tf_export_pipeline.publish.staging import (
    StagingGone,
    claim_lease_for_publish,
    drop_lease,
    staging_name,
    verify_staging,
)
from tf_export_pipeline.publish.storage_check import require_checked_store
from tf_export_pipeline.publish.versioning import MAX_VERSION, first_candidate, training_order
from tf_export_pipeline.run_info import RUN_KEY, summary_of
from tf_export_pipeline.storage import Storage

# A claim with neither a ledger entry nor a version directory this long after
# it was taken belongs to a publish that died before its commit: it no longer
# counts for the serving order, and gc removes it. A publish takes seconds
# from its claim to its ledger entry.
CLAIM_TTL_SECONDS = 600.0
UNKNOWN = "<unknown>"  # what a ledger read that failed says of an entry


class Publisher:
    """Claims, ledger and promotion for one export base."""

    def __init__(self, store: Storage, strategy: PromotionStrategy | None = None, promotion: str = "auto"):
        self.store = store
        self.base = store.root
        self.promotion = promotion
        self.strategy = strategy or choose_strategy(store, promotion)

    # -- layout ----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return self.store.join(self.base, *parts)

    def claim_path(self, version: int) -> str:
        return self.path(EXPORTS_DIR, CLAIMS_DIR, str(version))

    def ledger_path(self, key: str) -> str:
        return self.path(EXPORTS_DIR, LEDGER_DIR, key)

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

    def whole_versions(self) -> list[int]:
        """Versions that are whole. Locally every listed one (a version appears by rename); on an
        object store one request per listed version (bounded by retention, not by history),
        since a version whose objects are being moved is listed before its saved_model.pb lands."""
        listed = self.versions()
        if self.store.is_local:
            return listed
        return [v for v in listed if self.is_whole(self.version_path(v))]

    def live_version(self, listed: list[int] | None = None) -> int | None:
        """The highest version TF Serving can serve (of ``listed``, else of a new listing): a name beyond
        int64 (left by an older release) it never reads, so it neither serves it nor must a new version
        outrank it."""
        versions = [v for v in (self.versions() if listed is None else listed) if v <= MAX_VERSION]
        return versions[-1] if versions else None

    def manifest(self, version: int) -> dict | None:
        try:
            return json.loads(self.store.read_text(self.path(str(version), MANIFEST)))
        except (FileNotFoundError, ValueError, OSError):
            return None

    def ledger_entry(self, key: str) -> dict | None:
        """The ledger entry of ``key``, or None. A torn entry (left by an older writer
        or a damaged disk) is removed, so the checkpoint can be published again."""
        path = self.ledger_path(key)
        for _ in range(3):
            try:
                data = self.store.read_bytes(path)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except IsADirectoryError:
                raise PublishError(f"ledger entry is a directory, not a file: {self.store.url(path)}") from None
            except PermissionError:
                raise PublishError(f"permission denied reading the ledger entry: {self.store.url(path)}") from None
            if not is_torn(data):
                return json.loads(data)
            self.store.remove_if_torn(path, is_torn)
        raise PublishError(f"ledger entry keeps coming back torn: {self.store.url(path)}")

    def ledger(self) -> dict[str, dict]:
        """Every ledger entry by key: one listing on GCS (versions ride in the object metadata)."""
        out = {}
        for entry in self.store.list_dir(self.path(EXPORTS_DIR, LEDGER_DIR)):
            if entry.is_dir or entry.name.startswith("."):
                continue
            got = from_metadata(entry.metadata)
            if "version" not in got:
                got = self.ledger_entry(entry.name)
            if got is not None:
                out[entry.name] = got
        return out

    def claims(self) -> dict[int, dict]:
        """Every claim by version number, with its note (one listing on GCS)."""
        out = {}
        for entry in self.store.list_dir(self.path(EXPORTS_DIR, CLAIMS_DIR)):
            if entry.is_dir or not entry.name.isdigit():
                continue
            note = self._record_of(entry, "claimed_at") or {}
            note.setdefault("mtime", entry.mtime)
            out[int(entry.name)] = note
        return out

    def _record_of(self, entry, present: str) -> dict | None:
        """A small record from its listing's metadata when that carries ``present``, else read; None when
        it cannot be read (gone, or not a JSON object)."""
        got = from_metadata(entry.metadata)
        if present not in got:
            try:
                got = json.loads(self.store.read_bytes(entry.path))
            except (FileNotFoundError, ValueError, UnicodeDecodeError):
                return None
        return got if isinstance(got, dict) else None

    # -- exactly once ----------------------------------------------------------
    def resolve(self, key: str) -> dict | None:
        """What the ledger says of ``key``, finishing a committed publish if it is not whole.

        Returns None when the checkpoint has not been published under this
        config, else ``{"version": V, "path": ..., "state": "published"|"rolled_forward"}``
        for a version directory that is whole.
        """
        entry = self.ledger_entry(key)
        if entry is None:
            return None
        version = int(entry["version"])
        final = self.version_path(version)
        if self.is_whole(final):
            return {"version": version, "path": self.store.url(final), "state": "published"}
        if self._finish(entry):
            return {"version": version, "path": self.store.url(final), "state": "rolled_forward"}
        if self.forget_if_dangling(key, entry):
            return None  # its version was removed (retention cut short, or by hand): export it again
        raise PublishError(f"version {version} was committed but could not be promoted; the next run tries "
                           f"again: {self.store.url(final)}")

    def forget_if_dangling(self, key: str, entry: dict) -> bool:
        """Remove the ledger entry of ``key`` if neither its version nor its staging exists.

        That is an entry whose version was removed (a prune killed between
        removing the version and forgetting it, or a hand): nothing can finish
        it, and the checkpoint may be exported again. A committed publish in
        flight always has its staging or its whole version (promotion removes
        staging only once the version is whole), so it is never taken for one;
        the version is checked again after staging, in case a promotion ended
        between the two looks.
        """
        version = int(entry["version"])
        final = self.version_path(version)
        staging = self.store.strip(str(entry.get("staging") or ""))
        if self.is_whole(final) or (staging and self.store.exists(staging)) or self.is_whole(final):
            return False
        if self.ledger_entry(key) != entry:
            return False  # replaced meanwhile: not the entry that was judged
        try:
            self.store.rm(self.ledger_path(key))
        except FileNotFoundError:
            pass
        self.release(version)
        return True

    def finish_committed(self) -> dict[str, list]:
        """Finish every committed publish whose version is not whole, and forget dangling entries.

        Run by every prune, so a publish killed after its commit is finished
        even when no later run exports that checkpoint again.
        """
        listed = set(self.whole_versions())
        finished, forgotten = [], []
        for key, entry in self.ledger().items():
            version = entry.get("version")
            if not isinstance(version, int) or version in listed:
                continue
            full = self.ledger_entry(key)
            if full is None or self.is_whole(self.version_path(version)):
                continue
            if self._finish(full):
                finished.append(version)
            elif self.forget_if_dangling(key, full):
                forgotten.append(key)
        return {"finished": finished, "forgotten": forgotten}

    def _finish(self, entry: dict) -> bool:
        """Promote the staging of a committed entry; True once its version is whole.

        Safe to run by any number of processes at once: each step either
        happens or finds it happened already.
        """
        version = int(entry["version"])
        final = self.version_path(version)
        staging = entry.get("staging")
        promoted = False
        if staging:
            staging = self.store.strip(staging)
            try:
                self.strategy.promote(self.store, staging, final)
                promoted = True  # a strategy returns only once the version is whole
            except FileNotFoundError:
                pass  # another finisher got there first, or is moving the last objects
            except VersionExistsError:
                # Another finisher's identical copies are not "other content": a version that does not
                # match its manifest here holds objects that staging does not, and no run can finish it.
                if not self.is_whole(final) or self.check_files(version) is not None:
                    raise
            except PublishError:
                # e.g. staging without saved_model.pb: another finisher is deleting the sources
                # of a version it has made whole; anything else is raised
                if not self.is_whole(final):
                    raise
            drop_lease(self.store, staging_name(staging))
        return promoted or self.is_whole(final)

    def is_whole(self, final: str) -> bool:
        """Whether a version directory is complete. On object stores a version
        being moved is listed before it is whole; ``saved_model.pb`` moves last."""
        if self.store.is_local:
            return self.store.isdir(final)
        return self.store.isfile(self.store.join(final, SAVED_MODEL_PB))

    def check_files(self, version: int, manifest: dict | None = None) -> str | None:
        """The first file of the manifest's file list that the version lacks or holds changed, as a
        phrase; None when every one is there (or the manifest has no file list).

        One listing: sizes always, crc32c where the store lists it (object
        stores), so a local version's bytes are not read again.
        """
        manifest = self.manifest(version) if manifest is None else manifest
        files = (manifest or {}).get("files")
        if not isinstance(files, dict) or not files:
            return None
        present = {e.name: e for e in self.store.walk(self.version_path(version))}
        for rel, want in sorted(files.items()):
            have, want = present.get(rel), want if isinstance(want, dict) else {}
            if have is None:
                return f"{rel} is missing, of the {len(files)} files its manifest lists"
            if want.get("size") is not None and have.size != want["size"]:
                return f"{rel} has {have.size} bytes, its manifest says {want['size']}"
            if have.crc32c and want.get("crc32c") and have.crc32c != want["crc32c"]:
                return f"{rel} does not match its manifest's crc32c"
        return None

    def taken(self, listed: list[int] | None = None) -> set[int]:
        """Numbers already claimed or published (``listed``, else a new listing of the versions)."""
        claims = {int(e.name) for e in self.store.list_dir(self.path(EXPORTS_DIR, CLAIMS_DIR)) if e.name.isdigit()}
        return claims | set(self.versions() if listed is None else listed)

    def claim(self, start: int, attempts: int, note: dict, listed: list[int] | None = None) -> tuple[int, int]:
        """Claim the first free number from ``start``; returns (version, attempts used).

        Numbers that the listings show as taken are skipped without a try, so a
        run of checkpoints written within one second (``checkpoint_time``) gets
        consecutive numbers; ``attempts`` bounds the create-only writes lost to
        writers racing for the same number. ``listed``: the versions as the
        caller just listed them.
        """
        require_checked_store(self.store, self.promotion)
        taken = self.taken(listed)
        version = start
        for i in range(attempts):
            while version in taken:
                version += 1
            if version > MAX_VERSION:
                break  # TF Serving would never read it
            # The first number comes from the listings just made; after a lost race they are older, so the
            # version directory is looked for before claiming. The check after the claim is what guards.
            if (i == 0 or not self.store.exists(self.version_path(version))) and \
                    self.store.create_only(self.claim_path(version), json.dumps(note).encode(),
                                           metadata=to_metadata(note)):
                # A claim file is written after the version directory only by a
                # foreign writer; never promote over one that is there.
                if not self.store.exists(self.version_path(version)):
                    return version, i + 1
            taken.add(version)
        raise PublishError(
            f"could not claim a version number in {attempts} attempts from {start} "
            f"(raise max_claim_attempts, or look for a stuck writer): "
            f"{self.store.url(self.path(EXPORTS_DIR, CLAIMS_DIR))}"
        )

    def release(self, version: int) -> None:
        try:
            self.store.rm(self.claim_path(version))
        except (OSError, PipelineError):
            pass  # gc collects claims that no ledger entry and no version use

    def check_serving_order(self, version: int, checkpoint: Checkpoint, config_hash: str, versioning: str) -> None:
        """Refuse ``version`` if it would put ``checkpoint`` out of training order under this config.

        Compared with every other claim of this config that is published, committed or
        still fresh (a publish racing this one): an older checkpoint must not
        end above a newer one, nor a newer one below an older one, or the
        highest version would not come from the newest checkpoint. Two racing
        publishes each see the other's claim, so at least one of them refuses.
        """
        mine = training_order(checkpoint.step, checkpoint.written_at)
        versions = set(self.versions())
        now = time.time()
        seen: set[int] = set()
        others: list[tuple[int, tuple[int, float], str]] = []
        for v, note in self.claims().items():
            if v == version or note.get("config_hash") is None:
                continue
            seen.add(v)
            if note.get("config_hash") != config_hash:
                continue
            claimed = float(note.get("claimed_at") or note.get("mtime") or 0)
            if v not in versions and now - claimed > CLAIM_TTL_SECONDS:
                continue  # abandoned before its commit, or its version was removed
            others.append((v, training_order(note.get("step"), note.get("written_at")),
                           str(note.get("checkpoint_name") or note.get("checkpoint"))))
        for v in versions - seen - {version}:  # versions whose claims carry no checkpoint (older layouts)
            manifest = self.manifest(v) or {}
            ck = manifest.get("checkpoint") or {}
            if manifest.get("config_hash") == config_hash:
                others.append((v, training_order(ck.get("step"), ck.get("written_at")), str(ck.get("name"))))
        for v, theirs, name in sorted(others):
            if v < version and theirs > mine:
                hint = {"timestamp": "--versioning checkpoint_time (numbers follow training time), or ",
                        "checkpoint_time": "--versioning step (checkpoints written within one second of each "
                                           "other have no whole second between them), or "}.get(versioning, "")
                raise ServingOrderError(
                    f"versioning '{versioning}' would give {checkpoint.name} version {version}, above version {v} "
                    f"of the newer checkpoint {name}, so TF Serving would serve the older model; use {hint}"
                    f"--allow-outrank (DAG param allow_outrank) to publish it anyway: {checkpoint.prefix}")
            if v > version and theirs < mine:
                raise ServingOrderError(
                    f"versioning '{versioning}' would give {checkpoint.name} version {version}, below version {v} "
                    f"of the older checkpoint {name}, which TF Serving would go on serving; use the versioning "
                    f"that numbered {v}, or --allow-outrank (DAG param allow_outrank) to publish it anyway: "
                    f"{checkpoint.prefix}")

    def publish(self, *, staging: str, files: dict[str, dict], checkpoint: Checkpoint, ledger_key: str,
                config_hash: str, versioning: str, max_claim_attempts: int, validation: dict | None,
                allow_outrank: bool = False, lease_seconds: float = 86400, extra: dict | None = None,
                now: float | None = None, run: dict | None = None) -> dict:
        """Check staging, claim, manifest, check again, ledger, promote. Returns the run record.

        ``files`` is the file list made when staging was written
        (:func:`tf_export_pipeline.publish.staging.file_list`); nothing that does not match it
        is committed. ``run`` (:func:`tf_export_pipeline.run_info.section`) names the run that made
        the version, in the manifest and the ledger entry. Raises
        :class:`tf_export_pipeline.publish.staging.StagingGone` when staging is gone, incomplete or
        past its lease: nothing was published, and the next run exports the checkpoint again.
        """
        faults.hold("publishing")
        done = self.resolve(ledger_key)
        if done is not None:
            self._discard(staging)
            # A publish that died after its ledger entry was just finished by this run.
            status = "published" if done["state"] == "rolled_forward" else "skipped"
            return {"status": status, "version": done["version"], "path": done["path"], "claim_attempts": 0}

        files = {k: v for k, v in files.items() if k != MANIFEST}  # the manifest is written below
        claim_lease_for_publish(self.store, staging, lease_seconds)
        verify_staging(self.store, staging, files)
        listed = self.versions()
        live = self.live_version(listed)
        now = time.time() if now is None else now
        start = first_candidate(versioning, checkpoint, now, live)
        note = {"staging": staging, "checkpoint": checkpoint.prefix, "checkpoint_name": checkpoint.name,
                "step": checkpoint.step, "written_at": checkpoint.written_at, "config_hash": config_hash,
                "ledger_key": ledger_key, "claimed_at": time.time()}
        version, attempts = self.claim(start, max_claim_attempts, note, listed)
        try:
            if not allow_outrank:
                self.check_serving_order(version, checkpoint, config_hash, versioning)
            faults.hold("claimed")
            manifest = {
                "format": 1,
                "version": version,
                "checkpoint": {**checkpoint.identity(), "path": checkpoint.prefix, "name": checkpoint.name,
                               "step": checkpoint.step, "written_at": checkpoint.written_at},
                "config_hash": config_hash,
                "ledger_key": ledger_key,
                "versioning": versioning,
                "validation": validation,
                "files": files,
                "tool": {"name": "tf-export-pipeline", "version": __version__},
                "times": {"claimed_at": note["claimed_at"], **((extra or {}).get("times") or {})},
                **({"run": run} if run else {}),
            }
            for key, value in (extra or {}).items():
                if key != "times":
                    manifest[key] = value
            self._write_manifest(staging, json.dumps(manifest, indent=1, sort_keys=True).encode())
            verify_staging(self.store, staging, files, deep=False)
            if not self.store.exists(self.claim_path(version)):
                raise PublishError(f"the claim on version {version} vanished before the commit (gc after a "
                                   f"pause longer than {CLAIM_TTL_SECONDS:.0f} s?); run again: "
                                   f"{self.store.url(self.claim_path(version))}")
        except BaseException:
            self.release(version)
            raise

        entry = {"version": version, "staging": staging, "checkpoint": checkpoint.prefix, "step": checkpoint.step,
                 "written_at": checkpoint.written_at, "config_hash": config_hash, "created_at": time.time(),
                 **({"run": run} if run else {})}
        try:
            # A listing returns the metadata (GCS): the run rides there as its one-line summary.
            committed = self.store.create_only(
                self.ledger_path(ledger_key), json.dumps(entry).encode(),
                metadata=to_metadata({"version": version, "staging": staging, "step": checkpoint.step,
                                      RUN_KEY: summary_of(run)}))
        except BaseException:
            # The entry may have landed before the error (an fsync, a lost answer): then it
            # stands and the version is finished by the next run. The claim is freed only
            # when the ledger is known not to name this staging.
            if self.committed_staging(ledger_key) not in (staging, UNKNOWN):
                self.release(version)
            raise
        if not committed:
            # Another process published this checkpoint while we exported it.
            self._discard(staging)
            self.release(version)
            done = self.resolve(ledger_key) or {}
            return {"status": "skipped", "version": done.get("version"), "path": done.get("path"),
                    "claim_attempts": attempts}
        faults.hold("ledgered")
        final = self.version_path(version)
        if not self._finish(entry):
            raise PublishError(f"version {version} was committed but is not whole after promotion; the next run "
                               f"finishes it: {self.store.url(final)}")
        return {"status": "published", "version": version, "path": self.store.url(final), "claim_attempts": attempts}

    def committed_staging(self, key: str) -> str | None:
        """The staging the ledger entry of ``key`` names, None without an entry, or
        :data:`UNKNOWN` when the ledger cannot be read (storage failing)."""
        try:
            entry = self.ledger_entry(key)
        except Exception:  # noqa: BLE001 - the caller must then keep what may be committed
            return UNKNOWN
        return self.store.strip(str(entry.get("staging") or "")) if entry else None

    def _write_manifest(self, staging: str, data: bytes) -> None:
        """Write the manifest into staging, never re-creating a staging directory that is gone."""
        target = self.store.join(staging, MANIFEST)
        if self.store.is_local:
            try:
                os.mkdir(os.path.dirname(target))
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise StagingGone(f"staging is gone (removed by gc or by hand?); the next run exports the "
                                  f"checkpoint again: {staging}") from None
        self.store.write_bytes(target, data)

    def retire(self, version: int) -> list[str]:
        """Forget ``version`` after retention removed it: its ledger entries and its claim.

        Each of its checkpoints gets a removal record first (see :meth:`removed`),
        so discovery marks it removed rather than pending and a backfill
        leaves it alone unless asked to export removed checkpoints again.
        Returns the keys removed.
        """
        removed = []
        for key, entry in self.ledger().items():
            if entry.get("version") == version:
                record = {"version": version, "checkpoint": entry.get("checkpoint"), "step": entry.get("step"),
                          "removed_at": time.time(), RUN_KEY: summary_of(entry.get(RUN_KEY))}
                path = self.path(EXPORTS_DIR, REMOVED_DIR, key)
                self.store.rm(path)  # a checkpoint exported again and removed again: the newer record
                self.store.create_only(path, json.dumps(record).encode(), metadata=to_metadata(record))
                try:
                    self.store.rm(self.ledger_path(key))
                    removed.append(key)
                except FileNotFoundError:
                    pass
        self.release(version)
        return removed

    def removed(self) -> dict[str, dict]:
        """Removal records by ledger key: ``{"version", "checkpoint", "step", "removed_at"}`` (one listing on GCS)."""
        out = {}
        for entry in self.store.list_dir(self.path(EXPORTS_DIR, REMOVED_DIR)):
            if entry.is_dir or entry.name.startswith(".") or TEMP_MARK in entry.name:
                continue
            got = self._record_of(entry, "removed_at")
            if got is not None:
                out[entry.name] = got
        return out

    def _discard(self, staging: str) -> None:
        try:
            self.store.rm(staging, recursive=True)
        except (OSError, PipelineError):
            pass  # gc removes it after the lease
        drop_lease(self.store, staging_name(staging))


__all__ = ["CLAIM_TTL_SECONDS", "UNKNOWN", "Publisher", "StagingGone", "first_candidate", "training_order"]
