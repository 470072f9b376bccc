"""The Azure Blob store (``az://``) against Azurite, and the real `tf-export` publishing on it.

What a test reads back, it reads through azure-storage-blob's own client
(``azure_container.client``), never through the pipeline's storage layer.
One Azurite serves the whole session; each test has a container of its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import assert_published_once, cli_popen, one_line_error, release_together, run_cli
from tests.support.azurite import ACCOUNT_KEY, connection_string, free_port
from tests.support.fault_proxy import DROP_AFTER, FaultProxy
from tf_export_pipeline.storage import AzureBlobStore, open_storage
from tf_export_pipeline.storage import azure as azure_store

pytestmark = pytest.mark.timeout(240)

BASE = "serving/demo_regressor"
REQUIRED = ("saved_model.pb", "variables/variables.index", "assets.extra/export_manifest.json")
WRONG_KEY = base64.b64encode(b"not-the-account-key-" * 3).decode()


# -- helpers -------------------------------------------------------------------------
class Wire:
    """Every request the SDK's HTTP transport sends in this process: method, path, a few headers, status."""

    def __init__(self, monkeypatch):
        from azure.core.pipeline.transport import AioHttpTransport

        self.log: list[tuple[str, str, dict, int]] = []
        self._lock = threading.Lock()
        real = AioHttpTransport.send
        wire = self

        async def send(transport, request, **kwargs):
            response = await real(transport, request, **kwargs)
            headers = {k.lower(): v for k, v in request.headers.items()
                       if k.lower() in ("if-none-match", "if-match", "content-md5", "x-ms-copy-source")}
            with wire._lock:
                wire.log.append((request.method, request.url.split("?")[0], headers, response.status_code))
            return response

        monkeypatch.setattr(AioHttpTransport, "send", send)

    def requests(self, method: str, contains: str) -> list[tuple[str, str, dict, int]]:
        with self._lock:
            return [r for r in self.log if r[0] == method and contains in r[1]]


def versions_in(container, base: str = BASE) -> dict[int, set[str]]:
    """Integer-named children of ``base`` (TF Serving's rule) with their files."""
    out: dict[int, set[str]] = {}
    for rel in container.blobs(base):
        head, _, rest = rel.partition("/")
        if head.isdigit() and rest:
            out.setdefault(int(head), set()).add(rest)
    return out


def upload_tree(container, local: Path, prefix: str) -> None:
    for path in sorted(local.iterdir()):
        with open(path, "rb") as fh:
            container.client.upload_blob(f"{prefix}/{path.name}", fh, overwrite=True)


def workspace(root: Path, trained_dir: Path, container, **options) -> Path:
    """The training directory uploaded into the container; a config with training_dir and export_base
    there. Returns the config's path."""
    from tf_export_pipeline.demo import write_config

    upload_tree(container, trained_dir, "train")
    return Path(write_config(str(root), training_dir=container.url("train"), export_base=container.url(BASE),
                             storage_options={**container.storage_options, **options}))


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert ACCOUNT_KEY not in text and WRONG_KEY not in text
        assert "AccountKey" not in text and "connection_string=" not in text


# -- the store's guarantees ------------------------------------------------------------
def test_twelve_concurrent_create_only_one_winner_and_the_condition_reaches_the_server(azure_container,
                                                                                      monkeypatch):
    wire = Wire(monkeypatch)
    store = open_storage(azure_container.url(BASE), azure_container.storage_options)
    assert isinstance(store, AzureBlobStore)
    claim = store.join(store.root, "_exports", "claims", "1700000000")

    with ThreadPoolExecutor(12) as pool:
        won = list(pool.map(lambda i: store.create_only(claim, f"writer {i}".encode(), {"version": str(i)}),
                            range(12)))
    assert won.count(True) == 1
    winner = won.index(True)
    blob = azure_container.client.get_blob_client(f"{BASE}/_exports/claims/1700000000")
    assert blob.download_blob().readall() == f"writer {winner}".encode()
    assert blob.get_blob_properties().metadata["version"] == str(winner)

    # one conditional Put Blob per writer; the server, not the client, refused the eleven
    puts = wire.requests("PUT", "/_exports/claims/1700000000")
    assert len(puts) == 12
    assert all(headers.get("if-none-match") == "*" for _, _, headers, _ in puts)
    assert sorted(status for *_, status in puts) == [201] + [409] * 11

    # a later writer, and the listing that carries the record's metadata
    assert store.create_only(claim, b"late") is False
    [entry] = store.list_dir(store.join(store.root, "_exports", "claims"))
    assert entry.name == "1700000000" and entry.metadata == {"version": str(winner)}
    assert entry.generation and entry.generation.startswith('"')


