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

from typing import Any

import numpy as np

from tf_export_pipeline.errors import CheckpointError, ConfigError, ModelMismatchError, PipelineError
from tf_export_pipeline.export.endpoints import build_endpoint_signatures, is_endpoints
from tf_export_pipeline.export.examples import add_example_signature, write_spec
from tf_export_pipeline.export.model import is_keras_model, load_factory, track_model
from tf_export_pipeline.export.naming import keras_output_names, keras_tensor_name
from tf_export_pipeline.export.writer import SavedModelWriter
from tf_export_pipeline.layout import SERVING_KEY


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
        # the tf.Example signature's feature spec, written beside the SavedModel (set by add_example_signature)
        self.example_spec: dict | None = None
        track_model(self.root, model)

        if is_endpoints(model):
            build_endpoint_signatures(self, model)
        elif is_keras_model(model):
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
            raise ConfigError("model factory returned a Keras model without defined inputs; "
                              "return a built functional model")
        specs = [
            tf.TensorSpec(shape=t.shape, dtype=t.dtype, name=keras_tensor_name(t, f"input_{i}"))
            for i, t in enumerate(model.inputs)
        ]
        out_names = keras_output_names(model, len(model.outputs))

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
        fns: dict[str, Any] = {}
        declared = getattr(module, "signatures", None)
        if isinstance(declared, dict):
            fns.update(declared)
        elif hasattr(module, "__call__") and hasattr(module.__call__, "get_concrete_function"):  # noqa: B004 - reads the attribute (may be set on the instance), not callability
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

            add_example_signature(self.serving, example_signature)

    @classmethod
    def from_config(cls, cfg) -> Exporter:
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

            self._writer = SavedModelWriter()
        try:
            self._writer.write(self.serving.root, self.serving.signatures, directory)
        except Exception as err:
            if "No space left on device" in str(err):
                raise PipelineError(f"disk full (no space left on device) while writing the SavedModel: "
                                    f"{directory}") from None
            raise PipelineError(f"writing the SavedModel failed ({type(err).__name__}: {_first_line(err)}): "
                                f"{directory}") from None
        if self.serving.example_spec:
            write_spec(directory, self.serving.example_spec)

def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0][:240] if text else type(err).__name__
