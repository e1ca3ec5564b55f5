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
``boolean``, ``null``, ``integer`` (``minimum``, ``maximum`` and their exclusive
forms, within a signed 64-bit range), ``array`` (``items``,
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
"""Digits allowed in an unbounded integer, so the value fits a signed 64-bit integer."""

INTEGER_LIMIT = 10**MAX_INTEGER_DIGITS - 1
"""Largest magnitude an integer may have; bounds outside it are rejected."""


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


def integer_range_alternatives(low: int, high: int) -> list[str]:
    """Return GBNF sequences whose union is the decimal text of ``low``..``high``.

    Each sequence is a literal prefix, at most one character class and a run
    of ``[0-9]``, the usual digit-by-digit split of a numeric range. Text has
    no leading zeros and no ``-0``, so every integer has exactly one spelling.
    """
    parts: list[str] = []
    if low < 0:
        magnitudes = _unsigned_range(max(1, -high), -low)
        parts += [_join('"-"', p) for p in magnitudes]
    if high >= 0:
        parts += _unsigned_range(max(0, low), high)
    return parts


def _unsigned_range(low: int, high: int) -> list[str]:
    """GBNF sequences for the non-negative integers ``low``..``high``."""
    parts: list[str] = []
    while low <= high:
        # Split at each change of digit count: 0..9, 10..99, 100..999, ...
        top = min(high, 10 ** len(str(low)) - 1)
        parts += _same_length(str(low), str(top))
        low = top + 1
    return parts


def _same_length(low: str, high: str) -> list[str]:
    """GBNF sequences for the digit strings ``low``..``high`` of equal length."""
    if low == high:
        return [f'"{low}"']
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    rest = len(low) - 1
    if low[0] == high[0]:
        return [_join(f'"{low[0]}"', p) for p in _same_length(low[1:], high[1:])]
    parts: list[str] = []
    first, last = int(low[0]), int(high[0])
    if low[1:] != "0" * rest:
        parts += [_join(f'"{low[0]}"', p) for p in _same_length(low[1:], "9" * rest)]
        first += 1
    tail: list[str] = []
    if high[1:] != "9" * rest:
        tail = [_join(f'"{high[0]}"', p) for p in _same_length("0" * rest, high[1:])]
        last -= 1
    if first <= last:
        digit = f'"{first}"' if first == last else f"[{first}-{last}]"
        parts.append(_join(digit, f"[0-9]{{{rest}}}"))
    return parts + tail


def _join(head: str, tail: str) -> str:
    """Concatenate two GBNF sequences, merging adjacent literals."""
    if head.endswith('"') and tail.startswith('"') and tail.count('"') == 2:
        return head[:-1] + tail[1:]
    return f"{head} {tail}"


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
            return self._integer(node, path)
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
        elif kind == "integer":
            handled |= {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
        return handled

    def _integer(self, node: dict[str, Any], path: str) -> str:
        low, high = -INTEGER_LIMIT, INTEGER_LIMIT
        bounds = (
            ("minimum", 0, max),
            ("exclusiveMinimum", 1, max),
            ("maximum", 0, min),
            ("exclusiveMaximum", -1, min),
        )
        for key, shift, pick in bounds:
            if key not in node:
                continue
            value = node[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise GrammarError(
                    f"integer at {path!r} has {key} {value!r}; use a whole number",
                    path,
                )
            if abs(value) > INTEGER_LIMIT:
                raise GrammarError(
                    f"integer at {path!r} has {key} {value}, outside "
                    f"±{INTEGER_LIMIT}; narrow the bound",
                    path,
                )
            if pick is max:
                low = max(low, value + shift)
            else:
                high = min(high, value + shift)
        if low > high:
            raise GrammarError(
                f"integer at {path!r} admits no value: lowest {low} is above "
                f"highest {high}",
                path,
            )
        return "( " + " | ".join(integer_range_alternatives(low, high)) + " )"

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
