"""deploy/: the settings of the Dockerfile, docker-compose.yaml and the Helm values, not only their names.

No Docker daemon or Kubernetes is needed: the files are read as data (YAML with
pyyaml, the Dockerfile as text, compose's ``${VAR...}`` interpolation resolved
here) and checked for what the deployment depends on: one logs volume for every
Airflow container, one required secret key and JWT secret, the data service as
AIRFLOW_UID, TF Serving of the installed TensorFlow, the Celery profile, log
persistence and paused DAGs on Kubernetes, no demo config in the production
image. Every name they refer to (services, volumes, files, configs, model
factories, connections, pools) is looked up. With a `docker compose` CLI (no
daemon needed) the compose file is also resolved by compose itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yaml"
CELERY_ENV = DEPLOY / "celery.env"
HELM = DEPLOY / "helm" / "values.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DAG_FILE = REPO / "dags" / "tf_export_dags.py"
LOGS = "/opt/airflow/logs"

# Top-level keys of the official chart's values.yaml (chart 1.19+, Airflow 3) used here.
CHART_KEYS = {"executor", "defaultAirflowRepository", "defaultAirflowTag", "airflowVersion", "images", "env",
              "secret", "config", "workers", "migrateDatabaseJob", "scheduler", "dagProcessor", "triggerer",
              "apiServer", "dags", "postgresql", "redis", "extraEnv", "extraSecrets", "logs", "createUserJob",
              "volumes", "volumeMounts", "apiSecretKeySecretName", "jwtSecretName", "fernetKeySecretName"}
AIRFLOW_COMMANDS = {"api-server", "scheduler", "dag-processor", "triggerer"}
TRUE = {"true", "True", "TRUE", "1", True}


# --- reading the files -------------------------------------------------------------------------------

def _dockerfile_text() -> str:
    return DOCKERFILE.read_text()


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _helm() -> dict:
    return yaml.safe_load(HELM.read_text())


def _arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", _dockerfile_text(), re.M)
    assert m, f"Dockerfile has no ARG {name}"
    return m.group(1)


def _stages() -> list[dict]:
    """The Dockerfile's stages in order: name, what it is FROM, its instructions (continuations joined)."""
    stages: list[dict] = []
    text = re.sub(r"\\\n", " ", _dockerfile_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            stages.append({"from": m.group(1), "name": m.group(2) or str(len(stages)), "lines": []})
        elif stages:
            stages[-1]["lines"].append(line)
    assert stages, "Dockerfile has no FROM"
    return stages


def _stage_chain(stages: list[dict], stage: dict) -> list[dict]:
    """The stage and the stages it is built FROM, down to the external base image."""
    by_name = {s["name"]: s for s in stages}
    chain = [stage]
    while chain[-1]["from"] in by_name:
        chain.append(by_name[chain[-1]["from"]])
    return chain


def _copies(stage: dict) -> list[tuple[list[str], str]]:
    out = []
    for line in stage["lines"]:
        if line.split()[0].upper() in ("COPY", "ADD"):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
    return out


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def _interpolate(value, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; an unset required one raises."""
    def sub(m):
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        have = variables.get(name)
        if op in (":?", "?") and not have:
            raise LookupError(f"{name}: {arg}")
        if op in (":-", "-") and not have:
            return arg
        return have or ""
    return re.sub(r"\$\{(\w+)(:?[-?])?([^}]*)\}", sub, str(value))


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _command(service: dict) -> str:
    cmd = service.get("command") or ""
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes."""
    out = {}
    for mount in service.get("volumes") or []:
        source, target = mount.split(":")[:2]
        out[target] = source
    return out


def _airflow_services(compose: dict) -> dict[str, dict]:
    """The Airflow containers: the services of the x-airflow-common image named airflow-*."""
    image = compose["x-airflow-common"]["image"]
    found = {name: s for name, s in compose["services"].items()
             if name.startswith("airflow-") and s.get("image") == image}
    assert found, "no Airflow services"
    return found


def _url_host(url: str) -> str:
    return url.split("//", 1)[1].split("@")[-1].split("/")[0].split(":")[0]


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


def _is_true(value) -> bool:
    return value in TRUE


# --- Dockerfile ----------------------------------------------------------------------------------------

def test_dockerfile_pins_the_tested_airflow_installs_the_airflow_extra_and_copies_what_exists():
    assert _arg("AIRFLOW_VERSION") == importlib.metadata.version("apache-airflow")
    text = _dockerfile_text()
    stages = _stages()
    assert stages[0]["from"] == "apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}"
    installs = [line for s in stages for line in s["lines"] if line.startswith("RUN") and "pip install" in line]
    assert installs, "the Dockerfile installs nothing"
    # pip cannot move Airflow off the image's version; the package comes with its [airflow] extra
    assert any('"apache-airflow==${AIRFLOW_VERSION}"' in line and '"/opt/tf-export[airflow]"' in line
               for line in installs), installs
    for stage in stages:
        for sources, _ in _copies(stage):
            for source in sources:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    # the context is the repository root: the ignore file beside the Dockerfile lets through what is copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore  # not the whole repository (.venv, build/) into the context
    for stage in stages:
        for sources, _ in _copies(stage):
            for source in sources:
                assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is not in the build context"
    assert "COPY" in text


def test_the_production_image_carries_the_dag_file_but_no_demo_config():
    stages = _stages()
    production = stages[-1]  # what `docker build` without --target builds
    assert production["name"] == "production"
    chain = _stage_chain(stages, production)
    copied = [(src, dst) for stage in chain for sources, dst in _copies(stage) for src in sources]
    assert ("dags/tf_export_dags.py", "/opt/airflow/dags/tf_export_dags.py") in copied
    for src, _dst in copied:
        assert not src.rstrip("/").endswith(("configs", ".yaml", ".yml")), f"production image gets {src}"
        assert src.rstrip("/") != "dags", "the whole dags/ folder (with dags/configs) goes into the image"
        assert not src.startswith("deploy/"), f"production image gets {src}"
    # the demo target adds the compose demo's configs where its containers look for them
    [demo] = [s for s in stages if s["name"] == "demo"]
    compose = _compose()
    assert compose["x-airflow-common"]["build"]["target"] == "demo"
    config_dir = _env(compose["x-airflow-common"])["TF_EXPORT_CONFIG_DIR"]
    assert (["deploy/configs"], config_dir) in _copies(demo)
    assert production not in _stage_chain(stages, demo) and demo not in chain


def test_the_dag_file_imports_the_installed_package_not_the_repository_folders():
    text = DAG_FILE.read_text()
    assert "from tf_export_pipeline.operators" in text
    assert not re.search(r"^\s*(from|import)\s+(operators|pipeline)\b", text, re.M)


# --- docker-compose -------------------------------------------------------------------------------------

def test_compose_services_volumes_files_and_names_exist():
    compose = _compose()
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    assert {"postgres", "airflow-init", "fake-gcs", "demo-data", "tf-serving"} <= set(services)
    assert AIRFLOW_COMMANDS <= {_command(s) for s in services.values()}
    connections = set()
    for name, service in services.items():
        for dep in service.get("depends_on") or {}:
            assert dep in services and dep != name, f"{name} depends on unknown service {dep}"
        for source in _mounts(service).values():
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
    for _name, service in _airflow_services(compose).items():
        env = _env(service)
        assert _url_host(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]) in services
        assert _url_host(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]) in services

    # The configs the Airflow containers read, baked into the demo image from deploy/configs.
    scheduler = services["airflow-scheduler"]
    configs = {p.stem: _check_config(p, connections) for p in _config_dir_files(DEPLOY / "configs")}
    assert {"demo", "demo_gcs"} <= set(configs)

    # TF Serving watches the export base of the local demo, on the volume the Airflow containers share.
    serving = services["tf-serving"]
    env = _env(serving)
    assert f"{env['MODEL_BASE_PATH']}/{env['MODEL_NAME']}" == configs["demo"].export_base
    data_volume = next(m.split(":")[0] for m in serving["volumes"])
    assert any(source == data_volume and configs["demo"].export_base.startswith(target)
               for target, source in _mounts(scheduler).items())
    # The demo data lands where the configs look for it; the emulator is the connection's endpoint.
    seeding = (DEPLOY / "demo_data.py").read_text()
    assert f'TRAIN = "{configs["demo"].training_dir}"' in seeding
    assert f'BUCKET = "{configs["demo_gcs"].training_dir.split("/")[2]}"' in seeding
    conn = json.loads(_env(scheduler)[f"AIRFLOW_CONN_{configs['demo_gcs'].airflow.conn_id.upper()}"])
    assert conn["conn_type"] == "tf_export_storage"
    assert _url_host(conn["extra"]["endpoint_url"]) == "fake-gcs" and "fake-gcs" in services


