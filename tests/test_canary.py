"""The promote DAG's canary check (pipeline/canary.py), and `tf-export demo` moving its labels.

The verdicts run on a real model config file and history, written by
ServingControl; the versions are manifests written by hand (the check reads
nothing else of a version), so no TensorFlow is needed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tf_export_pipeline.canary import soak_verdict
from tf_export_pipeline.config import config_from_dict
from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.serving import ServingControl

HOUR = 3600.0


def _cfg(root: Path, gate: bool = False, policy: str = "labels"):
    data = {"training_dir": "./train", "export_base": "./serving/m",
            "model": {"factory": "tf_export_pipeline.demo:build"},
            "serving": {"model_name": "m", "model_config_file": "./serving/models.config", "policy": policy,
                        "reload_seconds": 0}}
    if gate:
        data["gate"] = {"metric": "val_loss", "mode": "min", "source": "./train/metrics-{step}.json"}
    return config_from_dict(data, str(root))


def _version(root: Path, version: int, step: int, val_loss: float | None = None) -> int:
    manifest = root / "serving" / "m" / str(version) / "assets.extra" / "export_manifest.json"
    manifest.parent.mkdir(parents=True)
    (manifest.parent.parent / "saved_model.pb").write_bytes(b"")  # what promote checks a version by
    manifest.write_text(json.dumps({"version": version, "times": {"claimed_at": time.time()},
                                    "checkpoint": {"name": f"ckpt-{step}", "step": step}}))
    if val_loss is not None:
        _metric(root, step, val_loss)
    return version


def _metric(root: Path, step: int, val_loss: float) -> None:
    (root / "train").mkdir(exist_ok=True)
    (root / "train" / f"metrics-{step}.json").write_text(json.dumps({"step": step, "metrics": {"val_loss": val_loss}}))


def test_canary_becomes_ready_after_the_soak_and_never_after_a_rollback_from_it(tmp_path):
    cfg = _cfg(tmp_path)
    control = ServingControl.from_config(cfg)
    assert soak_verdict(cfg, HOUR, control=control)["status"] == "no_canary"
    v1, v2 = _version(tmp_path, 100, 10), _version(tmp_path, 200, 20)
    control.move({"canary": v1, "stable": v1}, command="publish", now=True)  # the first publish
    assert soak_verdict(cfg, HOUR)["status"] == "already_stable"

    control.move({"canary": v2}, command="publish", now=True)
    soaking = soak_verdict(cfg, HOUR)
    assert (soaking["status"], soaking["version"], soaking["stable"]) == ("soaking", v2, v1)
    assert soaking["soaked_seconds"] < 60 and "of 3600 s" in soaking["reason"]
    ready = soak_verdict(cfg, HOUR, now=time.time() + HOUR)
    assert ready["status"] == "ready" and ready["version"] == v2 and ready["since"] == soaking["since"]

    control.promote(v2, now=True)
    control.rollback(now=True)  # v2 was promoted, then rolled back from: a person decided
    later = soak_verdict(cfg, HOUR, now=time.time() + 10 * HOUR)
    assert (later["status"], later["version"], later["stable"]) == ("was_stable", v2, v1)

    v3 = _version(tmp_path, 300, 30)  # the next publish is a new canary, with a soak of its own
    control.move({"canary": v3}, command="publish", now=True)
    assert soak_verdict(cfg, HOUR)["status"] == "soaking"
    assert soak_verdict(cfg, 0)["status"] == "ready"

    with pytest.raises(ConfigError, match="policy: labels"):
        soak_verdict(_cfg(tmp_path, policy="latest"), HOUR)


def test_with_a_gate_the_canary_must_hold_its_metric_read_again_at_the_end_of_the_soak(tmp_path):
    cfg = _cfg(tmp_path, gate=True)
    control = ServingControl.from_config(cfg)
    v1, v2 = _version(tmp_path, 100, 10, val_loss=0.5), _version(tmp_path, 200, 20, val_loss=0.6)
    control.move({"canary": v1, "stable": v1}, command="publish", now=True)
    control.move({"canary": v2}, command="publish", now=True)

    held = soak_verdict(cfg, 0)
    assert (held["status"], held["metric"], held["value"], held["stable_value"]) == ("held", "val_loss", 0.6, 0.5)
    assert "worse than 0.5 of stable 100" in held["reason"]
    _metric(tmp_path, 20, 0.5)  # e.g. an evaluation on fresh data, written during the soak: equal is not worse
    ready = soak_verdict(cfg, 0)
    assert (ready["status"], ready["value"], ready["stable_value"]) == ("ready", 0.5, 0.5)

    (tmp_path / "train" / "metrics-20.json").unlink()  # no metric anywhere: held, never promoted blind
    assert soak_verdict(cfg, 0)["status"] == "held"


def test_demo_publishes_promotes_publishes_a_canary_and_rolls_back(tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    res = run_cli("demo", "--workdir", str(tmp_path / "demo"), "--json")
    assert res.rc == 0, res.err[-2000:]
    for line in ("[3/7] first run:  published version", "[4/7] second run: skipped:", "[6/7] tf-export promote",
                 "[7/7] tf-export rollback: stable ->", "model_config_list {"):
        assert line in res.err
    out = res.json
    first, second, third = out["runs"]
    v1, v2 = first["version"], third["version"]
    assert (first["status"], second["status"], third["status"]) == ("published", "skipped", "published")
    assert [(s["step"], s["labels"]) for s in out["serving"]] == [
        ("publish", {"canary": v1, "stable": v1}),
        ("publish as canary", {"canary": v2, "stable": v1}),
        ("promote", {"canary": v2, "stable": v2}),
        ("rollback", {"canary": v2, "stable": v1}),
    ]
    for step in out["serving"]:  # each file printed is what TF Serving reads
        config = text_format.Parse(step["file"], model_server_config_pb2.ModelServerConfig())
        [entry] = config.model_config_list.config
        assert dict(entry.version_labels) == step["labels"]
        assert sorted(entry.model_version_policy.specific.versions) == step["versions"]
    assert Path(out["model_config_file"]).read_text() == out["serving"][-1]["file"]
