"""Operability from the command line: the run that made a version, ``tf-export lineage``, OpenLineage events
to a real HTTP listener on loopback (and to one that fails or hangs), StatsD packets to a real UDP socket."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import make_workspace

pytestmark = pytest.mark.timeout(400, method="thread")


class LineageListener:
    """An OpenLineage HTTP backend on loopback: ``mode`` ok (200), fail (500) or hang (no answer)."""

    def __init__(self, mode: str = "ok"):
        self.mode, self.events, self.requests = mode, [], 0
        self.release = threading.Event()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                listener.requests += 1
                if listener.mode == "hang":
                    listener.release.wait(120)
                    return
                if listener.mode == "fail":
                    self.send_response(500)
                    self.end_headers()
                    return
                listener.events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class StatsdListener:
    """A UDP socket on loopback collecting StatsD lines."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def lines(self, settle: float = 0.5) -> list[str]:
        out: list[str] = []
        self.sock.settimeout(settle)
        while True:
            try:
                out += self.sock.recv(65535).decode().splitlines()
            except TimeoutError:
                return out


def manifest_of(base: Path, version: int) -> dict:
    return json.loads((base / str(version) / "assets.extra" / "export_manifest.json").read_text())


def ledger_entries(base: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((base / "_exports" / "ledger").iterdir())]


def facet_names(event: dict) -> set[str]:
    return set(event["run"]["facets"])


def test_cli_run_sends_openlineage_events_and_statsd_metrics(workspace):
    backend, statsd = LineageListener(), StatsdListener()
    parent_run = str(uuid.uuid4())
    try:
        res = workspace.cli("run", "--json", env={
            "OPENLINEAGE_URL": f"http://127.0.0.1:{backend.port}", "OPENLINEAGE_NAMESPACE": "ml-exports",
            "OPENLINEAGE_PARENT_ID": f"airflow-prod/train_dag.train/{parent_run}",
            "TF_EXPORT_STATSD": f"127.0.0.1:{statsd.port}"})
        lines = statsd.lines()
    finally:
        backend.close()
    assert res.rc == 0, res.err
    version = res.json["version"]
    assert res.json["status"] == "published" and "warning" not in res.err
    manifest = manifest_of(workspace.base, version)
    run = manifest["run"]
    assert run["kind"] == "cli" and run["command"] == f"tf-export run --json --config {workspace.config}"
    assert run["host"] == socket.gethostname() and run["config_file"] == str(workspace.config)
    assert run["parent"]["run_id"] == parent_run and "export" not in run  # one process exported and published
    [entry] = ledger_entries(workspace.base)
    assert entry["run"] == run

    start, complete = backend.events
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    for event in (start, complete):
        assert event["run"]["runId"] == run["openlineage_run_id"]
        assert event["job"] == {**event["job"], "namespace": "ml-exports", "name": "tf_export.export.run"}
        assert event["run"]["facets"]["parent"]["run"]["runId"] == parent_run
        assert event["run"]["facets"]["parent"]["job"]["name"] == "train_dag.train"
    [output] = complete["outputs"]
    assert (output["namespace"], output["name"]) == (f"file://{socket.gethostname()}", str(workspace.base))
    assert output["facets"]["version"]["datasetVersion"] == str(version)
    assert output["facets"]["symlinks"]["identifiers"][0]["name"] == str(workspace.base / str(version))
    assert output["facets"]["datasetType"]["datasetType"] == "MODEL"
    files = manifest["files"]
    assert output["outputFacets"]["outputStatistics"] == {
        **output["outputFacets"]["outputStatistics"], "fileCount": len(files),
        "size": sum(f["size"] for f in files.values())}
    [checkpoint] = complete["inputs"]
    assert (checkpoint["namespace"], checkpoint["name"]) == (output["namespace"], manifest["checkpoint"]["path"])
    validation = complete["run"]["facets"]["tf_export_validation"]
    assert validation["ok"] is True and validation["loader"] == "session"
    assert validation["checks_passed"] == validation["checks_total"] > 3
    tests = {t["name"]: t["status"] for t in complete["run"]["facets"]["test"]["tests"]}
    assert tests["parity_with_checkpoint"] == "pass"
    assert [o["name"] for o in start["outputs"]] == [str(workspace.base)] and "version" not in start["outputs"][0][
        "facets"]

    prefix = "tf_export.export."
    kinds = {line.split(":")[0]: line.rsplit("|", 1)[1] for line in lines}
    for stage in ("export", "validate", "publish"):
        assert kinds[f"{prefix}{stage}.duration"] == "ms"
    assert f"{prefix}publish.published:1|c" in lines
    assert f"{prefix}version:{version}|g" in lines
    assert f"{prefix}bytes:{sum(f['size'] for f in files.values())}|g" in lines

    found = workspace.cli("discover", "--json").json
    by_version = {item["version"]: item for item in found}
    assert by_version[version]["run"] == f"cli: {run['user']}@{run['host']} {run['command']}"
    status = workspace.cli("status", "--json").json
    assert status["versions"][0]["run"] == by_version[version]["run"]

    # A second run skips: a START and a COMPLETE again, no new version in its output.
    backend = LineageListener()
    try:
        again = workspace.cli("run", "--json", env={"OPENLINEAGE_URL": f"http://127.0.0.1:{backend.port}"})
    finally:
        backend.close()
    assert again.json["status"] == "skipped"
    assert [e["eventType"] for e in backend.events] == ["START", "COMPLETE"]
    assert "version" not in backend.events[1]["outputs"][0]["facets"]


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_a_lineage_backend_failing_or_hanging_never_fails_nor_stalls_a_run(tmp_path, trained_dir, mode):
    quiet = make_workspace(tmp_path / "quiet", trained_dir)
    t0 = time.monotonic()
    assert quiet.cli("run", "--json").json["status"] == "published"
    baseline = time.monotonic() - t0

    ws = make_workspace(tmp_path / mode, trained_dir)
    backend = LineageListener(mode)
    closed = StatsdListener()
    closed.sock.close()  # StatsD down too: the port refuses
    password = "s3cr3t-lineage-pass"
    try:
        t0 = time.monotonic()
        res = ws.cli("run", "--json", env={
            "OPENLINEAGE_URL": f"http://tfexport:{password}@127.0.0.1:{backend.port}",
            "TF_EXPORT_LINEAGE_WAIT_SECONDS": "2", "TF_EXPORT_STATSD": f"127.0.0.1:{closed.port}"})
        took = time.monotonic() - t0
    finally:
        backend.close()
    assert res.rc == 0 and res.json["status"] == "published", res.err
    assert ws.versions() == [res.json["version"]]
    assert backend.requests >= 1
    assert "tf-export: warning: OpenLineage events not delivered" in res.err
    assert password not in res.err + res.out

    # The same run without a backend again, after: the slower of the two baselines stands for the machine's
    # load around the run under test, which a parallel suite changes from one second to the next.
    again = make_workspace(tmp_path / "again", trained_dir)
    t0 = time.monotonic()
    assert again.cli("run", "--json").json["status"] == "published"
    baseline = max(baseline, time.monotonic() - t0)
    # Bounded: the wait for the events (2 s) and a margin, whatever the backend does (a hang holds 120 s).
    assert took < baseline + 2 + 8, (took, baseline)


