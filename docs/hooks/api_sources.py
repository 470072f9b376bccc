"""The package's sources laid out under their import names, for mkdocstrings to read.

The repository's ``pipeline/`` is installed as ``tf_export_pipeline`` and ``operators/`` as
``tf_export_pipeline.operators`` (``[tool.setuptools.package-dir]`` of pyproject.toml). griffe reads
sources statically and looks packages up by folder name, so each build lays out
``build/api-src/tf_export_pipeline/`` anew: a symlink to every entry of ``pipeline/`` and one to
``operators/``. Laid out at each build, it follows whatever modules the folders hold then.

Example::

    from pathlib import Path
    from api_sources import lay_out_sources
    lay_out_sources(Path("."), Path("build/api-src"))
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mkdocs.plugins import event_priority

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

#: Where the tree is laid out, from the repository's root; mkdocs.yml's mkdocstrings ``paths`` names it.
SOURCE_ROOT = "build/api-src"


def package_dirs(repo: Path) -> dict[str, str]:
    """Each installed package and the repository folder it comes from, as pyproject.toml maps them."""
    with open(repo / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["setuptools"]["package-dir"])


def lay_out_sources(repo: Path, root: Path) -> None:
    """Lay out ``root/<package path>`` for every mapped package, outer packages first."""
    repo, root = repo.resolve(), repo.resolve() / root
    for package, folder in sorted(package_dirs(repo).items(), key=lambda item: item[0].count(".")):
        target = root.joinpath(*package.split("."))
        if "." in package:  # inside an outer package laid out just before
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(repo / folder, target_is_directory=True)
            continue
        if target.is_symlink():
            target.unlink()
        shutil.rmtree(target, ignore_errors=True)  # symlinks in it are removed, never followed
        target.mkdir(parents=True)
        for entry in sorted((repo / folder).iterdir()):
            if entry.name != "__pycache__":
                (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


@event_priority(100)  # before mkdocstrings reads anything
def on_config(config):
    lay_out_sources(Path(config.config_file_path).parent, Path(SOURCE_ROOT))
    return config
