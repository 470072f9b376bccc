"""Hold points for crash and race tests.

Setting ``TF_EXPORT_TEST_HOLD=<point>`` makes the process print
``tf-export: holding at <point>`` to stderr when it reaches that point and wait
there until it is killed. ``<point>@<path>`` waits only until the file
``<path>`` exists, so that a test can release several processes at the same
instant. ``<point>#<n>`` holds only the n-th time the process reaches the
point (the second export of a backfill task, say). Nothing happens when the
variable is unset.
"""

from __future__ import annotations

import os
import sys
import time

POINTS = ("restored", "exported", "staged", "validating", "publishing", "claimed", "ledgered", "promoting")


_REACHED: dict[str, int] = {}


def hold(point: str) -> None:
    spec = os.environ.get("TF_EXPORT_TEST_HOLD")
    if not spec:
        return
    name, _, release = spec.partition("@")
    name, _, nth = name.partition("#")
    if name != point:
        return
    _REACHED[point] = _REACHED.get(point, 0) + 1
    if nth and _REACHED[point] != int(nth):
        return
    print(f"tf-export: holding at {point}", file=sys.stderr, flush=True)
    while not (release and os.path.exists(release)):
        time.sleep(0.005)
