"""The ledger: one create-only ``_exports/ledger/<ledger-key>`` per published checkpoint and config, the
commit record of a publish; and the removal records retention leaves in ``_exports/removed/``.

Example::

    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage
    pub = Publisher(open_storage("/srv/models/m"))
    for key, entry in pub.ledger().items():
        print(key, entry["version"], entry.get("step"))

The ledger key is the checkpoint's identity plus the hash of the export
configuration: a checkpoint is published once per config. Once its entry
exists the publish is committed, and any process may finish it.
"""

from __future__ import annotations

import json
import time

from tf_export_pipeline.errors import PublishError
from tf_export_pipeline.layout import EXPORTS_DIR, LEDGER_DIR, REMOVED_DIR, TEMP_MARK
from tf_export_pipeline.publish.claims import Claims
from tf_export_pipeline.publish.metadata import from_metadata, is_torn, read_record, to_metadata
from tf_export_pipeline.run_info import RUN_KEY, summary_of

UNKNOWN = "<unknown>"  # what a ledger read that failed says of an entry


class Ledger(Claims):
    """The ledger of an export base (under :class:`tf_export_pipeline.publish.Publisher`)."""

    def ledger_path(self, key: str) -> str:
        return self.path(EXPORTS_DIR, LEDGER_DIR, key)

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
            found = got if "version" in got else self.ledger_entry(entry.name)
            if found is not None:
                out[entry.name] = found
        return out

    def committed_staging(self, key: str) -> str | None:
        """The staging the ledger entry of ``key`` names, None without an entry, or
        :data:`UNKNOWN` when the ledger cannot be read (storage failing)."""
        try:
            entry = self.ledger_entry(key)
        except Exception:  # noqa: BLE001 - the caller must then keep what may be committed
            return UNKNOWN
        return self.store.strip(str(entry.get("staging") or "")) if entry else None

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
            got = read_record(self.store, entry, "removed_at")
            if got is not None:
                out[entry.name] = got
        return out
