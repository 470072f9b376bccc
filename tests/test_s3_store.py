"""The S3 store against a real S3 server (SeaweedFS), and the pipeline on s3:// through the real `tf-export`.

What a test reads back it reads through the server's own botocore client
(``s3_bucket.client``), never through the pipeline's storage layer. Requests
are watched, altered or cut through botocore's event hooks on the store's own
client, so what is checked is what went over the wire.
"""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import CliResult, assert_published_once, cli_popen, one_line_error, release_together, run_cli
from tests.support.s3_fixtures import S3Bucket
from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage import S3Store, crc32c_of_file, open_storage
from tf_export_pipeline.storage import s3 as s3_module

pytestmark = pytest.mark.timeout(240)

BASE = "serving/demo_regressor"
REQUIRED = ("saved_model.pb", "variables/variables.index", "assets.extra/export_manifest.json")
PROBE = s3_module.PROBE_PREFIX


# -- helpers ---------------------------------------------------------------------------------
def store_of(bucket: S3Bucket, *parts: str, **options) -> S3Store:
    store = open_storage(bucket.url(*parts), {**bucket.storage_options, **options})
    assert isinstance(store, S3Store)
    return store


def hook(store: S3Store, event: str, handler) -> None:
    """Register a botocore event handler on the store's client (s3fs shares one client per options)."""
    store.fs.s3.meta.events.register(event, handler)


def unhook(store: S3Store, event: str, handler) -> None:
    store.fs.s3.meta.events.unregister(event, handler)


def versions_in(bucket: S3Bucket, base: str = BASE) -> dict[int, set[str]]:
    """Integer-named children of ``base`` (TF Serving's rule) with their files."""
    out: dict[int, set[str]] = {}
    for rel in bucket.objects(base):
        head, _, rest = rel.partition("/")
        if head.isdigit() and rest:
            out.setdefault(int(head), set()).add(rest)
    return out


def children(bucket: S3Bucket, base: str = BASE) -> set[str]:
    """What a delimiter listing of ``base`` shows (prefixes and objects): what TF Serving would list."""
    page = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=base.strip("/") + "/", Delimiter="/")
    names = {p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in page.get("CommonPrefixes") or []}
    return names | {o["Key"].rsplit("/", 1)[-1] for o in page.get("Contents") or []}


def assert_whole_versions(bucket: S3Bucket) -> None:
    for version, files in versions_in(bucket).items():
        missing = [f for f in REQUIRED if f not in files]
        assert not missing, f"partial version {version}: no {missing}"


# -- create-only: one conditional PutObject ----------------------------------------------------
def test_twelve_concurrent_creates_have_exactly_one_winner(s3_bucket):
    store = store_of(s3_bucket, "m")
    path = store.join(store.root, "_exports", "claims", "17")
    sent: list[str | None] = []

    def watch(request, **_):
        if PROBE not in request.url:
            value = request.headers.get("If-None-Match")
            sent.append(value.decode() if isinstance(value, bytes) else value)

    hook(store, "before-send.s3.PutObject", watch)
    barrier = threading.Barrier(12)
    results: list[tuple[int, bool]] = []

    def racer(i: int) -> None:
        barrier.wait()
        results.append((i, store.create_only(path, f"writer {i}".encode())))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    unhook(store, "before-send.s3.PutObject", watch)
    winners = [i for i, won in results if won]
    assert len(results) == 12 and len(winners) == 1
    key = s3_bucket.key("m", "_exports", "claims", "17")
    assert s3_bucket.read(key) == f"writer {winners[0]}".encode()
    # the condition went over the wire with every one of the twelve requests...
    assert sent == ["*"] * 12
    # ...and it is what kept the object: the same write without it replaces the object
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"plain put")
    assert s3_bucket.read(key) == b"plain put"
    assert store.create_only(path, b"late") is False
    assert s3_bucket.read(key) == b"plain put"
    # the probe that checked the server before the first claim left nothing behind
    assert set(s3_bucket.objects("m/_exports/claims")) == {"17"}


