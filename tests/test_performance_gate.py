"""The performance gate's size part: a model grown against the reference version, and TF Serving's graph limit."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_workspace, one_line_error, run_cli

MANIFEST = ("assets.extra", "export_manifest.json")


def _performance(ws, version: int) -> dict:
    return json.loads(ws.base.joinpath(str(version), *MANIFEST).read_text())["validation"]["performance"]


def _grow(ws, **config) -> None:
    """A newer checkpoint of a model with a 4 MiB extra weight, exported under a config that builds it
    (``config``: the workspace's other overrides, kept)."""
    from tests.models import padded
    from tf_export_pipeline.demo import train, write_config

    train(str(ws.train), steps=10, checkpoint_every=10, start_step=40, factory=padded, resume=False)
    write_config(str(ws.root), model={"factory": "tests.models:padded"}, **config)


def test_first_publish_records_sizes_without_reference(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir)
    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    perf = _performance(ws, res.json["version"])
    assert perf["reference"] is None and perf["size_ratio"] is None and perf["overridden"] is False
    assert perf["max_size_ratio"] == 2.0
    saved_model = ws.base / str(res.json["version"]) / "saved_model.pb"
    assert perf["candidate"]["graph_bytes"] == saved_model.stat().st_size
    assert perf["candidate"]["bytes"] > perf["candidate"]["graph_bytes"]
    st = ws.cli("status", "--json")
    assert st.json["versions"][0]["size_ratio"] is None
    assert "size ratio" not in ws.cli("status").out


def test_grown_model_is_refused_then_published_with_allow_regression(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir)
    first = ws.cli("run", "--json")
    assert first.rc == 0, first.err
    live = first.json["version"]
    reference = _performance(ws, live)["candidate"]
    _grow(ws)

    refused = ws.cli("run")
    assert refused.rc == 1, refused.err
    line = one_line_error(refused)
    assert line.startswith("tf-export: error: validation failed: size ratio ")
    assert f", reference version {live} " in line and "is above validation.max_size_ratio 2.0 " in line
    assert "(--allow-regression to publish anyway): " in line and str(ws.base) in line
    assert ws.versions() == [live]
    assert not [e for e in ws.entries() if e.startswith("temp-")]

    allowed = ws.cli("run", "--allow-regression", "--json")
    assert allowed.rc == 0, allowed.err
    version = allowed.json["version"]
    assert ws.versions() == [live, version]
    perf = _performance(ws, version)
    sizes = ("bytes", "graph_bytes")
    expected = {"version": live, **{k: reference[k] for k in sizes}}
    assert {k: perf["reference"][k] for k in ("version", *sizes)} == expected
    assert perf["overridden"] is True and perf["size_ratio"] > 2.0
    assert perf["candidate"]["bytes"] - reference["bytes"] >= 4 * 2**20  # the extra weight
    assert perf["size_ratio"] == pytest.approx(perf["candidate"]["bytes"] / reference["bytes"], abs=1e-4)
    listed = {v["version"]: v["size_ratio"] for v in ws.cli("status", "--json").json["versions"]}
    assert listed == {live: None, version: perf["size_ratio"]}
    assert f"size ratio of version {version} against its reference: {perf['size_ratio']:.2f}" in ws.cli("status").out

    # tf-export validate compares with the version given as --against, under the same override.
    grown, small = str(ws.base / str(version)), str(ws.base / str(live))
    res = run_cli("validate", grown, "--against", small)
    assert res.rc == 1 and "is above validation.max_size_ratio 2.0" in res.err, res.err
    assert run_cli("validate", grown, "--against", small, "--allow-regression").rc == 0


def test_reference_is_the_stable_version_under_serving_labels(tmp_path, trained_dir):
    from tests.models import padded
    from tf_export_pipeline.demo import SERVING, train

    ws = make_workspace(tmp_path, trained_dir, serving=SERVING)
    stable = ws.cli("run", "--json").json["version"]
    _grow(ws, serving=SERVING)
    canary = ws.cli("run", "--allow-regression", "--json")
    assert canary.rc == 0 and canary.json["labels"] == {"stable": stable, "canary": canary.json["version"]}
    # A third model of the canary's size is still compared with stable, not with the highest version.
    train(str(ws.train), steps=10, checkpoint_every=10, factory=padded)
    res = ws.cli("run")
    assert res.rc == 1 and f", reference version {stable} " in one_line_error(res)
    assert ws.versions() == [stable, canary.json["version"]]


def test_backfill_measures_against_the_live_version_and_takes_allow_regression(tmp_path, trained_dir):
    from tf_export_pipeline.demo import write_config

    ws = make_workspace(tmp_path, trained_dir)
    live = ws.cli("run", "--json").json["version"]
    # Historic checkpoints of the same model are as large as the live version: a ratio of 1.0.
    write_config(str(ws.root), validation={"max_size_ratio": 0.5})
    res = ws.cli("backfill")
    assert res.rc == 1 and "2 of 2 checkpoints failed; first: validation failed: size ratio 1.00 " in res.err, res.err
    assert f"reference version {live} " in res.err and ws.versions() == [live]
    assert not [e for e in ws.entries() if e.startswith("temp-")]
    res = ws.cli("backfill", "--allow-regression", "--json")
    assert res.rc == 0, res.err
    published = [r["version"] for r in res.json]
    assert len(published) == 2 and max(published) < live
    for version in published:
        perf = _performance(ws, version)
        assert perf["reference"]["version"] == live and perf["overridden"] is True
        assert perf["size_ratio"] == pytest.approx(1.0, abs=0.01) and perf["max_size_ratio"] == 0.5


def test_graph_limit_holds_even_with_allow_regression(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, validation={"max_graph_bytes": 1024})
    res = ws.cli("run", "--allow-regression")
    assert res.rc == 1, res.err
    line = one_line_error(res)
    assert line.startswith("tf-export: error: validation failed: saved_model.pb is ")
    assert "KiB, above validation.max_graph_bytes 1.0 KiB (TF Serving refuses a larger one): " in line
    assert ws.versions() == []
    assert not [e for e in ws.entries() if e.startswith("temp-")]


def test_gate_figures_and_keys():
    from tf_export_pipeline.config import ValidationConfig, config_from_dict
    from tf_export_pipeline.errors import ConfigError
    from tf_export_pipeline.validate.performance import apply_performance_gate, human_bytes, sizes_of

    assert [human_bytes(n) for n in (512, 4 * 2**20, int(1.2 * 2**30))] == ["512 B", "4.0 MiB", "1.2 GiB"]
    candidate = sizes_of({"saved_model.pb": {"size": 100}, "variables/variables.data-00000-of-00001": {"size": 300},
                          "assets.extra/export_manifest.json": {"size": 10_000}})
    assert candidate == {"bytes": 400, "graph_bytes": 100}
    reference = {"version": 7, "bytes": 100, "graph_bytes": 50}
    report = apply_performance_gate({"ok": True, "checks": []}, candidate, reference,
                                    ValidationConfig(max_size_ratio=None))
    assert report["ok"] and report["performance"]["size_ratio"] == 4.0 and not report["performance"]["overridden"]
    report = apply_performance_gate({"ok": True, "checks": []}, candidate, reference,
                                    ValidationConfig(allow_regression=True))
    assert report["ok"] and report["performance"]["overridden"]
    report = apply_performance_gate({"ok": True, "checks": []}, candidate, reference, ValidationConfig())
    assert report["reason"] == ("size ratio 4.00 (candidate 400 B, reference version 7 100 B) is above "
                                "validation.max_size_ratio 2.0 (--allow-regression to publish anyway)")
    # The latency figures the worker measured: the worse batch size's ratio is the one gated.
    latency = {"rounds": 30,
               "candidate": {"batch_8": {"median": 6.0, "p99": 7.0}, "batch_1": {"median": 1.0, "p99": 2}},
               "reference": {"batch_8": {"median": 2.0, "p99": 2.5}, "batch_1": {"median": 0.8, "p99": 1}},
               "ratios": {"batch_8": 3.0, "batch_1": 1.25}, "latency_ratio": 3.0, "confirmed": True}
    small = {"version": 7, "bytes": 400, "graph_bytes": 100}
    report = apply_performance_gate({"ok": True, "checks": [], "loader": "session", "latency": dict(latency)},
                                    candidate, small, ValidationConfig())
    assert report["reason"] == ("latency ratio 3.00 (batch of 8: candidate median 6 ms, reference version 7 2 ms, "
                                "over 30 interleaved rounds) is above validation.max_latency_ratio 1.5 "
                                "(--allow-regression to publish anyway)")
    perf = report["performance"]
    assert "latency" not in report and perf["loader"] == "session" and perf["rounds"] == 30
    assert perf["candidate"]["latency_ms"] == latency["candidate"]
    assert perf["reference"] == {**small, "latency_ms": latency["reference"]}
    assert perf["latency_ratio"] == 3.0 and perf["latency_confirmed"] and not perf["overridden"]
    report = apply_performance_gate({"ok": True, "checks": [], "latency": dict(latency)}, candidate, small,
                                    ValidationConfig(max_latency_ratio=4))
    assert report["ok"]
    report = apply_performance_gate({"ok": True, "checks": [], "latency": dict(latency)}, candidate, small,
                                    ValidationConfig(), allow_regression=True)
    assert report["ok"] and report["performance"]["overridden"]
    assert report["checks"][-1]["detail"].startswith("allowed by --allow-regression: latency ratio 3.00")
    # The first publish: the candidate's figures are recorded, nothing is compared.
    alone = {**latency, "reference": None, "ratios": None, "latency_ratio": None, "confirmed": False}
    report = apply_performance_gate({"ok": True, "checks": [], "latency": alone}, candidate, None, ValidationConfig())
    assert report["ok"] and report["performance"]["candidate"]["latency_ms"] == latency["candidate"]
    assert report["performance"]["reference"] is None and report["performance"]["latency_ratio"] is None
    for bad in ({"max_size_ratio": 0}, {"max_graph_bytes": 0}, {"max_size_ratios": 2}, {"max_latency_ratio": 0},
                {"latency_rounds": 4}):
        with pytest.raises(ConfigError):
            config_from_dict({"training_dir": "t", "export_base": "b", "model": {"factory": "m:f"},
                              "validation": bad}, ".")
