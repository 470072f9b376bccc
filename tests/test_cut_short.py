"""A promotion cut short on an object store (S3, Azure Blob) does not stay partial until the next export:
``status`` (and the serving commands) finish it, as ``run``, ``backfill`` and ``gc`` do.

The publisher is SIGKILLed while it copies the version's objects (hold point
``promoting``: every object but ``saved_model.pb`` copied), which leaves
``<base>/<V>/`` listed, the state TF Serving's directory watching would try to
load. The next ``status`` finishes the move and says so.
"""

from __future__ import annotations

import pytest

from tests.conftest import kill_at_hold, run_cli

pytestmark = pytest.mark.slow


def _workspace(store: str, request, tmp_path, trained_dir) -> tuple[str, str, dict]:
    """(config path, export base URL, storage options) on the store named."""
    if store == "s3":
        from tests.test_s3_store import make_s3_workspace

        bucket = request.getfixturevalue("s3_bucket")
        ws = make_s3_workspace(tmp_path, trained_dir, bucket)
        return str(ws.config), ws.base_url, dict(bucket.storage_options)
    from tests.test_azure_store import BASE, workspace

    container = request.getfixturevalue("azure_container")
    return str(workspace(tmp_path, trained_dir, container)), container.url(BASE), container.storage_options


@pytest.mark.parametrize("store", ["s3", "az"])
def test_a_move_cut_short_is_finished_by_the_next_status(store, request, tmp_path, trained_dir):
    from tf_export_pipeline.publish import Publisher
    from tf_export_pipeline.storage import open_storage

    config, base_url, options = _workspace(store, request, tmp_path, trained_dir)
    kill_at_hold("promoting", "run", "--json", "--config", config)
    publisher = Publisher(open_storage(base_url, options))
    [version] = publisher.versions()  # listed, as TF Serving would list it ...
    assert not publisher.is_whole(publisher.version_path(version))  # ... without saved_model.pb

    st = run_cli("status", "--json", "--config", config, timeout=240)
    assert st.rc == 0, st.err
    assert st.json["finished"] == [version], st.json
    assert f"finished the promotion of version(s) {version}" in st.err
    assert [(v["version"], v["whole"]) for v in st.json["versions"]] == [(version, True)]
    assert publisher.is_whole(publisher.version_path(version))

    again = run_cli("status", "--json", "--config", config, timeout=240)
    assert again.rc == 0 and "finished" not in again.json and again.err == "", again.err
    rerun = run_cli("run", "--json", "--config", config, timeout=240)  # the checkpoint has its version
    assert rerun.rc == 0 and rerun.json["status"] == "skipped" and rerun.json["version"] == version, rerun.err