def test_a_server_that_ignores_if_none_match_is_refused(s3_bucket):
    store = store_of(s3_bucket, "m")

    def drop_condition(request, **_):  # what a server that ignores the header amounts to
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    hook(store, "before-sign.s3.PutObject", drop_condition)
    try:
        with pytest.raises(PipelineError) as refused:
            store.create_only(store.join(store.root, "_exports", "claims", "5"), b"x")
    finally:
        unhook(store, "before-sign.s3.PutObject", drop_condition)
    assert "ignores If-None-Match" in str(refused.value) and str(refused.value).endswith(
        s3_bucket.url("m", "_exports", "claims", "5"))
    assert s3_bucket.objects("m") == {}  # neither the claim nor the probe


def test_a_lost_answer_is_recognised_as_our_own_write(s3_bucket):
    import botocore.exceptions

    store = store_of(s3_bucket, "m")
    path = store.join(store.root, "_exports", "ledger", "key-1")
    store.create_only(store.join(store.root, "_exports", "ledger", "warm-up"), b"{}")  # the probe runs here
    cut: list[str] = []

    def apply_then_drop_answer(request, **_):
        # The request reaches the server and takes effect; its answer never comes back.
        if cut or "key-1" not in request.url:
            return None
        parts = urlsplit(request.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        body = request.body.read() if hasattr(request.body, "read") else request.body
        if hasattr(request.body, "seek"):
            request.body.seek(0)
        conn.request(request.method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers=dict(request.headers.items()))
        cut.append(str(conn.getresponse().status))
        conn.close()
        raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)

    hook(store, "before-send.s3.PutObject", apply_then_drop_answer)
    try:
        assert store.create_only(path, b'{"version": 7}', metadata={"version": "7"}) is True
    finally:
        unhook(store, "before-send.s3.PutObject", apply_then_drop_answer)
    assert cut == ["200"]  # our write landed the first time; the client's retry met it (412)
    assert store.create_only(path, b'{"version": 7}') is False  # a second writer, even with equal bytes
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=s3_bucket.key("m/_exports/ledger/key-1"))
    assert head["Metadata"]["version"] == "7"


def test_a_conflicting_conditional_write_is_retried(s3_bucket, monkeypatch):
    store = store_of(s3_bucket, "m")
    path = store.join(store.root, "_exports", "claims", "9")
    real = S3Store._put_async
    answers: list[str] = []

    async def conflict_first(self, target, data, metadata=None, **condition):
        if target == path:
            if not answers:
                answers.append("409")
                raise s3_module._Conflict(target)  # ConditionalRequestConflict: a concurrent write of the key
            answers.append("sent")
        return await real(self, target, data, metadata, **condition)

    monkeypatch.setattr(S3Store, "_put_async", conflict_first)
    monkeypatch.setattr(s3_module, "backoff", lambda attempt: None)
    assert store.create_only(path, b"mine") is True
    assert answers == ["409", "sent"] and s3_bucket.read("m/_exports/claims/9") == b"mine"


# -- conditional deletes and copies, listings, checksums ---------------------------------------
def test_deletes_and_copies_are_matched_to_what_was_listed(s3_bucket):
    store = store_of(s3_bucket, "m")
    for name in ("a", "b", "c", "sub/d"):
        s3_bucket.write(f"m/src/{name}", f"content {name}".encode())
    listed = {e.name: e for e in store.walk(store.join(store.root, "src"))}
    assert sorted(listed) == ["a", "b", "c", "sub/d"]
    assert all(e.generation and e.generation.startswith('"') for e in listed.values())

    # copies: create-only destinations; an identical one counts as copied, another one is refused
    created: list = []
    pairs = [(listed[n], store.join(store.root, "dst", n)) for n in ("a", "sub/d")]
    assert store.copy_objects(pairs, created) == len(b"content a") + len(b"content sub/d")
    assert sorted(e.name for e in created) == ["a", "d"]
    again: list = []
    assert store.copy_objects(pairs, again) == 0 and again == []
    s3_bucket.write("m/dst/b", b"someone else's b")
    with pytest.raises(FileExistsError, match="destination exists with other content"):
        store.copy_objects([(listed["b"], store.join(store.root, "dst", "b"))])
    assert s3_bucket.read("m/dst/b") == b"someone else's b"
    # a source rewritten since it was listed is not copied (x-amz-copy-source-if-match)
    s3_bucket.write("m/src/c", b"rewritten c")
    with pytest.raises(FileNotFoundError):
        store.copy_objects([(listed["c"], store.join(store.root, "dst", "c"))])
    assert "c" not in s3_bucket.objects("m/dst")

    # deletes: If-Match the listed ETag; a rewritten object stays, a vanished one counts as deleted
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="m/src/b")
    kept = store.delete_objects(list(listed.values()))
    assert kept == [listed["c"].path]
    assert set(s3_bucket.objects("m/src")) == {"c"}
    # a folder emptied by the deletes is not left behind as a prefix (SeaweedFS keeps them otherwise)
    assert "sub" not in children(s3_bucket, "m/src")
    store.rm(store.join(store.root, "dst"), recursive=True)
    assert children(s3_bucket, "m") == {"src"}


