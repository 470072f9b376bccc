"""A signature that parses serialized ``tf.Example`` protos, as the Estimator's parsing receiver did.

Example (config)::

    model:
      factory: my_pkg.model:build
      example_signature:
        name: examples
        features:
          features: {dtype: float32, shape: [4]}
          country:  {dtype: string, shape: [], default: ""}

adds a signature ``examples`` whose single input ``examples`` is a batch of
serialized ``tf.Example`` strings. It parses them with the feature spec
(``tf.io.FixedLenFeature`` per feature; a feature without ``default`` is
required) and feeds the features, by name, to the model's ``serving_default``
function: its outputs are the same. The spec is written into the SavedModel as
``assets.extra/example_signature.json`` (TF Serving ignores ``assets.extra``),
so that validation and ``tf-export predict --examples`` can build protos for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.layout import EXAMPLE_SPEC, SERVING_KEY
from tf_export_pipeline.validate.parity import compare_outputs

INPUT_NAME = "examples"


def _np_dtype(dtype: str):
    return {"float32": np.float32, "int64": np.int64, "string": object}[dtype]


def _default_array(name: str, feature: dict) -> np.ndarray | None:
    default = feature.get("default")
    if default is None:
        return None
    shape = list(feature.get("shape") or [])
    if feature["dtype"] == "string":
        flat = np.asarray(default, dtype=object)
        value = np.array([v.encode() if isinstance(v, str) else v for v in flat.reshape(-1).tolist()],
                         dtype=object).reshape(flat.shape)
    else:
        try:
            value = np.asarray(default, dtype=_np_dtype(feature["dtype"]))
        except (TypeError, ValueError):
            raise ConfigError(f"model.example_signature feature '{name}': default {default!r} is not "
                              f"{feature['dtype']}") from None
    if value.ndim == 0 and shape:
        value = np.full(shape, value.item(), dtype=value.dtype)
    if list(value.shape) != shape:
        raise ConfigError(f"model.example_signature feature '{name}': default has shape {list(value.shape)}, "
                          f"the feature {shape}")
    return value


def spec_of(config: Any) -> dict:
    """The JSON form of a ``model.example_signature`` config."""
    data = config.model_dump() if hasattr(config, "model_dump") else dict(config)
    return {"name": data["name"], "input": INPUT_NAME,
            "features": {n: {"dtype": f["dtype"], "shape": list(f.get("shape") or []), "default": f.get("default")}
                         for n, f in data["features"].items()}}


def _compatible(feature_dtype: str, model_dtype: Any) -> bool:
    if feature_dtype == "string":
        return model_dtype.name == "string"
    if feature_dtype == "float32":
        return model_dtype.is_floating
    return model_dtype.is_integer or model_dtype.is_floating  # int64 casts to any number


def add_example_signature(serving: Any, config: Any) -> None:
    """Add the tf.Example-parsing signature to ``serving`` (a :class:`tf_export_pipeline.export.ServingModel`).

    Raises :class:`ConfigError` when the feature spec does not match the inputs
    of ``serving_default``: a missing or extra feature, a dtype that cannot feed
    the input, a per-example shape that differs.
    """
    import tensorflow as tf

    spec = spec_of(config)
    name = spec["name"]
    if name in serving.signatures:
        raise ConfigError(f"model.example_signature.name '{name}' is already a signature of the model "
                          f"({', '.join(sorted(serving.signatures))}); choose another name")
    raw = serving.signatures[SERVING_KEY]
    specs = serving.input_specs(SERVING_KEY)
    inputs = {s.name: s for s in specs}
    features = spec["features"]
    missing = [n for n in inputs if n not in features]
    extra = [n for n in features if n not in inputs]
    if missing or extra:
        parts = ([f"no feature for input(s) {missing}"] if missing else []) + \
                ([f"feature(s) {extra} are not inputs"] if extra else [])
        raise ConfigError(f"model.example_signature does not match the inputs of {SERVING_KEY} "
                          f"{sorted(inputs)}: {'; '.join(parts)}")
    feature_spec = {}
    for fname, feature in features.items():
        want = inputs[fname]
        if not _compatible(feature["dtype"], want.dtype):
            raise ConfigError(f"model.example_signature feature '{fname}' is {feature['dtype']}, but the model's "
                              f"input '{fname}' is {want.dtype.name}")
        shape = feature["shape"]
        if want.shape.rank is not None:
            per_example = want.shape.as_list()[1:]
            if len(per_example) != len(shape) or any(d is not None and d != s for d, s in zip(per_example, shape)):
                shown = ["?" if d is None else d for d in per_example]
                raise ConfigError(f"model.example_signature feature '{fname}' has shape {shape} per example, but "
                                  f"the model's input '{fname}' takes {shown}")
        tf_dtype = {"float32": tf.float32, "int64": tf.int64, "string": tf.string}[feature["dtype"]]
        feature_spec[fname] = tf.io.FixedLenFeature(shape, tf_dtype, default_value=_default_array(fname, feature))

    args, kwargs = raw.structured_input_signature

    def parse(examples):
        parsed = tf.io.parse_example(examples, feature_spec)
        fed = {n: (t if t.dtype == inputs[n].dtype else tf.cast(t, inputs[n].dtype)) for n, t in parsed.items()}
        return raw(*[fed[s.name] for s in args], **{k: fed[k] for k in kwargs})

    fn = tf.function(parse, input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)], autograph=False)
    try:
        concrete = fn.get_concrete_function()
    except Exception as err:
        text = " ".join(str(err).split())[:240]
        raise ConfigError(f"model.example_signature cannot feed the model ({type(err).__name__}: {text})") from None
    serving.root.parse_examples = fn
    serving.signatures[name] = concrete
    serving.example_spec = spec


def write_spec(saved_model_dir: str, spec: dict) -> None:
    path = os.path.join(saved_model_dir, EXAMPLE_SPEC)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh, indent=1, sort_keys=True)


def read_spec(saved_model_dir: str) -> dict | None:
    """The example signature's spec stored in a SavedModel, or None."""
    path = os.path.join(saved_model_dir, EXAMPLE_SPEC)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# -- building protos ---------------------------------------------------------------
