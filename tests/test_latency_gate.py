"""The performance gate's latency part: a slower model refused, an unchanged one passed under load, every time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import make_workspace, one_line_error, run_cli

MANIFEST = ("assets.extra", "export_manifest.json")
TRIALS = 20


def _performance(ws, version: int) -> dict:
    return json.loads(ws.base.joinpath(str(version), *MANIFEST).read_text())["validation"]["performance"]


@pytest.fixture(scope="module")
def heavy_trained(tmp_path_factory):
    """ckpt-10 and ckpt-20 of :func:`tests.models.heavy`, trained once for the module (tests copy them)."""
    from tests.models import heavy
    from tf_export_pipeline.demo import train

    folder = tmp_path_factory.mktemp("heavy") / "train"
    train(str(folder), steps=20, checkpoint_every=10, factory=heavy, resume=False)
    return folder


def _heavy_workspace(root, trained_dir, heavy_trained, **config):
    """A workspace whose training job writes checkpoints of :func:`tests.models.heavy`."""
    ws = make_workspace(root, trained_dir, model={"factory": "tests.models:heavy"}, **config)
    shutil.rmtree(ws.train)
    shutil.copytree(heavy_trained, ws.train)
    return ws


def _slow_down(ws, **config) -> None:
    """From now on the config builds :func:`tests.models.heavy_slowed`: the same checkpoints, the same
    outputs, three times the work per call. A newer checkpoint makes the next run export."""
    from tests.models import heavy
    from tf_export_pipeline.demo import train, write_config

    train(str(ws.train), steps=10, checkpoint_every=10, factory=heavy)
    write_config(str(ws.root), model={"factory": "tests.models:heavy_slowed"}, **config)


def test_slower_model_is_refused_in_one_line_then_published_with_allow_regression(tmp_path, trained_dir,
                                                                                  heavy_trained):
    ws = _heavy_workspace(tmp_path, trained_dir, heavy_trained)
    first = ws.cli("run", "--json")
    assert first.rc == 0, first.err
    live = first.json["version"]
    alone = _performance(ws, live)
    # The first publish: the candidate is timed, nothing is compared.
    assert alone["reference"] is None and alone["latency_ratio"] is None and alone["loader"] == "session"
    assert set(alone["candidate"]["latency_ms"]) == {"batch_2", "batch_1"}
    assert all(f["median"] > 0 and f["p99"] >= f["median"] for f in alone["candidate"]["latency_ms"].values())
    assert alone["rounds"] == 30 and alone["max_latency_ratio"] == 1.5

    _slow_down(ws)
    refused = ws.cli("run")
    assert refused.rc == 1, refused.err
    line = one_line_error(refused)
    assert line.startswith("tf-export: error: validation failed: latency ratio "), line
    assert "candidate median " in line and f"reference version {live} " in line, line
    assert "is above validation.max_latency_ratio 1.5 (--allow-regression to publish anyway): " in line, line
    assert ws.versions() == [live]
    assert not [e for e in ws.entries() if e.startswith("temp-")]

    allowed = ws.cli("run", "--allow-regression", "--json")
    assert allowed.rc == 0, allowed.err
    version = allowed.json["version"]
    perf = _performance(ws, version)
    assert perf["overridden"] is True and perf["latency_ratio"] > 1.5 and perf["latency_confirmed"] is True, perf
    assert perf["reference"]["version"] == live and set(perf["reference"]["latency_ms"]) == {"batch_2", "batch_1"}
    assert perf["size_ratio"] == pytest.approx(1.0, abs=0.1)  # the same variables: only the time grew
    worse = max(perf["latency_ratios"], key=perf["latency_ratios"].get)
    assert perf["latency_ratio"] == pytest.approx(
        perf["candidate"]["latency_ms"][worse]["median"] / perf["reference"]["latency_ms"][worse]["median"], rel=1e-3)
    listed = {v["version"]: v["latency_ratio"] for v in ws.cli("status", "--json").json["versions"]}
    assert listed == {live: None, version: perf["latency_ratio"]}
    assert f"latency ratio of version {version} against its reference: {perf['latency_ratio']:.2f}" in \
        ws.cli("status").out

    # tf-export validate times a SavedModel against the one given as --against.
    slow, fast = str(ws.base / str(version)), str(ws.base / str(live))
    res = run_cli("validate", slow, "--against", fast)
    assert res.rc == 1 and "is above validation.max_latency_ratio 1.5" in res.err, res.err
    assert "Latency over " in res.out and f"version {live} " in res.out
    assert run_cli("validate", slow, "--against", fast, "--allow-regression").rc == 0


def test_latency_gate_off_and_raised_limit(tmp_path, trained_dir, heavy_trained):
    ws = _heavy_workspace(tmp_path, trained_dir, heavy_trained)
    assert ws.cli("run").rc == 0
    _slow_down(ws, validation={"max_latency_ratio": None})
    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    perf = _performance(ws, res.json["version"])
    assert perf["latency_ratio"] is None and perf["max_latency_ratio"] is None
    assert perf["reference"]["latency_ms"] is None  # not loaded when the gate is off
    assert perf["candidate"]["latency_ms"]  # the candidate's own figures are still recorded


@pytest.fixture(scope="module")
def two_speeds(tmp_path_factory, trained_dir, heavy_trained):
    """Two published versions of the heavy model: ``fast`` and ``slow`` (heavy_slowed), the work directory
    of ``slow``'s samples, and the published directories."""
    root = tmp_path_factory.mktemp("speeds")
    ws = _heavy_workspace(root, trained_dir, heavy_trained, validation={"max_latency_ratio": None})
    first = ws.cli("run", "--json")
    assert first.rc == 0, first.err
    _slow_down(ws, validation={"max_latency_ratio": None})
    second = ws.cli("run", "--json")
    assert second.rc == 0, second.err
    return str(ws.base / str(first.json["version"])), str(ws.base / str(second.json["version"]))