def test_listings_go_by_pages_of_1000(s3_bucket, monkeypatch):
    store = store_of(s3_bucket, "m")
    for i in range(7):
        s3_bucket.write(f"m/many/{i:02d}", b"x")
    s3_bucket.write("m/many/deeper/z", b"z")
    calls: list[int] = []
    hook(store, "before-parameter-build.s3.ListObjectsV2", lambda params, **_: calls.append(params.get("MaxKeys")))
    assert [e.name for e in store.walk(store.join(store.root, "many"))] == [
        *(f"{i:02d}" for i in range(7)), "deeper/z"]
    assert calls == [1000]
    monkeypatch.setattr(s3_module, "LIST_PAGE_SIZE", 3)
    calls.clear()
    listed = store.list_dir(store.join(store.root, "many"))
    assert sorted(e.name for e in listed if not e.is_dir) == [f"{i:02d}" for i in range(7)]
    assert [e.name for e in listed if e.is_dir] == ["deeper"]
    assert len(calls) >= 3 and set(calls) == {3}


def test_transfers_are_checked_by_the_server_and_against_its_checksums(s3_bucket, tmp_path, monkeypatch):
    import hashlib
    import os

    store = store_of(s3_bucket, "m")
    local = tmp_path / "model"
    (local / "variables").mkdir(parents=True)
    (local / "saved_model.pb").write_bytes(os.urandom(40_000))
    (local / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(11 << 20))
    monkeypatch.setattr(s3_module, "PART_SIZE", 5 << 20)  # the big file goes in three parts

    # the first upload of saved_model.pb is corrupted on the way after its checksums were computed:
    # the server refuses it (BadDigest) and the upload check sends it again
    corrupted: list[str] = []

    def corrupt(request, **_):
        if not corrupted and request.url.endswith("saved_model.pb"):
            corrupted.append(request.url)
            request.body = b"\0" + request.body[1:]

    hook(store, "before-send.s3.PutObject", corrupt)
    try:
        store.upload_dir(str(local), store.join(store.root, "staged"))
    finally:
        unhook(store, "before-send.s3.PutObject", corrupt)
    assert len(corrupted) == 1
    pb = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="m/staged/saved_model.pb", ChecksumMode="ENABLED")
    assert pb["ChecksumCRC32C"] == crc32c_of_file(str(local / "saved_model.pb"))  # the server holds our crc32c
    assert pb["ETag"].strip('"') == hashlib.md5((local / "saved_model.pb").read_bytes()).hexdigest()
    big = s3_bucket.objects("m/staged")["variables/variables.data-00000-of-00001"]
    assert big["ETag"].strip('"').endswith("-3")

    back = tmp_path / "back"
    store.download_dir(store.join(store.root, "staged"), str(back))
    for rel in ("saved_model.pb", "variables/variables.data-00000-of-00001"):
        assert (back / rel).read_bytes() == (local / rel).read_bytes()

    # an object larger than one CopyObject may copy goes server-side in parts, still create-only
    monkeypatch.setattr(s3_module, "COPY_LIMIT", 4 << 20)
    monkeypatch.setattr(s3_module, "COPY_PART_SIZE", 5 << 20)
    [entry] = [e for e in store.walk(store.join(store.root, "staged")) if e.name.startswith("variables/")]
    dst = store.join(store.root, "copied", "variables.data")
    assert store.copy_objects([(entry, dst)]) == entry.size
    assert s3_bucket.read("m/copied/variables.data") == (local / "variables/variables.data-00000-of-00001"
                                                          ).read_bytes()
    s3_bucket.write("m/copied/other", b"taken")
    with pytest.raises(FileExistsError):
        store.copy_objects([(entry, store.join(store.root, "copied", "other"))])
    assert s3_bucket.read("m/copied/other") == b"taken"  # CompleteMultipartUpload's If-None-Match held


