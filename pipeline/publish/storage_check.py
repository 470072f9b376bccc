"""What an export base's store guarantees, checked against the server itself.

Example::

    from tf_export_pipeline.storage import open_storage
    from tf_export_pipeline.publish.storage_check import check_storage
    verdict = check_storage(open_storage("/srv/models/m"))
    print(verdict.ok, [(c.guarantee, c.ok) for c in verdict.checks])

Many S3-compatible servers (and older clients) accept a conditional header and
ignore it; a store that overwrites where it should refuse would let two racing
publishes both claim one version. So the check writes one name twice with a
create-only write (the second must be refused, and the first body must stay),
and says how a version becomes visible to TF Serving on this store: in one
step (a rename) or object by object (a flat object store, where TF Serving
should learn of versions only through its model config file). The verdict is
kept under ``_exports/`` beside the records it protects: the first claim on
an export base (:func:`require_checked_store`) runs the check when no verdict
is there, and a store that fails it is refused before anything is published.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field

from tf_export_pipeline.errors import ConditionIgnored, ConfigError, PipelineError
from tf_export_pipeline.layout import EXPORTS_DIR, STORAGE_CHECK_NAME
from tf_export_pipeline.publish.promotion import FolderRename, PosixRename, choose_strategy
from tf_export_pipeline.storage import Store


@dataclass(frozen=True)
class Check:
    guarantee: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class StorageVerdict:
    """``ok`` when every guarantee the publishing protocol relies on holds."""

    url: str
    checks: tuple[Check, ...]
    promotion: str
    one_step_visibility: bool
    checked_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def missing(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _create_only(store: Store) -> Check:
    name = store.join(store.root, EXPORTS_DIR, f".storage-check-{secrets.token_hex(6)}")
    first_body = b"first " + secrets.token_hex(8).encode()
    try:
        first = store.create_only(name, first_body)
        second = store.create_only(name, b"second")
        kept = store.read_bytes(name)
    except ConditionIgnored as err:  # the store's own probe caught it first
        return Check("create_only", False, str(err))
    finally:
        try:
            store.rm(name)
        except (OSError, PipelineError):
            pass
    if first and not second and kept == first_body:
        return Check("create_only", True, "a create-only write of an existing name is refused")
    return Check("create_only", False, "a create-only write of an existing name was not refused (the server "
                                       "ignores the condition): racing publishes could claim one version twice")


def check_storage(store: Store, promotion: str = "auto") -> StorageVerdict:
    """Probe ``store`` (the export base) and return what it guarantees; nothing else in it changes."""
    checks = [_create_only(store)]
    strategy = choose_strategy(store, promotion)
    one_step = isinstance(strategy, (PosixRename, FolderRename))
    return StorageVerdict(url=store.url(store.root), checks=tuple(checks), promotion=strategy.name,
                          one_step_visibility=one_step)


def record_verdict(store: Store, verdict: StorageVerdict) -> str:
    """Keep ``verdict`` at ``_exports/storage-check.json`` (replacing an older one); returns its path."""
    path = store.join(store.root, EXPORTS_DIR, STORAGE_CHECK_NAME)
    store.write_bytes(path, json.dumps(verdict.to_dict(), indent=1).encode())
    return path


# Export bases whose verdict this process has read or made: a publish pays for the check once per base.
_CHECKED: set[str] = set()


class StorageRefused(ConfigError):
    """The store does not keep a guarantee the publishing protocol relies on; no retry mends it."""


def refusal(verdict: StorageVerdict) -> StorageRefused:
    missing = verdict.missing()[0]
    return StorageRefused(f"storage does not keep the '{missing.guarantee}' guarantee ({missing.detail}): "
                          f"{verdict.url}")


def require_checked_store(store: Store, promotion: str = "auto") -> None:
    """Refuse ``store`` unless a verdict under ``_exports/`` (or a check run now, then kept) says it keeps
    every guarantee. Costs one read per process and export base once the verdict exists."""
    url = store.url(store.root)
    if url in _CHECKED:
        return
    try:
        kept = json.loads(store.read_bytes(store.join(store.root, EXPORTS_DIR, STORAGE_CHECK_NAME)))
    except (FileNotFoundError, ValueError):
        kept = None
    if not (isinstance(kept, dict) and kept.get("ok") is True):
        verdict = check_storage(store, promotion)
        if not verdict.ok:
            raise refusal(verdict)
        record_verdict(store, verdict)
    _CHECKED.add(url)