class _BusyCore:
    """Another process spinning on one of the machine's cores for the duration."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _verdicts(candidate: str, reference: str) -> list[dict]:
    """``TRIALS`` validations of ``candidate`` against ``reference`` in one long-lived worker (as a
    backfill runs them), each through the gate with the default limits."""
    from tf_export_pipeline.config import ValidationConfig
    from tf_export_pipeline.validate import ValidationSession
    from tf_export_pipeline.validate.performance import apply_performance_gate, local_sizes, timing_request

    gate = ValidationConfig()
    out = []
    with ValidationSession() as session:
        for _ in range(TRIALS):
            report = session.validate(candidate, timing=timing_request(gate, reference), timeout=120)
            assert report.get("latency"), report
            apply_performance_gate(report, local_sizes(candidate), {"version": 1, **local_sizes(reference)}, gate)
            out.append(report)
    return out


def test_an_unchanged_model_passes_every_time_while_a_core_is_busy(two_speeds, forked_validation):
    fast, _slow = two_speeds
    with _BusyCore():
        reports = _verdicts(fast, fast)
    ratios = [r["performance"]["latency_ratio"] for r in reports]
    assert [r["ok"] for r in reports] == [True] * TRIALS, (ratios, [r.get("reason") for r in reports])
    assert max(ratios) < 1.5, ratios
    # Kept loaded between requests: only the first validation paid for loading the reference.
    loads = [r["performance"]["reference_load_seconds"] for r in reports]
    assert loads[0] > 0.01 and max(loads[1:]) < 0.01, loads


def test_a_three_times_slower_model_is_refused_every_time_while_a_core_is_busy(two_speeds, forked_validation):
    fast, slow = two_speeds
    with _BusyCore():
        reports = _verdicts(slow, fast)
    ratios = [r["performance"]["latency_ratio"] for r in reports]
    assert [r["ok"] for r in reports] == [False] * TRIALS, ratios
    assert all(r["reason"].startswith("latency ratio ") for r in reports), [r["reason"] for r in reports]
    assert min(ratios) > 1.5, ratios


def test_backfill_times_every_checkpoint_against_the_reference_loaded_once(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir)
    live = ws.cli("run", "--json")
    assert live.rc == 0, live.err
    res = ws.cli("backfill", "--json")
    assert res.rc == 0, res.err
    versions = [r["version"] for r in res.json if r["status"] == "published"]
    assert len(versions) == 2, res.json
    perfs = [_performance(ws, v) for v in versions]
    assert all(p["reference"]["version"] == live.json["version"] and p["latency_ratio"] is not None for p in perfs)
    loads = sorted(p["reference_load_seconds"] for p in perfs)
    assert loads[0] < 0.01 < loads[1], loads  # loaded for the first checkpoint, kept for the next