def test_a_lost_answer_to_our_own_create_is_recognised_as_ours(azure_container, azurite):
    """The Put Blob lands but its answer is dropped; the SDK's retry meets our own blob (409), and the
    nonce in the blob's metadata says it is ours."""
    proxy = FaultProxy(f"http://127.0.0.1:{azurite.port}", lifetime=60.0)
    proxy.start()
    try:
        proxy.configure(drop_after_rate=1.0, max_faults=1, match=lambda m, p: m == "PUT" and "/claims/" in p)
        options = {"connection_string": connection_string(f"{proxy.url}/devstoreaccount1")}
        store = open_storage(azure_container.url(BASE), options)
        claim = store.join(store.root, "_exports", "claims", "7")
        assert store.create_only(claim, b"mine") is True
        puts = [e for e in proxy.log if e.method == "PUT" and "/claims/7" in e.path]
        assert [e.action for e in puts] == [DROP_AFTER, "forward"]
        assert puts[1].status == 409  # the retry met the blob its first attempt wrote
        rival = open_storage(azure_container.url(BASE), azure_container.storage_options)
        assert rival.create_only(rival.join(rival.root, "_exports", "claims", "7"), b"rival") is False
    finally:
        proxy.stop()
    blob = azure_container.client.get_blob_client(f"{BASE}/_exports/claims/7")
    assert blob.download_blob().readall() == b"mine"


def test_uploads_copies_deletes_and_listings_use_the_servers_guarantees(azure_container, tmp_path, monkeypatch):
    wire = Wire(monkeypatch)
    store = open_storage(azure_container.url(BASE, scheme="abfs"), azure_container.storage_options)
    assert store.url(store.root) == azure_container.url(BASE, scheme="abfs")
    local = tmp_path / "model"
    files = {"saved_model.pb": os.urandom(3000), "variables/variables.index": os.urandom(200),
             "variables/variables.data-00000-of-00001": os.urandom(300_000), "assets/vocab.txt": b"a\nb\n"}
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    staging = store.join(store.root, "temp-1700000000-ab12")
    store.upload_dir(str(local), staging)

    # each upload carried its Content-MD5, which the server checked and keeps as the blob's
    puts = wire.requests("PUT", "/temp-1700000000-ab12/")
    assert len(puts) == len(files) and all("content-md5" in h for _, _, h, _ in puts)
    for rel, data in files.items():
        props = azure_container.client.get_blob_client(f"{BASE}/temp-1700000000-ab12/{rel}").get_blob_properties()
        assert bytes(props.content_settings.content_md5) == hashlib.md5(data).digest(), rel

    # listings: by pages (two names a page here), with each file's size and crc32c
    monkeypatch.setattr(azure_store, "LIST_PAGE_SIZE", 2)
    before = len(wire.requests("GET", f"/{azure_container.name}"))
    entries = store.walk(staging)
    assert len(wire.requests("GET", f"/{azure_container.name}")) - before == 2
    from tf_export_pipeline.storage import crc32c_of_file

    assert {e.name: (e.size, e.crc32c) for e in entries} == {
        rel: (len(data), crc32c_of_file(str(local / rel))) for rel, data in files.items()}
    assert {e.name for e in store.list_dir(staging)} == {"saved_model.pb", "variables", "assets"}

    # server-side copies: no body through the client, destination If-None-Match: *, a rerun is a no-op
    final = store.join(store.root, "1700000000")
    pairs = [(e, store.join(final, e.name)) for e in entries]
    copied = store.copy_objects(pairs)
    assert copied == sum(len(d) for d in files.values())
    copies = [r for r in wire.requests("PUT", "/1700000000/") if "x-ms-copy-source" in r[2]]
    assert len(copies) == len(files) and all(h.get("if-none-match") == "*" for _, _, h, _ in copies)
    assert store.copy_objects(pairs) == 0  # already there, identical
    other = store.join(store.root, "other")
    store.write_bytes(store.join(other, "saved_model.pb"), b"different")
    with pytest.raises(FileExistsError, match="other content"):
        store.copy_objects([(e, store.join(other, e.name)) for e in entries if e.name == "saved_model.pb"])
    assert azure_container.client.get_blob_client(f"{BASE}/other/saved_model.pb").download_blob().readall() \
        == b"different"

    # a source rewritten since it was listed is not copied
    from tf_export_pipeline.errors import PipelineError

    stale = next(e for e in entries if e.name == "assets/vocab.txt")
    store.write_bytes(store.join(staging, "assets/vocab.txt"), b"changed")
    with pytest.raises(PipelineError, match="changed since it was listed"):
        store.copy_objects([(stale, store.join(store.root, "elsewhere", "vocab.txt"))])
    assert not azure_container.blobs(f"{BASE}/elsewhere")

    # downloads are checked against the server's MD5 and the crc32c
    out = tmp_path / "down"
    store.download_dir(final, str(out))
    assert {rel: (out / rel).read_bytes() for rel in files} == files

    # deletes matched to the ETag listed: a blob rewritten since is left alone
    listed = store.walk(staging)
    store.write_bytes(store.join(staging, "assets/vocab.txt"), b"rewritten")
    kept = store.delete_objects(listed)
    assert kept == [store.join(staging, "assets/vocab.txt")]
    assert set(azure_container.blobs(f"{BASE}/temp-1700000000-ab12")) == {"assets/vocab.txt"}
    store.rm(staging, recursive=True)
    assert not azure_container.blobs(f"{BASE}/temp-1700000000-ab12")

    # a torn record is removed only at the ETag read
    torn = store.join(store.root, "_exports", "ledger", "k")
    assert store.create_only(torn, b"{not json")
    assert store.remove_if_torn(torn, lambda b: not b.startswith(b"{\"")) is True
    assert not store.exists(torn)


