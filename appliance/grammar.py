"""GBNF grammar generation from JSON schemas, owned and tested here.

llama-cpp-python's own converter lets raw control characters into strings,
ignores numeric bounds and can emit grammars that crash llama.cpp's sampler, so
the appliance builds its grammars itself. The generated grammar admits compact
JSON only (no whitespace between tokens), properties in declared order, and
strings with no control characters whose length is bounded by ``maxLength``.
A schema feature the generator does not handle raises ``GrammarError`` naming
the schema node instead of being skipped.

Supported: ``object`` (every property required, no additional properties),
``string`` (``maxLength`` required, ``minLength``, ``enum``, ``const``),
``boolean``, ``null``, ``integer`` (digit count bounded), ``array`` (``items``,
``minItems``, ``maxItems`` required), ``enum``/``const`` of scalars, ``$ref``
into ``$defs`` and ``anyOf`` of supported schemas.
"""

from __future__ import annotations

import json
import re
from typing import Any

from appliance.errors import GrammarError

IGNORED_KEYWORDS = frozenset(
    {"title", "description", "$schema", "$id", "$defs", "default", "examples"}
)
"""Annotations that do not constrain values."""

STRING_CHAR = r'[^"\\\x00-\x1F\x7F] | "\\" ["\\/]'
"""One JSON string character: no control characters, only \\" \\\\ \\/ escapes."""

MAX_INTEGER_DIGITS = 18
"""Digits allowed in an integer, so the value fits a signed 64-bit integer."""


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """Return a GBNF grammar whose language is compact JSON valid for ``schema``.

    Raises:
        GrammarError: the schema uses an unsupported keyword or lacks a bound.
    """
    builder = _GrammarBuilder(schema)
    root = builder.visit(schema, "#")
    builder.rules["root"] = root
    lines = [f"root ::= {builder.rules.pop('root')}"]
    lines += [f"{name} ::= {body}" for name, body in builder.rules.items()]
    return "\n".join(lines) + "\n"


def _literal(value: str) -> str:
    """Quote ``value`` as a GBNF string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def _json_literal(value: Any) -> str:
    """GBNF literal that matches exactly the compact JSON text of ``value``."""
    return _literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class _GrammarBuilder:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.rules: dict[str, str] = {}
        self._ref_names: dict[str, str] = {}

    def visit(self, node: dict[str, Any], path: str) -> str:
        if not isinstance(node, dict):
            raise GrammarError(f"schema node {path!r} is not an object", path)
        unknown = set(node) - IGNORED_KEYWORDS - self._handled_keywords(node)
        if unknown:
            raise GrammarError(
                f"schema node {path!r} uses unsupported keyword(s) "
                f"{sorted(unknown)!r}; remove them or extend appliance/grammar.py",
                path,
            )

        if "$ref" in node:
            return self._ref(node["$ref"], path)
        if "anyOf" in node:
            options = [
                self.visit(n, f"{path}/anyOf/{i}") for i, n in enumerate(node["anyOf"])
            ]
            return "( " + " | ".join(options) + " )"
        if "const" in node:
            return _json_literal(node["const"])
        if "enum" in node:
            return self._enum(node["enum"], path)

        kind = node.get("type")
        if kind == "object":
            return self._object(node, path)
        if kind == "string":
            return self._string(node, path)
        if kind == "boolean":
            return '( "true" | "false" )'
        if kind == "null":
            return '"null"'
        if kind == "integer":
            # TODO: honour minimum and maximum with a digit-range grammar; until
            # then only the digit count is bounded and pydantic checks the range.
            return f'"-"? [0-9]{{1,{MAX_INTEGER_DIGITS}}}'
        if kind == "array":
            return self._array(node, path)
        raise GrammarError(f"schema node {path!r} has unsupported type {kind!r}", path)

    @staticmethod
    def _handled_keywords(node: dict[str, Any]) -> set[str]:
        kind = node.get("type")
        handled = {"type", "$ref", "anyOf", "const", "enum"}
        if kind == "object":
            handled |= {"properties", "required", "additionalProperties"}
        elif kind == "string":
            handled |= {"minLength", "maxLength"}
        elif kind == "array":
            handled |= {"items", "minItems", "maxItems"}
        return handled

    def _ref(self, ref: str, path: str) -> str:
        if ref in self._ref_names:
            return self._ref_names[ref]
        match = re.fullmatch(r"#/\$defs/([A-Za-z0-9_]+)", ref)
        if match is None or match.group(1) not in self.root.get("$defs", {}):
            raise GrammarError(
                f"schema node {path!r} has unresolvable $ref {ref!r}", path
            )
        name = "def-" + re.sub(r"[^a-z0-9]+", "-", match.group(1).lower()).strip("-")
        self._ref_names[ref] = name
        self.rules[name] = self.visit(self.root["$defs"][match.group(1)], ref)
        return name

    def _enum(self, values: list[Any], path: str) -> str:
        if not values:
            raise GrammarError(f"schema node {path!r} has an empty enum", path)
        for value in values:
            if isinstance(value, (dict, list)) or isinstance(value, float):
                raise GrammarError(
                    f"schema node {path!r} enum value {value!r} is not a string, "
                    "integer, boolean or null",
                    path,
                )
        return "( " + " | ".join(_json_literal(v) for v in values) + " )"

    def _object(self, node: dict[str, Any], path: str) -> str:
        properties: dict[str, Any] = node.get("properties", {})
        required = set(node.get("required", []))
        optional = [name for name in properties if name not in required]
        if optional:
            raise GrammarError(
                f"schema node {path!r} has optional properties {optional!r}; "
                "make every property required",
                f"{path}/properties/{optional[0]}",
            )
        if node.get("additionalProperties", False) is not False and properties:
            raise GrammarError(
                f"schema node {path!r} allows additional properties; set "
                "additionalProperties to false",
                path,
            )
        if not properties:
            return '"{}"'
        parts = []
        for i, (name, sub) in enumerate(properties.items()):
            key = json.dumps(name, ensure_ascii=False) + ":"
            prefix = ("," if i else "{") + key
            parts.append(_literal(prefix))
            parts.append(self.visit(sub, f"{path}/properties/{name}"))
        parts.append('"}"')
        return " ".join(parts)

    def _string(self, node: dict[str, Any], path: str) -> str:
        if "maxLength" not in node:
            raise GrammarError(
                f"string at {path!r} has no maxLength; every string must be bounded",
                path,
            )
        low, high = int(node.get("minLength", 0)), int(node["maxLength"])
        if not 0 <= low <= high:
            raise GrammarError(
                f"string at {path!r} has minLength {low} above maxLength {high}", path
            )
        self.rules.setdefault("char", STRING_CHAR)
        return f'"\\"" char{{{low},{high}}} "\\""'

    def _array(self, node: dict[str, Any], path: str) -> str:
        if "items" not in node or "maxItems" not in node:
            raise GrammarError(
                f"array at {path!r} needs items and maxItems; every array must be bounded",
                path,
            )
        item = self.visit(node["items"], f"{path}/items")
        low, high = int(node.get("minItems", 0)), int(node["maxItems"])
        if not 0 <= low <= high:
            raise GrammarError(
                f"array at {path!r} has minItems {low} above maxItems {high}", path
            )
        if high == 0:
            return '"[]"'
        rest_low, rest_high = max(low - 1, 0), high - 1
        body = f'{item} ( "," {item} ){{{rest_low},{rest_high}}}'
        if low == 0:
            return f'"[" ( {body} )? "]"'
        return f'"[" {body} "]"'
