"""`tf-export check-storage`, and the check the first claim on an export base runs: a store that ignores a
create-only condition is refused in one line before anything is published."""

from __future__ import annotations

import json

from tests.conftest import make_workspace, one_line_error, run_cli
from tests.support.fault_proxy import FaultProxy
from tests.support.gcs_fixtures import clear_gcsfs_caches
from tests.test_gcs_end_to_end import make_gcs_workspace


def _leftover_probes(names) -> list[str]:
    return [n for n in names if n.startswith(".storage-check-")]


def test_local_disk_keeps_every_guarantee_and_the_verdict_is_kept(workspace):
    res = workspace.cli("check-storage", "--json")
    assert res.rc == 0, res.err
    verdict = res.json
    assert verdict["ok"] is True and verdict["promotion"] == "rename" and verdict["one_step_visibility"] is True
    assert [c["guarantee"] for c in verdict["checks"]] == ["create_only"]
    exports = workspace.base / "_exports"
    assert json.loads((exports / "storage-check.json").read_text())["ok"] is True
    assert _leftover_probes(p.name for p in exports.iterdir()) == []
    human = workspace.cli("check-storage")
    assert human.rc == 0 and "one step (an atomic rename)" in human.out


def test_the_first_publish_checks_the_store_and_keeps_the_verdict(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir)
    res = ws.cli("run", "--json")
    assert res.rc == 0 and res.json["status"] == "published", res.err
    kept = json.loads((ws.base / "_exports" / "storage-check.json").read_text())
    assert kept["ok"] is True and kept["url"] == str(ws.base)


def test_a_gcs_gateway_that_drops_the_precondition_is_refused_before_anything_is_published(
        tmp_path, trained_dir, gcs_bucket, gcs_server):
    proxy = FaultProxy(gcs_server.url, lifetime=240.0, strip_query=("ifGenerationMatch",))
    proxy.start()
    try:
        ws = make_gcs_workspace(tmp_path, trained_dir, gcs_bucket.via(proxy))
        check = run_cli("check-storage", "--json", "--config", str(ws.config), timeout=240)
        assert check.rc == 2, check.err
        line = one_line_error(check)
        assert "'create_only' guarantee" in line and "not refused" in line and line.endswith(ws.base_url)

        run = run_cli("run", "--json", "--config", str(ws.config), timeout=240)
        assert run.rc == 2, run.err
        assert "'create_only' guarantee" in run.err
        assert ws.versions() == [] and "storage-check.json" not in str(ws.children())  # nothing published
    finally:
        clear_gcsfs_caches()
        proxy.stop()
    # Without the gateway the same bucket keeps the guarantee, and no probe object was left behind.
    direct = make_gcs_workspace(tmp_path / "direct", trained_dir, gcs_bucket)
    ok = run_cli("check-storage", "--json", "--config", str(direct.config), timeout=240)
    assert ok.rc == 0 and ok.json["ok"] is True and ok.json["promotion"] == "object_move", ok.err
    assert ok.json["one_step_visibility"] is False
    listed = [o.rsplit("/", 1)[-1] for o in gcs_bucket.fs().find(direct.base_url)]
    assert "storage-check.json" in listed and _leftover_probes(listed) == []
    human = run_cli("check-storage", "--config", str(direct.config), timeout=240)
    assert "serve through the model config file" in human.out


def test_s3_and_azure_keep_create_only_and_promote_object_by_object(tmp_path, trained_dir, s3_bucket,
                                                                     azure_container):
    from tests.test_azure_store import workspace as azure_workspace
    from tests.test_s3_store import make_s3_workspace

    configs = {"s3": make_s3_workspace(tmp_path / "s3", trained_dir, s3_bucket).config,
               "az": azure_workspace(tmp_path / "az", trained_dir, azure_container)}
    for store, config in configs.items():
        res = run_cli("check-storage", "--json", "--config", str(config), timeout=240)
        assert res.rc == 0, (store, res.err)
        assert res.json["ok"] is True and res.json["promotion"] == "object_move", store
        assert res.json["one_step_visibility"] is False and res.json["url"].startswith(f"{store}://"), store
        # No serving: section, so TF Serving would watch the folders: the model config file is recommended.
        assert "add a serving: section with policy: newest" in res.json["recommendation"], res.json


IGNORE_IF_NONE_MATCH_SITE = """
import s3fs

_set_session = s3fs.S3FileSystem.set_session


def _drop(request, **_):
    if "If-None-Match" in request.headers:
        del request.headers["If-None-Match"]


async def set_session(self, *args, **kwargs):
    client = await _set_session(self, *args, **kwargs)
    client.meta.events.register("before-sign.s3.PutObject", _drop)
    return client


s3fs.S3FileSystem.set_session = set_session
"""


def test_an_s3_store_that_ignores_if_none_match_or_a_gateway_that_strips_it_is_refused(
        tmp_path, trained_dir, s3_bucket, s3_server):
    from tests.support.s3_fixtures import S3Bucket
    from tests.test_s3_store import BASE, make_s3_workspace

    # A server that accepts If-None-Match and ignores it (the header never reaches the real one, which
    # honours it): the check names the missing guarantee and the run publishes nothing.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(IGNORE_IF_NONE_MATCH_SITE)
    ws = make_s3_workspace(tmp_path / "ignores", trained_dir, s3_bucket)
    env = {"PYTHONPATH": str(site)}
    check = run_cli("check-storage", "--json", "--config", str(ws.config), env=env, timeout=240)
    assert check.rc == 2, check.err
    line = one_line_error(check)
    assert "'create_only' guarantee" in line and "ignores If-None-Match" in line and line.endswith(ws.base_url), line
    run = run_cli("run", "--json", "--config", str(ws.config), env=env, timeout=240)
    assert run.rc == 2 and "'create_only' guarantee" in one_line_error(run), run.err
    assert s3_bucket.objects(BASE) == {}  # nothing published, no verdict kept, no probe left

    # A gateway that strips the header breaks its signature: refused too, in one line, before anything.
    proxy = FaultProxy(s3_server.url, lifetime=240.0, strip_headers=("If-None-Match",), keep_host=True)
    proxy.start()
    try:
        via = S3Bucket(s3_bucket.name, {**s3_bucket.storage_options, "endpoint_url": proxy.url}, s3_server)
        gateway = make_s3_workspace(tmp_path / "gateway", trained_dir, via)
        run = run_cli("run", "--json", "--config", str(gateway.config), timeout=240)
        assert run.rc != 0
        assert "SignatureDoesNotMatch" in one_line_error(run) and gateway.base_url in run.err, run.err
        assert any(e.method == "PUT" for e in proxy.log), [(e.method, e.path, e.status) for e in proxy.log][:20]
        assert s3_bucket.objects(BASE) == {}
    finally:
        proxy.stop()
    # Straight to the server, the same bucket keeps the guarantee.
    direct = run_cli("check-storage", "--json", "--config", str(ws.config), timeout=240)
    assert direct.rc == 0 and direct.json["ok"] is True, direct.err
