"""Mistakes in a config or in the files it names: a clear error before anything is exported, and nothing left behind."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import yaml

from tests.conftest import make_workspace, one_line_error, run_cli

GATE = {"metric": "val_loss", "mode": "min", "source": "train/metrics-{step}.json"}


def _nothing_left(ws):
    """No version, no staging, no work folder and no lease in the export base."""
    assert ws.versions() == []
    assert not [e for e in ws.entries() if e.startswith("temp-")], ws.entries()
    for sub in ("work", "leases"):
        folder = ws.base / "_exports" / sub
        assert not folder.exists() or not list(folder.iterdir()), (sub, list(folder.iterdir()))


def _metrics(ws, values: dict[int, object]):
    for step, value in values.items():
        # json writes NaN and Infinity as Python's json reads them, as a training job's json.dump does.
        (ws.train / f"metrics-{step}.json").write_text(json.dumps({"step": step, "metrics": {"val_loss": value}}))


# -- the metric gate: values that are not finite numbers ------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_candidate_whose_metric_is_not_finite_is_not_published(tmp_path, trained_dir, value):
    ws = make_workspace(tmp_path, trained_dir, gate=GATE)
    _metrics(ws, {30: value})
    res = ws.cli("run", "--json")
    assert res.rc == 1, (res.out, res.err)
    line = one_line_error(res)
    assert "'val_loss'" in line and repr(value) in line and "not finite" in line, line
    assert line.endswith(str(ws.train / "metrics-30.json")), line
    _nothing_left(ws)

    forced = ws.cli("run", "--force", "--json")
    assert forced.rc == 0, forced.err
    assert forced.json["status"] == "published" and forced.json["step"] == 30
    manifest = json.loads((ws.base / str(forced.json["version"]) / "assets.extra" / "export_manifest.json").read_text())
    assert "gate" not in manifest  # no value to compare the next checkpoint with


@pytest.mark.parametrize("live_value", [float("nan"), float("-inf")])
def test_a_live_metric_that_is_not_finite_is_reported_and_the_gate_keeps_working(tmp_path, trained_dir, live_value):
    ws = make_workspace(tmp_path, trained_dir, gate=GATE)
    _metrics(ws, {20: 0.5, 30: 0.9, 40: 1.5})
    live = ws.cli("run", "--checkpoint", "ckpt-20", "--json").json
    # A version published before non-finite metrics were refused (or by hand) records one.
    manifest_path = ws.base / str(live["version"]) / "assets.extra" / "export_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["gate"]["value"] = live_value
    manifest_path.write_text(json.dumps(manifest))

    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published" and res.json["step"] == 30
    assert "live" in res.json["gate_warning"] and "not finite" in res.json["gate_warning"]
    assert "tf-export: warning:" in res.err and "not finite" in res.err
    manifest = json.loads((ws.base / str(res.json["version"]) / "assets.extra" / "export_manifest.json").read_text())
    assert manifest["gate"]["value"] == 0.9 and manifest["gate"]["live_value"] is None

    ws.train_more(10)  # ckpt-40, worse than the new live version: the gate holds it back
    worse = ws.cli("run", "--json")
    assert worse.rc == 0, worse.err
    assert worse.json["status"] == "gated" and worse.json["live_value"] == 0.9


def test_a_metric_value_that_is_not_a_number_is_a_config_error(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, gate=GATE)
    _metrics(ws, {30: "low"})
    res = ws.cli("run")
    assert res.rc == 2, res.err
    line = one_line_error(res)
    assert "'val_loss'" in line and "'low'" in line and line.endswith(str(ws.train / "metrics-30.json")), line
    assert "unexpected" not in line and str(ws.config) not in line
    _nothing_left(ws)


# -- validation samples -------------------------------------------------------------------------------
def test_an_empty_samples_batch_is_a_config_error(tmp_path, trained_dir):
    np.savez(tmp_path / "samples.npz", features=np.zeros((0, 4), "float32"))
    ws = make_workspace(tmp_path, trained_dir, validation={"samples": "samples.npz"})
    res = ws.cli("run")
    assert res.rc == 2, res.err
    line = one_line_error(res)
    assert "'features'" in line and "no rows" in line and line.endswith(str(tmp_path / "samples.npz")), line
    _nothing_left(ws)


@pytest.mark.parametrize("array, given", [
    (np.zeros((2, 3), "float32"), "float32 (2, 3)"),
    (np.zeros((4,), "float32"), "float32 (4,)"),        # Keras's message for this one carries ANSI escapes
    (np.float32(1.0), "float32 ()"),
    (np.array([["a"] * 4] * 2), "<U1 (2, 4)"),
    (np.array([[b"a"] * 4] * 2), "|S1 (2, 4)"),
    (np.zeros((2, 4), complex), "complex128 (2, 4)"),
])
def test_samples_of_the_wrong_shape_or_dtype_are_a_config_error(tmp_path, trained_dir, array, given):
    np.savez(tmp_path / "samples.npz", features=array)
    ws = make_workspace(tmp_path, trained_dir, validation={"samples": "samples.npz"})
    res = ws.cli("run")
    assert res.rc == 2, res.err
    line = one_line_error(res)
    assert "\x1b" not in res.err
    assert "input 'features'" in line and "float32 [None, 4]" in line and given in line, line
    assert line.endswith(str(tmp_path / "samples.npz")), line
    _nothing_left(ws)


def test_samples_that_widen_losslessly_are_accepted(tmp_path, trained_dir):
    np.savez(tmp_path / "samples.npz", features=np.arange(8, dtype="int64").reshape(2, 4))
    ws = make_workspace(tmp_path, trained_dir, validation={"samples": "samples.npz"})
    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published"


def test_error_lines_carry_no_terminal_escapes(monkeypatch, capsys):
    from tf_export_pipeline import cli
    from tf_export_pipeline.errors import PipelineError

    def boom(args, cfg):
        raise ValueError("\x1b[1mInvalid input shape\x1b[0m\nArguments received: \x1b]8;;http://x\x07link\x1b]8;;\x07")

    monkeypatch.setitem(cli.COMMANDS, "demo", boom)
    assert cli.main(["demo", "--workdir", "x"]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and len(err.strip().splitlines()) == 1
    assert "Invalid input shape Arguments received: link" in err

    def fails(args, cfg):
        raise PipelineError("\x1b[31mred\x1b[0m: /some/path")

    monkeypatch.setitem(cli.COMMANDS, "demo", fails)
    assert cli.main(["demo", "--workdir", "x"]) == 1
    assert capsys.readouterr().err == "tf-export: error: red: /some/path\n"


# -- config errors that surface late must not leave staging behind ------------------------------------
@pytest.mark.parametrize("contract", [None, "signatures: [serving_default]\n", "- just\n- a list\n",
                                      "signatures:\n  serving_default:\n    inputs: [features]\n"])
def test_a_missing_or_malformed_contract_leaves_nothing_behind(tmp_path, trained_dir, contract):
    if contract is not None:
        (tmp_path / "contract.yaml").write_text(contract)
    ws = make_workspace(tmp_path, trained_dir, validation={"contract": "contract.yaml"})
    for _ in range(2):  # a retry must not add staging either
        res = ws.cli("run")
        assert res.rc == 2, res.err
        line = one_line_error(res)
        assert "contract" in line and line.endswith(str(tmp_path / "contract.yaml")), line
        _nothing_left(ws)


@pytest.mark.parametrize("policy", ["labels", "latest"])
def test_a_model_config_file_that_does_not_parse_leaves_nothing_behind(tmp_path, trained_dir, policy):
    from tf_export_pipeline.demo import SERVING

    ws = make_workspace(tmp_path, trained_dir, serving={**SERVING, "policy": policy})
    target = ws.root / "serving" / "models.config"
    target.parent.mkdir(parents=True)
    target.write_text("model_config_list { config { name: 'x' ")
    for _ in range(2):
        res = ws.cli("run")
        assert res.rc == 2, res.err
        line = one_line_error(res)
        assert "model config file does not parse" in line and line.endswith(str(target)), line
        _nothing_left(ws)


def test_a_contract_broken_between_export_and_validation_removes_staging(tmp_path, trained_dir):
    """In Airflow, export and validate are separate tasks: a config error in the second discards the first's work."""
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.errors import ConfigError
    from tf_export_pipeline.stages import stage_export, stage_validate

    (tmp_path / "contract.yaml").write_text(yaml.safe_dump({"signatures": {"serving_default": {}}}))
    ws = make_workspace(tmp_path, trained_dir, validation={"contract": "contract.yaml"})
    cfg = load_config(str(ws.config))
    staged = stage_export(cfg)
    assert staged.status == "staged" and [e for e in ws.entries() if e.startswith("temp-")]
    (tmp_path / "contract.yaml").write_text("signatures: {serving_default: {colour: blue}}\n")
    with pytest.raises(ConfigError, match="unknown key 'signatures.serving_default.colour'"):
        stage_validate(cfg, staged)
    _nothing_left(ws)


