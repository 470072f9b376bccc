"""OpenLineage: the datasets, facets and events of an export, for the operators and the command line.

Datasets are named by OpenLineage's naming conventions, so lineage joins
with what other tools report of the same files:

- the checkpoint, an input: ``gs://<bucket>`` / ``s3://<bucket>`` and the object key, or
  ``file://<host>`` and the absolute path on local disk;
- the export base, the output: the model's identity, its base path (not a version
  directory), with a dataset-version facet holding the version published, a
  symlink facet naming the version directory, output statistics (bytes, file
  count) and a dataset-type facet (``MODEL``).

The validation report becomes a run facet (``test``: each check passed or
failed, and why; ``tf_export_validation``: the verdict in brief), a failure an
``errorMessage`` facet. Operators hand these to Airflow's OpenLineage provider
(:mod:`tf_export_pipeline.operators.lineage`); the command line sends START,
COMPLETE and FAIL itself through openlineage-python when OpenLineage is
configured the standard way (``OPENLINEAGE_URL``, ``OPENLINEAGE__TRANSPORT__*``,
``OPENLINEAGE_CONFIG`` or an ``openlineage.yml``), from a background thread, so
a backend that is down, slow or failing costs a command at most
``TF_EXPORT_LINEAGE_WAIT_SECONDS`` (3) at its end, and a warning.

openlineage-python is imported only when events are built: it is an optional
extra (``pip install tf-export-pipeline[lineage]``).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tf_export_pipeline import __version__
from tf_export_pipeline.metrics import model_name
from tf_export_pipeline.observe import StageOutcome
from tf_export_pipeline.records import Status
from tf_export_pipeline.redaction import redact, register
from tf_export_pipeline.run_info import RunInfo
from tf_export_pipeline.trace import validation_brief

PRODUCER = f"urn:tf-export-pipeline:{__version__}"
VALIDATION_FACET = "tf_export_validation"
VALIDATION_SCHEMA = "urn:tf-export-pipeline:facets:TfExportValidationRunFacet:1"
DATASET_TYPE, DATASET_SUBTYPE = "MODEL", "TF_SAVED_MODEL"
NAMESPACE_ENV, DEFAULT_NAMESPACE = "OPENLINEAGE_NAMESPACE", "default"
WAIT_ENV, WAIT_SECONDS = "TF_EXPORT_LINEAGE_WAIT_SECONDS", 3.0
_CONFIG_ENV = ("OPENLINEAGE_URL", "OPENLINEAGE_CONFIG")
_DYNAMIC_PREFIX = "OPENLINEAGE__"
_BUCKET_SCHEMES = {"gs": "gs", "gcs": "gs", "s3": "s3", "s3a": "s3"}
_AZURE_SCHEMES = ("az", "abfs", "abfss")


# -- names ----------------------------------------------------------------------------
def dataset_name(location: str, storage_options: dict | None = None, host: str | None = None) -> tuple[str, str]:
    """(namespace, name) of a path or URL by OpenLineage's naming conventions."""
    scheme, sep, rest = location.partition("://")
    if not sep or scheme == "file":
        path = os.path.abspath(rest if sep else location)
        return f"file://{host or socket.gethostname()}", path.rstrip("/") or "/"
    bucket, _, key = rest.partition("/")
    key = key.strip("/")
    scheme = scheme.lower()
    if scheme in _BUCKET_SCHEMES:
        return f"{_BUCKET_SCHEMES[scheme]}://{bucket}", key
    if scheme in _AZURE_SCHEMES:
        account = (storage_options or {}).get("account_name")
        container = bucket.split("@", 1)[0]
        if account:
            return f"wasbs://{container}@{account}.blob.core.windows.net", key
        return f"{scheme}://{bucket}", key
    return f"{scheme}://{bucket}", key


def job_namespace() -> str:
    return os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE


def job_name(cfg, command: str) -> str:
    """The command line's job: ``tf_export.<model>.<command>``."""
    return f"tf_export.{model_name(cfg)}.{command}"


def configured(environ: dict[str, str] | None = None) -> bool:
    """Whether OpenLineage is configured the standard way (and not disabled)."""
    env = os.environ if environ is None else environ
    if env.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    if any(env.get(name) for name in _CONFIG_ENV) or any(k.startswith(_DYNAMIC_PREFIX) for k in env):
        return True
    return any(os.path.isfile(p) for p in (os.path.join(os.getcwd(), "openlineage.yml"),
                                            os.path.expanduser("~/.openlineage/openlineage.yml")))


# -- facets ---------------------------------------------------------------------------
@functools.cache
def _validation_facet_class() -> type:
    import attr
    from openlineage.client.facet_v2 import RunFacet

    @attr.define
    class TfExportValidationRunFacet(RunFacet):
        """The validation gate's verdict on the model a run published."""

        ok: bool
        reason: str | None = attr.field(default=None)
        loader: str | None = attr.field(default=None)
        checks_passed: int | None = attr.field(default=None)
        checks_total: int | None = attr.field(default=None)
        parity_max_abs_diff: float | None = attr.field(default=None)
        size_ratio: float | None = attr.field(default=None)
        latency_ratio: float | None = attr.field(default=None)

        @staticmethod
        def _get_schema() -> str:
            return VALIDATION_SCHEMA

    return TfExportValidationRunFacet