# -- the pipeline on s3://, through the real CLI ------------------------------------------------
@dataclass
class S3Workspace:
    root: Path
    bucket: S3Bucket
    config: Path
    results: list[CliResult]

    @property
    def base_url(self) -> str:
        return self.bucket.url(BASE)

    def cli(self, *args: str) -> CliResult:
        res = run_cli(*args, "--config", str(self.config), timeout=240)
        self.results.append(res)
        return res


def upload_tree(bucket: S3Bucket, local: Path, prefix: str) -> None:
    for path in sorted(local.iterdir()):
        bucket.client.put_object(Bucket=bucket.name, Key=bucket.key(prefix, path.name), Body=path.read_bytes())


def make_s3_workspace(root: Path, trained_dir: Path, bucket: S3Bucket, **overrides) -> S3Workspace:
    from tf_export_pipeline.demo import write_config

    upload_tree(bucket, trained_dir, "train")
    config = write_config(str(root), training_dir=bucket.url("train"), export_base=bucket.url(BASE),
                          storage_options=dict(bucket.storage_options), **overrides)
    return S3Workspace(root, bucket, Path(config), [])


def test_publish_skip_and_status_on_s3(tmp_path, trained_dir, s3_bucket):
    ws = make_s3_workspace(tmp_path, trained_dir, s3_bucket)
    first = ws.cli("run", "--json")
    assert first.rc == 0, first.err
    rec = first.json
    version = rec["version"]
    assert rec["status"] == "published" and rec["step"] == 30
    assert rec["checkpoint"] == s3_bucket.url("train", "ckpt-30")
    assert rec["path"] == f"{ws.base_url}/{version}"
    assert versions_in(s3_bucket) == {version: versions_in(s3_bucket)[version]}
    assert_whole_versions(s3_bucket)
    assert children(s3_bucket) == {str(version), "_exports"}  # no staging, no emptied folder left
    assert set(s3_bucket.objects(f"{BASE}/_exports/claims")) == {str(version)}
    [ledger] = s3_bucket.objects(f"{BASE}/_exports/ledger")
    assert json.loads(s3_bucket.read(f"{BASE}/_exports/ledger/{ledger}"))["version"] == version

    manifest = json.loads(s3_bucket.read(f"{BASE}/{version}/assets.extra/export_manifest.json"))
    assert manifest["checkpoint"]["path"] == rec["checkpoint"] and manifest["validation"]["ok"] is True

    again = ws.cli("run", "--json")
    assert again.rc == 0, again.err
    assert again.json == {**rec, "status": "skipped"}
    status = ws.cli("status", "--json")
    assert status.rc == 0, status.err
    assert [v["version"] for v in status.json["versions"]] == [version] and status.json["serving"] == version

    secret = s3_bucket.storage_options["secret"]
    for res in ws.results:
        assert secret not in res.out and secret not in res.err


