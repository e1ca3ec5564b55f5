"""The schema decoder's plan, vocabulary table and loop detector, without a model."""

from __future__ import annotations

import pytest

from appliance.decoding import (
    EnumSlot,
    SchemaDecoder,
    StringSlot,
    VocabularyTable,
    _common_prefix,
    max_output_tokens,
    plan_from_schema,
)
from appliance.errors import GrammarError
from appliance.log_event import log_event_schema


def test_plan_follows_declared_field_order() -> None:
    plan = plan_from_schema(log_event_schema())
    assert plan.literals[0] == '{"severity":'
    assert plan.literals[-1] == "}"


def test_plan_has_one_more_literal_than_slots() -> None:
    plan = plan_from_schema(log_event_schema())
    assert len(plan.literals) == len(plan.slots) + 1


def test_plan_resolves_enum_refs() -> None:
    plan = plan_from_schema(log_event_schema())
    assert plan.slots[0] == EnumSlot(
        ('"debug"', '"info"', '"warning"', '"error"', '"critical"')
    )


def test_plan_keeps_string_bounds() -> None:
    plan = plan_from_schema(log_event_schema())
    assert plan.slots[3] == StringSlot(1, 120)


def test_plan_maps_boolean_to_enum() -> None:
    plan = plan_from_schema(log_event_schema())
    assert plan.slots[4] == EnumSlot(("true", "false"))


@pytest.mark.parametrize(
    "node",
    [
        {"type": "integer"},
        {"type": "string"},
        {"type": "string", "maxLength": 4, "pattern": "a+"},
        {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    ],
)
def test_unsupported_field_names_its_path(node: dict) -> None:
    schema = {"type": "object", "properties": {"x": node}, "required": ["x"]}
    with pytest.raises(GrammarError) as caught:
        plan_from_schema(schema)
    assert caught.value.field == "#/properties/x"


def test_optional_field_is_rejected() -> None:
    schema = {
        "type": "object",
        "properties": {"x": {"type": "boolean"}},
        "required": [],
    }
    with pytest.raises(GrammarError, match="optional"):
        plan_from_schema(schema)


def test_common_prefix_of_quoted_options() -> None:
    assert _common_prefix(('"a"', '"bc"')) == '"'


def test_common_prefix_never_swallows_an_option() -> None:
    assert _common_prefix(('"ab"', '"ab"')) == '"ab'


def test_max_output_tokens_covers_longest_text() -> None:
    plan = plan_from_schema(log_event_schema())
    longest = (
        '{"severity":"critical","component":"' + "x" * 32 + '","event_type":'
        '"configuration","summary":"' + "x" * 120 + '","action_required":false,'
        '"suggested_action":"' + "x" * 120 + '"}'
    )
    assert max_output_tokens(plan) >= len(longest)


def test_vocabulary_excludes_quotes_and_controls() -> None:
    table = VocabularyTable([b"ok", b'a"', b"\\n", b"tab\t", b"\xe2\x82", b"\xc2\xb5s"])
    assert table.string_ok.tolist() == [True, False, False, False, False, True]


def test_vocabulary_counts_characters_not_bytes() -> None:
    table = VocabularyTable([b"\xc2\xb5s"])
    assert table.char_len[0] == 2


def test_vocabulary_lists_closing_tokens() -> None:
    table = VocabularyTable([b"x", b'","', b'."', b'a\\"'])
    assert table.quote_tokens == [(1, "", ',"'), (2, ".", "")]


@pytest.mark.parametrize(
    ("history", "looping"),
    [
        ([1, 2, 3, 4], False),
        ([7, 7, 7], True),
        ([1, 5, 6, 5, 6, 5, 6], True),
        ([1, 2, 3, 1, 2, 3, 1, 2], False),
    ],
)
def test_loop_detector(history: list[int], looping: bool) -> None:
    assert SchemaDecoder._looping(history) is looping


def test_plan_keeps_non_ascii_enum_values() -> None:
    schema = {
        "type": "object",
        "properties": {"unit": {"enum": ["°C", "µs"]}},
        "required": ["unit"],
    }
    assert plan_from_schema(schema).slots[0] == EnumSlot(('"°C"', '"µs"'))
