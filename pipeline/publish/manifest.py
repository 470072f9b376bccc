"""The manifest: what a version is and where it came from, written into staging before the commit, and the
file list a published version is checked against.

Example::

    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage
    pub = Publisher(open_storage("/srv/models/m"))
    version = pub.live_version()
    print(pub.manifest(version)["checkpoint"]["step"], pub.why_not_whole(version))   # 300 None

The manifest (``assets.extra/export_manifest.json`` in the version) names the
checkpoint, the config hash, the ledger key, the versioning, the validation
results, the run, and every file of the version with its size and crc32c.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tf_export_pipeline import __version__
from tf_export_pipeline.checkpoints import Checkpoint
from tf_export_pipeline.layout import MANIFEST, SAVED_MODEL_PB
from tf_export_pipeline.publish.export_base import ExportBase
from tf_export_pipeline.publish.staging import StagingGone
from tf_export_pipeline.publish.versioning import MAX_VERSION
from tf_export_pipeline.storage import Storage


def new_manifest(*, version: int, checkpoint: Checkpoint, config_hash: str, ledger_key: str, versioning: str,
                 validation: dict | None, files: dict[str, dict], claimed_at: float, extra: dict | None = None,
                 run: dict | None = None) -> dict[str, Any]:
    """The manifest of ``version``; ``extra`` adds keys of its own and times beside ``claimed_at``."""
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
        "times": {"claimed_at": claimed_at, **((extra or {}).get("times") or {})},
        **({"run": run} if run else {}),
    }
    for key, value in (extra or {}).items():
        if key != "times":
            manifest[key] = value
    return manifest


def write_manifest(store: Storage, staging: str, manifest: dict[str, Any]) -> None:
    """Write the manifest into staging, never re-creating a staging directory that is gone."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    target = store.join(staging, MANIFEST)
    if store.is_local:
        try:
            os.mkdir(os.path.dirname(target))
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise StagingGone(f"staging is gone (removed by gc or by hand?); the next run exports the "
                              f"checkpoint again: {staging}") from None
    store.write_bytes(target, data)


class Manifests(ExportBase):
    """The manifests of an export base's versions (under :class:`tf_export_pipeline.publish.Publisher`)."""

    def manifest(self, version: int) -> dict | None:
        try:
            return json.loads(self.store.read_text(self.path(str(version), MANIFEST)))
        except (FileNotFoundError, ValueError, OSError):
            return None

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

    def why_not_whole(self, version: int) -> str | None:
        """Why ``version`` is not a whole published version, or None: it has its saved_model.pb, its
        manifest, and every file the manifest lists."""
        if not 0 <= version <= MAX_VERSION:
            return "not a number TF Serving reads as a version, 0 to 2**63-1"
        final = self.version_path(version)
        # is_whole trusts a local directory (a rename made it whole); a directory made by hand is not
        # a publish, and TF Serving fails to load a version without saved_model.pb: check the file.
        if not self.is_whole(final):
            return "no such version"
        if not self.store.isfile(self.store.join(final, SAVED_MODEL_PB)):
            return f"no {SAVED_MODEL_PB}"
        manifest = self.manifest(version)
        if manifest is None:
            return "no manifest"
        # A version that lost files since its publish (variables/ removed by hand) would fail to load.
        return self.check_files(version, manifest)
