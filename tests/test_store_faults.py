"""S3 and Azure Blob requests failing through a proxy: every run publishes, or fails in one line, and the next
runs converge to each checkpoint once.

The commands reach the server (SeaweedFS, Azurite) through a fault proxy that
answers 503, drops the connection before forwarding, or forwards and then
drops the answer (the server acted, the client never heard), at random on
about a fifth of the requests, never more than two in a row (what the
clients' own retries absorb, mostly). The training job writes a new
checkpoint before each run. After the faults stop, ``backfill`` and ``run``
must leave every checkpoint published once, whole, in training order, with
no credential in any output.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import one_line_error, run_cli
from tests.support.fault_proxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Runs through the faults per store. Each fault costs the Azure client a back-off of RETRY_INITIAL_BACKOFF
# and more (pipeline/storage/azure_client.py), so Azure gets fewer runs than S3 for a like duration.
RUNS = {"s3": 5, "az": 3}


def _through(store: str, request, proxy_url: str | None):
    """(place, storage options through ``proxy_url`` or straight, secret) for the store named."""
    if store == "s3":
        place = request.getfixturevalue("s3_bucket")
        options = dict(place.storage_options)
        if proxy_url:
            options["endpoint_url"] = proxy_url
        return place, options, place.storage_options["secret"]
    from tests.support.azurite import ACCOUNT_KEY, connection_string

    place = request.getfixturevalue("azure_container")
    options = dict(place.storage_options)
    if proxy_url:
        options = {"connection_string": connection_string(f"{proxy_url}/devstoreaccount1")}
    return place, options, ACCOUNT_KEY


@pytest.mark.parametrize("store", ["s3", "az"])
def test_runs_through_failing_requests_publish_or_fail_in_one_line_and_converge(store, request, tmp_path,
                                                                                trained_dir):
    from tf_export_pipeline.demo import train, write_config
    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage

    if store == "s3":
        from tests.test_s3_store import BASE, upload_tree

        upstream = request.getfixturevalue("s3_server").url
    else:
        from tests.test_azure_store import BASE, upload_tree

        upstream = f"http://127.0.0.1:{request.getfixturevalue('azurite').port}"
    proxy = FaultProxy(upstream, keep_host=True, lifetime=800, max_requests=10**6, seed=20 + len(store),
                       fail_rate=0.08, drop_rate=0.06, drop_after_rate=0.06)
    proxy.start()
    try:
        place, options, secret = _through(store, request, proxy.url)
        local = tmp_path / "train"
        shutil.copytree(trained_dir, local)
        upload_tree(place, local, "train")
        faulty = write_config(str(tmp_path), name="faulty.yaml", training_dir=place.url("train"),
                              export_base=place.url(BASE), storage_options=options, retention={"keep": 100})
        outcomes = []
        for _ in range(RUNS[store]):
            train(str(local), steps=10, checkpoint_every=10, max_to_keep=None)
            upload_tree(place, local, "train")  # straight to the server: the training job is not under test
            res = run_cli("run", "--json", "--config", faulty, timeout=400)
            assert secret not in res.out + res.err
            if res.rc == 0:
                assert res.json["status"] in ("published", "skipped"), res.out
                outcomes.append(res.json["status"])
            else:
                assert res.rc == 1, res.err
                outcomes.append("failed: " + one_line_error(res))
        counters = proxy.counters
    finally:
        proxy.stop()
    print(f"{store}: {outcomes}; {counters}")
    assert counters.failed_503 > 0 and counters.dropped > 0 and counters.dropped_after > 0, counters

    _, direct, _ = _through(store, request, None)
    config = write_config(str(tmp_path), name="direct.yaml", training_dir=place.url("train"),
                          export_base=place.url(BASE), storage_options=direct, retention={"keep": 100})
    for args in (("backfill",), ("run",)):
        res = run_cli(*args, "--json", "--config", config, timeout=400)
        assert res.rc == 0, (args, res.err, outcomes)
    publisher = Publisher(open_storage(place.url(BASE), direct))
    steps = sorted(e["step"] for e in publisher.ledger().values())
    newest = 30 + 10 * RUNS[store]
    assert steps == list(range(10, newest + 1, 10)), (steps, outcomes)
    versions = publisher.versions()
    assert len(versions) == len(steps) and all(publisher.is_whole(publisher.version_path(v)) for v in versions)
    by_version = [(publisher.manifest(v) or {}).get("checkpoint", {}).get("step") for v in versions]
    assert by_version == sorted(by_version), by_version
    assert publisher.finish_committed() == {"finished": [], "forgotten": []}
