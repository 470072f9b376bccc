"""`tf-export report`: one self-contained HTML page of several models, opened by headless Chromium with
the network off, and the run records it shows (`_exports/runs/`).

A model with three published versions under serving labels, a promotion, and a
failed run; a second model whose storage (an S3 endpoint nobody listens on)
cannot be read. The page is loaded from file:// with every host name resolving
to nothing, and the test reads the DOM Chromium rendered: the versions, the
labels, the failed run's error, the plots Plotly drew, the second model's error.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, make_workspace, one_line_error, run_cli

pytestmark = pytest.mark.timeout(600)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECRET = "sekret-value-4711"
SERVING = {"model_name": "demo_regressor", "model_config_file": "./serving/models.config", "policy": "labels",
           "reload_seconds": 0}


def chromium(*args: str, timeout: float = 120, reachable: str | None = None) -> str:
    """Headless Chromium with no network: every host resolves to nothing (but ``reachable``, an address of
    this machine). Returns stdout."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (.ci/run and `make venv` install Debian's chromium)")
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--host-resolver-rules=MAP * ~NOTFOUND" + (f", EXCLUDE {reachable}" if reachable else ""),
            "--disable-background-networking", "--no-first-run",
            "--hide-scrollbars", "--virtual-time-budget=5000", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory, trained_dir):
    """The served model (three versions, labels moved, a failed run) and the unreachable one."""
    root = tmp_path_factory.mktemp("report")
    ws = make_workspace(root / "ranker", trained_dir, versioning="step", serving=SERVING)
    for step in (10, 20, 30):
        res = ws.cli("run", "--checkpoint", f"ckpt-{step}", "--json")
        assert res.rc == 0 and res.json["status"] == "published", res.err
    assert ws.cli("promote", "20", "--now").rc == 0
    failed = ws.cli("run", "--checkpoint", "ckpt-99")
    assert failed.rc != 0
    error = one_line_error(failed).removeprefix("tf-export: error: ")
    ranker = root / "ranker.yaml"
    shutil.copy(ws.config, ranker)
    text = ranker.read_text().replace("./train", str(ws.train)).replace("./serving", str(ws.root / "serving"))
    ranker.write_text(text)
    lost = root / "lost.yaml"
    lost.write_text(
        "training_dir: ./train\nexport_base: s3://gone/base\nmodel: {factory: tf_export_pipeline.demo:make_model}\n"
        f"storage_options: {{endpoint_url: 'http://127.0.0.1:{closed_port()}', key: AKIAREPORTTEST, "
        f"secret: {SECRET}, config_kwargs: {{retries: {{max_attempts: 1}}}}}}\n")
    return {"ws": ws, "ranker": ranker, "lost": lost, "error": error, "root": root}


