"""``.keras`` files exported through the :class:`~tf_export_pipeline.export.Exporter` interface.

Each file carries its own model, so ``restore`` loads the file (with Keras,
imported then) instead of restoring variables into a factory's model.

Example::

    exporter = KerasFileExporter(cfg)
    exporter.restore("/data/train/model-12.keras")
    exporter.write("/tmp/staged_model")
"""

from __future__ import annotations

from typing import Any

from tf_export_pipeline.checkpoints.keras_files import archive_problem
from tf_export_pipeline.errors import CheckpointError, ConfigError, PipelineError
from tf_export_pipeline.export import Exporter


class KerasFileExporter:
    """The :class:`tf_export_pipeline.export.Exporter` interface for ``.keras`` files: ``restore`` loads the file."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._inner: Exporter | None = None

    def restore(self, path: str) -> None:
        problem = archive_problem(path)
        if problem:
            raise CheckpointError(f"not a whole Keras model file, missing {problem}: {path}")
        import keras  # only here: loading a file is the one step that needs it

        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as err:  # whatever Keras raises for a file it cannot revive
            text = " ".join(str(err).split())[:240]
            raise CheckpointError(f"cannot load Keras model file ({type(err).__name__}: {text}): {path}") from None
        if not getattr(model, "inputs", None):
            raise CheckpointError(f"the Keras model in the file has no defined inputs (a subclassed model?); "
                                  f"export it with a factory instead: {path}")
        try:
            self._inner = Exporter(model, example_signature=self.cfg.model.example_signature)
        except ConfigError as err:
            raise ConfigError(f"{err}: {self.cfg.source or path}") from None

    @property
    def serving(self):
        return self._loaded().serving

    def reference_outputs(self, inputs):
        return self._loaded().reference_outputs(inputs)

    def write(self, directory: str) -> None:
        self._loaded().write(directory)

    def _loaded(self) -> Exporter:
        if self._inner is None:
            raise PipelineError("no Keras file was loaded before export")
        return self._inner
