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
"""

from __future__ import annotations

import json
import struct

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage import open_storage


class GateError(PipelineError):
    """The metric of a checkpoint cannot be read."""


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
    """The value of ``metric`` for one checkpoint, from a JSON file or a TensorBoard directory."""
    path = source.replace("{step}", str(step)).replace("{name}", name)
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
        return float(rec["metrics"][metric])
    raise GateError(f"metrics file has no record for step {step}: {path}")


def compare(mode: str, value: float, live_value: float | None) -> dict:
    """Whether ``value`` is worse than the live version's; equal is not worse."""
    if live_value is None:
        worse = False
    elif mode == "min":
        worse = value > live_value
    else:
        worse = value < live_value
    return {"value": value, "live_value": live_value, "worse": worse}