def test_report_renders_versions_labels_runs_and_plots_offline(models, tmp_path):
    out = tmp_path / "models.html"
    res = run_cli("report", "--config", str(models["ranker"]), "--config", str(models["lost"]), "--html", str(out))
    assert res.rc == 0, res.err
    assert "wrote " + str(out) in res.out
    [warning] = [line for line in res.err.splitlines() if line.strip()]
    assert warning.startswith("tf-export: warning: model lost: ") and "s3://gone/base" in warning
    text = out.read_text()
    assert SECRET not in text and "AKIAREPORTTEST" not in text and SECRET not in res.err
    # Self-contained: no script, style or image is fetched from anywhere.
    markup = re.sub(r"<script>.*?</script>", "", text, flags=re.S)  # Plotly's bundle holds "<\\/script" only
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", markup), "the page fetches something"

    dom = chromium("--dump-dom", out.as_uri())
    (tmp_path / "dom.html").write_text(dom)
    versions = [int(v) for v in re.findall(r'<tr class="version[^"]*" data-version="(\d+)"', dom)]
    assert versions == [30, 20, 10]  # newest first
    assert re.search(r'data-label="stable" data-version="20"', dom)
    assert re.search(r'data-label="canary" data-version="30"', dom)
    assert 'data-rollback="10"' in dom  # stable was 10 before the promotion
    failed = re.search(r'<tr class="run" data-status="failed">(.*?)</tr>', dom, re.S)
    assert failed and models["error"] in failed.group(1) and "ckpt-99" in failed.group(1)
    assert dom.count('data-status="published"') == 3
    # Plotly drew every plot of the served model (its script ran from the file, with no network).
    assert 'data-plots-drawn="4"' in dom
    assert len(re.findall(r'class="[^"]*js-plotly-plot', dom)) == 4
    lost = re.search(r'<section class="model" id="model-lost".*?</section>', dom, re.S).group(0)
    assert "model-error" in lost and "s3://gone/base" in lost and "unreachable" in lost

    chromium("--window-size=1280,1400", f"--screenshot={tmp_path / 'report.png'}", out.as_uri())
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_report_json_is_what_the_page_shows_and_costs_no_tensorflow(models, tmp_path):
    script = ("import sys, json\nfrom tf_export_pipeline.cli import main\n"
              "rc = main(sys.argv[1:])\n"
              "print(json.dumps({'rc': rc, 'tf': 'tensorflow' in sys.modules}), file=sys.stderr)\n")
    out = tmp_path / "one.html"
    proc = subprocess.run([sys.executable, "-c", script, "report", "--config", str(models["ranker"]), "--html",
                           str(out), "--json"], env=cli_env(), capture_output=True, text=True, timeout=300)
    last = json.loads(proc.stderr.strip().splitlines()[-1])
    assert last == {"rc": 0, "tf": False}, proc.stderr[-2000:]
    [view] = json.loads(proc.stdout)
    assert view["model"] == "ranker" and view["error"] is None
    assert [v["version"] for v in view["versions"]] == [10, 20, 30]
    assert view["labels"] == {"canary": 30, "stable": 20} and view["rollback_to"] == 10
    for v in view["versions"]:
        assert v["bytes"] > 0 and v["export_seconds"] > 0 and v["step"] == v["version"]
    assert [v["latency_ratio"] is not None for v in view["versions"]] == [False, True, True]
    assert view["runs"][0]["status"] == "failed" and view["runs"][0]["stage"] == "export"
    assert [r["status"] for r in view["runs"][1:]] == ["published"] * 3
    assert view["runs"][1]["versions"] == [30] and view["runs"][1]["run"].startswith("cli: ")


def test_a_config_that_does_not_load_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "models.html"
    res = run_cli("report", "--config", str(tmp_path / "missing.yaml"), "--html", str(out))
    assert res.rc == 2
    assert one_line_error(res) == f"tf-export: error: config file not found: {tmp_path / 'missing.yaml'}"
    assert not out.exists()


def test_report_help_says_what_the_page_holds():
    res = run_cli("report", "--help")
    assert res.rc == 0
    for words in ("self-contained", "no network", "rollback", "errors", "_exports/runs/", "latency ratio"):
        assert words in " ".join(res.out.split()), words


def test_run_records_keep_the_newest_and_read_newest_first(tmp_path):
    from tf_export_pipeline import runs
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.demo import write_config
    from tf_export_pipeline.layout import RUNS_DIR, RUNS_KEPT

    cfg = load_config(write_config(str(tmp_path)))
    items = [{"stage": "export", "status": "failed", "checkpoint": "/t/ckpt-1", "step": 1, "version": None,
              "error": "boom\nwith a second line"}]
    for i in range(RUNS_KEPT + 5):
        runs.write(cfg, runs.summary(items, now=1_700_000_000 + i))
    folder = Path(cfg.export_base, *RUNS_DIR)
    assert len([p for p in folder.iterdir() if p.suffix == ".json"]) == RUNS_KEPT
    (folder / "9999999999999-torn.json").write_text("{not json")  # newest by name, not a record
    got = runs.recent(cfg, limit=3)
    assert [r["at"] for r in got] == [1_700_000_000 + RUNS_KEPT + 4 - i for i in range(3)]
    assert got[0]["error"] == "boom with a second line" and got[0]["status"] == "failed"
    assert got[0]["kind"] == "cli" and got[0]["run"].startswith("cli: ")
