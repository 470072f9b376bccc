"""Names of a signature's inputs and outputs: what TF Serving clients send and get back.

Example::

    from tf_export_pipeline.export.naming import clean_name
    assert clean_name("dense_1/BiasAdd:0", "output_0") == "dense_1/BiasAdd"
"""

from __future__ import annotations

import re
from typing import Any

# Characters a SavedModel signature key may hold; anything else becomes "_".
_NAME_OK = re.compile(r"[^A-Za-z0-9_.\-/]")


def clean_name(name: str, fallback: str) -> str:
    """``name`` without its ``:0`` suffix and with unusable characters replaced; ``fallback`` when empty."""
    name = (name or "").split(":")[0]
    name = _NAME_OK.sub("_", name)
    return name or fallback


def keras_tensor_name(tensor: Any, fallback: str) -> str:
    """A Keras tensor's own name; an auto-generated ``keras_tensor_N`` gives way to its layer's name."""
    name = getattr(tensor, "name", "") or ""
    if name.startswith("keras_tensor"):
        history = getattr(tensor, "_keras_history", None)
        layer = getattr(history[0], "name", "") if history else ""
        name = layer or name
    return clean_name(name, fallback)


def keras_output_names(model: Any, n: int) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != n:
        names = [keras_tensor_name(t, f"output_{i}") for i, t in enumerate(model.outputs)]
    if len(set(names)) != n:
        names = [f"output_{i}" for i in range(n)]
    return names
