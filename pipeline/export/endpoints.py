"""Several named serving endpoints from one model factory.

Example (a factory in ``my_pkg/model.py``, config ``model.factory: my_pkg.model:build``)::

    import keras, tensorflow as tf
    from tf_export_pipeline.export.endpoints import Endpoints

    def build():
        model = make_functional_model()          # input "features", output "score"
        spec = [tf.TensorSpec([None, 4], tf.float32)]
        ep = Endpoints(model)
        ep.add_endpoint("call_inference", lambda x: model(x, training=False), spec)
        ep.add_endpoint("call_training", lambda x: model(x, training=True), spec)
        return ep

Every endpoint becomes a signature of the SavedModel under its own name; the
first is also ``serving_default`` unless one is so named, as Keras's
``ExportArchive`` does (a ``keras.export.ExportArchive`` with a tracked model
is accepted too). An input signature may nest lists and dicts of
``tf.TensorSpec``; the signature's inputs are flat and named after the model:
a spec's own name, else its dict key, else the functional model's input name,
else the function's parameter name. Outputs are named by the keys of a dict the
function returns, else by the model's output names; never ``output_0``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.export.model import track_model
from tf_export_pipeline.export.naming import clean_name, keras_output_names, keras_tensor_name
from tf_export_pipeline.layout import SERVING_KEY


class Endpoints:
    """An ``ExportArchive``-like set of named endpoints over one model.

    ``model`` (or the first object given to :meth:`track`) is what the
    checkpoint is restored into, under ``model.checkpoint_key``.
    """

    def __init__(self, model: Any = None):
        self.model = model
        self.endpoints: dict[str, tuple[Callable, Any]] = {}

    def track(self, resource: Any) -> Any:
        if self.model is None:
            self.model = resource
        return resource

    def add_endpoint(self, name: str, fn: Callable, input_signature: Any = None) -> Callable:
        if not isinstance(name, str) or not name:
            raise ValueError(f"endpoint name must be a non-empty string, got {name!r}")
        if name in self.endpoints:
            raise ValueError(f"endpoint name '{name}' is already taken")
        self.endpoints[name] = (fn, input_signature)
        return fn

    def track_and_add_endpoint(self, name: str, resource: Any, input_signature: Any = None) -> Callable:
        self.track(resource)
        return self.add_endpoint(name, resource.__call__, input_signature)


def is_endpoints(obj: Any) -> bool:
    """An :class:`Endpoints`, or a Keras ``ExportArchive`` (it names endpoints the same way)."""
    if isinstance(obj, Endpoints):
        return True
    return hasattr(obj, "_endpoint_names") and hasattr(obj, "_tf_trackable") and hasattr(obj, "add_endpoint")


def _table(obj: Any) -> tuple[Any, list[tuple[str, Callable, Any]]]:
    """(the model to restore, [(name, fn, input_signature), ...]) of an endpoints object."""
    if isinstance(obj, Endpoints):
        return obj.model, [(n, fn, sig) for n, (fn, sig) in obj.endpoints.items()]
    # keras.export.ExportArchive: read through its (unexported) bookkeeping.
    names = list(getattr(obj, "_endpoint_names", []) or [])
    sigs = dict(getattr(obj, "_endpoint_signatures", {}) or {})
    tracked = [t for t in (getattr(obj, "_tracked", None) or []) if getattr(t, "variables", None)]
    model = tracked[0] if tracked else None
    return model, [(n, getattr(obj._tf_trackable, n), sigs.get(n)) for n in names]


# -- structures ------------------------------------------------------------------
def _flatten(struct: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Leaves of nested dicts (sorted keys, as tf.nest) and lists/tuples, with their paths."""
    if isinstance(struct, dict):
        for key in sorted(struct):
            yield from _flatten(struct[key], path + (key,))
    elif isinstance(struct, (list, tuple)):
        for i, value in enumerate(struct):
            yield from _flatten(value, path + (i,))
    else:
        yield path, struct


def _pack(struct: Any, leaves: Iterator[Any]) -> Any:
    """``struct`` with its leaves replaced, in :func:`_flatten` order."""
    if isinstance(struct, dict):
        return {key: _pack(struct[key], leaves) for key in sorted(struct)}
    if isinstance(struct, (list, tuple)):
        return type(struct)(_pack(v, leaves) for v in struct)
    return next(leaves)


def _param_names(fn: Callable) -> list[str]:
    target = getattr(fn, "python_function", fn)
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _is_keras(obj: Any) -> bool:
    return hasattr(obj, "inputs") and hasattr(obj, "outputs") and hasattr(obj, "layers")


def _own_name(spec: Any) -> str | None:
    name = getattr(spec, "name", None)
    if not name or str(name).startswith("keras_tensor"):
        return None
    return str(name)


