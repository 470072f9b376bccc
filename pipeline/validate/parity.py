"""Output parity: whether two sets of named outputs agree, within tolerances for numbers, exactly otherwise.

Used for the exported model against the restored checkpoint, and for the
tf.Example signature against ``serving_default``.

Example::

    import numpy as np
    from tf_export_pipeline.validate.parity import compare_outputs
    problems, diffs = compare_outputs({"y": np.ones(2)}, {"y": np.ones(2)}, rtol=1e-5, atol=1e-6)
    assert problems == {} and diffs == {"y": 0.0}
"""

from __future__ import annotations

from typing import Any

import numpy as np


def compare_outputs(got: dict[str, Any], want: dict[str, np.ndarray], rtol: float, atol: float
                    ) -> tuple[dict[str, str], dict[str, float]]:
    """Per output of ``want`` that ``got`` does not match: ``"missing"``, ``"shape [..] != [..]"`` or
    ``"values"``; and the largest absolute difference of each numeric output of matching shape."""
    problems: dict[str, str] = {}
    diffs: dict[str, float] = {}
    for name, ref in want.items():
        have = got.get(name)
        if have is None:
            problems[name] = "missing"
            continue
        have = np.asarray(have)
        if have.shape != ref.shape:
            problems[name] = f"shape {list(have.shape)} != {list(ref.shape)}"
            continue
        if have.dtype.kind in "OSUb" or ref.dtype.kind in "OSUb":  # strings and booleans: exactly
            if not np.array_equal(have, ref):
                problems[name] = "values"
            continue
        diffs[name] = float(np.max(np.abs(have.astype("float64") - ref.astype("float64")))) if have.size else 0.0
        if not np.allclose(have, ref, rtol=rtol, atol=atol, equal_nan=False):
            problems[name] = "values"
    return problems, diffs
