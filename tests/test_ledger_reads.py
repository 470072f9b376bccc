"""Reading the ledger costs a fixed number of storage requests, whatever the history's length.

``discover`` (and so every poke of the Airflow sensor) reads the whole ledger;
on GCS the version of each entry rides in the object metadata that the
listing returns, so the read is one listing per 1000 entries.
"""

from __future__ import annotations

import json
import time

from tests.support.gcs_fixtures import gcs_bucket, gcs_fault_proxy, gcs_server  # noqa: F401  (fixtures)
from tf_export_pipeline.publish import Publisher
from tf_export_pipeline.publish.metadata import to_metadata as _meta
from tf_export_pipeline.retention import prune
from tf_export_pipeline.storage import open_storage


def _write_entries(store, pub: Publisher, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        entry = {"version": 1000 + i, "staging": f"{store.root}/temp-1-{i:08x}", "step": i}
        assert store.create_only(pub.ledger_path(f"key-{i:04d}"), json.dumps(entry).encode(),
                                 metadata=_meta({"version": 1000 + i, "staging": entry["staging"], "step": i}))


def test_the_ledger_is_read_in_one_listing_on_gcs(gcs_bucket, gcs_fault_proxy):
    via = gcs_bucket.via(gcs_fault_proxy)
    store = open_storage(via.url("serving/m"), via.storage_options)
    pub = Publisher(store)
    costs = {}
    for total, add in ((5, 5), (60, 55)):
        _write_entries(store, pub, add, start=total - add)
        gcs_fault_proxy.reset_counters()
        ledger = pub.ledger()
        costs[total] = gcs_fault_proxy.counters.requests
        assert {k: v["version"] for k, v in ledger.items()} == {f"key-{i:04d}": 1000 + i for i in range(total)}
    assert costs[5] == costs[60] == 1, costs


def test_gc_collects_abandoned_claims_and_keeps_live_ones(tmp_path):
    store = open_storage(str(tmp_path))
    pub = Publisher(store)
    old = time.time() - 3600
    for version, claimed_at in ((7, old), (8, time.time())):
        assert store.create_only(pub.claim_path(version), json.dumps({"claimed_at": claimed_at}).encode())
    (tmp_path / "9").mkdir()  # a published version keeps its claim
    assert store.create_only(pub.claim_path(9), json.dumps({"claimed_at": old}).encode())
    result = prune(store, keep=5)
    assert result["removed_claims"] == [7]
    assert sorted(p.name for p in (tmp_path / "_exports" / "claims").iterdir()) == ["8", "9"]
