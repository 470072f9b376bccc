"""Model factory, restore from a checkpoint, SavedModel write.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.export import Exporter
    exporter = Exporter.from_config(load_config("serving.yaml"))
    exporter.restore("/data/train/ckpt-300")
    exporter.write("/tmp/staged_model")

An :class:`Exporter` builds the model and traces its serving functions once;
each checkpoint after that only restores variable values and writes them out.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from tf_export_pipeline.layout import SERVING_KEY
from tf_export_pipeline.errors import CheckpointError, ConfigError, ModelMismatchError, PipelineError

_NAME_OK = re.compile(r"[^A-Za-z0-9_.\-/]")


def load_factory(spec: str, config_dir: str | None = None) -> Callable[[], Any]:
    """Import ``package.module:callable``; the config's folder is importable too."""
    module_name, _, attr = spec.partition(":")
    if config_dir and config_dir not in sys.path:
        sys.path.insert(0, config_dir)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an ImportError, or whatever the module raises at import
        raise ConfigError(f"cannot import model factory module '{module_name}' ({type(err).__name__}: {err}): {spec}") from None
    try:
        target: Any = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ConfigError(f"model factory '{attr}' not found in module '{module_name}': {spec}") from None
    if not callable(target):
        raise ConfigError(f"model factory is not callable: {spec}")
    return target


def _clean_name(name: str, fallback: str) -> str:
    name = (name or "").split(":")[0]
    name = _NAME_OK.sub("_", name)
    return name or fallback


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
    if _is_keras_model(model) or hasattr(model, "_tracker"):
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


def _is_keras_model(obj: Any) -> bool:
    return hasattr(obj, "inputs") and hasattr(obj, "outputs") and hasattr(obj, "layers")


def _keras_tensor_name(tensor: Any, fallback: str) -> str:
    """A Keras tensor's own name; an auto-generated ``keras_tensor_N`` gives way to its layer's name."""
    name = getattr(tensor, "name", "") or ""
    if name.startswith("keras_tensor"):
        history = getattr(tensor, "_keras_history", None)
        layer = getattr(history[0], "name", "") if history else ""
        name = layer or name
    return _clean_name(name, fallback)


def _keras_output_names(model: Any, n: int) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != n:
        names = [_keras_tensor_name(t, f"output_{i}") for i, t in enumerate(model.outputs)]
    if len(set(names)) != n:
        names = [f"output_{i}" for i in range(n)]
    return names