def test_compose_every_airflow_container_writes_and_reads_task_logs_on_one_volume():
    compose = _compose()
    airflow = _airflow_services(compose)
    assert {"api-server", "scheduler", "dag-processor", "triggerer", "celery worker"} <= {
        _command(s) for s in airflow.values()}
    sources = {}
    for name, service in airflow.items():
        mounts = _mounts(service)
        assert LOGS in mounts, f"{name} does not mount the logs volume at {LOGS}"
        sources[name] = mounts[LOGS]
    assert len(set(sources.values())) == 1, f"the Airflow containers mount different log folders: {sources}"
    [source] = set(sources.values())
    assert source in (compose.get("volumes") or {}), f"{source} is not a declared volume"
    for name, service in airflow.items():
        assert _env(service).get("AIRFLOW__LOGGING__BASE_LOG_FOLDER", LOGS) == LOGS, name


def test_compose_one_required_secret_key_and_jwt_secret_for_every_airflow_container():
    airflow = _airflow_services(_compose())
    variables = []
    for option in ("AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET"):
        values = {name: _env(s).get(option) for name, s in airflow.items()}
        assert None not in values.values(), f"{option} missing in {[n for n, v in values.items() if v is None]}"
        assert len(set(values.values())) == 1, f"{option} differs between containers: {values}"
        [value] = set(values.values())
        # from the environment, required: compose refuses to start without it, nothing written in the file
        m = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", str(value))
        assert m, f"{option} is {value!r}, not a required variable (${{NAME:?message}})"
        variables.append(m.group(1))
        with pytest.raises(LookupError):
            _interpolate(value, {})
        assert _interpolate(value, {m.group(1): "s3cret"}) == "s3cret"
    assert variables[0] != variables[1], "the secret key and the JWT secret are the same variable"