def test_lineage_traces_a_version_to_checkpoint_config_validation_run_and_serving(tmp_path, trained_dir):
    from tf_export_pipeline.demo import SERVING

    ws = make_workspace(tmp_path / "labels", trained_dir, serving=SERVING)
    version = ws.cli("run", "--json").json["version"]
    found = ws.cli("lineage", str(version), "--json")
    assert found.rc == 0, found.err
    t = found.json
    manifest = manifest_of(ws.base, version)
    assert t["checkpoint"]["path"] == str(ws.train / "ckpt-30") and t["checkpoint"]["step"] == 30
    assert t["checkpoint"]["identity"]["index_crc32c"] == manifest["checkpoint"]["index_crc32c"]
    assert t["checkpoint"]["written_at"] == manifest["checkpoint"]["written_at"]
    assert t["config"]["hash"] == manifest["config_hash"] == t["config"]["current_hash"]
    assert t["config"]["file"] == str(ws.config)
    assert t["validation"]["ok"] is True and t["validation"]["parity"] is True
    assert t["validation"]["loader"] == manifest["validation"]["loader"]
    assert t["run"] == manifest["run"] and t["run"]["kind"] == "cli"
    assert t["ledger"]["key"] == manifest["ledger_key"] and t["removed"] is None
    assert t["serving"]["listed"] is True and t["serving"]["labels"] == ["canary", "stable"]
    changes = [c for event in t["serving"]["history"] for c in event["changes"]]
    assert "listed" in changes and f"canary -> {version}" in changes and f"stable -> {version}" in changes

    human = ws.cli("lineage", str(version))
    assert human.rc == 0
    assert f"made by:     cli: {manifest['run']['user']}@" in human.out
    assert f"OpenLineage run {manifest['run']['openlineage_run_id']}" in human.out
    assert "validation:  passed, loader session" in human.out

    missing = ws.cli("lineage", "12345")
    assert missing.rc == 2 and "no version 12345 in the export base" in missing.err


