"""The models page: each model's versions, labels and last runs, as a static report and in Airflow's UI.

:mod:`.gather` reads what the page shows of a model (bounded by retention, as
``tf-export status``); :mod:`.page` renders it, with :mod:`.plots` drawing
the plots through Plotly. ``tf-export report`` writes one self-contained HTML
file of several models (:func:`write_report`); the Airflow plugin
(``tf_export_pipeline.operators.models_ui``) serves the same views as pages
and JSON. Neither imports TensorFlow.

Example::

    from tf_export_pipeline.report import write_report
    views = write_report(["ranker.yaml", "tagger.yaml"], "models.html")
    print([(v["model"], v["served"], v["error"]) for v in views])
"""

from __future__ import annotations

import functools
import os
import tempfile
import time

from tf_export_pipeline.report.gather import model_name, model_view


def views_of(config_paths: list[str]) -> list[dict]:
    """The view of each config's model, in the order given."""
    from tf_export_pipeline.config import load_config

    return [model_view(model_name(path), functools.partial(load_config, path), path) for path in config_paths]


def write_report(config_paths: list[str], out: str) -> list[dict]:
    """Write the report of ``config_paths`` to ``out`` (whole or not at all); the views it shows."""
    from tf_export_pipeline.report.page import report_html

    views = views_of(config_paths)
    text = report_html(views, generated_at=time.time())
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=".tf-export-report-", suffix=".html", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return views


__all__ = ["model_name", "model_view", "views_of", "write_report"]
