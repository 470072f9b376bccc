"""Every name and path of an export base, and the names a SavedModel is checked by.

An export base, as TF Serving and this package see it::

    <export_base>/
      1700000000/                       a version: TF Serving loads integer-named folders
        saved_model.pb  variables/  assets.extra/export_manifest.json
      temp-1700000300-ab12cd34/          staging: an export being written or validated
      _exports/                          the publishing protocol's records (TF Serving ignores it)
        claims/<version>                 a version number taken by a publish
        ledger/<checkpoint key>          the commit record: checkpoint -> version
        removed/<checkpoint key>         a version retention removed
        leases/<staging name>            renewed while staging is in use
        work/<staging name>/files.json   the file list staging is verified against
        work/<staging name>/resume.json  a backfill task's record of it, for that task's retry
        serving/history/                 label changes (serving control)
        runs/                            the newest runs' outcomes (tf-export report, the Airflow page)
        storage-check.json               what the store guarantees (tf-export check-storage)

Nothing here does I/O; every module that lays out or reads an export base
takes its names from here.
"""

from __future__ import annotations

from typing import Literal, get_args

# -- the export base -------------------------------------------------------------
EXPORTS_DIR = "_exports"
CLAIMS_DIR = "claims"
LEDGER_DIR = "ledger"
REMOVED_DIR = "removed"
LEASES_DIR = "leases"
WORK_DIR = "work"
SERVING_DIR = "serving"
HISTORY_DIR = (EXPORTS_DIR, SERVING_DIR, "history")
RUNS_DIR = (EXPORTS_DIR, "runs")  # one record per run or task, the newest RUNS_KEPT kept
RUNS_KEPT = 50
FILES_NAME = "files.json"
RESUME_NAME = "resume.json"  # beside FILES_NAME: which backfill task made this staging, and how far it got
STORAGE_CHECK_NAME = "storage-check.json"  # the last verdict of `tf-export check-storage`
STAGING_PREFIX = "temp-"
DELETING_PREFIX = "temp-deleting-"  # a version renamed out of TF Serving's sight before it is removed
TEMP_MARK = ".tmp-"  # temporary name of a create-only write

# -- a SavedModel ----------------------------------------------------------------
SAVED_MODEL_PB = "saved_model.pb"  # written last by a promotion, removed first by retention
ASSETS_EXTRA = "assets.extra"
MANIFEST = f"{ASSETS_EXTRA}/export_manifest.json"
EXAMPLE_SPEC = f"{ASSETS_EXTRA}/example_signature.json"
WARMUP_FILE = "tf_serving_warmup_requests"

# -- signatures ------------------------------------------------------------------
SERVING_KEY = "serving_default"
SERVE_TAG = "serve"  # the tag-set TF Serving loads (its default --saved_model_tags)
PREDICT_METHOD = "tensorflow/serving/predict"

# -- version numbering -----------------------------------------------------------
Versioning = Literal["timestamp", "checkpoint_time", "step"]
VERSIONINGS: tuple[str, ...] = get_args(Versioning)
#: What a backfill numbers by under each config versioning: under `timestamp` every historic checkpoint
#: would be numbered by the export time, above the live version.
BACKFILL_VERSIONING = {"timestamp": "checkpoint_time", "checkpoint_time": "checkpoint_time", "step": "step"}
