"""The publisher: a publish from staging to a whole version, and the finishing of committed ones.

Example::

    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage
    pub = Publisher(open_storage("/srv/models/m"))
    print(pub.versions(), pub.live_version())

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
import time

from tf_export_pipeline import faults
from tf_export_pipeline.checkpoints import Checkpoint
from tf_export_pipeline.errors import PipelineError, PublishError
from tf_export_pipeline.layout import MANIFEST
from tf_export_pipeline.publish.claims import CLAIM_TTL_SECONDS
from tf_export_pipeline.publish.ledger import UNKNOWN, Ledger
from tf_export_pipeline.publish.manifest import new_manifest, write_manifest
from tf_export_pipeline.publish.metadata import to_metadata
from tf_export_pipeline.publish.promotion import PromotionStrategy, VersionExistsError, choose_strategy
from tf_export_pipeline.publish.staging import claim_lease_for_publish, drop_lease, staging_name, verify_staging
from tf_export_pipeline.publish.versioning import first_candidate
from tf_export_pipeline.run_info import RUN_KEY, summary_of
from tf_export_pipeline.storage import Storage


class Publisher(Ledger):
    """Claims, ledger, manifests and promotion for one export base."""

    def __init__(self, store: Storage, strategy: PromotionStrategy | None = None, promotion: str = "auto"):
        super().__init__(store, promotion)
        self.strategy = strategy or choose_strategy(store, promotion)

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
        claimed_at = time.time()
        note = {"staging": staging, "checkpoint": checkpoint.prefix, "checkpoint_name": checkpoint.name,
                "step": checkpoint.step, "written_at": checkpoint.written_at, "config_hash": config_hash,
                "ledger_key": ledger_key, "claimed_at": claimed_at}
        version, attempts = self.claim(start, max_claim_attempts, note, listed)
        try:
            if not allow_outrank:
                self.check_serving_order(version, checkpoint, config_hash, versioning)
            faults.hold("claimed")
            manifest = new_manifest(version=version, checkpoint=checkpoint, config_hash=config_hash,
                                    ledger_key=ledger_key, versioning=versioning, validation=validation,
                                    files=files, claimed_at=claimed_at, extra=extra, run=run)
            write_manifest(self.store, staging, manifest)
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

    def _discard(self, staging: str) -> None:
        try:
            self.store.rm(staging, recursive=True)
        except (OSError, PipelineError):
            pass  # gc removes it after the lease
        drop_lease(self.store, staging_name(staging))
