"""Hold points for crash and race tests.

Setting ``TF_EXPORT_TEST_HOLD=<point>`` makes the process print
``tf-export: holding at <point>`` to stderr when it reaches that point and wait
there until it is killed; ``<point>@<unix-time>`` waits only until that time, so
that several processes can be made to reach the point within the same second.
Nothing happens when the variable is unset.
"""

from __future__ import annotations

import os
import sys
import time

POINTS = ("exported", "validating", "claimed", "ledgered")


def hold(point: str) -> None:
    spec = os.environ.get("TF_EXPORT_TEST_HOLD")
    if not spec:
        return
    name, _, until = spec.partition("@")
    if name != point:
        return
    print(f"tf-export: holding at {point}", file=sys.stderr, flush=True)
    if until:
        delay = float(until) - time.time()
        if delay > 0:
            time.sleep(delay)
        return
    while True:
        time.sleep(3600)
