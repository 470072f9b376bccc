"""One closing line for a suite run in several parts: ``python -m tests.summary A.xml B.xml ...``.

``make test`` runs the suite in two pytest runs (a parallel part and the
tests marked ``alone``); each writes a JUnit XML report. This adds them up,
prints the seconds of each test file (slowest first, to ``build/durations.txt``
too), names each failed test with the first line of its failure (so the end of a
CI log says what failed), and ends with one line ``tests: N passed, N failed,
N skipped``. Exit
status 1 when a test failed or errored, or when no test ran at all.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def first_line(case: ET.Element) -> str:
    outcome = case.find("failure")
    if outcome is None:
        outcome = case.find("error")
    message = (outcome.get("message") or outcome.text or "").strip() if outcome is not None else ""
    return (message.splitlines() or [""])[0][:200]


def read(paths: list[str]) -> tuple[dict[str, int], dict[str, float], list[str]]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures: list[str] = []
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
                failures.append(f"{file}::{case.get('name')}: {first_line(case)}")
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return counts, dict(per_file), failures


def main(argv: list[str]) -> int:
    counts, per_file, failures = read(argv)
    lines = [f"{seconds:8.1f} s  {file}" for file, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])]
    Path("build").mkdir(exist_ok=True)
    Path("build/durations.txt").write_text("\n".join(lines) + "\n")
    print("seconds per test file (summed over workers):")
    print("\n".join(lines[:15]))
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    ran = counts["passed"] + counts["failed"]
    return 1 if counts["failed"] or not ran else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