def test_four_racers_on_one_checkpoint_publish_it_once(tmp_path, trained_dir, s3_bucket):
    ws = make_s3_workspace(tmp_path, trained_dir, s3_bucket)
    release = tmp_path / "release"
    procs = [cli_popen("run", "--checkpoint", "ckpt-30", "--json", "--config", str(ws.config),
                       env={"TF_EXPORT_TEST_HOLD": f"publishing@{release}"})
             for _ in range(4)]
    outs, errs, held = release_together(procs, release, limit=200)  # claim, ledger, promote at once
    for p, e in zip(procs, errs):
        assert p.returncode == 0, e
    assert held == len(procs), "every racer should have reached the publish step"

    records = [json.loads(o) for o in outs]
    assert_published_once(records)
    assert len({r["version"] for r in records}) == 1
    version = records[0]["version"]
    assert sorted(versions_in(s3_bucket)) == [version]
    assert_whole_versions(s3_bucket)
    assert len(s3_bucket.objects(f"{BASE}/_exports/ledger")) == 1
    assert set(s3_bucket.objects(f"{BASE}/_exports/claims")) == {str(version)}  # losers released theirs
    assert children(s3_bucket) == {str(version), "_exports"}
    secret = s3_bucket.storage_options["secret"]
    assert all(secret not in o for o in outs) and all(secret not in e for e in errs)


# -- bad input: one line naming the cause and the URL, nothing published ----------------------------
def test_bad_storage_input_is_one_clear_line(tmp_path, s3_bucket, s3_server):
    from tf_export_pipeline.demo import write_config

    s3_bucket.write("train/ckpt-1.index", b"i")
    missing = f"missing-{uuid.uuid4().hex[:10]}"
    wrong_secret = f"wrong-{uuid.uuid4().hex}"
    secrets_seen = (s3_bucket.storage_options["secret"], wrong_secret)

    def cli(name: str, command: str = "run", **keys) -> str:
        data = {"training_dir": s3_bucket.url("train"), "export_base": s3_bucket.url(BASE),
                "storage_options": dict(s3_bucket.storage_options)}
        data.update(keys)
        res = run_cli(command, "--config", write_config(str(tmp_path), name=name, **data), timeout=120)
        assert res.rc != 0
        assert not any(s in res.out or s in res.err for s in secrets_seen)
        return one_line_error(res)[len("tf-export: error: "):]

    assert cli("a.yaml", training_dir=f"s3://{missing}/train") == \
        f"bucket '{missing}' does not exist: s3://{missing}/train"
    assert cli("b.yaml", "status", export_base=f"s3://{missing}/models/m") == \
        f"bucket '{missing}' does not exist: s3://{missing}/models/m"

    def names_the_bucket(line: str) -> bool:
        return line.rsplit(": ", 1)[-1].startswith(s3_bucket.url() + "/")

    line = cli("c.yaml", storage_options=dict(s3_bucket.storage_options, secret=wrong_secret))
    assert line.startswith("credentials rejected (SignatureDoesNotMatch") and names_the_bucket(line), line
    line = cli("d.yaml", storage_options=dict(s3_bucket.storage_options, key="AKNOSUCHKEY000"))
    assert line.startswith("credentials rejected (InvalidAccessKeyId") and names_the_bucket(line), line

    port = _closed_port()
    # One retry of each request (botocore's default is four, with back-off): the message is the same.
    closed = dict(s3_bucket.storage_options, endpoint_url=f"http://127.0.0.1:{port}",
                  config_kwargs={"retries": {"max_attempts": 1}})
    line = cli("e.yaml", storage_options=closed)
    assert line.startswith(f"storage endpoint unreachable after retries (http://127.0.0.1:{port}) while ") \
        and names_the_bucket(line), line

    # Nothing published, nothing staged: the runs that could reach the export base left only the record of
    # their failure (what the models page shows), naming no secret.
    left = s3_bucket.objects(BASE)
    assert left and all(key.startswith("_exports/runs/") for key in left), left
    records = [json.loads(s3_bucket.read(f"{BASE}/{key}")) for key in left]
    assert all(r["status"] == "failed" for r in records), records
    assert not any(secret in json.dumps(records) for secret in secrets_seen)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_credentials_from_the_environment(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.storage_options["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.storage_options["endpoint_url"])
    store = open_storage(s3_bucket.url("env"), {"client_kwargs": {"region_name": "us-east-1"}})
    assert store.endpoint == s3_bucket.storage_options["endpoint_url"]
    assert store.create_only(store.join(store.root, "x"), b"from the environment")
    assert s3_bucket.read("env/x") == b"from the environment"
