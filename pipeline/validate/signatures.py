"""The signatures of a SavedModel as plain data, read from ``saved_model.pb`` without loading the model.

TensorFlow's protobuf modules are imported when a file is read, not with this module.

Example::

    from tf_export_pipeline.validate.signatures import signatures_of
    sigs = signatures_of("/srv/models/m/1700000000")
    print(sigs["serving_default"]["inputs"])
"""

from __future__ import annotations

import os

from tf_export_pipeline.layout import SAVED_MODEL_PB, SERVE_TAG


def signatures_of(path: str) -> dict:
    """Signatures of a local SavedModel directory: ``{key: {"method", "inputs", "outputs"}}``."""
    with open(os.path.join(path, SAVED_MODEL_PB), "rb") as fh:
        return signatures_from_bytes(fh.read())


def signatures_from_bytes(data: bytes) -> dict:
    """Signatures from the bytes of a ``saved_model.pb`` (the serving meta graph's; ``__*`` keys left out)."""
    sm = _parse(data)
    # TF Serving loads the meta graph whose tag-set is exactly {"serve"}; one that only includes the tag,
    # or the first, stands in for SavedModels it would not load, whose signatures are still worth showing.
    metas = sm.meta_graphs
    meta = next((m for m in metas if set(m.meta_info_def.tags) == {SERVE_TAG}),
                next((m for m in metas if SERVE_TAG in m.meta_info_def.tags), metas[0]))
    out = {}
    for key, sig in meta.signature_def.items():
        if key.startswith("__"):
            continue  # e.g. __saved_model_init_op
        out[key] = {
            "method": sig.method_name,
            "inputs": {n: _tensor_info(t) for n, t in sig.inputs.items()},
            "outputs": {n: _tensor_info(t) for n, t in sig.outputs.items()},
        }
    return out


def tag_sets_from_bytes(data: bytes) -> list[list[str]]:
    """The tag-set of each meta graph in the bytes of a ``saved_model.pb``, in file order."""
    return [sorted(m.meta_info_def.tags) for m in _parse(data).meta_graphs]


def _parse(data: bytes):
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString(data)
    return sm


def _tensor_info(info) -> dict:
    from tensorflow.python.framework import dtypes

    shape = None if info.tensor_shape.unknown_rank else [d.size if d.size >= 0 else -1 for d in info.tensor_shape.dim]
    return {"dtype": dtypes.as_dtype(info.dtype).name, "shape": shape}