class ServingModel:
    """The model plus its serving signatures, traced once.

    ``signatures`` maps a signature key to a concrete function whose outputs are a
    dict of named tensors; ``reference`` computes the same outputs by calling the
    restored model directly (the parity baseline for validation).
    """

    def __init__(self, model: Any):
        import tensorflow as tf

        self.model = model
        self.root = tf.Module()
        track_model(self.root, model)
        from tf_export_pipeline.export.endpoints import build_endpoint_signatures, is_endpoints

        if is_endpoints(model):
            build_endpoint_signatures(self, model)
        elif _is_keras_model(model):
            self._from_keras(model)
        elif isinstance(model, tf.Module):
            self._from_module(model)
        else:
            raise ConfigError(
                f"model factory returned {type(model).__name__}, not a Keras model, tf.Module or endpoints"
            )

    def _from_keras(self, model: Any) -> None:
        import tensorflow as tf

        if not model.inputs:
            raise ConfigError("model factory returned a Keras model without defined inputs; return a built functional model")
        specs = [
            tf.TensorSpec(shape=t.shape, dtype=t.dtype, name=_keras_tensor_name(t, f"input_{i}"))
            for i, t in enumerate(model.inputs)
        ]
        out_names = _keras_output_names(model, len(model.outputs))

        def call(*args):
            x = args[0] if len(args) == 1 else list(args)
            y = model(x, training=False)
            if isinstance(y, dict):
                return dict(y)
            ys = y if isinstance(y, (list, tuple)) else [y]
            return dict(zip(out_names, ys))

        serve = tf.function(call, input_signature=specs, autograph=False)
        self.root.serve = serve
        self.signatures = {SERVING_KEY: serve.get_concrete_function()}
        self.reference = call

    def _from_module(self, module: Any) -> None:
        import tensorflow as tf

        fns: dict[str, Any] = {}
        declared = getattr(module, "signatures", None)
        if isinstance(declared, dict):
            fns.update(declared)
        elif hasattr(module, "__call__") and hasattr(module.__call__, "get_concrete_function"):
            fns[SERVING_KEY] = module.__call__
        if not fns:
            raise ConfigError(
                "tf.Module from the model factory has no serving function: give it a tf.function "
                "__call__ with an input_signature, or a 'signatures' dict"
            )
        self.signatures = {}
        for key, fn in fns.items():
            try:
                self.signatures[key] = fn.get_concrete_function()
            except (TypeError, ValueError) as err:
                raise ConfigError(f"signature '{key}' needs an input_signature ({err})") from None
        self.root.module_fns = list(fns.values())
        first = self.signatures.get(SERVING_KEY) or next(iter(self.signatures.values()))

        def call(*args):
            out = first(*args)
            if isinstance(out, dict):
                return out
            outs = out if isinstance(out, (list, tuple)) else [out]
            return {f"output_{i}": t for i, t in enumerate(outs)}

        self.reference = call

    def input_specs(self, key: str = SERVING_KEY) -> list[Any]:
        fn = self.signatures[key]
        args, kwargs = fn.structured_input_signature
        specs = list(args) + [kwargs[k] for k in sorted(kwargs)]
        return specs