def validation_facets(report: dict | None) -> dict[str, Any]:
    """The run facets of a validation report: ``test`` (one entry per check) and the verdict in brief."""
    if not isinstance(report, dict):
        return {}
    from openlineage.client.facet_v2 import test_run

    brief = validation_brief(report)
    assert brief is not None  # a brief is None only for a report that is not a dict
    tests = [test_run.TestExecution(name=str(c.get("name")), status="pass" if c.get("ok") else "fail",
                                    severity="error", description=redact(c.get("detail") or "") or None)
             for c in report.get("checks") or [] if isinstance(c, dict)]
    facets: dict[str, Any] = {VALIDATION_FACET: _validation_facet_class()(
        ok=bool(brief["ok"]), reason=brief["reason"], loader=brief["loader"], checks_passed=brief["checks_passed"],
        checks_total=brief["checks_total"], parity_max_abs_diff=brief["parity_max_abs_diff"],
        size_ratio=brief["size_ratio"], latency_ratio=brief["latency_ratio"])}
    if tests:
        facets["test"] = test_run.TestRunFacet(tests=tests)
    return facets


def error_facet(message: str) -> dict[str, Any]:
    from openlineage.client.facet_v2 import error_message_run

    return {"errorMessage": error_message_run.ErrorMessageRunFacet(message=redact(message),
                                                                   programmingLanguage="python")}


def checkpoint_dataset(cfg, path: str, step: int | None = None):
    from openlineage.client.event_v2 import InputDataset

    namespace, name = dataset_name(path, cfg.storage_options)
    return InputDataset(namespace=namespace, name=name)


