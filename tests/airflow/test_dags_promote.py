"""``export_promote__<model>``: TF Serving's labels moved by ``dag.test()`` runs, each change an Asset event.

Two versions are published first (ckpt-20, then ckpt-30 as canary) with the
pipeline itself; then the DAG runs three times: its scheduled path (no
params: the canary has soaked, so it becomes stable), ``rollback``, and a
promotion by ``version``. The model config file is parsed with TF Serving's
protos after each run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.airflow.conftest import asset_events, model_dags, task_states, xcom
from tests.airflow.test_dags_local import parse_in_fresh_process

pytestmark = pytest.mark.timeout(300, method="thread")

SERVING = {"model_name": "demo_regressor", "model_config_file": "./serving/models.config", "policy": "labels",
           "reload_seconds": 0}


def labels_in(path: Path) -> tuple[list[int], dict[str, int]]:
    """The demo model's listed versions and labels, read with TF Serving's own protos."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    [entry] = [c for c in config.model_config_list.config if c.name == "demo_regressor"]
    return sorted(entry.model_version_policy.specific.versions), dict(entry.version_labels)


def test_promote_dag_only_for_labels_parses_without_tensorflow(tmp_path):
    from tf_export_pipeline.demo import write_config

    folder = tmp_path / "configs"
    folder.mkdir()
    write_config(str(folder), name="ranker.yaml", serving=SERVING,
                 airflow={"promote_schedule": "@hourly", "soak_seconds": 7200})
    write_config(str(folder), name="latest.yaml", serving={**SERVING, "policy": "latest"})
    write_config(str(folder), name="plain.yaml")
    out = parse_in_fresh_process({"TF_EXPORT_CONFIG_DIR": str(folder)})
    assert out["import_errors"] == {} and out["tensorflow"] is False and out["keras"] is False
    assert sorted(d for d in out["dags"] if d.startswith("export_promote__")) == ["export_promote__ranker"]
    assert len(out["dags"]) == 3 * 3 + 1
    dag = out["dags"]["export_promote__ranker"]
    assert dag["schedule"] == "@hourly" and dag["catchup"] is False
    assert dag["params"] == ["label", "rollback", "version"]
    assert sorted(dag["tasks"]) == ["check_canary", "choose", "promote", "promote_canary"]
    assert [dag["tasks"][t]["type"] for t in ("promote", "check_canary", "promote_canary")] == [
        "PromoteVersionOperator", "CheckCanaryOperator", "PromoteVersionOperator"]
    model_config = "file://" + str(folder / "serving" / "models.config")
    assert dag["tasks"]["promote"]["outlets"] == [model_config]
    assert dag["tasks"]["promote_canary"]["outlets"] == [model_config]


def test_promote_dag_makes_a_soaked_canary_stable_rolls_back_and_promotes_by_version(tmp_path, trained_dir,
                                                                                     forked_validation):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl
    from tf_export_pipeline.stages import run_once

    m = model_dags(tmp_path / "ws", "promote_local", trained_dir, serving=SERVING,
                   airflow={"soak_seconds": 0})
    cfg = load_config(str(m.config))
    model_config = m.config.parent / "serving" / "models.config"
    uri = "file://" + str(model_config)
    v1 = run_once(cfg, checkpoint="ckpt-20").version
    v2 = run_once(cfg, checkpoint="ckpt-30").version  # published as canary; v1 stays stable
    assert v1 < v2 and labels_in(model_config) == ([v1, v2], {"stable": v1, "canary": v2})

    # No params, as a scheduled run: the canary has soaked (soak_seconds: 0) and there is no gate.
    soaked = m.test("promote")
    assert soaked.state == "success", task_states(soaked)
    assert task_states(soaked) == {"choose": ["success"], "check_canary": ["success"],
                                   "promote_canary": ["success"], "promote": ["skipped"]}
    assert xcom(soaked, "check_canary")["status"] == "ready"
    promoted = xcom(soaked, "promote_canary")
    assert (promoted["status"], promoted["label"], promoted["version"], promoted["previous"]) == \
        ("promoted", "stable", v2, v1)
    assert labels_in(model_config) == ([v2], {"stable": v2, "canary": v2})
    assert asset_events(soaked.run_id) == [(uri, {"model": "demo_regressor", "label": "stable", "version": v2,
                                                  "previous": v1, "command": "promote"})]

    back = m.test("promote", conf={"rollback": True})
    assert back.state == "success", task_states(back)
    assert task_states(back)["check_canary"] == ["skipped"]
    rolled = xcom(back, "promote")
    assert (rolled["status"], rolled["version"], rolled["previous"]) == ("rolled_back", v1, v2)
    assert labels_in(model_config) == ([v1, v2], {"stable": v1, "canary": v2})
    assert asset_events(back.run_id) == [(uri, {"model": "demo_regressor", "label": "stable", "version": v1,
                                                "previous": v2, "command": "rollback"})]

    # A person promotes the version rolled back from again, by its number.
    again = m.test("promote", conf={"version": v2, "label": "stable"})
    assert again.state == "success", task_states(again)
    assert xcom(again, "promote")["version"] == v2
    assert labels_in(model_config) == ([v2], {"stable": v2, "canary": v2})
    assert [extra["version"] for _, extra in asset_events(again.run_id)] == [v2]
    history = [(r["command"], r["labels_after"].get("stable"))
               for r in ServingControl.from_config(cfg).history() if r["phase"] == "labels"]
    assert history == [("publish", v1), ("publish", v1), ("promote", v2), ("rollback", v1), ("promote", v2)]
