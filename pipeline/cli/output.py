"""What a command leaves on the terminal: its result, its one-line error or warning, its exit status.

Example::

    emit(args, {"version": 3}, "published version 3")  # one JSON document with --json, else the line
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

from tf_export_pipeline.redaction import redact

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def emit(args, data: Any, human: str) -> None:
    """A command's result on stdout: ``data`` as one JSON document with ``--json``, else ``human``; redacted."""
    if args.json:
        sys.stdout.write(redact(json.dumps(data, indent=1, default=str)) + "\n")
    else:
        print(redact(human))


# Terminal escapes (CSI colours, OSC links, two-byte escapes) and the other control characters: Keras puts
# some in its messages, and they would reach a log file or an Airflow task log as they are.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def one_line(message: str) -> str:
    """``message`` as plain text on one line."""
    return re.sub(r"\s*\n\s*", " ", _ESCAPES.sub("", message)).strip()


def error(message: str) -> None:
    """The one line of a failed command, on stderr; never a secret."""
    print(f"tf-export: error: {redact(one_line(message))}", file=sys.stderr)


def warn(message: str) -> None:
    """A warning on stderr, on one line; never a secret."""
    print(f"tf-export: warning: {redact(one_line(message))}", file=sys.stderr)


def failed(args, message: str, code: int) -> int:
    """End a failed command: its one line on stderr and, for ``run --json``, its record on stdout, so a
    script that reads the record learns why as well as that nothing was published."""
    message = one_line(message)
    error(message)
    if getattr(args, "json", False) and args.command == "run":
        record = {"status": "failed", "version": None, "path": None, "checkpoint": args.checkpoint, "step": None,
                  "error": message, "exit_code": code}
        sys.stdout.write(redact(json.dumps(record, indent=1)) + "\n")
    return code


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*map(str, r)) for r in rows])
