"""TF Serving warmup records: ``assets.extra/tf_serving_warmup_requests``.

TF Serving replays these ``PredictionLog`` records when it loads a version, so
the first real request does not pay for graph initialisation.

Example::

    from tf_export_pipeline.validate.warmup import write_warmup
    write_warmup("/tmp/staged/assets.extra", {"features": x}, signature="serving_default")
"""

from __future__ import annotations

import os

import numpy as np

from tf_export_pipeline.layout import SERVING_KEY, WARMUP_FILE


def build_logs(inputs: dict[str, np.ndarray], signature: str = SERVING_KEY, model_name: str = "model",
               per_record: int = 1) -> list[bytes]:
    """Serialized ``PredictionLog`` records, ``per_record`` rows of the samples each."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    n = len(next(iter(inputs.values())))
    out = []
    for start in range(0, n, per_record):
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
        for name, arr in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(arr[start:start + per_record]))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        out.append(log.SerializeToString())
    return out


def write_warmup(assets_extra: str, inputs: dict[str, np.ndarray], signature: str = SERVING_KEY,
                 model_name: str = "model") -> str:
    import tensorflow as tf

    os.makedirs(assets_extra, exist_ok=True)
    path = os.path.join(assets_extra, WARMUP_FILE)
    with tf.io.TFRecordWriter(path) as writer:
        for record in build_logs(inputs, signature, model_name):
            writer.write(record)
    return path


def read_warmup(path: str) -> list:
    """The ``PredictionLog`` records of a warmup file."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