def sample_inputs(specs: list[Any], seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Deterministic inputs that fit ``specs`` (unknown dimensions become ``batch``)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        shape = [batch if d is None else d for d in (spec.shape.as_list() if spec.shape.rank is not None else [batch])]
        dtype = spec.dtype
        name = spec.name or f"input_{i}"
        if dtype.is_floating:
            arr = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_integer:
            arr = rng.integers(0, 10, size=shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_bool:
            arr = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.name == "string":
            arr = np.array([b"sample"] * int(np.prod(shape)), dtype="S6").reshape(shape)
        else:
            raise PipelineError(f"cannot generate sample input of dtype {dtype.name} for '{name}'")
        out[name] = arr
    return out


class Exporter:
    """Restores checkpoints of one model and writes them as SavedModels."""

    def __init__(self, model: Any, checkpoint_key: str = "model", example_signature: Any = None):
        self.serving = ServingModel(model)
        self.model = self.serving.model  # for endpoints, the model they track
        self.checkpoint_key = checkpoint_key
        variables = getattr(self.model, "variables", None)
        if variables is not None and len(variables) == 0:
            raise ConfigError("model from the factory has no variables yet; build it before returning it")
        if example_signature is not None:
            from tf_export_pipeline.export.examples import add_example_signature

            add_example_signature(self.serving, example_signature)

    @classmethod
    def from_config(cls, cfg) -> "Exporter":
        if not cfg.model.factory:
            raise ConfigError(f"model.factory is required to export TF checkpoints (.keras files need none): "
                              f"{cfg.source or cfg.training_dir}")
        factory = load_factory(cfg.model.factory, cfg.config_dir)
        try:
            model = factory()
        except Exception as err:
            raise ConfigError(f"model factory raised {type(err).__name__}: {err}: {cfg.model.factory}") from None
        try:
            return cls(model, cfg.model.checkpoint_key, cfg.model.example_signature)
        except ConfigError as err:
            raise ConfigError(f"{err}: {cfg.source or cfg.model.factory}") from None

    def restore(self, prefix: str) -> None:
        """Load ``prefix`` into the model; every model variable must come from it."""
        import tensorflow as tf

        ckpt = tf.train.Checkpoint(**{self.checkpoint_key: self.model})
        try:
            status = ckpt.read(prefix)
            status.assert_existing_objects_matched()
            status.expect_partial()  # optimizer slots and counters are not part of the served model
        except AssertionError as err:
            detail = str(err).splitlines()[0][:200]
            raise ModelMismatchError(
                f"checkpoint does not hold this model under key '{self.checkpoint_key}' ({detail}): {prefix}"
            ) from None
        except ValueError as err:
            detail = " ".join(str(err).split())[:240]
            raise ModelMismatchError(f"checkpoint is of a different model ({detail}): {prefix}") from None
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, IndexError) as err:
            # IndexError is how the checkpoint reader reports a short data shard.
            raise CheckpointError(
                f"checkpoint data is truncated or corrupt ({_first_line(err)}): {prefix}"
            ) from None
        except tf.errors.NotFoundError as err:
            raise CheckpointError(f"checkpoint file missing ({_first_line(err)}): {prefix}") from None
        except tf.errors.OpError as err:
            raise CheckpointError(f"cannot read checkpoint ({_first_line(err)}): {prefix}") from None

    def reference_outputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of the restored model itself, in this process (parity baseline)."""
        args = [inputs[s.name] for s in self.serving.input_specs()]
        out = self.serving.reference(*args)
        return {k: np.asarray(v) for k, v in out.items()}

    def write(self, directory: str) -> None:
        """Write a SavedModel with the serving signatures into ``directory`` (local).

        The first write of this exporter is a full ``tf.saved_model.save``; later
        ones reuse its graph and write only the variables (see
        :mod:`tf_export_pipeline.export.writer`).
        """
        if getattr(self, "_writer", None) is None:
            from tf_export_pipeline.export.writer import SavedModelWriter

            self._writer = SavedModelWriter()
        try:
            self._writer.write(self.serving.root, self.serving.signatures, directory)
        except Exception as err:
            if "No space left on device" in str(err):
                raise PipelineError(f"disk full (no space left on device) while writing the SavedModel: "
                                    f"{directory}") from None
            raise PipelineError(f"writing the SavedModel failed ({type(err).__name__}: {_first_line(err)}): {directory}") from None
        if getattr(self.serving, "example_spec", None):
            from tf_export_pipeline.export.examples import write_spec

            write_spec(directory, self.serving.example_spec)


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0][:240] if text else type(err).__name__


# TensorFlow's start-up lines that say nothing about the model: CPU features, the absence of a GPU.
_STARTUP_CHATTER = re.compile(
    r"oneDNN custom operations|Could not find cuda drivers|failed call to cuInit|cuda_platform\.cc|"
    r"cudart_stub\.cc|All log messages before absl::InitializeLog|This TensorFlow binary is optimized|"
    r"rebuild TensorFlow with the appropriate compiler flags|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|Attempting to register factory|TF-TRT Warning|"
    r"cpu_feature_guard\.cc|port\.cc:\d+\] oneDNN")


def import_tensorflow_quietly():
    """Import TensorFlow with its start-up chatter (oneDNN, CUDA probes on a CPU machine) kept off stderr.

    TensorFlow's C++ logs before absl is initialised ignore TF_CPP_MIN_LOG_LEVEL,
    so stderr's file descriptor is pointed at a temporary file for the import
    and the first op, then restored; what it caught that is not start-up
    chatter is written back to stderr, so real warnings still show.
    ``TF_EXPORT_VERBOSE=1`` keeps everything.
    """
    if os.environ.get("TF_EXPORT_VERBOSE") or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    caught = tempfile.TemporaryFile()
    try:
        os.dup2(caught.fileno(), 2)
        import tensorflow as tf

        tf.constant(0) + 0
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        caught.seek(0)
        kept = [line for line in caught.read().decode("utf-8", "replace").splitlines()
                if line.strip() and not _STARTUP_CHATTER.search(line)]
        caught.close()
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
            sys.stderr.flush()
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.constant(0) + 0
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return tf
