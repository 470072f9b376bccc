"""Promotion: making a fully written staging directory visible as a version, at once.

Each way of doing it is one small class behind one small protocol, chosen per
storage. Every strategy keeps the rule TF Serving depends on: an integer-named
directory appears only when it is complete (on a flat object store: it holds
``saved_model.pb`` only once every other file is there).

- :class:`PosixRename`: ``rename(2)`` on local disk.
- :class:`FolderRename`: one atomic folder rename in a GCS bucket with
  hierarchical namespace (JSON API ``folders.rename``, the Storage Control
  ``RenameFolder`` operation). An existing destination is an error; there is
  no silent fallback to copying objects.
- :class:`ObjectMove`: flat object stores. Each object is copied server-side
  (GCS rewrite, no byte through the client), concurrently, each destination
  create-only where the server honours it and checked explicitly besides;
  ``saved_model.pb`` strictly last; the sources are deleted after. It runs
  only after the ledger entry, so a promotion cut short (an error, a kill) is
  finished by running it again, by any process, which skips what was already
  copied; nothing is undone that a concurrent finisher may rely on.

Example::

    from tf_export_pipeline.publish.promotion import choose_strategy
    strategy = choose_strategy(store, "auto")
    strategy.promote(store, "/srv/m/temp-1732147260-ab12", "/srv/m/1732147260")
"""

from __future__ import annotations

import logging
import os
import time
from typing import Protocol

from tf_export_pipeline import faults
from tf_export_pipeline.errors import PublishError
from tf_export_pipeline.layout import SAVED_MODEL_PB
from tf_export_pipeline.storage import Entry, GcsStore, Storage, fsync_dir, fsync_tree

log = logging.getLogger(__name__)

PROMOTIONS = ("auto", "rename", "object_move")


class VersionExistsError(PublishError):
    """The destination of a promotion already exists; nothing was changed."""


class PromotionStrategy(Protocol):
    name: str

    def promote(self, store: Storage, staging: str, final: str) -> None:
        """Make ``staging`` appear as ``final`` all at once, or raise and change nothing visible."""


class PosixRename:
    """``rename(2)`` on one filesystem, after the files and folders are on disk.

    ``rename`` silently replaces an *empty* target directory, so the caller must
    hold the claim for ``final``; the existence check here is a second guard.
    """

    name = "rename"

    def promote(self, store: Storage, staging: str, final: str) -> None:
        fsync_tree(staging)
        if os.path.lexists(final):
            raise VersionExistsError(f"version directory already exists: {final}")
        os.rename(staging, final)
        fsync_dir(os.path.dirname(final))


def _same(a: Entry, b: Entry) -> bool:
    if a.size != b.size:
        return False
    return a.crc32c is None or b.crc32c is None or a.crc32c == b.crc32c


def _same_tree(a: list[Entry], b: list[Entry]) -> bool:
    left, right = {e.name: e for e in a}, {e.name: e for e in b}
    return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)


class FolderRename:
    """One atomic folder rename in a GCS bucket with hierarchical namespace."""

    name = "rename"

    def __init__(self) -> None:
        self.stats: dict = {}

    def promote(self, store: Storage, staging: str, final: str) -> None:
        if not isinstance(store, GcsStore):  # choose_strategy picks it only for a bucket with folders
            raise PublishError(f"promotion 'rename' needs a GCS bucket with hierarchical namespace: {store.url(final)}")
        started = time.monotonic()
        before = store.walk(staging)
        if not before:
            raise FileNotFoundError(f"staging is empty or gone: {store.url(staging)}")
        if not any(e.name == SAVED_MODEL_PB for e in before):
            raise PublishError(f"staging holds no {SAVED_MODEL_PB}; refusing to promote it: {store.url(staging)}")
        if store.isdir(final):
            raise VersionExistsError(f"version directory already exists: {store.url(final)}")
        try:
            store.rename_folder(staging, final)
        except (FileExistsError, FileNotFoundError) as err:
            # The answer to our rename may have been lost and its retry refused:
            # then the destination holds exactly what staging held, and staging is gone.
            if _same_tree(before, store.walk(final)) and not store.isdir(staging):
                log.info("folder rename had already happened: %s", store.url(final))
            elif isinstance(err, FileExistsError):
                raise VersionExistsError(f"version directory already exists: {store.url(final)}") from None
            else:
                raise
        self.stats = {"strategy": self.name, "objects": len(before), "bytes_copied": 0,
                      "seconds": round(time.monotonic() - started, 4)}


