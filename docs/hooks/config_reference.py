"""The configuration reference, built from the pydantic models of ``tf_export_pipeline.config`` at every build.

Each section of the YAML file is a table of its keys: type, default and description, read from the
models' fields, so the page says what the code accepts. The page holds a marker where the tables go.

Example::

    from config_reference import reference_markdown
    print(reference_markdown())
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

#: Where the tables go in configuration.md.
MARKER = "<!-- config-reference -->"
#: How a field the YAML must give shows in the default column.
REQUIRED = "required"
#: How a section that may be left out shows in the default column: each of its keys has its own default.
SECTION_DEFAULT = "its keys' defaults"
#: The placeholder of a mapping's keys in a dotted key (``model.example_signature.features.<name>.dtype``).
ANY_NAME = "<name>"

_BOUNDS = ((annotated_types.Ge, "≥", "ge"), (annotated_types.Gt, ">", "gt"), (annotated_types.Le, "≤", "le"),
           (annotated_types.Lt, "<", "lt"), (annotated_types.MinLen, "length ≥", "min_length"),
           (annotated_types.MaxLen, "length ≤", "max_length"))


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """The annotation with ``None`` taken out of a union, and whether it was there."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return functools.reduce(operator.or_, args), True
    return annotation, False


def type_name(annotation: Any) -> str:
    """How a field's type reads in the reference: YAML's words, not Python's."""
    inner, optional = _without_none(annotation)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is Literal:
        text = " | ".join(yaml_value(a) for a in args)
    elif origin in (typing.Union, types.UnionType):
        text = " | ".join(type_name(a) for a in args)
    elif origin is list:
        text = f"list of {type_name(args[0])}" if args else "list"
    elif origin is dict:
        text = f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    elif _is_model(inner):
        text = "section"
    elif inner is Any:
        text = "any"
    else:
        text = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(inner, getattr(inner, "__name__",
                                                                                                     str(inner)))
    return f"{text} | null" if optional else text


def yaml_value(value: Any) -> str:
    """A value as it would be written in the YAML file."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


def default_text(field: FieldInfo) -> str:
    """The default column of a field: ``required``, or its default as YAML (a section's: its own defaults)."""
    if field.is_required():
        return REQUIRED
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return SECTION_DEFAULT
        return yaml_value(value)
    return yaml_value(field.default)


def bounds_text(field: FieldInfo) -> str:
    """The limits pydantic checks on a field (``≥ 1``, ``length ≥ 1``), as one phrase."""
    found = []
    for item in field.metadata:
        for kind, sign, attr in _BOUNDS:
            if isinstance(item, kind):
                found.append(f"{sign} {yaml_value(getattr(item, attr))}")
    return ", ".join(found)


def _sections(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """Each model under ``model`` with the dotted key it is found at, depth first, ``model`` itself first."""
    yield prefix, model
    for name, field in model.model_fields.items():
        inner, _ = _without_none(field.annotation)
        key = f"{prefix}.{name}" if prefix else name
        if _is_model(inner):
            yield from _sections(inner, key)
        elif typing.get_origin(inner) is dict and _is_model(typing.get_args(inner)[1]):
            yield from _sections(typing.get_args(inner)[1], f"{key}.{ANY_NAME}")


def fields(model: type[BaseModel] | None = None) -> Iterator[tuple[str, FieldInfo]]:
    """Every key of the config file, dotted (``validation.max_size_ratio``), with its pydantic field."""
    for prefix, section in _sections(model or _config_model(), ""):
        for name, field in section.model_fields.items():
            yield (f"{prefix}.{name}" if prefix else name), field


def _cell(text: str) -> str:
    """Text as one table cell that Markdown takes literally (``*.keras`` is no emphasis, ``[]`` no link)."""
    for char in "\\*_[]|":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;").replace("\n", " ")


def anchor(prefix: str) -> str:
    """The id of a section's heading: its dotted key with dashes (``model-example_signature``)."""
    return prefix.replace(".", "-").replace(ANY_NAME, "name") if prefix else "top-level"


def _code(text: str) -> str:
    # A backtick in a value (none today) would end the code span.
    return f"`{text}`" if "`" not in text else f"``{text}``"


def reference_markdown(model: type[BaseModel] | None = None) -> str:
    """The reference: one heading and one table per section of the config file."""
    out = []
    for prefix, section in _sections(model or _config_model(), ""):
        title = _code(prefix) if prefix else "Top level"
        out += [f"### {title} {{#{anchor(prefix)}}}", "", "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in section.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            limits = bounds_text(field)
            kind = type_name(field.annotation) + (f" ({limits})" if limits else "")
            default = default_text(field)
            default_cell = default if default in (REQUIRED, SECTION_DEFAULT) else _code(default)
            # A pipe inside a code span needs no escape in Python-Markdown's tables (an escape would show).
            row = (_code(key), _cell(kind), default_cell, _cell(field.description or ""))
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _config_model() -> type[BaseModel]:
    from tf_export_pipeline.config import Config

    return Config


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference_markdown())
    return markdown
