"""Docstrings that state a default agree with the code (``inspect.signature``).

A default is read from the three forms the docstrings use::

    ``name="value"`` (default)
    name: ``value`` (default) ...
    name: ... (default ``value``) / (default value) / (default: value)

and compared when the documented value is a Python literal or a dotted name
(``nn.ReLU``).  Prose defaults ("torch's global RNG") are not checked.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys

import pytest

import pyroflows
import pyroflows.flows
import pyroflows.infer
import pyroflows.nn
import pyroflows.transforms

MODULES = [pyroflows, pyroflows.transforms, pyroflows.flows, pyroflows.infer, pyroflows.nn]

PATTERNS = [
    re.compile(r"``(\w+)=([^`]+)``\s*\(default\)"),
    re.compile(r"^\s*(\w+):\s*``([^`]+)``\s*\(default\)", re.M),
    re.compile(r"^\s*(\w+):[^\n]*?\(default:?\s+``([^`]+)``", re.M),
    re.compile(r"^\s*(\w+):[^\n]*?\(default:?\s+([\w.+-]+)[),;:]", re.M),
]


def _public_callables():
    seen = {}
    for mod in MODULES:
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj not in seen.values():
                seen[f"{mod.__name__}.{name}"] = obj
    return seen


def _documented_defaults(obj):
    doc = inspect.getdoc(obj) or ""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return []
    out = []
    for pattern in PATTERNS:
        for m in pattern.finditer(doc):
            name, text = m.group(1), m.group(2).strip()
            if name in params and params[name].default is not inspect.Parameter.empty:
                out.append((name, text, params[name].default))
    return out


def _resolve(text, obj):
    """The object a dotted name in ``obj``'s docstring refers to (its module's namespace,
    then torch's constraints), or ``None``."""
    from torch.distributions import constraints

    for namespace in (vars(sys.modules[obj.__module__]), vars(constraints)):
        head, *rest = text.split(".")
        value = namespace.get(head)
        for part in rest:
            value = getattr(value, part, None)
        if value is not None:
            return value
    return None


def _matches(text, default, obj):
    try:
        return ast.literal_eval(text) == default
    except (ValueError, SyntaxError):
        pass
    if text in inspect.signature(obj).parameters:  # "default ``lr``": another argument's value
        return True
    if re.fullmatch(r"[\w.]+", text):
        value = _resolve(text, obj)
        if value is not None:
            return value is default or value == default
        return text.split(".")[-1] == (getattr(default, "__name__", None) or type(default).__name__)
    return True  # prose: not checked


CASES = [(qual, obj, name, text, default) for qual, obj in _public_callables().items()
         for name, text, default in _documented_defaults(obj)]


def test_the_check_finds_documented_defaults():
    assert len(CASES) >= 5


@pytest.mark.parametrize("qual,obj,name,text,default", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_documented_default_matches_the_signature(qual, obj, name, text, default):
    assert _matches(text, default, obj), f"{qual}: docstring says {name}={text}, the code's default is {default!r}"
