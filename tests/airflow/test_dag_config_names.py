"""One config never takes the other models' DAGs down: its name, its DAG ids and its settings are its own problem.

Each test parses the real DAG file with a real DagBag over a config folder and
reads the DAGs and the import errors it found.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.airflow.conftest import DAG_FILE

pytestmark = pytest.mark.timeout(300, method="thread")

KINDS = ("nightly", "after_training", "backfill")


def parse(folder: Path):
    from airflow.dag_processing.dagbag import DagBag

    before = os.environ.get("TF_EXPORT_CONFIG_DIR")
    os.environ["TF_EXPORT_CONFIG_DIR"] = str(folder)
    try:
        return DagBag(dag_folder=str(DAG_FILE))
    finally:
        if before is None:
            os.environ.pop("TF_EXPORT_CONFIG_DIR", None)
        else:
            os.environ["TF_EXPORT_CONFIG_DIR"] = before


def write(folder: Path, name: str, **overrides) -> Path:
    from tf_export_pipeline.demo import write_config

    return Path(write_config(str(folder), name=name, **overrides))


def test_config_names_that_cannot_be_dag_ids_are_their_own_import_errors(tmp_path):
    folder = tmp_path / "configs"
    write(folder, "ranker.yaml")
    spaced = write(folder, "ranker v2.yaml")
    plus = write(folder, "a+b.yaml")
    bag = parse(folder)
    assert sorted(bag.dags) == sorted(f"export_{k}__ranker" for k in KINDS)
    assert sorted(bag.import_errors) == sorted([str(spaced), str(plus)]), bag.import_errors
    for path, stem in ((spaced, "ranker v2"), (plus, "a+b")):
        message = bag.import_errors[str(path)]
        assert message.startswith("ConfigError: ") and message.endswith(f": {path}"), message
        assert f"'{stem}'" in message
        assert "letters, digits, '_', '-' and '.'" in message


def test_configs_whose_dag_ids_collide_keep_the_first_and_report_the_second(tmp_path):
    folder = tmp_path / "configs"
    first = write(folder, "ranker.yaml")
    second = write(folder, "ranker.yml")
    write(folder, "scorer.yaml")
    bag = parse(folder)
    assert sorted(bag.dags) == sorted(f"export_{k}__{m}" for k in KINDS for m in ("ranker", "scorer"))
    assert str(first) in (bag.dags["export_nightly__ranker"].doc_md or "")
    assert list(bag.import_errors) == [str(second)], bag.import_errors
    message = bag.import_errors[str(second)]
    assert "export_nightly__ranker" in message and str(first) in message and message.endswith(f": {second}")


def test_a_schedule_airflow_cannot_read_is_that_configs_own_import_error(tmp_path):
    folder = tmp_path / "configs"
    write(folder, "ranker.yaml")
    broken = write(folder, "scorer.yaml", airflow={"schedule": "every night at 2"})
    bag = parse(folder)
    assert sorted(bag.dags) == sorted(f"export_{k}__ranker" for k in KINDS)
    assert list(bag.import_errors) == [str(broken)], bag.import_errors
    message = bag.import_errors[str(broken)]
    assert "airflow.schedule" in message and "every night at 2" in message and message.endswith(f": {broken}")