# -- the CLI on az:// --------------------------------------------------------------------
def test_cli_publishes_on_az_then_skips(tmp_path, trained_dir, azure_container):
    config = workspace(tmp_path, trained_dir, azure_container)
    first = run_cli("run", "--json", "--config", str(config), timeout=240)
    assert first.rc == 0, first.err
    rec = first.json
    version = rec["version"]
    assert rec["status"] == "published" and rec["step"] == 30
    assert rec["checkpoint"] == azure_container.url("train", "ckpt-30")
    assert rec["path"] == f"{azure_container.url(BASE)}/{version}"
    assert list(versions_in(azure_container)) == [version]
    files = versions_in(azure_container)[version]
    assert all(f in files for f in REQUIRED)
    children = {rel.split("/", 1)[0] for rel in azure_container.blobs(BASE)}
    assert children == {str(version), "_exports"}  # no staging left behind
    ledger = azure_container.blobs(f"{BASE}/_exports/ledger")
    assert len(ledger) == 1
    [(name, props)] = ledger.items()
    assert props.metadata["version"] == str(version)  # the listing carries the record
    body = azure_container.client.get_blob_client(f"{BASE}/_exports/ledger/{name}").download_blob().readall()
    assert json.loads(body)["version"] == version
    manifest = json.loads(azure_container.client.get_blob_client(
        f"{BASE}/{version}/assets.extra/export_manifest.json").download_blob().readall())
    assert manifest["validation"]["ok"] is True

    again = run_cli("run", "--json", "--config", str(config), timeout=240)
    assert again.rc == 0, again.err
    assert again.json == {**rec, "status": "skipped"}
    status = run_cli("status", "--json", "--config", str(config))
    assert status.rc == 0, status.err
    assert [v["version"] for v in status.json["versions"]] == [version]
    for res in (first, again, status):
        assert_no_secret(res.out, res.err)


