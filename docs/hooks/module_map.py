"""The architecture page's module map, read from the sources at every build.

Each module of the installed package (``tf_export_pipeline`` and its ``operators``) with the first
paragraph of its docstring, so the map follows the modules as they are split, merged or moved.

Example::

    from pathlib import Path
    from module_map import module_map_markdown
    print(module_map_markdown(Path(".")))
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from api_sources import package_dirs
from griffe_docstrings import markdown_from_rst

#: Where the map goes in architecture.md.
MARKER = "<!-- module-map -->"


def modules(repo: Path) -> Iterator[tuple[str, Path]]:
    """Each module's import name and file, in name order, a package's ``__init__.py`` under the package's name."""
    found = {}
    for package, folder in package_dirs(repo).items():
        base = repo / folder
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if "__pycache__" in parts or parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    yield from sorted(found.items())


def summary(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line, as Markdown."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = docstring.split("\n\n", 1)[0]
    return " ".join(markdown_from_rst(first).split())


def module_map_markdown(repo: Path) -> str:
    """A table of every module: its import name and what it holds."""
    rows = ["| module | what it holds |", "|---|---|"]
    for name, path in modules(repo.resolve()):
        text = summary(path).replace("|", "\\|")
        rows.append(f"| `{name}` | {text} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, module_map_markdown(Path(config.config_file_path).parent))
    return markdown
