"""Promotion: making a fully written staging directory visible as a version, at once.

Each way of doing it is one small class behind one small protocol, chosen per
storage. Every strategy keeps the rule TF Serving depends on: an integer-named
directory appears only when it is complete.

Example::

    from pipeline.promotion import choose_strategy
    strategy = choose_strategy(store, "auto")
    strategy.promote(store, "/srv/m/temp-1732147260-ab12", "/srv/m/1732147260")
"""

from __future__ import annotations

import os
from typing import Protocol

from pipeline.errors import PublishError
from pipeline.storage import Storage, fsync_dir, fsync_tree


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


def choose_strategy(store: Storage, forced: str = "auto") -> PromotionStrategy:
    """The promotion strategy for ``store``; ``forced`` is the config key ``promotion``."""
    if store.is_local:
        if forced not in ("auto", "rename"):
            raise PublishError(f"promotion '{forced}' is not available on local disk: {store.root}")
        return PosixRename()
    raise PublishError(f"no promotion strategy for storage '{store.protocol}': {store.url(store.root)}")