# -- the template of fast SavedModel writes --------------------------------------------------------------
def test_runs_and_backfills_leave_nothing_in_tmpdir(tmp_path, trained_dir):
    ws = make_workspace(tmp_path / "ws", trained_dir)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}

    def leftovers():
        return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("tf-export-"))

    res = ws.cli("run", "--json", env=env)
    assert res.rc == 0 and res.json["status"] == "published", res.err
    assert leftovers() == []
    res = ws.cli("backfill", "--json", env=env)  # ckpt-10 and ckpt-20: a full write, then a fast one
    assert res.rc == 0 and [r["status"] for r in res.json] == ["published", "published"], res.err
    assert leftovers() == []
    ws.train_more(20)
    res = ws.cli("backfill", "--jobs", "2", "--json", env=env)
    assert res.rc == 0 and [r["status"] for r in res.json] == ["published", "published"], res.err
    assert leftovers() == []


# -- airflow schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("schedule", "every night at 2"),
    ("schedule", "0 24 * * *"),
    ("promote_schedule", "@nightly"),
])
def test_a_schedule_that_is_not_cron_is_a_config_error(tmp_path, key, value):
    from tf_export_pipeline.demo import write_config

    config = write_config(str(tmp_path), airflow={key: value})
    for command in ("status", "run"):
        res = run_cli(command, "--config", config)
        assert res.rc == 2, res.err
        line = one_line_error(res)
        assert line.startswith(f"tf-export: error: invalid config: bad value for 'airflow.{key}': "
                               f"not a cron expression or preset ({value!r}"), line
        assert line.endswith(f": {config}"), line


