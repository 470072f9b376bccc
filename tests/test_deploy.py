"""deploy/: the Dockerfile, docker-compose.yaml and the Helm values parse, and what they name exists.

No Docker or Kubernetes is needed: the files are read as data and every name
they refer to (services, volumes, files, configs, model factories, Airflow
connections and pools, versions) is looked up.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yaml"
HELM = DEPLOY / "helm" / "values.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

# Top-level keys of the official chart's values.yaml (chart 1.19+, Airflow 3) used here.
CHART_KEYS = {"executor", "defaultAirflowRepository", "defaultAirflowTag", "airflowVersion", "images", "env",
              "secret", "config", "workers", "migrateDatabaseJob", "scheduler", "dagProcessor", "triggerer",
              "apiServer", "dags", "postgresql", "redis", "extraEnv", "extraSecrets", "logs", "createUserJob"}
AIRFLOW_COMMANDS = {"api-server", "scheduler", "dag-processor", "triggerer"}


def _arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m, f"Dockerfile has no ARG {name}"
    return m.group(1)


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def _config_dir_files(host_dir: Path) -> list[Path]:
    files = sorted(host_dir.glob("*.yaml"))
    assert files, f"no configs in {host_dir}"
    return files


def _check_config(path: Path, connections: set[str]):
    from tf_export_pipeline.config import load_config

    cfg = load_config(str(path))
    module, _, attr = cfg.model.factory.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), cfg.model.factory
    if cfg.airflow.conn_id:
        assert cfg.airflow.conn_id in connections, f"{path.name}: no connection {cfg.airflow.conn_id}"
    return cfg


def test_dockerfile_pins_the_tested_airflow_and_copies_what_exists():
    assert _arg("AIRFLOW_VERSION") == importlib.metadata.version("apache-airflow")
    text = DOCKERFILE.read_text()
    assert "FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}" in text
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in text  # pip cannot move Airflow off the image's version
    for line in text.splitlines():
        if line.startswith("COPY"):
            sources = [p for p in line.split()[1:-1] if not p.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert "COPY --chown=airflow:root dags /opt/airflow/dags" in text
    # the context is the repository root: the ignore file beside the Dockerfile lets through what is copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore  # not the whole repository (.venv, build/) into the context
    for source in ("pyproject.toml", "README.md", "pipeline/", "operators/", "dags/"):
        assert f"!{source}" in ignore, source


def test_compose_services_volumes_files_and_names_exist():
    compose = yaml.safe_load(COMPOSE.read_text())
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    assert {"postgres", "airflow-init", "fake-gcs", "demo-data", "tf-serving"} <= set(services)
    assert {s["command"] for s in services.values() if isinstance(s.get("command"), str)} == AIRFLOW_COMMANDS
    connections = set()
    for name, service in services.items():
        for dep in service.get("depends_on") or {}:
            assert dep in services and dep != name, f"{name} depends on unknown service {dep}"
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
        for port in service.get("ports") or []:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: unpinned image {image!r}"
        env = _env(service)
        connections |= {k[len("AIRFLOW_CONN_"):].lower() for k in env if k.startswith("AIRFLOW_CONN_")}
        if name.startswith("airflow-"):
            assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
            assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].split("@")[1].split("/")[0] in services
            assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].split("//")[1].split(":")[0] in services

    # The configs the Airflow containers read, mounted at TF_EXPORT_CONFIG_DIR.
    scheduler = services["airflow-scheduler"]
    config_dir = _env(scheduler)["TF_EXPORT_CONFIG_DIR"]
    [host] = [m.split(":")[0] for m in scheduler["volumes"] if m.split(":")[1] == config_dir]
    configs = {p.stem: _check_config(p, connections) for p in _config_dir_files(DEPLOY / host)}
    assert {"demo", "demo_gcs"} <= set(configs)

    # TF Serving watches the export base of the local demo, on the volume the Airflow containers share.
    serving = services["tf-serving"]
    env = _env(serving)
    assert f"{env['MODEL_BASE_PATH']}/{env['MODEL_NAME']}" == configs["demo"].export_base
    data_volume = next(m.split(":")[0] for m in serving["volumes"])
    assert any(m.startswith(f"{data_volume}:") and configs["demo"].export_base.startswith(m.split(":")[1])
               for m in scheduler["volumes"])
    # The demo data lands where the configs look for it; the emulator is the connection's endpoint.
    seeding = (DEPLOY / "demo_data.py").read_text()
    assert f'TRAIN = "{configs["demo"].training_dir}"' in seeding
    assert f'BUCKET = "{configs["demo_gcs"].training_dir.split("/")[2]}"' in seeding
    assert '"gcs.endpoint": "http://fake-gcs:4443"' in _env(scheduler)["AIRFLOW_CONN_FAKE_GCS"]


def test_helm_values_use_kubernetes_executor_the_tested_version_and_a_pool_that_is_created():
    values = yaml.safe_load(HELM.read_text())
    assert set(values) <= CHART_KEYS, set(values) - CHART_KEYS
    assert values["executor"] == "KubernetesExecutor"
    assert values["airflowVersion"] == _arg("AIRFLOW_VERSION")
    assert values["images"]["airflow"]["repository"] == values["defaultAirflowRepository"]
    assert values["images"]["airflow"]["tag"] == values["defaultAirflowTag"]
    env = {e["name"]: e["value"] for e in values["env"]}
    # the pool the DAGs put export tasks in is created by the migration job
    migrate = " ".join(values["migrateDatabaseJob"]["args"])
    assert re.search(rf"airflow pools set {re.escape(env['TF_EXPORT_POOL'])} \d+ ", migrate)
    assert "airflow db migrate" in migrate
    # the config folder is the one the image gets from dags/configs
    assert env["TF_EXPORT_CONFIG_DIR"] == "/opt/airflow/dags/configs"
    for config in _config_dir_files(REPO / "dags" / "configs"):
        _check_config(config, {s["envName"][len("AIRFLOW_CONN_"):].lower() for s in values["secret"]})
    assert values["triggerer"]["enabled"] and values["dagProcessor"]["enabled"]
    assert values["dags"]["gitSync"]["enabled"] is False  # the DAGs come with the image


@pytest.mark.parametrize("name", ["POOL", "CONFIG_DIR", "POKE_SECONDS", "WAIT_SECONDS", "RETRIES"])
def test_settings_named_in_deploy_files_are_read_by_the_dag_file(name):
    assert f"TF_EXPORT_{name}" in (REPO / "dags" / "tf_export_dags.py").read_text()
