"""The real SmolLM2 model in llama.cpp under the generated grammar."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.grammar import schema_to_gbnf
from appliance.inference import CachedEngine, SamplingParams
from appliance.log_event import log_event_schema
from appliance.prompts import build_messages
from appliance.workflow import parse_log_event
from firmware_bridge.simulator import load_sample_lines

pytestmark = pytest.mark.model

GRAMMAR = schema_to_gbnf(log_event_schema())
# Lines 1, 30 and 1,000-odd of the sample cover INFO, FATAL and APP entries.
LINES = [load_sample_lines()[i] for i in (0, 29, 250, 1200, 1900)]


@pytest.mark.parametrize("line", LINES, ids=[f"line{i}" for i in range(len(LINES))])
def test_grammar_output_validates(engine, line: str) -> None:
    completion = engine.complete(build_messages(line), GRAMMAR, SamplingParams())
    assert completion.finish_reason == "stop"
    assert parse_log_event(completion.text)["severity"] in {
        "debug",
        "info",
        "warning",
        "error",
        "critical",
    }


def test_completion_reports_token_counts(engine) -> None:
    completion = engine.complete(build_messages(LINES[0]), GRAMMAR, SamplingParams())
    assert completion.prompt_tokens > 0
    assert completion.completion_tokens > 0


def test_answer_cache_skips_repeated_line(engine, tmp_path: Path) -> None:
    cached = CachedEngine(engine, tmp_path / "cache")
    first = cached.complete(build_messages(LINES[1]), GRAMMAR, SamplingParams())
    second = cached.complete(build_messages(LINES[1]), GRAMMAR, SamplingParams())
    cached.cache.close()
    assert second.cached
    assert second.text == first.text


def test_temperature_zero_is_deterministic(engine) -> None:
    first = engine.complete(build_messages(LINES[2]), GRAMMAR, SamplingParams())
    second = engine.complete(build_messages(LINES[2]), GRAMMAR, SamplingParams())
    assert first.text == second.text
