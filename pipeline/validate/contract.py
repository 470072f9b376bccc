"""Signature contracts and the breaking-change diff between two SavedModels.

Both work on the plain description of signatures that validation reports::

    {"serving_default": {"method": "tensorflow/serving/predict",
                         "inputs":  {"features": {"dtype": "float32", "shape": [-1, 4]}},
                         "outputs": {"score":    {"dtype": "float32", "shape": [-1, 1]}}}}

Example::

    from tf_export_pipeline.validate.contract import load_contract, check_contract
    problems = check_contract(load_contract("contract.yaml"), report["signatures"])

A contract file (YAML)::

    require_serving_default: true        # the default
    signatures:
      serving_default:
        method: tensorflow/serving/predict
        inputs:
          features: {dtype: float32, shape: [-1, 4]}   # -1 or null: any size
        outputs:
          score: {dtype: float32, shape: [-1, 1]}
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from tf_export_pipeline.config import DuplicateKey, StrictLoader
from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.layout import PREDICT_METHOD, SERVING_KEY


def _norm_shape(shape: Any) -> list[int] | None:
    if shape is None:
        return None
    return [-1 if d is None else int(d) for d in shape]


def load_contract(path: str) -> dict:
    """Read and check a contract file; returns ``{"require_serving_default": bool, "signatures": {...}}``."""
    if not os.path.isfile(path):
        raise ConfigError(f"contract file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=StrictLoader) or {}
    except DuplicateKey as err:
        raise ConfigError(f"invalid contract: {err}: {path}") from None
    except yaml.YAMLError:
        raise ConfigError(f"contract is not valid YAML: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"contract cannot be read ({type(err).__name__}): {path}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid contract: needs a mapping with a 'signatures' mapping, not a "
                          f"{type(data).__name__}: {path}")
    unknown = {str(k) for k in data} - {"require_serving_default", "signatures"}
    if unknown or not isinstance(data.get("signatures"), dict):
        what = f"unknown key '{sorted(unknown)[0]}'" if unknown else "needs a 'signatures' mapping"
        raise ConfigError(f"invalid contract: {what}: {path}")
    sigs = {}
    for key, sig in data["signatures"].items():
        sig = sig or {}
        if not isinstance(sig, dict):
            raise ConfigError(f"invalid contract: signatures.{key} needs a mapping (method, inputs, outputs): {path}")
        extra = {str(k) for k in sig} - {"method", "inputs", "outputs"}
        if extra:
            raise ConfigError(f"invalid contract: unknown key 'signatures.{key}.{sorted(extra)[0]}': {path}")
        entry = {"method": sig.get("method", PREDICT_METHOD)}
        for kind in ("inputs", "outputs"):
            tensors = {}
            declared = sig.get(kind) or {}
            if not isinstance(declared, dict):
                raise ConfigError(f"invalid contract: signatures.{key}.{kind} needs a mapping of names to "
                                  f"{{dtype, shape}}: {path}")
            for name, spec in declared.items():
                if not isinstance(spec, dict) or "dtype" not in spec:
                    raise ConfigError(f"invalid contract: signatures.{key}.{kind}.{name} needs a dtype: {path}")
                shape = spec.get("shape")
                if shape is not None and not (isinstance(shape, list) and all(
                        d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in shape)):
                    raise ConfigError(f"invalid contract: signatures.{key}.{kind}.{name}.shape must be a list of "
                                      f"sizes (-1 or null: any), got {shape!r}: {path}")
                tensors[name] = {"dtype": str(spec["dtype"]), "shape": _norm_shape(shape)}
            entry[kind] = tensors
        sigs[key] = entry
    return {"require_serving_default": bool(data.get("require_serving_default", True)), "signatures": sigs}


def _fmt(t: dict | None) -> str:
    if t is None:
        return "nothing"
    return f"{t['dtype']} {t['shape'] if t['shape'] is not None else '[unknown rank]'}"


def check_contract(contract: dict, found: dict) -> list[str]:
    """Every way ``found`` differs from ``contract``; empty when it holds exactly."""
    problems = []
    if contract.get("require_serving_default", True) and SERVING_KEY not in found:
        problems.append(f"signature 'serving_default' is required but missing (found: {sorted(found) or 'none'})")
    for key, want in contract["signatures"].items():
        got = found.get(key)
        if got is None:
            problems.append(f"signature '{key}': expected by the contract, not found")
            continue
        if want["method"] != got.get("method"):
            problems.append(f"signature '{key}': method expected {want['method']}, found {got.get('method')}")
        for kind in ("inputs", "outputs"):
            label = kind[:-1]
            w, g = want[kind], got.get(kind, {})
            for name in sorted(set(w) - set(g)):
                problems.append(f"signature '{key}' {label} '{name}': expected {_fmt(w[name])}, "
                                f"found nothing (missing)")
            for name in sorted(set(g) - set(w)):
                problems.append(f"signature '{key}' {label} '{name}': expected nothing, found {_fmt(g[name])} (extra)")
            for name in sorted(set(w) & set(g)):
                if w[name]["dtype"] != g[name]["dtype"] or not _shape_matches(w[name]["shape"], g[name]["shape"]):
                    problems.append(f"signature '{key}' {label} '{name}': expected {_fmt(w[name])}, "
                                    f"found {_fmt(g[name])}")
    return problems


def _shape_matches(want: list[int] | None, got: list[int] | None) -> bool:
    if want is None or got is None:
        return want == got
    return len(want) == len(got) and all(w == g for w, g in zip(want, got))


def _accepts_fewer(old: list[int] | None, new: list[int] | None) -> bool:
    """True when a tensor of shape ``new`` accepts fewer inputs than one of shape ``old``."""
    if new is None:
        return False
    if old is None:
        return True
    if len(old) != len(new):
        return True
    return any(o != n and n != -1 for o, n in zip(old, new))


def diff_signatures(live: dict, staged: dict) -> dict:
    """Breaking changes and additions from the live version's signatures to the staged ones.

    Breaking: a removed signature, a removed or renamed input or output, a new
    input (existing clients do not send it), a dtype change, a method change, a
    shape that accepts fewer inputs. Allowed: new signatures, new outputs, shapes
    that accept more.
    """
    breaking, additions, widened = [], [], []
    for key in sorted(set(live) - set(staged)):
        breaking.append(f"signature '{key}' removed")
    for key in sorted(set(staged) - set(live)):
        additions.append(f"signature '{key}' added")
    for key in sorted(set(live) & set(staged)):
        old, new = live[key], staged[key]
        if old.get("method") != new.get("method"):
            breaking.append(f"signature '{key}': method changed from {old.get('method')} to {new.get('method')}")
        for kind in ("inputs", "outputs"):
            label = kind[:-1]
            o, n = old.get(kind, {}), new.get(kind, {})
            for name in sorted(set(o) - set(n)):
                breaking.append(f"signature '{key}' {label} '{name}' removed or renamed")
            for name in sorted(set(n) - set(o)):
                if kind == "inputs":
                    breaking.append(f"signature '{key}' input '{name}' added (clients do not send it)")
                else:
                    additions.append(f"signature '{key}' output '{name}' added")
            for name in sorted(set(o) & set(n)):
                if o[name]["dtype"] != n[name]["dtype"]:
                    breaking.append(f"signature '{key}' {label} '{name}': "
                                    f"dtype changed from {o[name]['dtype']} to {n[name]['dtype']}")
                elif _accepts_fewer(o[name]["shape"], n[name]["shape"]):
                    breaking.append(f"signature '{key}' {label} '{name}': "
                                    f"shape narrowed from {o[name]['shape']} to {n[name]['shape']}")
                elif o[name]["shape"] != n[name]["shape"]:
                    widened.append(f"signature '{key}' {label} '{name}': "
                                   f"shape widened from {o[name]['shape']} to {n[name]['shape']}")
    return {"breaking": breaking, "additions": additions, "widened": widened}