def _infer_dtype(values: list) -> str:
    if all(isinstance(v, (bytes, str)) for v in values):
        return "string"
    if all(isinstance(v, (bool, int, np.integer)) for v in values):
        return "int64"
    return "float32"


def serialize_examples(rows: list[dict], features: dict | None = None) -> list[bytes]:
    """Serialized ``tf.Example`` protos of ``rows`` (feature name -> value or list of values).

    With ``features`` (the spec), each value is checked against its dtype and
    shape and a missing feature must have a default; without it the list type
    follows the values (str: bytes_list, int: int64_list, else float_list).
    """
    from tensorflow.core.example import example_pb2

    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"example {i} is {type(row).__name__}, not a mapping of feature names to values")
        if features is not None:
            unknown = sorted(set(row) - set(features))
            if unknown:
                raise ConfigError(f"example {i} has feature(s) {unknown} that the signature does not parse "
                                  f"(it parses {sorted(features)})")
            lacking = sorted(n for n, f in features.items() if n not in row and f.get("default") is None)
            if lacking:
                raise ConfigError(f"example {i} lacks required feature(s) {lacking}")
        ex = example_pb2.Example()
        for fname, value in row.items():
            arr = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
            values = [v.item() if isinstance(v, np.generic) else v for v in arr.reshape(-1).tolist()]
            if features is not None:
                feature = features[fname]
                dtype, shape = feature["dtype"], list(feature.get("shape") or [])
                size = int(np.prod(shape)) if shape else 1
                if len(values) != size:
                    raise ConfigError(f"example {i}: feature '{fname}' has {len(values)} value(s), its spec wants "
                                      f"{size} (shape {shape})")
            else:
                dtype = _infer_dtype(values)
            entry = ex.features.feature[fname]
            try:
                if dtype == "string":
                    if not all(isinstance(v, (bytes, str)) for v in values):
                        raise TypeError("not strings")
                    entry.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
                elif dtype == "int64":
                    if not all(isinstance(v, (bool, int)) or float(v).is_integer() for v in values):
                        raise TypeError("not integers")
                    entry.int64_list.value.extend(int(v) for v in values)
                else:
                    entry.float_list.value.extend(float(v) for v in values)
            except (TypeError, ValueError):
                raise ConfigError(f"example {i}: feature '{fname}' is not {dtype}: {values[:4]!r}") from None
        out.append(ex.SerializeToString())
    return out


def rows_of(inputs: dict[str, np.ndarray], names: list[str]) -> list[dict]:
    """One row per example of a batch of named input arrays."""
    n = len(next(iter(inputs.values())))
    return [{k: inputs[k][i] for k in names} for i in range(n)]


# -- validation --------------------------------------------------------------------
def check_example_signature(signatures: Mapping[str, Callable[[dict[str, Any]], dict[str, np.ndarray]]],
                            saved_model_dir: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                            add: Callable[[str, bool, str], Any], rtol: float, atol: float) -> str | None:
    """Feed the smoke-test samples as tf.Example protos to the parsing signature; its outputs must equal
    those ``serving_default`` gave. ``signatures`` maps each signature key of the loaded model to a function
    of its feeds (input name -> array) that returns its outputs. Adds the ``example_signature_parity`` check
    (none without a spec) and returns the key of the parsing signature it was given to run, or None."""
    try:
        spec = read_spec(saved_model_dir)
    except (OSError, ValueError) as err:
        add("example_signature_parity", False, f"{EXAMPLE_SPEC} does not parse ({type(err).__name__})")
        return None
    if spec is None:
        return None
    name = spec.get("name")
    if name is None or name not in signatures:
        add("example_signature_parity", False, f"signature '{name}' named in {EXAMPLE_SPEC} is missing")
        return None
    try:
        serialized = serialize_examples(rows_of(inputs, list(spec["features"])), spec["features"])
        got = signatures[name]({spec.get("input", INPUT_NAME): np.array(serialized, dtype=object)})
    except Exception as err:
        text = " ".join(str(err).split()).removeprefix("Graph execution error: ")[:240]
        add("example_signature_parity", False, f"signature '{name}' failed on tf.Example protos of the samples "
                                               f"({type(err).__name__}: {text})")
        return name
    mismatches, _ = compare_outputs(got, outputs, rtol, atol)
    problems = [f"output '{key}' missing" if why == "missing" else f"output '{key}' differs from {SERVING_KEY}'s"
                for key, why in mismatches.items()]
    detail = ("; ".join(problems) if problems
              else f"'{name}' on {len(serialized)} tf.Example protos equals {SERVING_KEY}")
    add("example_signature_parity", not problems, detail)
    return name
