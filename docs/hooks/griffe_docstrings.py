"""The package's reStructuredText-flavoured docstrings read as Markdown by mkdocstrings.

The docstrings open with ``Example::`` and an indented block, and name code with ``double
backticks`` and roles (``:func:`~tf_export_pipeline.stages.discover```). Markdown would show the
colons and the roles as they are, so each docstring is rewritten once griffe has read it: the block
becomes a fenced one, the roles and double backticks plain code spans.

Example::

    from griffe_docstrings import markdown_from_rst
    print(markdown_from_rst("Example::\\n\\n    run_once(cfg)\\n"))
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`<]*?)(?:\s*<([^`>]*)>)?`")
_DOUBLE_BACKTICKS = re.compile(r"``(.+?)``")
_SHELL_STARTS = ("tf-export", "$ ", "python ", "airflow ", "curl ", "kubectl ", "docker ", "pip ", "make ")


def _role(match: re.Match) -> str:
    tilde, text, target = match.groups()
    if target is not None and text.strip():  # :class:`the hook <ExportHook>`: its title
        return f"`{text.strip()}`"
    name = (target or text).strip()
    return f"`{name.rsplit('.', 1)[-1] if tilde else name}`"


def _inline(text: str) -> str:
    return _DOUBLE_BACKTICKS.sub(r"`\1`", _ROLE.sub(_role, text))


def _language(block: str) -> str:
    lines = [line for line in block.splitlines() if line.strip()]
    return "sh" if lines and all(line.startswith(_SHELL_STARTS) for line in lines) else "python"


def markdown_from_rst(text: str) -> str:
    """A docstring with its literal blocks fenced and its inline markup as Markdown code spans."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(_inline(line))
            i += 1
            continue
        # "Example::" introduces the indented block below it; a lone "::" only introduces it.
        lead = line.rstrip()[:-2].rstrip()
        if lead:
            out.append(_inline(lead) + ":")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        k = j
        while k < len(lines) and (not lines[k].strip() or lines[k][:1] in (" ", "\t")):
            k += 1
        while k > j and not lines[k - 1].strip():
            k -= 1
        block = textwrap.dedent("\n".join(lines[j:k]))
        if block.strip():
            out += ["", f"```{_language(block)}", *block.splitlines(), "```", ""]
        i = k
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrites every docstring griffe reads (modules, classes, functions, attributes)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_from_rst(obj.docstring.value)