def test_compose_the_data_service_and_the_airflow_containers_run_as_airflow_uid():
    compose = _compose()
    services = compose["services"]
    uid = compose["x-airflow-common"]["user"]
    assert re.fullmatch(r"\$\{AIRFLOW_UID(:-\d+)?\}:0", uid), uid
    assert services["demo-data"]["user"] == uid
    for name, service in _airflow_services(compose).items():
        if name != "airflow-init":
            assert service["user"] == uid, name
    # airflow-init, as root like the official file's, hands the shared volumes to that user
    init = services["airflow-init"]
    assert init["user"] == "0:0"
    script = _command(init)
    data_target = next(t for t, s in _mounts(services["demo-data"]).items() if s == "demo-data")
    m = re.search(r'chown -R "?([^"\s]+)"?((?:\s+/\S+)+)', script)
    assert m and m.group(1) == uid.replace(":0", "") + ":0", script
    assert {LOGS, data_target} <= set(m.group(2).split())
    assert _mounts(init).get(data_target) == "demo-data" and LOGS in _mounts(init)
    assert services["demo-data"]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_compose_tf_serving_is_the_tensorflow_the_versions_are_exported_with():
    image = _compose()["services"]["tf-serving"]["image"]
    m = re.fullmatch(r"tensorflow/serving:(\d+)\.(\d+)\.\d+(-gpu)?", image)
    assert m, image
    tf_major_minor = importlib.metadata.version("tensorflow").split(".")[:2]
    assert [m.group(1), m.group(2)] == tf_major_minor, f"{image} serves what TensorFlow {tf_major_minor} exports?"


def test_compose_celery_profile_postgres_redis_two_workers_acks_late_and_the_executor_switch():
    compose = _compose()
    services = compose["services"]
    celery = {name for name, s in services.items() if "celery" in (s.get("profiles") or [])}
    workers = {name for name in celery if _command(services[name]).split()[:2] == ["celery", "worker"]}
    assert len(workers) >= 2, f"the celery profile has workers {workers}"
    [broker] = [name for name in celery if services[name]["image"].startswith("redis:")]
    assert "profiles" not in services["postgres"]  # the metadata database (and result backend) of both executors
    for name in workers:
        env = _env(services[name])
        assert _is_true(env.get("AIRFLOW__CELERY__TASK_ACKS_LATE")), f"{name}: task_acks_late is not True"
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
        assert _url_host(env["AIRFLOW__CELERY__BROKER_URL"]) == broker
        assert _url_host(env["AIRFLOW__CELERY__RESULT_BACKEND"]) == "postgres"
        assert services[name]["depends_on"][broker]["condition"] == "service_healthy"
        assert int(env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]) >= 1
    # One switch: LocalExecutor by default, CeleryExecutor with deploy/celery.env, which enables the profile.
    switch = _env_file(CELERY_ENV)
    assert switch["COMPOSE_PROFILES"].split(",") == ["celery"]
    for name, service in _airflow_services(compose).items():
        executor = _env(service)["AIRFLOW__CORE__EXECUTOR"]
        if name in workers:
            continue
        assert _interpolate(executor, {}) == "LocalExecutor", name
        assert _interpolate(executor, switch) == "CeleryExecutor", name
    # The pool the DAGs put export tasks in is created before they run.
    env = _env(services["airflow-scheduler"])
    assert re.search(rf"airflow pools set {re.escape(env['TF_EXPORT_POOL'])} \d+ ", _command(services["airflow-init"]))
    assert int(env["TF_EXPORT_RETRIES"]) >= 1


