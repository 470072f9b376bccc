"""Version numbers are claimed, not guessed: one create-only ``_exports/claims/<version>`` per number,
and the serving order checked against the other claims.

Example::

    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage
    pub = Publisher(open_storage("/srv/models/m"))
    print(pub.claims())      # {1732147200: {"checkpoint": ..., "step": 300, "claimed_at": ...}}
    print(pub.taken())       # every number claimed or published

A claim is taken with a create-only write; a writer that loses the race for a
number tries the next one, a bounded number of times. Its note names the
checkpoint, so two racing publishes of one config each see the other's claim
and at least one refuses a number that would break training order.
"""

from __future__ import annotations

import json
import time

from tf_export_pipeline.checkpoints import Checkpoint
from tf_export_pipeline.errors import PipelineError, PublishError, ServingOrderError
from tf_export_pipeline.layout import CLAIMS_DIR, EXPORTS_DIR
from tf_export_pipeline.publish.manifest import Manifests
from tf_export_pipeline.publish.metadata import read_record, to_metadata
from tf_export_pipeline.publish.storage_check import require_checked_store
from tf_export_pipeline.publish.versioning import MAX_VERSION, training_order

# A claim with neither a ledger entry nor a version directory this long after
# it was taken belongs to a publish that died before its commit: it no longer
# counts for the serving order, and gc removes it. A publish takes seconds
# from its claim to its ledger entry.
CLAIM_TTL_SECONDS = 600.0


class Claims(Manifests):
    """The claims of an export base (under :class:`tf_export_pipeline.publish.Publisher`)."""

    def claim_path(self, version: int) -> str:
        return self.path(EXPORTS_DIR, CLAIMS_DIR, str(version))

    def claims(self) -> dict[int, dict]:
        """Every claim by version number, with its note (one listing on GCS)."""
        out = {}
        for entry in self.store.list_dir(self.path(EXPORTS_DIR, CLAIMS_DIR)):
            if entry.is_dir or not entry.name.isdigit():
                continue
            note = read_record(self.store, entry, "claimed_at") or {}
            note.setdefault("mtime", entry.mtime)
            out[int(entry.name)] = note
        return out

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
