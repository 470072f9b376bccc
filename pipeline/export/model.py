"""The user's model: its factory, and how a SavedModel's root object carries its state.

TensorFlow is imported inside the functions that need it.

Example::

    from tf_export_pipeline.export.model import load_factory
    build = load_factory("tf_export_pipeline.demo:build")
    model = build()
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from tf_export_pipeline.errors import ConfigError


def load_factory(spec: str, config_dir: str | None = None) -> Callable[[], Any]:
    """Import ``package.module:callable``; the config's folder is importable too."""
    module_name, _, attr = spec.partition(":")
    if config_dir and config_dir not in sys.path:
        sys.path.insert(0, config_dir)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an ImportError, or whatever the module raises at import
        raise ConfigError(f"cannot import model factory module '{module_name}' ({type(err).__name__}: {err}): "
                          f"{spec}") from None
    try:
        target: Any = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ConfigError(f"model factory '{attr}' not found in module '{module_name}': {spec}") from None
    if not callable(target):
        raise ConfigError(f"model factory is not callable: {spec}")
    return target


def plain_variables(model: Any) -> list:
    """The model's variables as plain ``tf.Variable`` objects (Keras 3 wraps its own)."""
    import tensorflow as tf

    out = []
    for var in getattr(model, "variables", None) or []:
        inner = var if isinstance(var, tf.Variable) else getattr(var, "value", None)
        if isinstance(inner, tf.Variable):
            out.append(inner)
    return out


def track_model(root: Any, model: Any) -> None:
    """Make ``root`` (the SavedModel's root object) carry the model's state.

    A Keras 3 model is tracked through its plain variables only: tracked as a
    Keras object as well, each variable would be written twice (once through its
    Keras wrapper), doubling the size of every version. A ``tf.Module`` is
    tracked as it is.
    """
    if is_keras_model(model) or hasattr(model, "_tracker"):
        root.model_variables = plain_variables(model)
        resources = _resources(model)
        if resources:  # lookup tables of StringLookup, TextVectorization, ...
            root.model_resources = resources
    else:
        root.model = model


def _resources(obj: Any) -> list:
    """Resources (e.g. lookup tables) reachable from ``obj``, which the serving functions may capture."""
    from tensorflow.python.trackable.resource import CapturableResource

    found: list = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, CapturableResource):
            found.append(node)
        try:
            children = node._trackable_children(save_type="savedmodel")
        except Exception:  # some Keras objects cannot list SavedModel children; their checkpoint ones do
            try:
                children = node._trackable_children()
            except Exception:
                continue
        stack.extend(children.values())
    return found


def is_keras_model(obj: Any) -> bool:
    """A Keras model (it has inputs, outputs and layers), as opposed to a ``tf.Module``."""
    return hasattr(obj, "inputs") and hasattr(obj, "outputs") and hasattr(obj, "layers")
