"""The models page inside Airflow's UI: the FastAPI app the plugin mounts under ``/tf-export``.

``/tf-export/`` lists the models of the config folder (the one the DAG file
reads: ``$TF_EXPORT_CONFIG_DIR``, else ``configs/`` in Airflow's DAGs folder)
with what each serves, its labels and its last run; ``/tf-export/models/<model>``
is a model's page (versions on a time line, labels and the rollback target, the
last runs with their one-line errors, plots of export duration, size and
latency ratio), the same view ``tf-export report`` writes
(:mod:`tf_export_pipeline.report`). ``/tf-export/api/models`` and
``/tf-export/api/models/<model>`` give the same data as JSON. The UI's menu
links to it (the plugin's external view, under Browse).

Read-only, and behind Airflow's own authentication like every UI page: a
request needs the user's token (the UI's cookie, or ``Authorization: Bearer``)
and the auth manager's leave to see the website; a model is shown only to a
user who may read its DAGs. A browser without a session is sent to the login
page. Storage credentials come from the config's Airflow connection, as in the
tasks, and never reach a page.

The plugin itself (:mod:`tf_export_pipeline.operators.models_ui`) imports this
module only when the api-server asks for its app.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from tf_export_pipeline.operators.provider import MODELS_PAGE_PREFIX as PREFIX

CONFIG_SUFFIXES = (".yaml", ".yml")
READERS = 8  # models read at once for the list: each is a few storage requests


def config_dir() -> Path:
    """The folder the DAG file reads configs from (see ``dags/tf_export_dags.py``)."""
    folder = os.environ.get("TF_EXPORT_CONFIG_DIR")
    if folder:
        return Path(folder)
    from airflow.configuration import conf

    return Path(conf.get("core", "dags_folder")) / "configs"


def config_files() -> dict[str, Path]:
    """Each model of the config folder by its name (the config file's name, as in the DAG ids)."""
    folder = config_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in CONFIG_SUFFIXES and p.is_file()}


def _may_read(user: Any, model: str) -> bool:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    return get_auth_manager().is_authorized_dag(method="GET", details=DagDetails(id=f"export_nightly__{model}"),
                                                user=user)


def _website(user: GetUserDep) -> Any:
    """Airflow's check of every UI page: a signed-in user who may see the website."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView

    if not get_auth_manager().is_authorized_view(access_view=AccessView.WEBSITE, user=user):
        raise HTTPException(status_code=403, detail="Forbidden")
    return user


User = Annotated[Any, Depends(_website)]


def _view(model: str, path: Path) -> dict:
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.operators.connections import config_with_connection
    from tf_export_pipeline.report.gather import model_view

    return model_view(model, lambda: config_with_connection(load_config(str(path))), str(path))


def _views(user: Any) -> list[dict]:
    models = [(m, p) for m, p in config_files().items() if _may_read(user, m)]
    if not models:
        return []
    with ThreadPoolExecutor(min(READERS, len(models))) as pool:
        return list(pool.map(lambda item: _view(*item), models))


def _one(user: Any, model: str) -> dict:
    path = config_files().get(model)
    if path is None or not _may_read(user, model):
        raise HTTPException(status_code=404, detail=f"no model {model!r} in the config folder")
    return _view(model, path)


def _run_link(record: dict) -> str | None:
    """The Airflow UI's page of the DAG run a record names (none for a command line's run)."""
    airflow = record.get("airflow") or {}
    if not airflow.get("dag_id") or not airflow.get("run_id"):
        return None
    return f"/dags/{quote(airflow['dag_id'], safe='')}/runs/{quote(airflow['run_id'], safe='')}"


def _model_href(model: str) -> str:
    return f"{PREFIX}/models/{quote(model, safe='')}"


app = FastAPI(title="TF export: models", description="Each model's versions, labels and last runs (read-only).")


@app.exception_handler(HTTPException)
async def _signed_out(request: Request, exc: HTTPException) -> Response:
    """A browser without a session goes to the login page and back; an API client gets the status."""
    wants_page = "/api/" not in request.url.path and "text/html" in request.headers.get("accept", "")
    if exc.status_code == 401 and wants_page:
        from airflow.api_fastapi.app import get_auth_manager

        return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=307)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


@app.get("/", response_class=HTMLResponse)
def index(user: User) -> HTMLResponse:
    from tf_export_pipeline.report.page import index_page

    return HTMLResponse(index_page(_views(user), _model_href, f"{PREFIX}/api/models"))


@app.get("/models/{model}", response_class=HTMLResponse)
def model_page(model: str, user: User) -> HTMLResponse:
    from tf_export_pipeline.report.page import model_page as page

    return HTMLResponse(page(_one(user, model), f"{PREFIX}/static/plotly.min.js", f"{PREFIX}/", _run_link))


@app.get("/api/models")
def api_models(user: User) -> JSONResponse:
    return JSONResponse({"models": _views(user), "config_dir": str(config_dir())})


@app.get("/api/models/{model}")
def api_model(model: str, user: User) -> JSONResponse:
    return JSONResponse(_one(user, model))


@app.get("/static/plotly.min.js")
def plotly_script(user: User) -> Response:
    from tf_export_pipeline.report.plots import plotly_js

    return Response(plotly_js(), media_type="text/javascript", headers={"Cache-Control": "private, max-age=86400"})
