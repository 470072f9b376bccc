"""One closing line for a suite run in several parts: ``python -m tests.summary A.xml B.xml ...``.

``make test`` runs the suite in two pytest runs (a parallel part and the
tests marked ``alone``); each writes a JUnit XML report. This adds them up,
prints the seconds of each test file (slowest first, to ``build/durations.txt``
too), and ends with one line ``tests: N passed, N failed, N skipped``. Exit
status 1 when a test failed or errored, or when no test ran at all.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def read(paths: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    per_file: dict[str, float] = defaultdict(float)
    for path in paths:
        if not Path(path).is_file():
            print(f"tests.summary: no report at {path} (that part did not run)", file=sys.stderr)
            counts["failed"] += 1
            continue
        root = ET.parse(path).getroot()
        for suite in root.iter("testsuite"):
            print(f"{path}: {float(suite.get('time') or 0):.1f} s wall")
        for case in root.iter("testcase"):
            module = (case.get("classname") or "").split(".")
            # classname is tests.x.test_y[.Class]: the file is the part that starts with test_
            file = "/".join(module[: next((i + 1 for i, m in enumerate(module) if m.startswith("test_")),
                                          len(module))]) + ".py"
            per_file[file] += float(case.get("time") or 0)
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return counts, dict(per_file)


def main(argv: list[str]) -> int:
    counts, per_file = read(argv)
    lines = [f"{seconds:8.1f} s  {file}" for file, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])]
    Path("build").mkdir(exist_ok=True)
    Path("build/durations.txt").write_text("\n".join(lines) + "\n")
    print("seconds per test file (summed over workers):")
    print("\n".join(lines[:15]))
    print(f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    ran = counts["passed"] + counts["failed"]
    return 1 if counts["failed"] or not ran else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
