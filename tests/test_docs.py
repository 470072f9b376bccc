"""The documentation against the code: what `make docs` builds must not drift from what the package does.

The site itself is built strictly by `make docs` (part of `make test`); these checks are the fast ones
that name the drift: a config key missing from the generated reference, a README link into the site
that leads nowhere, an API page naming a module that moved.
"""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

import markdown
import pytest
import yaml
from pydantic import BaseModel

from tf_export_pipeline.config import Config, config_from_dict

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 300


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_reference = _hook("config_reference")


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: itself, inside Optional, a list or a dict's values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _every_field(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """Every (dotted key, field) of a model and of every model below it; a mapping's keys as ``<name>``."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append((key, field))
        is_mapping = typing.get_origin(field.annotation) is dict
        for sub in _models_in(field.annotation):
            out += _every_field(sub, f"{key}.<name>." if is_mapping else f"{key}.")
    return out


def _rows(reference: str) -> dict[str, list[str]]:
    """The reference's table rows by key: ``{key: [type, default, description]}``."""
    rows = {}
    for line in reference.splitlines():
        match = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if match:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", match.group(2))]
            rows[match.group(1)] = cells
    return rows


def test_every_config_key_is_in_the_reference_with_its_default_and_a_description():
    reference = config_reference.reference_markdown()
    rows = _rows(reference)
    fields = _every_field(Config)
    assert len(fields) > 40  # the walk went into the sections
    for key, field in fields:
        assert key in rows, f"config key {key} is missing from the generated reference"
        _type, default, description = rows[key]
        expected = config_reference.default_text(field)
        assert default in (expected, f"`{expected}`"), f"{key}: default {default!r}, the model says {expected!r}"
        assert field.description, f"{key} has no Field(description=...) in pipeline/config.py"
        assert description, f"{key}: empty description in the reference"
    assert set(rows) == {key for key, _ in fields}, "the reference lists keys the models do not have"


def test_reference_defaults_are_the_models_defaults():
    rows = _rows(config_reference.reference_markdown())
    assert rows["versioning"][1] == "`timestamp`"
    assert rows["retention.keep"][1] == "`5`"
    assert rows["validation.max_graph_bytes"][1] == f"`{1 << 30}`"
    assert rows["validation.max_latency_ratio"][1] == "`1.5`"
    assert rows["airflow.schedule"][1] == "`'@daily'`"
    assert rows["training_dir"][1] == "required"
    assert rows["gate.metric"][1] == "required"
    assert "≥ 1" in rows["retention.keep"][0]


def test_configuration_page_places_the_reference_and_its_example_is_a_valid_config(tmp_path):
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert config_reference.MARKER in page
    example = re.search(r"```yaml\n(.*?)```", page, re.S).group(1)
    data = yaml.safe_load(example)
    cfg = config_from_dict(data, str(tmp_path))
    assert set(data) == set(Config.model_fields), "the example leaves out a section of the config"
    assert cfg.serving is not None and cfg.gate is not None


def test_readme_example_config_is_valid(tmp_path):
    text = README.read_text(encoding="utf-8")
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        config_from_dict(yaml.safe_load(block), str(tmp_path))


def _ids(page: Path) -> set[str]:
    """The anchors of a page as the site renders it (the generated reference included)."""
    text = page.read_text(encoding="utf-8")
    text = text.replace(config_reference.MARKER, config_reference.reference_markdown())
    md = markdown.Markdown(extensions=["toc", "attr_list", "tables", "pymdownx.superfences"])
    md.convert(text)
    found = set()

    def walk(tokens):
        for token in tokens:
            found.add(token["id"])
            walk(token["children"])

    walk(md.toc_tokens)
    return found


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text


def test_every_readme_link_leads_to_a_page_and_anchor_of_the_site():
    links = [link for link in _links(README.read_text(encoding="utf-8"))
             if not re.match(r"^[a-z]+:", link)]  # http:, https:, mailto:
    assert links, "the README links into the site"
    for link in links:
        target, _, anchor = link.partition("#")
        assert target.startswith("docs/"), f"README link {link} leads outside the site (docs/)"
        page = ROOT / target
        assert page.is_file(), f"README link {link}: no such page"
        if anchor:
            assert anchor in _ids(page), f"README link {link}: {target} has no heading #{anchor}"


@pytest.mark.parametrize("page", sorted(p.relative_to(DOCS).as_posix() for p in (DOCS / "api").glob("*.md")))
def test_api_pages_name_modules_that_exist(page):
    names = re.findall(r"^::: (\S+)$", (DOCS / page).read_text(encoding="utf-8"), re.M)
    for name in names:
        assert importlib.util.find_spec(name) is not None, f"{page}: module {name} does not exist"