def test_four_racers_on_one_checkpoint_publish_it_once(tmp_path, trained_dir, azure_container):
    config = workspace(tmp_path, trained_dir, azure_container)
    release = tmp_path / "release"
    procs = [cli_popen("run", "--checkpoint", "ckpt-30", "--json", "--config", str(config),
                       env={"TF_EXPORT_TEST_HOLD": f"publishing@{release}"})
             for _ in range(4)]
    outs, errs, held = release_together(procs, release, limit=180)  # all four publish at the same instant
    for p, e in zip(procs, errs):
        assert p.returncode == 0, e
    assert held == len(procs), "every racer should have reached the publish step"

    records = [json.loads(o) for o in outs]
    assert_published_once(records)
    assert len({r["version"] for r in records}) == 1
    version = records[0]["version"]
    assert list(versions_in(azure_container)) == [version]
    assert all(f in versions_in(azure_container)[version] for f in REQUIRED)
    assert len(azure_container.blobs(f"{BASE}/_exports/ledger")) == 1
    assert set(azure_container.blobs(f"{BASE}/_exports/claims")) == {str(version)}
    assert {rel.split("/", 1)[0] for rel in azure_container.blobs(BASE)} == {str(version), "_exports"}
    for out, e in zip(outs, errs):
        assert_no_secret(out, e)


# -- bad input: one line naming the cause and the URL, nothing published -------------------------
def _run_with(tmp_path: Path, trained_dir: Path, container, name: str, *, export_base: str,
              storage_options: dict):
    from tf_export_pipeline.demo import write_config

    upload_tree(container, trained_dir, "train")
    config = write_config(str(tmp_path / name), training_dir=container.url("train"), export_base=export_base,
                          storage_options=storage_options)
    return run_cli("run", "--json", "--config", config, timeout=240)


def test_bad_azure_input_is_one_line_naming_cause_and_url(tmp_path, trained_dir, azure_container):
    good = azure_container.storage_options
    missing = f"az://{azure_container.name}-gone/{BASE}"
    res = _run_with(tmp_path, trained_dir, azure_container, "missing", export_base=missing, storage_options=good)
    assert res.rc != 0
    line = one_line_error(res)
    assert f"container '{azure_container.name}-gone' does not exist" in line and missing in line, line
    assert_no_secret(res.out, res.err)

    endpoint = f"http://127.0.0.1:{azure_container.server.port}/devstoreaccount1"
    wrong = {"connection_string": connection_string(endpoint, key=WRONG_KEY)}
    res = _run_with(tmp_path, trained_dir, azure_container, "wrong-key", export_base=azure_container.url(BASE),
                    storage_options=wrong)
    assert res.rc != 0
    line = one_line_error(res)
    assert "not authorized" in line and azure_container.url() in line, line
    assert_no_secret(res.out, res.err)

    closed = {"connection_string": connection_string(f"http://127.0.0.1:{free_port()}/devstoreaccount1"),
              "retry_total": 1}
    res = _run_with(tmp_path, trained_dir, azure_container, "unreachable", export_base=azure_container.url(BASE),
                    storage_options=closed)
    assert res.rc != 0
    line = one_line_error(res)
    assert "unreachable" in line and azure_container.url() in line, line
    assert_no_secret(res.out, res.err)

    assert not versions_in(azure_container)
    assert not azure_container.blobs(BASE)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_client_backs_off_from_half_a_second_and_never_waits_minutes():
    """The SDK's own schedule would start at initial + base and jitter by whole seconds; ours starts short."""
    from tf_export_pipeline.storage.azure_client import (
        RETRY_INCREMENT_BASE,
        RETRY_INITIAL_BACKOFF,
        RETRY_JITTER,
        RETRY_TOTAL,
        _retry_policy,
    )

    policy = _retry_policy(RETRY_TOTAL)
    assert policy.total_retries == RETRY_TOTAL
    for _ in range(50):
        waits = [policy.get_backoff_time({"count": n}) for n in range(1, RETRY_TOTAL + 1)]
        expected = [RETRY_INITIAL_BACKOFF] + [RETRY_INITIAL_BACKOFF + RETRY_INCREMENT_BASE ** n
                                              for n in range(1, RETRY_TOTAL)]
        assert all(abs(w - e) <= RETRY_JITTER for w, e in zip(waits, expected)), waits
    assert sum(expected) + RETRY_TOTAL * RETRY_JITTER < 20
