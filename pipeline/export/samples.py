"""The validation samples of ``validation.samples``: read, and checked against the serving signature's inputs.

Example::

    from tf_export_pipeline.export.samples import fit_samples, load_samples
    given = load_samples("/data/samples.npz")                 # name -> array, at least one row each
    inputs = fit_samples(given, exporter.serving.input_specs(), "/data/samples.npz")

Samples that cannot feed the model are a mistake in the config, not a failure
of the model: they are refused with a :class:`ConfigError` naming the input,
what it takes, what was given and the file, before anything is exported (the
model itself would raise a bare ValueError, worded by Keras).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_export_pipeline.errors import ConfigError


def load_samples(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (no pickles); every array of one dimension or more must hold a row."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"validation samples file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"validation samples file is a directory: {path}") from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"validation samples are not a plain .npz ({err}): {path}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConfigError(f"validation samples are one array, not an .npz of one array per input: {path}")
    try:
        with data:
            given = {k: data[k] for k in data.files}
    except (ValueError, OSError) as err:  # e.g. an object array inside, which needs pickle
        raise ConfigError(f"validation samples are not a plain .npz ({err}): {path}") from None
    for name, array in given.items():
        if array.ndim >= 1 and array.shape[0] == 0:
            raise ConfigError(f"validation samples hold no rows for input '{name}' (given {_given(array)}); "
                              f"give at least one: {path}")
    return given


def fit_samples(given: dict[str, np.ndarray], specs: list[Any], path: str) -> dict[str, np.ndarray]:
    """``given`` as the inputs of ``specs`` (``tf.TensorSpec``), one array each, cast to the input's dtype.

    A cast must not change a value's kind: integers may feed a float input, floats an input of
    narrower floats, but floats never an integer input, complex numbers never a real one, and
    only text (bytes or str, sent as UTF-8) a string input.
    """
    names = [s.name for s in specs]
    missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing or extra:
        raise ConfigError(f"validation samples do not match the inputs of serving_default {names} "
                          f"(missing {missing}, extra {extra}): {path}")
    return {spec.name: _fit(given[spec.name], spec, path) for spec in specs}


def _fit(array: np.ndarray, spec: Any, path: str) -> np.ndarray:
    dims = spec.shape.as_list() if spec.shape.rank is not None else None
    shape_ok = dims is None or (array.ndim == len(dims) and all(d is None or d == n for d, n in zip(dims, array.shape)))
    fitted = _cast(array, spec.dtype) if shape_ok else None
    if fitted is None:
        expected = f"{spec.dtype.name} {dims if dims is not None else '[unknown rank]'}"
        raise ConfigError(f"validation samples do not fit input '{spec.name}' of serving_default: expected "
                          f"{expected}, given {_given(array)}: {path}")
    return fitted


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray | None:
    """``array`` as ``dtype`` (a ``tf.DType``), or None when that would change what the values are."""
    kind = array.dtype.kind
    if dtype.name == "string":
        if kind == "S":
            return array
        # Fixed-width bytes, as _plain_arrays keeps them: TensorFlow takes them as they are.
        return np.char.encode(array, "utf-8") if kind == "U" else None
    target = np.dtype(dtype.as_numpy_dtype)
    if dtype.is_bool:
        return array if kind == "b" else None
    if kind not in "biuf":
        return None
    try:
        same_kind = np.can_cast(array.dtype, target, casting="same_kind")
    except TypeError:  # a dtype numpy does not rank (bfloat16): numbers of the same kind, or integers to floats
        same_kind = kind == target.kind or (kind in "biu" and dtype.is_floating)
    return array.astype(target) if same_kind else None


def _given(array: np.ndarray) -> str:
    return f"{array.dtype} {array.shape}"
