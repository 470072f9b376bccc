"""Writing SavedModels of one model many times, paying for the graph once.

Between two checkpoints of the same model only the variable values change. The
graph, the function library and so ``saved_model.pb`` (and ``assets/``) do not:
they depend on the traced functions and on which variables exist, not on their
values. So the first write is a full ``tf.saved_model.save``; it becomes the
template, kept in memory (``saved_model.pb`` and ``assets/`` are small beside
the variables, and a template on disk outlives a process that is killed or
ends without closing it). Every later write writes the template's
``saved_model.pb`` and ``assets/``, the variables with the same object graph the full save used
(so every key is the same), checks that the keys and shapes match the
template's, and computes ``fingerprint.pb`` anew from the files on disk.

Example::

    writer = SavedModelWriter()
    for prefix in checkpoints:
        restore(prefix)                       # new values into the same variables
        writer.write(root, signatures, f"/exports/{step}")

If anything about the variables differs from the template (a variable created
late, a different shape), that write falls back to a full save and becomes the
new template: the fast path is an optimisation, never a different result.
"""

from __future__ import annotations

import os
import shutil

from tf_export_pipeline.layout import SAVED_MODEL_PB

VARIABLES = os.path.join("variables", "variables")


def _variable_layout(prefix: str) -> list[tuple[str, tuple]]:
    import tensorflow as tf

    return sorted((name, tuple(shape)) for name, shape in tf.train.list_variables(prefix))


class SavedModelWriter:
    """Writes SavedModels of one ``root`` object; reuses the first one's graph."""

    def __init__(self) -> None:
        # relative path -> bytes (None: a folder): saved_model.pb, assets/...
        self._template: dict[str, bytes | None] | None = None
        self._layout: list[tuple[str, tuple]] | None = None
        self._root_id: int | None = None
        self.full_writes = 0
        self.fast_writes = 0

    def write(self, root, signatures: dict, directory: str) -> str:
        """Write a SavedModel of ``root`` into ``directory``; returns ``"full"`` or ``"fast"``."""
        if self._template is not None and self._root_id == id(root):
            if self._write_fast(root, directory):
                self.fast_writes += 1
                return "fast"
        self._write_full(root, signatures, directory)
        self.full_writes += 1
        return "full"

    def _write_full(self, root, signatures: dict, directory: str) -> None:
        import tensorflow as tf

        track_captured_variables(root, signatures)
        tf.saved_model.save(root, directory, signatures=signatures)
        self.close()
        self._template = _read_files(directory, [SAVED_MODEL_PB, "assets"])
        self._layout = _variable_layout(os.path.join(directory, VARIABLES))
        self._root_id = id(root)

    def _write_fast(self, root, directory: str) -> bool:
        from tensorflow.python.checkpoint import checkpoint as checkpoint_lib
        from tensorflow.python.checkpoint import graph_view

        os.makedirs(os.path.join(directory, "variables"), exist_ok=False)
        prefix = os.path.join(directory, VARIABLES)
        checkpoint_lib.TrackableSaver(graph_view.ObjectGraphView(root)).save(prefix)
        if _variable_layout(prefix) != self._layout:
            shutil.rmtree(directory)
            return False
        assert self._template is not None  # write() takes the fast path only once a full write made one
        for rel, data in self._template.items():
            target = os.path.join(directory, rel)
            if data is None:
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(data)
        write_fingerprint(directory)
        return True

    def close(self) -> None:
        """Forget the template: the next write is a full one."""
        self._template = None


def _read_files(directory: str, names: list[str]) -> dict[str, bytes | None]:
    """The bytes of each file in ``names`` below ``directory``, and of every file in a folder among them
    (each folder maps to None, so that an empty one is written too)."""
    out: dict[str, bytes | None] = {}
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            for dirpath, _dirs, files in os.walk(path):
                out[os.path.relpath(dirpath, directory)] = None
                for file in files:
                    full = os.path.join(dirpath, file)
                    with open(full, "rb") as fh:
                        out[os.path.relpath(full, directory)] = fh.read()
        elif os.path.isfile(path):
            with open(path, "rb") as fh:
                out[name] = fh.read()
    return out


def track_captured_variables(root, signatures: dict) -> None:
    """Track on ``root`` the plain ``tf.Variable`` objects the signatures read.

    Keras 3 wraps its variables; a SavedModel that reaches them only through the
    Keras objects loads in TF2 but not in the TF1-style session loader that
    TF Serving and ``saved_model_cli run`` use ("Could not find variable ...").
    Tracking the captured variables themselves, as Keras's own export does,
    makes the variables checkpoint restorable by both.
    """
    seen: dict[int, object] = {}  # id -> variable: each once, in first-seen order
    for fn in signatures.values():
        for var in getattr(fn, "variables", ()):
            seen.setdefault(id(var), var)
    root._serving_variables = list(seen.values())


def write_fingerprint(directory: str) -> None:
    """``fingerprint.pb`` computed from the files in ``directory``, as ``tf.saved_model.save`` does."""
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting as fingerprinting_pywrap

    data = fingerprinting_pywrap.CreateFingerprintDef(directory)
    tmp = os.path.join(directory, "fingerprint.pb.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, os.path.join(directory, "fingerprint.pb"))
