"""The site's home page is the repository's README, its links into ``docs/`` made relative to the site.

The README is the front page on the repository host and links to the pages as ``docs/<page>.md``;
in the site those pages are at ``<page>.md``. A link of the README that leads anywhere else but a
page or an absolute URL would break in the site (and ``mkdocs build --strict`` says so).

Example::

    from readme_home import home_markdown
    print(home_markdown(open("README.md").read())[:200])
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

#: The folder of the pages, as the README's links spell it.
DOCS_PREFIX = "docs/"
#: The home page's name in the site.
HOME = "index.md"

# An inline link or image target: ](docs/...) in Markdown, src="docs/..." in HTML.
_TARGET = re.compile(r"(\]\(|src=\"|href=\")" + re.escape(DOCS_PREFIX))


def home_markdown(readme: str) -> str:
    """The README with its ``docs/`` links made relative to the docs folder."""
    return _TARGET.sub(r"\1", readme)


def on_files(files, config):
    readme = Path(config.config_file_path).parent / "README.md"
    files.append(File.generated(config, HOME, content=home_markdown(readme.read_text(encoding="utf-8"))))
    return files