def test_lineage_of_a_removed_version_shows_its_removal_record(tmp_path, trained_dir):
    ws = make_workspace(tmp_path / "keep1", trained_dir, retention={"keep": 1})
    first = ws.cli("run", "--checkpoint", "ckpt-20", "--json").json["version"]
    second = ws.cli("run", "--json").json
    assert second["status"] == "published" and ws.versions() == [second["version"]]
    t = ws.cli("lineage", str(first), "--json").json
    assert t["present"] is False and t["removed"]["version"] == first
    assert t["checkpoint"]["path"] == str(ws.train / "ckpt-20") and t["checkpoint"]["step"] == 20
    assert t["removed"]["run"].startswith("cli: ") and "--checkpoint ckpt-20" in t["removed"]["run"]
    assert t["removed"]["removed_at"] > 0
    human = ws.cli("lineage", str(first)).out
    assert "(removed)" in human and "by retention" in human
    removed = [i for i in ws.cli("discover", "--json").json if i.get("removed")]
    assert removed[0]["run"] == t["removed"]["run"]


# -- the parts, without a run ----------------------------------------------------------
def test_dataset_names_follow_openlineage_conventions():
    from tf_export_pipeline.lineage import dataset_name

    assert dataset_name("gs://models/ranker/serving/") == ("gs://models", "ranker/serving")
    assert dataset_name("s3://bucket/a/ckpt-3") == ("s3://bucket", "a/ckpt-3")
    assert dataset_name("az://box/m", {"account_name": "acct"}) == ("wasbs://box@acct.blob.core.windows.net", "m")
    assert dataset_name("/srv/models/m/", host="worker-3") == ("file://worker-3", "/srv/models/m")
    assert dataset_name("file:///srv/x", host="h") == ("file://h", "/srv/x")


def test_statsd_sink_sends_each_kind_and_a_bad_address_is_a_config_error(tmp_path):
    from tf_export_pipeline.metrics import StatsdSink

    listener = StatsdListener()
    sink = StatsdSink("127.0.0.1", listener.port)
    sink.gauge("tf_export.m.version", 1796227807)
    sink.gauge("tf_export.m.latency_ratio", 1.25)
    sink.gauge("tf_export.m.delta", -2)
    sink.incr("tf_export.m.publish.failed")
    sink.timing("tf_export.m.export.duration", 12.5)
    assert listener.lines() == ["tf_export.m.version:1796227807|g", "tf_export.m.latency_ratio:1.25|g",
                                "tf_export.m.delta:0|g", "tf_export.m.delta:-2|g", "tf_export.m.publish.failed:1|c",
                                "tf_export.m.export.duration:12.500|ms"]
    from tf_export_pipeline.config import config_from_dict
    from tf_export_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics.statsd"):
        config_from_dict({"training_dir": "t", "export_base": "e", "model": {"factory": "m:f"},
                          "metrics": {"statsd": "no-port-here"}}, str(tmp_path))


def test_run_record_round_trips_and_names_an_airflow_parent():
    from tf_export_pipeline.run_info import RunInfo, cli_run, summary_of

    env = {"AIRFLOW_CTX_DAG_ID": "train", "AIRFLOW_CTX_DAG_RUN_ID": "manual__1", "AIRFLOW_CTX_TASK_ID": "export",
           "AIRFLOW_CTX_TRY_NUMBER": "2", "OPENLINEAGE_PARENT_ID": "ns/train.export/0190-run"}
    run = cli_run(["run", "--config", "m.yaml"], env)
    assert run.airflow == {"dag_id": "train", "run_id": "manual__1", "task_id": "export", "try_number": 2}
    assert (run.parent.namespace, run.parent.job, run.parent.run_id) == ("ns", "train.export", "0190-run")
    assert uuid.UUID(run.openlineage_run_id).version == 7
    assert RunInfo.from_json(run.to_json()) == run
    airflow = {"kind": "airflow", "dag_id": "d", "run_id": "r", "task_id": "publish", "try_number": 1,
               "map_index": -1}
    assert summary_of(airflow) == "airflow: d/r/publish try 1"
    assert summary_of({**airflow, "task_id": "export_each.export", "map_index": 3}) == \
        "airflow: d/r/export_each.export[3] try 1"


def test_a_failed_run_sends_fail_with_its_error_and_counts_the_failed_stage(workspace):
    backend, statsd = LineageListener(), StatsdListener()
    try:
        res = workspace.cli("run", "--checkpoint", "ckpt-999", env={
            "OPENLINEAGE_URL": f"http://127.0.0.1:{backend.port}", "TF_EXPORT_STATSD": f"127.0.0.1:{statsd.port}"})
        lines = statsd.lines()
    finally:
        backend.close()
    assert res.rc == 2 and "checkpoint not found: ckpt-999" in res.err
    start, fail = backend.events
    assert (start["eventType"], fail["eventType"]) == ("START", "FAIL")
    assert start["run"]["runId"] == fail["run"]["runId"]
    error = fail["run"]["facets"]["errorMessage"]
    assert "checkpoint not found: ckpt-999" in error["message"] and error["programmingLanguage"] == "python"
    assert "tf_export.export.export.failed:1|c" in lines
    assert workspace.versions() == []
