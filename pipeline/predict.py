"""``tf-export predict``: run one signature of a SavedModel on inputs from a file.

Example::

    from tf_export_pipeline.predict import predict, format_outputs
    name, outputs = predict("/srv/models/m/1732147200", inputs_file="batch.npz")
    print(format_outputs(outputs))        # as ``saved_model_cli run`` prints them

``inputs_file`` is an ``.npz`` with one array per input of the signature,
loaded with ``allow_pickle=False``; ``examples_file`` is a JSON list of feature
dicts, serialized as ``tf.Example`` protos for a parsing signature (with the
feature spec the SavedModel carries in ``assets.extra/example_signature.json``
when there is one).
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from tf_export_pipeline.errors import ConfigError, PipelineError
from tf_export_pipeline.export.examples import read_spec, serialize_examples
from tf_export_pipeline.layout import SAVED_MODEL_PB, SERVING_KEY
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.storage import open_storage


def load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, refusing pickled (object) arrays."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"inputs file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        raise ConfigError(f"inputs file is a single .npy array, not an .npz of arrays named after the inputs: {path}")
    if not magic.startswith(b"PK"):
        raise ConfigError(f"inputs file is not an .npz archive (np.savez writes one): {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ConfigError(f"inputs file holds a pickled (object) array, which is refused; save numbers or "
                              f"fixed-width strings: {path}") from None
        raise ConfigError(f"inputs file is not a readable .npz ({' '.join(str(err).split())[:160]}): {path}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"inputs file is not a readable .npz ({type(err).__name__}): {path}") from None


def load_examples(path: str) -> list[dict]:
    """A JSON list of feature dicts."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"examples file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"examples file is not valid JSON ({' '.join(str(err).split())[:120]}): {path}") from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"examples file must hold a non-empty JSON list of feature dicts: {path}")
    return rows


def _feed(name: str, spec: Any, value: np.ndarray, source: str) -> Any:
    import tensorflow as tf

    want = spec.dtype
    kind = value.dtype.kind
    if want.name == "string":
        if kind not in "SU":
            raise ConfigError(f"input '{name}' is a string tensor, but the file gives {value.dtype}: {source}")
        value = np.char.encode(value, "utf-8") if kind == "U" else value
    elif want.is_bool:
        if kind != "b":
            raise ConfigError(f"input '{name}' is bool, but the file gives {value.dtype}: {source}")
    elif want.is_integer:
        if kind not in "iub":
            raise ConfigError(f"input '{name}' is {want.name}, but the file gives {value.dtype} "
                              f"(refusing to truncate): {source}")
    elif want.is_floating or want.is_complex:
        if kind not in "iubf" + ("c" if want.is_complex else ""):
            raise ConfigError(f"input '{name}' is {want.name}, but the file gives {value.dtype}: {source}")
    if spec.shape.rank is not None:
        dims = spec.shape.as_list()
        if value.ndim != len(dims) or any(d is not None and d != v for d, v in zip(dims, value.shape)):
            shown = [-1 if d is None else d for d in dims]
            raise ConfigError(f"input '{name}' takes shape {shown}, but the file gives {list(value.shape)}: {source}")
    return tf.constant(value, dtype=want)


def _signature(loaded: Any, name: str, path: str) -> Any:
    if name not in loaded.signatures:
        raise ConfigError(f"no signature '{name}' (the model has: {', '.join(sorted(loaded.signatures))}): {path}")
    return loaded.signatures[name]