@pytest.mark.skipif(not shutil.which("docker"), reason="no docker CLI")
def test_compose_resolved_by_docker_compose():
    base = ["docker", "compose", "-f", str(COMPOSE)]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` plugin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "COMPOSE_"))}
    refused = subprocess.run(base + ["config", "--quiet"], capture_output=True, text=True, env=env, cwd=REPO)
    assert refused.returncode != 0 and "AIRFLOW_SECRET_KEY" in refused.stderr + refused.stdout
    env.update(AIRFLOW_SECRET_KEY="k", AIRFLOW_JWT_SECRET="j", AIRFLOW_UID="1234")
    out = subprocess.run(base + ["--env-file", str(CELERY_ENV), "config", "--format", "json"],
                         capture_output=True, text=True, env=env, cwd=REPO, check=True).stdout
    services = json.loads(out)["services"]
    assert {"redis", "airflow-worker-1", "airflow-worker-2"} <= set(services)
    for name, service in services.items():
        if name.startswith("airflow-"):
            assert service["environment"]["AIRFLOW__API__SECRET_KEY"] == "k"
            assert service["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] == "j"
            assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
            assert any(v["target"] == LOGS for v in service["volumes"])
    assert services["demo-data"]["user"] == "1234:0"


# --- Helm values ----------------------------------------------------------------------------------------

def test_helm_values_use_kubernetes_executor_the_tested_version_and_a_pool_that_is_created():
    values = _helm()
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
    assert int(env["TF_EXPORT_RETRIES"]) >= 1
    assert values["triggerer"]["enabled"] and values["dagProcessor"]["enabled"]
    assert values["dags"]["gitSync"]["enabled"] is False  # the DAG file comes with the image
    assert values["workers"]["resources"]["requests"]


def test_helm_values_keep_new_dags_paused_and_task_logs_beyond_the_pods():
    values = _helm()
    core = values["config"]["core"]
    assert _is_true(core.get("dags_are_paused_at_creation", True)), "new DAGs would start unpaused"
    logging = (values.get("config") or {}).get("logging") or {}
    persisted = _is_true(((values.get("logs") or {}).get("persistence") or {}).get("enabled"))
    remote = _is_true(logging.get("remote_logging")) and bool(logging.get("remote_base_log_folder"))
    assert persisted or remote, "task logs vanish with the task pods: neither logs.persistence nor remote logging"


def test_helm_values_configs_from_a_configmap_and_secrets_from_kubernetes_secrets():
    values = _helm()
    env = {e["name"]: e["value"] for e in values["env"]}
    config_dir = env["TF_EXPORT_CONFIG_DIR"]
    # not a folder of the image (the production image has no configs): a volume of a ConfigMap
    assert not config_dir.startswith("/opt/airflow/dags")
    [mount] = [m for m in values.get("volumeMounts") or [] if m["mountPath"] == config_dir]
    [volume] = [v for v in values.get("volumes") or [] if v["name"] == mount["name"]]
    assert volume.get("configMap", {}).get("name")
    # storage credentials: a connection from a Secret, of a type the package reads; nothing inline
    secrets = {s["envName"]: s for s in values["secret"]}
    assert "AIRFLOW_CONN_TF_EXPORT_STORAGE_DEFAULT" in secrets
    assert not [k for k in env if k.startswith("AIRFLOW_CONN_")], "a connection written into the values"
    assert values.get("apiSecretKeySecretName") and values.get("jwtSecretName")
    # the configs of the compose demo, with this connection, load (the ConfigMap's files are of that kind)
    connections = {name[len("AIRFLOW_CONN_"):].lower() for name in secrets}
    for config in _config_dir_files(DEPLOY / "configs"):
        cfg = _check_config(config, connections)
        assert cfg.airflow.conn_id in (None, "tf_export_storage_default")


@pytest.mark.parametrize("name", ["POOL", "CONFIG_DIR", "POKE_SECONDS", "WAIT_SECONDS", "RETRIES",
                                  "RETRY_DELAY_SECONDS"])
def test_settings_named_in_deploy_files_are_read_by_the_dag_file(name):
    assert f"TF_EXPORT_{name}" in DAG_FILE.read_text()
