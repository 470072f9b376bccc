"""Operability under a real Airflow run: the nightly DAG through ``dag.test()`` with Airflow's OpenLineage
provider writing its events to a file (its file transport) and Airflow's StatsD metrics going to a UDP socket;
then ``tf-export lineage`` traces the version the DAG made.

The run happens in a process of its own: the provider reads its transport, and Airflow its metrics settings,
when they are first loaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.airflow.conftest import DAG_FILE, manifest, model_dags, versions
from tests.conftest import forked_validation_python, run_cli

pytestmark = pytest.mark.timeout(400, method="thread")

RUN_SCRIPT = r"""
import json, sys
if sys.argv[3]:  # the fork server's launcher: the validation process is forked by it, as in ModelDags.test()
    sys.executable = sys.argv[3]
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.configuration import conf
from airflow.sdk.observability import stats
from airflow.sdk.observability.metrics import stats_utils

# What Airflow's task runner does at its start; dag.test() runs the tasks in this process without it.
stats.initialize(factory=stats_utils.get_stats_factory(),
                 export_legacy_names=conf.getboolean("metrics", "legacy_names_on"))
bag = DagBag(dag_folder=sys.argv[1])
dr = bag.dags[sys.argv[2]].test()
print("RESULT " + json.dumps({"state": str(dr.state), "run_id": dr.run_id}))
"""


def events_by_job(path: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            event = json.loads(line)
            out.setdefault(event["job"]["name"], []).append(event)
    return out


def test_nightly_dag_emits_openlineage_events_and_metrics_and_lineage_traces_its_version(tmp_path, trained_dir):
    m = model_dags(tmp_path / "ws", "traced", trained_dir)
    base = m.config.parent / "serving" / "demo_regressor"
    events_file = tmp_path / "openlineage.jsonl"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    env = {**os.environ, "TF_EXPORT_CONFIG_DIR": str(m.config.parent),
           "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events_file),
                                                           "append": True}),
           "AIRFLOW__OPENLINEAGE__NAMESPACE": "tf-export-tests",
           # The listener drops an event it cannot send within this (10 s by default): on a busy machine
           # the forked sender can take longer than that, and the test needs every event.
           "AIRFLOW__OPENLINEAGE__EXECUTION_TIMEOUT": "120",
           "AIRFLOW__METRICS__STATSD_ON": "True", "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
           "AIRFLOW__METRICS__STATSD_PORT": str(udp.getsockname()[1]),
           "AIRFLOW__METRICS__STATSD_PREFIX": "airflow"}
    # Not from the checkout: `python -c` puts the working directory first on sys.path, and an editable
    # install's tf_export_pipeline.egg-info there registers the package's Airflow plugin a second time,
    # after which Airflow's OpenLineage listener sends no task events.
    # Its validation process comes from the CLI fork server, which imported TensorFlow once, as that of a run
    # by ModelDags.test() does: the launcher the child takes for sys.executable asks the server (named in the
    # environment) to fork it.
    launcher, naming = forked_validation_python()
    env.update(naming)
    proc = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(DAG_FILE), "export_nightly__traced", launcher],
                          env=env, capture_output=True, text=True, timeout=360, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result["state"] == "success", proc.stderr[-3000:]
    [version] = versions(base)
    made = manifest(base, version)
    run = made["run"]
    assert {k: run[k] for k in ("kind", "dag_id", "run_id", "task_id", "try_number", "map_index")} == {
        "kind": "airflow", "dag_id": "export_nightly__traced", "run_id": result["run_id"], "task_id": "publish",
        "try_number": 1, "map_index": -1}
    assert run["openlineage_namespace"] == "tf-export-tests"
    assert run["openlineage_job"] == "export_nightly__traced.publish"
    assert run["export"]["task_id"] == "export" and run["export"]["openlineage_run_id"] != run["openlineage_run_id"]

    jobs = events_by_job(events_file)
    publish = jobs["export_nightly__traced.publish"]
    assert [e["eventType"] for e in publish] == ["START", "COMPLETE"]
    assert {e["run"]["runId"] for e in publish} == {run["openlineage_run_id"]}
    assert {e["job"]["namespace"] for e in publish} == {"tf-export-tests"}
    complete = publish[-1]
    [output] = complete["outputs"]
    assert (output["namespace"], output["name"]) == (f"file://{socket.gethostname()}", str(base))
    assert output["facets"]["version"]["datasetVersion"] == str(version)
    assert output["facets"]["symlinks"]["identifiers"][0]["name"] == str(base / str(version))
    assert output["facets"]["datasetType"]["datasetType"] == "MODEL"
    assert output["outputFacets"]["outputStatistics"]["fileCount"] == len(made["files"])
    assert [i["name"] for i in complete["inputs"]] == [made["checkpoint"]["path"]]
    assert complete["run"]["facets"]["tf_export_validation"]["ok"] is True
    export = jobs["export_nightly__traced.export"]
    assert {e["run"]["runId"] for e in export} == {run["export"]["openlineage_run_id"]}
    validate = jobs["export_nightly__traced.validate"][-1]
    assert validate["eventType"] == "COMPLETE" and "test" in validate["run"]["facets"]

    udp.settimeout(0.5)
    lines: list[str] = []
    while True:
        try:
            lines += udp.recv(65535).decode().splitlines()
        except TimeoutError:
            break
    names = {line.split(":")[0] for line in lines}
    for stage in ("discover", "export", "validate", "publish"):
        assert f"airflow.tf_export.traced.{stage}.duration" in names
    assert "airflow.tf_export.traced.publish.published:1|c" in lines
    assert f"airflow.tf_export.traced.version:{version}|g" in lines

    traced = run_cli("lineage", str(version), "--config", str(m.config), "--json")
    assert traced.rc == 0, traced.err
    t = traced.json
    assert t["run"] == run and t["checkpoint"]["path"] == made["checkpoint"]["path"]
    assert t["config"]["hash"] == made["config_hash"] and t["validation"]["ok"] is True
    assert t["run_summary"] == f"airflow: export_nightly__traced/{result['run_id']}/publish try 1"