def test_the_exact_schedule_message(tmp_path):
    from tf_export_pipeline.demo import write_config

    config = write_config(str(tmp_path), airflow={"schedule": "every night at 2"})
    res = run_cli("status", "--config", config)
    assert one_line_error(res) == (f"tf-export: error: invalid config: bad value for 'airflow.schedule': not a cron "
                                   f"expression or preset ('every night at 2'): {config}")


GOOD_SCHEDULES = [None, "@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly",
                  "@annually", "@midnight", "0 3 * * *", "*/15 0-6,22-23 * jan-mar mon-fri", "0 0 1 */3 *",
                  "30 2 * * 0", "30 2 * * 7", "0 0 1-31/2 JAN,Dec SUN", "5 4 * * sun-sat", "0 0 ? * MON",
                  "  0   3 * * *  ", "59 23 31 12 6"]
BAD_SCHEDULES = ["", "every night at 2", "@nightly", "@reboot", "daily", "0 3 * *", "0 3 * * * *", "0 24 * * *",
                 "60 * * * *", "* * 0 * *", "* * 32 * *", "* * * 13 *", "* * * * 8", "*/0 * * * *", "5-1 * * * *",
                 "1,,2 * * * *", "* * * foo *", "* * * * mon-xyz", "- * * * *", "1-2-3 * * * *", "*/x * * * *",
                 "0 3 L * *", "0 3 * * 5#3", "H 3 * * *", "0 3 * jan-mon *", "1/ * * * *", "0 0 * * sun-mon/"]


def test_schedules_accepted_and_refused(tmp_path):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.demo import write_config
    from tf_export_pipeline.errors import ConfigError

    for value in GOOD_SCHEDULES:
        cfg = load_config(write_config(str(tmp_path), airflow={"schedule": value, "promote_schedule": value}))
        assert cfg.airflow.schedule == value and cfg.airflow.promote_schedule == value
    for value in BAD_SCHEDULES:
        config = write_config(str(tmp_path), airflow={"schedule": value})
        with pytest.raises(ConfigError, match="bad value for 'airflow.schedule': not a cron expression or preset"):
            load_config(config)


def test_good_schedule_through_the_cli(tmp_path):
    from tf_export_pipeline.demo import write_config

    config = write_config(str(tmp_path), airflow={"schedule": "*/30 1-5 * * mon-fri", "promote_schedule": "@hourly"})
    res = run_cli("status", "--config", config)
    assert res.rc == 0, res.err


# -- duplicate keys ---------------------------------------------------------------------------------------
def test_a_duplicate_key_is_a_config_error(tmp_path):
    config = tmp_path / "export.yaml"
    config.write_text(textwrap.dedent("""\
        training_dir: ./train
        export_base: ./serving/a
        model:
          factory: tf_export_pipeline.demo:build
        export_base: ./serving/b
    """))
    res = run_cli("status", "--config", str(config))
    assert res.rc == 2, res.err
    assert one_line_error(res) == f"tf-export: error: invalid config: duplicate key 'export_base' at line 5: {config}"


def test_a_nested_duplicate_key_names_its_section(tmp_path):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.errors import ConfigError

    config = tmp_path / "export.yaml"
    config.write_text(textwrap.dedent("""\
        training_dir: ./train
        export_base: ./serving/a
        model: {factory: tf_export_pipeline.demo:build}
        validation:
          rtol: 0.1
          atol: 0.1
          rtol: 0.001
        retention: {keep: 3}
    """))
    with pytest.raises(ConfigError) as caught:
        load_config(str(config))
    assert str(caught.value) == f"invalid config: duplicate key 'validation.rtol' at line 7: {config}"
    # the same key in two sections, and a merge key overridden in its mapping, are not duplicates
    config.write_text(textwrap.dedent("""\
        training_dir: ./train
        export_base: ./serving/a
        model: {factory: tf_export_pipeline.demo:build}
        storage_options:
          keep: 3
          defaults: &tolerances {rtol: 0.1, atol: 0.1}
        validation:
          <<: *tolerances
          rtol: 0.001
        retention: {keep: 3}
    """))
    cfg = load_config(str(config))
    assert cfg.validation.rtol == 0.001 and math.isclose(cfg.validation.atol, 0.1) and cfg.retention.keep == 3
