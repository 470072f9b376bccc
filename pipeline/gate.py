"""The metric gate: a checkpoint that scores worse than the live version is not published.

The Estimator ``BestExporter`` and the TFX Evaluator's blessing, without TFX.
The metric of a checkpoint comes from either

* a JSON file the training job writes beside the checkpoint,
  ``{"step": 300, "metrics": {"val_loss": 0.12}}`` (or a list of such records);
  ``{step}`` and ``{name}`` in the configured path are replaced by the
  checkpoint's step and base name; or
* a TensorBoard event directory, read for the scalar at the checkpoint's step.

Example::

    from tf_export_pipeline.gate import read_metric, compare
    value = read_metric("/data/train/metrics-{step}.json", "val_loss", step=300, name="ckpt-300")
    verdict = compare("min", value, live_value=0.15)   # {"worse": False, ...}

A metric that is not a finite number says training diverged: such a
checkpoint is not published (:class:`MetricNotFinite`, unless forced), and a
live version that recorded one is compared with nothing: the checkpoint
passes, with a ``warning`` in the verdict.
"""

from __future__ import annotations

import json
import math
import struct

from tf_export_pipeline.errors import ConfigError, PipelineError
from tf_export_pipeline.storage import open_storage


class GateError(PipelineError):
    """The metric of a checkpoint cannot be read."""


class MetricNotFinite(GateError):
    """The checkpoint's metric is NaN or infinite: its training diverged. The same on every retry."""

    permanent = True


class MetricNotANumber(GateError, ConfigError):
    """The metrics source holds something else than a number for the metric (exit 2, as a config error)."""


def metric_path(source: str, step: int | None, name: str) -> str:
    """The metrics file (or event directory) of one checkpoint."""
    return source.replace("{step}", str(step)).replace("{name}", name)


def _number(raw, metric: str, path: str) -> float:
    # bool is an int to Python, and float() takes "0.5" and "nan": a training job that writes either
    # has a bug the gate must not paper over.
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise MetricNotANumber(f"metric '{metric}' is not a number ({raw!r}) in metrics file: {path}")
    return float(raw)


def _tfrecords(data: bytes):
    """Records of a TFRecord file (length, crc, payload, crc); a torn last record is ignored."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        start = pos + 12
        end = start + length
        if end + 4 > len(data):
            break  # the writer is still appending
        yield data[start:end]
        pos = end + 4


def _scalar_from_events(store, directory: str, metric: str, step: int) -> float | None:
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    found: tuple[float, float] | None = None  # (wall_time, value)
    for entry in sorted(store.list_dir(directory), key=lambda e: e.name):
        if entry.is_dir or "tfevents" not in entry.name:
            continue
        for record in _tfrecords(store.read_bytes(entry.path)):
            event = event_pb2.Event.FromString(record)
            if event.step != step or not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.tag != metric:
                    continue
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    continue
                if found is None or event.wall_time >= found[0]:
                    found = (event.wall_time, number)
    return None if found is None else found[1]


def read_metric(source: str, metric: str, *, step: int | None, name: str,
                storage_options: dict | None = None) -> float:
    """The value of ``metric`` for one checkpoint, from a JSON file or a TensorBoard directory.

    The value may be NaN or infinite (see :func:`require_finite`); a value that is not a number at all
    raises :class:`MetricNotANumber`.
    """
    path = metric_path(source, step, name)
    store = open_storage(path, storage_options)
    target = store.root
    if store.isdir(target):
        if step is None:
            raise GateError(f"checkpoint {name} has no step to look up metric '{metric}' in event files: {path}")
        value = _scalar_from_events(store, target, metric, step)
        if value is None:
            raise GateError(f"no scalar '{metric}' at step {step} in the event files of {path}")
        return value
    if not store.isfile(target):
        raise GateError(f"metrics source not found for checkpoint {name}: {path}")
    try:
        doc = json.loads(store.read_text(target))
    except ValueError:
        raise GateError(f"metrics file is not JSON: {path}") from None
    records = doc if isinstance(doc, list) else [doc]
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
            raise GateError(f"metrics file must hold {{\"step\": N, \"metrics\": {{...}}}}: {path}")
        if step is not None and rec.get("step") is not None and int(rec["step"]) != step:
            continue
        if metric not in rec["metrics"]:
            raise GateError(f"metric '{metric}' not in metrics file (has {sorted(rec['metrics'])}): {path}")
        return _number(rec["metrics"][metric], metric, path)
    raise GateError(f"metrics file has no record for step {step}: {path}")


def require_finite(value: float, metric: str, name: str, path: str) -> float:
    """``value``, unless it is NaN or infinite: then :class:`MetricNotFinite` naming the metric and the file."""
    if not math.isfinite(value):
        raise MetricNotFinite(f"metric '{metric}' of checkpoint {name} is not finite ({value!r}): training "
                              f"diverged; not published (--force overrides): {path}")
    return value


def compare(mode: str, value: float, live_value: float | None, live_version: int | None = None) -> dict:
    """Whether ``value`` is worse than the live version's; equal is not worse.

    A value that is not finite is worse than anything. A live value that is not finite is compared
    with nothing (``live_value`` None, a ``warning`` says why): NaN compares false with everything
    and an infinity beats everything, so either would decide every later verdict alone.
    """
    verdict: dict = {"value": value, "live_value": live_value}
    if not math.isfinite(value):
        verdict["worse"] = True
    elif live_value is None:
        verdict["worse"] = False
    elif not math.isfinite(live_value):
        which = f"live version {live_version}" if live_version is not None else "the live version"
        verdict.update(live_value=None, worse=False,
                       warning=f"the metric of {which} is not finite ({live_value!r}); not compared with it")
    elif mode == "min":
        verdict["worse"] = value > live_value
    else:
        verdict["worse"] = value < live_value
    return verdict