def predict(path: str, *, inputs_file: str | None = None, examples_file: str | None = None,
            signature: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """Run a signature of the local SavedModel at ``path``; returns (signature name, outputs)."""

    if not os.path.isfile(os.path.join(path, SAVED_MODEL_PB)):
        raise ConfigError(f"not a SavedModel directory (no saved_model.pb): {path}")
    arrays = load_npz(inputs_file) if inputs_file else None
    rows = load_examples(examples_file) if examples_file else None
    tf = import_tensorflow_quietly()
    try:
        loaded = tf.saved_model.load(path)
    except Exception as err:
        text = " ".join(str(err).split())[:200]
        raise PipelineError(f"SavedModel does not load ({type(err).__name__}: {text}): {path}") from None

    if rows is not None:
        assert examples_file is not None  # the rows were read from it
        spec = read_spec(path)
        if signature is None:
            if spec:
                signature = spec["name"]
            else:
                parsing = [k for k, fn in loaded.signatures.items()
                           if list(fn.structured_input_signature[1].values()) and
                           all(s.dtype == tf.string for s in fn.structured_input_signature[1].values()) and
                           len(fn.structured_input_signature[1]) == 1]
                if len(parsing) != 1:
                    raise ConfigError(f"name the tf.Example-parsing signature with --signature (candidates: "
                                      f"{', '.join(sorted(parsing)) or 'none'}): {path}")
                signature = parsing[0]
        fn = _signature(loaded, signature, path)
        kw = fn.structured_input_signature[1]
        if len(kw) != 1 or next(iter(kw.values())).dtype != tf.string:
            raise ConfigError(f"signature '{signature}' does not take serialized tf.Example strings "
                              f"(inputs {sorted(kw)}): {path}")
        features = spec["features"] if spec and spec.get("name") == signature else None
        try:
            serialized = serialize_examples(rows, features)
        except ConfigError as err:
            raise ConfigError(f"{err}: {os.path.abspath(examples_file)}") from None
        key = next(iter(kw))
        feed = {key: tf.constant(serialized)}
        where = os.path.abspath(examples_file)
    else:
        signature = signature or SERVING_KEY
        fn = _signature(loaded, signature, path)
        kw = fn.structured_input_signature[1]
        if arrays is None or inputs_file is None:
            raise TypeError("predict() needs inputs_file or examples_file")
        missing, extra = sorted(set(kw) - set(arrays)), sorted(set(arrays) - set(kw))
        if missing or extra:
            raise ConfigError(f"inputs of '{signature}' are {sorted(kw)}; the file lacks {missing} and has "
                              f"extra {extra}: {os.path.abspath(inputs_file)}")
        where = os.path.abspath(inputs_file)
        feed = {k: _feed(k, kw[k], arrays[k], where) for k in kw}
    try:
        out = fn(**feed)
    except Exception as err:
        text = " ".join(str(getattr(err, "message", None) or err).split())[:240]
        raise PipelineError(f"signature '{signature}' failed ({type(err).__name__}: {text}): {where}") from None
    if not isinstance(out, dict):
        out = {"output_0": out}
    return signature, {k: v.numpy() for k, v in out.items()}


def format_outputs(outputs: dict[str, np.ndarray]) -> str:
    """As ``saved_model_cli run`` prints them: one block per output key, sorted."""
    return "\n".join(f"Result for output key {k}:\n{outputs[k]}" for k in sorted(outputs))


def to_json(signature: str, outputs: dict[str, np.ndarray]) -> dict:
    def plain(a: np.ndarray):
        if a.dtype.kind in "OS":
            return np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b),
                                otypes=[object])(a).tolist() if a.size else a.tolist()
        return a.tolist()

    return {"signature": signature, "outputs": {k: plain(v) for k, v in sorted(outputs.items())}}


def resolve_target(target: str, cfg: Any, scratch: str) -> str:
    """The local SavedModel directory of ``target``: a path, or a version number of ``cfg``'s export base."""
    if target.isdigit() and (cfg is not None or not os.path.isdir(target)):
        if cfg is None:
            raise ConfigError(f"a version number needs --config to find the export base: {target}")

        store = open_storage(cfg.export_base, cfg.storage_options)
        remote = store.join(store.root, target)
        if not store.exists(store.join(remote, SAVED_MODEL_PB)):
            raise ConfigError(f"version {target} is not published in the export base: {store.url(remote)}")
        if store.is_local:
            return remote
        local = os.path.join(scratch, target)
        store.download_dir(remote, local)
        return local
    path = os.path.abspath(target)
    if not os.path.isdir(path):
        raise ConfigError(f"not a SavedModel directory: {path}")
    return path
