"""The JSON-schema to GBNF generator and the grammar files llama.cpp must accept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from appliance.errors import GrammarError
from appliance.grammar import (
    INTEGER_LIMIT,
    integer_range_alternatives,
    schema_to_gbnf,
)
from appliance.grammar_check import check_grammar
from appliance.grammar_files import GRAMMAR_DIR, expected_files


def _obj(**props: dict) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def test_string_is_length_bounded() -> None:
    grammar = schema_to_gbnf(
        _obj(name={"type": "string", "minLength": 2, "maxLength": 9})
    )
    assert "char{2,9}" in grammar


def test_string_excludes_control_characters() -> None:
    grammar = schema_to_gbnf(_obj(name={"type": "string", "maxLength": 5}))
    char_rule = next(
        line for line in grammar.splitlines() if line.startswith("char ::=")
    )
    assert r"\x00-\x1F\x7F" in char_rule


def test_string_escapes_exclude_newline() -> None:
    grammar = schema_to_gbnf(_obj(name={"type": "string", "maxLength": 5}))
    char_rule = next(
        line for line in grammar.splitlines() if line.startswith("char ::=")
    )
    assert "n" not in char_rule.split('"\\\\"', 1)[1]


def test_properties_keep_declared_order() -> None:
    grammar = schema_to_gbnf(_obj(zeta={"type": "boolean"}, alpha={"type": "boolean"}))
    assert grammar.index("zeta") < grammar.index("alpha")


def test_enum_values_with_quotes_and_backslashes_are_escaped() -> None:
    grammar = schema_to_gbnf(_obj(mode={"enum": ['a"b', "c\\d"]}))
    assert r'"\"a\\\"b\""' in grammar
    assert r'"\"c\\\\d\""' in grammar


def test_const_matches_compact_json() -> None:
    grammar = schema_to_gbnf(_obj(version={"const": 2}))
    assert '"2"' in grammar


def test_array_honours_min_and_max_items() -> None:
    grammar = schema_to_gbnf(
        _obj(
            tags={
                "type": "array",
                "items": {"type": "boolean"},
                "minItems": 1,
                "maxItems": 3,
            }
        )
    )
    assert "){0,2}" in grammar


def test_no_whitespace_between_tokens() -> None:
    grammar = schema_to_gbnf(_obj(a={"type": "boolean"}, b={"type": "null"}))
    literals = re.findall(r'"(?:[^"\\]|\\.)*"', grammar)
    assert not [lit for lit in literals if re.search(r"\s|\\[nrt]", lit)]


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        (
            _obj(code={"type": "string", "maxLength": 4, "pattern": r"\d+"}),
            "#/properties/code",
        ),
        (_obj(note={"type": "string"}), "#/properties/note"),
        (
            _obj(items={"type": "array", "items": {"type": "null"}}),
            "#/properties/items",
        ),
        (_obj(price={"type": "number"}), "#/properties/price"),
    ],
)
def test_unsupported_schema_names_the_field(schema: dict, field: str) -> None:
    with pytest.raises(GrammarError) as caught:
        schema_to_gbnf(schema)
    assert caught.value.field == field


def _range_regex(low: int, high: int) -> re.Pattern[str]:
    """Translate the range's GBNF sequences (literals, classes, {n}) to a regex."""
    options = []
    for sequence in integer_range_alternatives(low, high):
        options.append(sequence.replace('"', "").replace(" ", ""))
    return re.compile("|".join(options))


@pytest.mark.parametrize(
    ("low", "high"),
    [(0, 0), (-5, -1), (-15, 2345), (1, 100), (0, 1009), (-1000, 1000), (37, 4129)],
)
def test_integer_range_matches_exactly_its_values(low: int, high: int) -> None:
    pattern = _range_regex(low, high)
    for value in range(low - 1100, high + 1100):
        assert bool(pattern.fullmatch(str(value))) is (low <= value <= high), value


def test_integer_range_has_one_spelling_per_value() -> None:
    pattern = _range_regex(-50, 50)
    for text in ("-0", "007", "+5", "05", "-05"):
        assert pattern.fullmatch(text) is None, text


def test_integer_range_reaches_the_64_bit_limits() -> None:
    pattern = _range_regex(-INTEGER_LIMIT, INTEGER_LIMIT)
    assert pattern.fullmatch(str(INTEGER_LIMIT))
    assert pattern.fullmatch(str(-INTEGER_LIMIT))
    assert pattern.fullmatch(str(INTEGER_LIMIT + 1)) is None


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"type": "integer", "minimum": 5, "maximum": 4}, "admits no value"),
        ({"type": "integer", "exclusiveMinimum": 3, "maximum": 3}, "admits no value"),
        ({"type": "integer", "minimum": 1.5}, "whole number"),
        ({"type": "integer", "maximum": 10**19}, "narrow the bound"),
        ({"type": "integer", "multipleOf": 2}, "multipleOf"),
    ],
)
def test_bad_integer_bounds_name_the_field(node: dict, message: str) -> None:
    with pytest.raises(GrammarError, match=message) as caught:
        schema_to_gbnf(_obj(count=node))
    assert caught.value.field == "#/properties/count"


def test_exclusive_bounds_move_by_one() -> None:
    grammar = schema_to_gbnf(
        _obj(n={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10})
    )
    assert "( [1-9] )" in grammar


def test_optional_property_is_rejected() -> None:
    schema = _obj(a={"type": "boolean"})
    schema["properties"]["b"] = {"type": "boolean"}
    with pytest.raises(GrammarError, match="optional properties"):
        schema_to_gbnf(schema)


def test_grammar_files_match_pydantic_models() -> None:
    for path, content in expected_files().items():
        assert path.read_text(encoding="utf-8") == content, (
            f"{path} is stale: run `make grammars`"
        )


def test_schema_file_is_valid_json_schema() -> None:
    import jsonschema

    schema = json.loads((GRAMMAR_DIR / "log_event.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.model
@pytest.mark.parametrize(
    "path", sorted(GRAMMAR_DIR.glob("*.gbnf")), ids=lambda p: p.name
)
def test_grammar_file_compiles_in_llama_cpp(path: Path, model_path: Path) -> None:
    check_grammar(path.read_text(encoding="utf-8"), model_path)


@pytest.mark.model
def test_integer_range_grammar_compiles_in_llama_cpp(model_path: Path) -> None:
    grammar = schema_to_gbnf(
        _obj(
            celsius={"type": "integer", "minimum": -40, "maximum": 125},
            count={"type": "integer", "minimum": 0},
        )
    )
    check_grammar(grammar, model_path)


@pytest.mark.model
def test_unparsable_grammar_raises_instead_of_crashing(model_path: Path) -> None:
    with pytest.raises(GrammarError, match="rejected"):
        check_grammar('root ::= "a" undefined-rule\n', model_path)


@pytest.mark.model
def test_grammar_check_result_is_cached(model_path: Path, tmp_path: Path) -> None:
    grammar = 'root ::= "ok"\n'
    check_grammar(grammar, model_path, tmp_path)
    assert len(list(tmp_path.glob("*.ok"))) == 1


def test_non_ascii_enum_values_stay_literal() -> None:
    grammar = schema_to_gbnf(_obj(unit={"enum": ["°C", "µs", "Ω"]}))
    assert '"\\"°C\\""' in grammar
    assert '"\\"Ω\\""' in grammar
