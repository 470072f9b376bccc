"""The models page in a live Airflow: the plugin listed by `airflow plugins`, its app under /tf-export behind
Airflow's authentication, its JSON, and its page rendered by headless Chromium (signed in through the
SimpleAuthManager's login, every host other than the api-server's unreachable).

One model with versions published by `tf-export run`, labels moved, a run that failed through the
operators' hook (the path every Airflow task takes) and one from the command line; the api-server runs
alone (the page needs no scheduler).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest

from tests.airflow.conftest import AIRFLOW, migrated_database, model_dags
from tests.airflow.live import LiveAirflow, wait_for
from tests.conftest import run_cli
from tests.test_report import chromium

pytestmark = pytest.mark.timeout(600, method="thread")

MODEL = "pageant"
SERVING = {"model_name": MODEL, "model_config_file": "./serving/models.config", "policy": "labels",
           "reload_seconds": 0}


class ApiServerOnly(LiveAirflow):
    """The api-server of :class:`LiveAirflow` alone, on a copy of the migrated database."""

    def start(self, limit: float = 180) -> ApiServerOnly:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        out = open(self.logs / "api-server.log", "wb")
        self.procs["api-server"] = subprocess.Popen([AIRFLOW, "api-server"], env=self.env, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self.procs["api-server"].poll() is not None:
                raise AssertionError(f"api-server exited\n{self.tails()}")
            try:
                return httpx.get(f"{self.base_url}/api/v2/version", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the api-server", up, limit, interval=0.5, on_timeout=self.tails)
        return self


@pytest.fixture(scope="module")
def model(tmp_path_factory, trained_dir):
    m = model_dags(tmp_path_factory.mktemp("page") / "configs", MODEL, trained_dir, versioning="step",
                   serving=SERVING, airflow={"schedule": None})
    for step in (10, 20):
        res = run_cli("run", "--checkpoint", f"ckpt-{step}", "--config", str(m.config))
        assert res.rc == 0, res.err
    assert run_cli("promote", "20", "--now", "--config", str(m.config)).rc == 0

    from tf_export_pipeline.operators.hooks import ExportHook

    with pytest.raises(Exception, match="checkpoint not found: ckpt-77"):
        ExportHook(str(m.config)).export("ckpt-77")
    return m


@pytest.fixture(scope="module")
def live(tmp_path_factory, model):
    home = tmp_path_factory.mktemp("page-home")
    shutil.copy2(migrated_database(tmp_path_factory), home / "airflow.db")
    airflow = ApiServerOnly(home, {"TF_EXPORT_CONFIG_DIR": str(model.config.parent)})
    try:
        yield airflow.start()
    finally:
        airflow.stop()


def test_airflow_plugins_lists_the_models_page(live):
    proc = subprocess.run([AIRFLOW, "plugins", "-o", "json"], env=live.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = json.loads(proc.stdout[proc.stdout.index("["):])
    [plugin] = [p for p in listed if p["name"] == "tf_export_models"]
    assert "'url_prefix': '/tf-export'" in str(plugin["fastapi_apps"])
    assert "'href': '/tf-export/'" in str(plugin["external_views"])
    # The UI builds its menu from the same list.
    views = [v for p in live.get("/api/v2/plugins")["plugins"] for v in p["external_views"]]
    assert any(v["href"] == "/tf-export/" and v["destination"] == "nav" for v in views)


def test_the_page_and_its_json_need_airflows_sign_in(model, monkeypatch):
    # Airflow's own app, as the api-server builds it, with the SimpleAuthManager's users (the live server
    # of this module makes everyone an admin, as `make airflow` does not).
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    monkeypatch.setenv("TF_EXPORT_CONFIG_DIR", str(model.config.parent))
    client = TestClient(create_app())
    for path in ("/tf-export/api/models", f"/tf-export/api/models/{MODEL}", f"/tf-export/models/{MODEL}",
                 "/tf-export/static/plotly.min.js"):
        assert client.get(path).status_code == 401, path
    assert client.get("/tf-export/api/models", headers={"Authorization": "Bearer not-a-token"}).status_code \
        in (401, 403)
    # A browser without a session is sent to the login page, and back.
    page = client.get("/tf-export/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 307 and "/auth/login" in page.headers["location"]
    assert "tf-export" in page.headers["location"]

    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    signed_in = client.get("/tf-export/api/models", headers={"Authorization": f"Bearer {token}"})
    assert signed_in.status_code == 200
    assert [v["model"] for v in signed_in.json()["models"]] == [MODEL]


def test_json_lists_the_model_with_versions_labels_and_the_failed_run(live, model):
    listed = live.get("/tf-export/api/models")
    assert listed["config_dir"] == str(model.config.parent)
    [view] = [v for v in listed["models"] if v["model"] == MODEL]
    one = live.get(f"/tf-export/api/models/{MODEL}")
    assert one["versions"] == view["versions"]
    assert [v["version"] for v in one["versions"]] == [10, 20]
    assert one["labels"] == {"canary": 20, "stable": 20} and one["rollback_to"] == 10
    assert one["error"] is None and one["served"] == 20
    failed = one["runs"][0]
    assert failed["status"] == "failed" and failed["stage"] == "export"
    assert failed["error"] == "checkpoint not found: ckpt-77" and failed["checkpoint"] == "ckpt-77"
    assert [r["status"] for r in one["runs"][1:]] == ["published", "published"]
    assert live.client.get("/tf-export/api/models/nope").status_code == 404


def test_the_model_page_renders_in_chromium(live, tmp_path):
    page = live.client.get(f"/tf-export/models/{MODEL}")
    assert page.status_code == 200 and "checkpoint not found: ckpt-77" in page.text

    # This server makes every visitor an admin (SIMPLE_AUTH_MANAGER_ALL_ADMINS): its middleware signs the
    # browser in, as the login does elsewhere.
    login = f"{live.base_url}/tf-export/models/{MODEL}"
    # Nothing but the api-server is reachable: Plotly's script comes from the plugin itself.
    dom = chromium("--dump-dom", login, reachable="127.0.0.1")
    (tmp_path / "dom.html").write_text(dom)
    assert f'data-model="{MODEL}"' in dom, dom[:2000]
    assert re.findall(r'<tr class="version[^"]*" data-version="(\d+)"', dom) == ["20", "10"]
    assert 'data-label="stable" data-version="20"' in dom and 'data-rollback="10"' in dom
    failed = re.search(r'<tr class="run" data-status="failed">(.*?)</tr>', dom, re.S)
    assert failed and "checkpoint not found: ckpt-77" in failed.group(1)
    assert 'data-plots-drawn="4"' in dom and len(re.findall(r'class="[^"]*js-plotly-plot', dom)) == 4
    chromium("--window-size=1280,1200", f"--screenshot={tmp_path / 'airflow-page.png'}", login,
             reachable="127.0.0.1")
    assert (tmp_path / "airflow-page.png").stat().st_size > 20_000