class ObjectMove:
    """Server-side copy of each object, ``saved_model.pb`` last, then delete the sources."""

    name = "object_move"

    def __init__(self, concurrency: int = 16):
        self.concurrency = concurrency
        self.stats: dict = {}

    def promote(self, store: Storage, staging: str, final: str) -> None:
        started = time.monotonic()
        sources = store.walk(staging)
        if not sources:
            raise FileNotFoundError(f"staging is empty or gone: {store.url(staging)}")
        by_name = {e.name: e for e in sources}
        if SAVED_MODEL_PB not in by_name:
            raise PublishError(f"staging holds no {SAVED_MODEL_PB}; refusing to promote it: {store.url(staging)}")

        # Explicit existence check: not every server honours create-only on copies.
        present = {e.name: e for e in store.walk(final)}
        foreign = sorted(n for n, e in present.items() if n not in by_name or not _same(e, by_name[n]))
        if foreign:
            raise VersionExistsError(
                f"version directory already exists with other content ({len(foreign)} objects, "
                f"e.g. {foreign[0]}): {store.url(final)}")
        if SAVED_MODEL_PB in present:
            # An earlier attempt copied everything and died before deleting staging.
            self._delete_sources(store, sources)
            self._record(started, sources, 0)
            return

        # No undo on failure: promotion runs only after the ledger entry, so the
        # next run (or a concurrent finisher) completes it, skipping what landed;
        # deleting those objects here could pull them from under that finisher.
        copied = 0
        body = [(e, store.join(final, e.name)) for n, e in sorted(by_name.items())
                if n != SAVED_MODEL_PB and n not in present]
        try:
            copied += store.copy_objects(body, limit=self.concurrency)
            faults.hold("promoting")
            copied += store.copy_objects([(by_name[SAVED_MODEL_PB], store.join(final, SAVED_MODEL_PB))])
        except FileExistsError as err:  # written there by something else since the check above
            raise VersionExistsError(f"version directory already exists with other content ({err}): "
                                     f"{store.url(final)}") from None
        self._delete_sources(store, sources)
        self._record(started, sources, copied)

    def _record(self, started: float, sources: list[Entry], copied: int) -> None:
        self.stats = {"strategy": self.name, "objects": len(sources), "bytes_copied": copied,
                      "seconds": round(time.monotonic() - started, 4)}

    @staticmethod
    def _delete_sources(store: Storage, sources: list[Entry]) -> None:
        try:
            kept = store.delete_objects(sources)
        except Exception as err:  # noqa: BLE001 - the version is published; gc removes staging later
            log.warning("published, but staging was not removed (%s); gc removes it after the lease",
                        type(err).__name__)
            return
        if kept:
            log.warning("published; %d staging objects changed since listing were left for gc", len(kept))


def choose_strategy(store: Storage, forced: str = "auto") -> PromotionStrategy:
    """The promotion strategy for ``store``; ``forced`` is the config key ``promotion``.

    ``auto``: a rename locally and in a GCS bucket with hierarchical namespace,
    else per-object moves. ``rename`` fails where no atomic rename exists;
    ``object_move`` is refused on local disk, where a rename is always better.
    """
    if forced not in PROMOTIONS:
        raise PublishError(f"unknown promotion '{forced}' (use one of {', '.join(PROMOTIONS)}): "
                           f"{store.url(store.root)}")
    if store.is_local:
        if forced not in ("auto", "rename"):
            raise PublishError(f"promotion '{forced}' is not available on local disk: {store.root}")
        return PosixRename()
    if forced == "object_move":
        return ObjectMove()
    if isinstance(store, GcsStore):
        if store.gcs_layout() == "hierarchical":
            return FolderRename()
        if forced == "rename":
            raise PublishError(
                f"promotion 'rename' needs a bucket with hierarchical namespace, and bucket '{store.bucket}' "
                f"is flat (use promotion: auto or object_move): {store.url(store.root)}")
        return ObjectMove()
    if forced == "rename":
        raise PublishError(f"promotion 'rename' is not available on '{store.protocol}' storage "
                           f"(use promotion: auto or object_move): {store.url(store.root)}")
    return ObjectMove()
