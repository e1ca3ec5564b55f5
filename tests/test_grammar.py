"""The JSON-schema to GBNF generator and the grammar files llama.cpp must accept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from appliance.errors import GrammarError
from appliance.grammar import schema_to_gbnf
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
