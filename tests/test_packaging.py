"""What `pip install tf-export-pipeline` installs: one import name of its own, the CLI without Airflow,
and Airflow (the operators, the provider entry point) only with the `[airflow]` extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

# A meta-path finder that makes `import airflow` fail, as in an environment without the extra.
NO_AIRFLOW = """
import sys
class _NoAirflow:
    def find_spec(self, name, path=None, target=None):
        if name == "airflow" or name.startswith("airflow."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoAirflow())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the distribution is made of: an in-tree build leaves build/lib behind.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("pipeline", "operators"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [whl] = out.glob("tf_export_pipeline-*.whl")
    return whl


def test_wheel_installs_one_top_level_package_and_airflow_only_as_an_extra(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(z.read(meta).decode())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_text = z.read(entry_points).decode()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"tf_export_pipeline"}  # no `pipeline` or `operators` to collide with a deployment's own
    # Every module of the repository is in the wheel: a subpackage missing from pyproject's list would not be.
    sources = {"tf_export_pipeline/" + str(p.relative_to(REPO / "pipeline")) for p in (REPO / "pipeline").rglob("*.py")}
    sources |= {"tf_export_pipeline/operators/" + str(p.relative_to(REPO / "operators"))
                for p in (REPO / "operators").rglob("*.py")}
    assert sources - set(names) == set(), sorted(sources - set(names))
    requires = metadata.get_all("Requires-Dist")
    plain = [r for r in requires if "extra ==" not in r]
    assert not [r for r in plain if "airflow" in r.lower()], plain  # nothing of Airflow without an extra
    assert any(r.startswith("apache-airflow<") or r.startswith("apache-airflow>") for r in requires
               if 'extra == "airflow"' in r)
    assert any(r.startswith("tensorflow") and "extra" not in r for r in requires)
    assert "airflow" in metadata.get_all("Provides-Extra")
    assert "[apache_airflow_provider]" in entry_text
    assert "provider_info = tf_export_pipeline.operators.provider:get_provider_info" in entry_text
    assert "tf-export = tf_export_pipeline.cli:main" in entry_text


def test_cli_demo_runs_where_airflow_cannot_be_imported(tmp_path):
    script = NO_AIRFLOW + "\nfrom tf_export_pipeline.cli import main\nraise SystemExit(main())\n"
    env = cli_env()
    proc = subprocess.run([sys.executable, "-c", script, "demo", "--workdir", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "published" in proc.stdout
    served = [p for p in (tmp_path / "demo").rglob("saved_model.pb")]
    assert served


def test_importing_the_package_imports_neither_airflow_nor_tensorflow():
    script = ("import sys, tf_export_pipeline, tf_export_pipeline.cli, tf_export_pipeline.config, "
              "tf_export_pipeline.stages, tf_export_pipeline.operators.provider as p; p.get_provider_info(); "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'airflow', 'tensorflow', 'keras'}))")
    proc = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_airflow_lists_the_provider_and_its_connection_type(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "home")}
    listed = subprocess.run([sys.executable, "-m", "airflow", "providers", "list", "--output", "plain"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "tf-export-pipeline" in listed.stdout
    script = ("from airflow.providers_manager import ProvidersManager as P; import json; p = P(); "
              "h = p.hooks['tf_export_storage']; "
              "print(json.dumps([h.hook_class_name, h.package_name, sorted(k for k in p.connection_form_widgets "
              "if k.startswith('extra__tf_export_storage__'))]))")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    hook, package, fields = json.loads(proc.stdout.strip().splitlines()[-1])
    assert hook == "tf_export_pipeline.operators.hooks.ExportHook" and package == "tf-export-pipeline"
    assert {f.rsplit("__", 1)[1] for f in fields} >= {"keyfile_dict", "project", "endpoint_url", "storage_options"}