def export_base_dataset(cfg, published: dict | None = None):
    """The export base as an output; for a ``published`` record, with the version it made."""
    from openlineage.client.event_v2 import OutputDataset
    from openlineage.client.facet_v2 import (
        dataset_type_dataset,
        dataset_version_dataset,
        output_statistics_output_dataset,
        symlinks_dataset,
    )

    namespace, name = dataset_name(cfg.export_base, cfg.storage_options)
    facets: dict[str, Any] = {"datasetType": dataset_type_dataset.DatasetTypeDatasetFacet(
        datasetType=DATASET_TYPE, subType=DATASET_SUBTYPE)}
    output_facets: dict[str, Any] = {}
    if published and published.get("version") is not None:
        version = str(published["version"])
        facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=version)
        where = dataset_name(published.get("path") or f"{cfg.export_base.rstrip('/')}/{version}",
                             cfg.storage_options)
        facets["symlinks"] = symlinks_dataset.SymlinksDatasetFacet(
            identifiers=[symlinks_dataset.Identifier(namespace=where[0], name=where[1], type="DIRECTORY")])
        size = published.get("model_size") or {}
        if size:
            output_facets["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                size=size.get("bytes"), fileCount=size.get("files"))
    return OutputDataset(namespace=namespace, name=name, facets=facets, outputFacets=output_facets)


# -- what a run did -------------------------------------------------------------------
@dataclass
class Lineage:
    """Inputs, outputs and run facets of one run (openlineage-python objects)."""

    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    run_facets: dict[str, Any] = field(default_factory=dict)


def checkpoints_in(record: Any) -> list[str]:
    """The checkpoint paths a stage record (or a list of them) names; a bare name or step is no path."""
    found = []
    for item in record if isinstance(record, list) else [record]:
        if isinstance(item, dict):
            info = item.get("checkpoint_info") or {}
            path = info.get("prefix") or item.get("prefix") or item.get("checkpoint")
            if isinstance(path, str) and path and path not in found:
                found.append(path)
    return found


def lineage_of(cfg, outcomes: list[StageOutcome], error: str | None = None,
               wanted: list[str] | None = None) -> Lineage:
    """What ``outcomes`` (of :func:`tf_export_pipeline.observe.watching`) read and made: each checkpoint an
    export or publish took (else ``wanted``, the checkpoints named up front), the export base with each
    version published, the last validation report seen, and ``error``."""
    out = Lineage()
    paths: list[str] = []
    report = None
    published: list[dict] = []
    for o in outcomes:
        if o.stage in ("export", "validate", "publish"):
            for record in (o.result, o.given):
                paths += [p for p in checkpoints_in(record) if p not in paths]
        for record in (o.result, o.given):
            if isinstance(record, dict) and isinstance(record.get("validation"), dict):
                report = record["validation"]
        if o.stage == "publish" and isinstance(o.result, dict) and o.result.get("status") == Status.PUBLISHED:
            published.append(o.result)
    if not paths and wanted:
        paths = list(wanted)
    out.inputs = [checkpoint_dataset(cfg, p) for p in paths]
    out.outputs = [export_base_dataset(cfg, p) for p in published] or [export_base_dataset(cfg)]
    out.run_facets.update(validation_facets(report))
    if error:
        out.run_facets.update(error_facet(error))
    return out


# -- the command line's events --------------------------------------------------------
def parent_facet(run: RunInfo) -> dict[str, Any]:
    if run.parent is None:
        return {}
    from openlineage.client.facet_v2 import parent_run

    p = run.parent
    root = None
    if p.root_run_id:
        assert p.root_namespace is not None and p.root_job is not None  # ParentRun.parse sets the root whole
        root = parent_run.Root(run=parent_run.RootRun(runId=p.root_run_id),
                               job=parent_run.RootJob(namespace=p.root_namespace, name=p.root_job))
    return {"parent": parent_run.ParentRunFacet(run=parent_run.Run(runId=p.run_id),
                                                job=parent_run.Job(namespace=p.namespace, name=p.job), root=root)}


class CommandEvents:
    """START, then COMPLETE or FAIL, of one command, sent in order from a background thread.

    :meth:`close` waits for them at most ``wait`` seconds; what is not delivered
    by then, or failed, is reported through ``warn`` (one line, redacted).
    """

    def __init__(self, cfg, command: str, run: RunInfo, warn: Callable[[str], None],
                 wait: float | None = None):
        self.cfg, self.run, self.warn = cfg, run, warn
        self.job = job_name(cfg, command)
        self.wait = float(os.environ.get(WAIT_ENV) or WAIT_SECONDS) if wait is None else wait
        self.sent = 0
        self.problem: str | None = None
        self._queue: queue.Queue = queue.Queue()
        # Keys a transport may print back in an error (a URL's credentials are redacted anyway).
        register(*(v for k, v in os.environ.items() if k.startswith("OPENLINEAGE") and
                   any(w in k for w in ("KEY", "TOKEN", "PASSWORD", "SECRET"))))
        # The client is made here, not in the thread: two threads importing openlineage at once can deadlock
        # on its modules' import locks. Making it sends nothing.
        try:
            from openlineage.client import OpenLineageClient

            client = OpenLineageClient()
        except Exception as err:  # noqa: BLE001 - lineage never fails an export
            client = None
            self.problem = f"OpenLineage client not set up ({type(err).__name__}: {err})"
        self._thread = threading.Thread(target=self._send_all, args=(client,), name="tf-export-lineage",
                                        daemon=True)
        self._thread.start()

    def _send_all(self, client) -> None:
        if client is None:
            return
        while True:
            event = self._queue.get()
            if event is None:
                break
            try:
                client.emit(event)
                self.sent += 1
            except Exception as err:  # noqa: BLE001 - lineage never fails an export
                self.problem = f"{type(err).__name__}: {err}"
        try:
            client.close(0)
        except Exception:  # noqa: BLE001 - a transport that cannot close has nothing more to send
            pass

    def _event(self, state: str, lineage: Lineage):
        from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
        from openlineage.client.facet_v2 import job_type_job

        facets = {**parent_facet(self.run), **lineage.run_facets}
        assert self.run.openlineage_run_id is not None  # a command line's run always has one (cli_run)
        job = Job(namespace=job_namespace(), name=self.job, facets={"jobType": job_type_job.JobTypeJobFacet(
            processingType="BATCH", integration="TF_EXPORT", jobType="COMMAND")})
        return RunEvent(eventType=getattr(RunState, state), eventTime=dt.datetime.now(dt.timezone.utc).isoformat(),
                        run=Run(runId=self.run.openlineage_run_id, facets=facets), job=job, inputs=lineage.inputs,
                        outputs=lineage.outputs, producer=PRODUCER)

    def _put(self, state: str, lineage: Lineage) -> None:
        try:
            self._queue.put(self._event(state, lineage))
        except Exception as err:  # noqa: BLE001 - an event that cannot be built is reported, not raised
            self.problem = f"{state} event not built ({type(err).__name__}: {err})"

    def start(self) -> None:
        # Which checkpoint the command exports is known only once it has looked: the START names the output.
        self._put("START", Lineage(outputs=[export_base_dataset(self.cfg)]))

    def finish(self, outcomes: list[StageOutcome], error: str | None = None) -> None:
        self._put("FAIL" if error else "COMPLETE", lineage_of(self.cfg, outcomes, error))

    def close(self) -> None:
        """Wait for the events, at most ``wait`` seconds; report what was not delivered."""
        self._queue.put(None)
        deadline = time.monotonic() + max(self.wait, 0.0)
        self._thread.join(max(deadline - time.monotonic(), 0.0))
        if self._thread.is_alive():
            self.warn(f"OpenLineage events not delivered within {self.wait:g} s (backend slow or down); "
                      f"the export is not affected")
        elif self.problem:
            self.warn(f"OpenLineage events not delivered: {redact(self.problem)}; the export is not affected")
