"""An export base as the publisher reads it: its paths, and the versions TF Serving would see in it.

Example::

    from tf_export_pipeline.publish.export_base import ExportBase
    from tf_export_pipeline.storage import open_storage
    base = ExportBase(open_storage("/srv/models/ranker"))
    print(base.versions(), base.live_version())
"""

from __future__ import annotations

from tf_export_pipeline.layout import SAVED_MODEL_PB
from tf_export_pipeline.publish.versioning import MAX_VERSION
from tf_export_pipeline.storage import Storage


class ExportBase:
    """The paths and version listing that manifests, claims, the ledger and the publisher build on."""

    def __init__(self, store: Storage, promotion: str = "auto"):
        self.store = store
        self.base = store.root
        self.promotion = promotion

    # -- layout ----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return self.store.join(self.base, *parts)

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

    def is_whole(self, final: str) -> bool:
        """Whether a version directory is complete. On object stores a version
        being moved is listed before it is whole; ``saved_model.pb`` moves last."""
        if self.store.is_local:
            return self.store.isdir(final)
        return self.store.isfile(self.store.join(final, SAVED_MODEL_PB))