def _to_spec(tf: Any, leaf: Any, where: str) -> Any:
    if isinstance(leaf, tf.TensorSpec):
        return leaf
    if isinstance(leaf, tf.TypeSpec):
        raise ConfigError(f"{where} is a {type(leaf).__name__}; serving signatures take dense tf.TensorSpec only")
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise ConfigError(f"{where} is {type(leaf).__name__}, not a tf.TensorSpec with a shape and dtype")
    return tf.TensorSpec(shape=shape, dtype=dtype, name=_own_name(leaf))


def _input_signature(tf: Any, name: str, fn: Callable, signature: Any) -> list:
    if signature is None:
        signature = getattr(fn, "input_signature", None)
    if signature is None and hasattr(fn, "_list_all_concrete_functions"):
        traced = fn._list_all_concrete_functions()
        if traced:
            signature = list(traced[0].structured_input_signature[0])
    if signature is None:
        raise ConfigError(f"endpoint '{name}' has no input signature: pass input_signature to add_endpoint")
    if not isinstance(signature, (list, tuple)):
        signature = [signature]  # one argument
    return list(signature)


def _input_names(name: str, fn: Callable, flat: list[tuple[tuple, Any]], model: Any) -> list[str]:

    params = _param_names(fn)
    model_inputs = [keras_tensor_name(t, f"input_{i}") for i, t in enumerate(model.inputs)] \
        if _is_keras(model) and model.inputs else []
    has_keys = any(isinstance(p, str) for path, _ in flat for p in path)
    names = []
    for k, (path, spec) in enumerate(flat):
        arg, inner = path[0], path[1:]
        own = _own_name(spec)
        if own:
            got = own
        elif any(isinstance(p, str) for p in inner):
            got = "_".join(str(p) for p in inner)
        elif model_inputs and len(model_inputs) == len(flat) and not has_keys:
            got = model_inputs[k]
        else:
            base = params[arg] if arg < len(params) else f"input_{arg}"
            got = "_".join([base, *map(str, inner)])
        names.append(clean_name(got, f"input_{k}"))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"endpoint '{name}' would have several inputs named {dupes}; "
                          f"give its TensorSpecs distinct names")
    return names


def _output_dict(name: str, out: Any, model: Any) -> dict:

    if isinstance(out, dict):
        flat = list(_flatten(out))
        named = {clean_name("_".join(map(str, path)), f"output_{i}"): t for i, (path, t) in enumerate(flat)}
        if len(named) != len(flat):
            raise ConfigError(f"endpoint '{name}' returns a dict whose keys collide once flattened")
        return named
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if _is_keras(model) and len(model.outputs) == len(outs):
        return dict(zip(keras_output_names(model, len(outs)), outs))
    raise ConfigError(f"endpoint '{name}' returns {len(outs)} unnamed output(s) that do not correspond to the "
                      f"model's outputs; return a dict of named tensors")


def _caller(name: str, fn: Callable, args: list, model: Any) -> Callable:
    """A function of the flat, named inputs that calls ``fn`` with its nested arguments."""

    def call(*tensors):
        return _output_dict(name, fn(*_pack(args, iter(tensors))), model)

    return call


def build_endpoint_signatures(serving: Any, obj: Any) -> None:
    """Fill ``serving`` (an :class:`tf_export_pipeline.export.ServingModel`) from an endpoints object."""
    import tensorflow as tf

    model, table = _table(obj)
    if not table:
        raise ConfigError("the model factory returned endpoints but none were added (call add_endpoint)")
    if model is None:
        raise ConfigError("the endpoints track no model to restore the checkpoint into: pass the model to "
                          "Endpoints(model) or call track(model)")
    serving.model = model
    # Keras 3 keeps some state (e.g. a dropout's seed) outside what tf.Module tracking finds;
    # an endpoint with training=True captures it. Track every variable, as ExportArchive does.

    track_model(serving.root, model)
    serving.signatures = {}
    functions = []
    calls: dict[str, Callable] = {}
    for name, fn, signature in table:
        args = _input_signature(tf, name, fn, signature)
        flat = [(path, _to_spec(tf, leaf, f"endpoint '{name}' input {list(path)}"))
                for path, leaf in _flatten(args)]
        if not flat:
            raise ConfigError(f"endpoint '{name}' takes no inputs; a serving signature needs at least one")
        names = _input_names(name, fn, flat, model)
        specs = [tf.TensorSpec(s.shape, s.dtype, name=n) for (_, s), n in zip(flat, names)]

        call = _caller(name, fn, args, model)
        traced = tf.function(call, input_signature=specs, autograph=False)
        try:
            serving.signatures[name] = traced.get_concrete_function()
        except ConfigError:
            raise
        except Exception as err:  # the endpoint's own code failed while tracing
            text = " ".join(str(err).split())[:240]
            raise ConfigError(f"endpoint '{name}' cannot be traced with its input signature "
                              f"({type(err).__name__}: {text})") from None
        functions.append(traced)
        calls[name] = call
    serving.root.endpoints = functions
    first = table[0][0]
    if SERVING_KEY not in serving.signatures:
        serving.signatures[SERVING_KEY] = serving.signatures[first]
    serving.reference = calls.get(SERVING_KEY, calls[first])
