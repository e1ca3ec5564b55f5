"""Built-in chat templates, their selection, and Gemma 3 270M through the engine.

The Gemma tests load the real model and are skipped when `make gemma` has not
installed it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from appliance.chat_templates import (
    BUILTIN_TEMPLATES,
    CHATML,
    GEMMA,
    ChatTemplate,
    select_template,
)
from appliance.decoding import plan_from_schema
from appliance.errors import ModelLoadError
from appliance.grammar import schema_to_gbnf
from appliance.inference import LlamaEngine, OutputSpec, SamplingParams
from appliance.log_event import log_event_schema
from appliance.models import list_manifests, load_manifest, model_file_path
from appliance.prompts import build_messages
from appliance.workflow import parse_log_event

GEMMA_MODEL = "gemma3-270m"
CONVERSATION = [
    {"role": "system", "content": "Reply in JSON."},
    {"role": "user", "content": "pump 3 stalled"},
    {"role": "assistant", "content": '{"ok":false}'},
    {"role": "user", "content": "pump 4 running"},
]
LINE = (
    "1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 "
    "R02-M1-N0-C:J12-U11 RAS KERNEL INFO instruction cache parity error corrected"
)


def _render(template: ChatTemplate, messages: list[dict[str, str]]) -> str:
    formatter = Jinja2ChatFormatter(
        template=template.source, eos_token="<eos>", bos_token="<bos>"
    )
    return formatter(messages=messages).prompt


# Rendering --------------------------------------------------------------------


def test_gemma_renders_turns() -> None:
    expected = (
        "<bos><start_of_turn>user\nReply in JSON.\n\npump 3 stalled<end_of_turn>\n"
        '<start_of_turn>model\n{"ok":false}<end_of_turn>\n'
        "<start_of_turn>user\npump 4 running<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert _render(GEMMA, CONVERSATION) == expected


def test_gemma_system_text_only_in_first_user_turn() -> None:
    prompt = _render(GEMMA, CONVERSATION)
    assert prompt.count("Reply in JSON.") == 1
    assert "system" not in prompt


def test_gemma_lone_system_message_becomes_user_turn() -> None:
    prompt = _render(GEMMA, [{"role": "system", "content": "Reply in JSON."}])
    assert prompt == (
        "<bos><start_of_turn>user\nReply in JSON.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="tool"):
        _render(GEMMA, [{"role": "tool", "content": "42"}])


def test_chatml_renders_turns() -> None:
    prompt = _render(CHATML, CONVERSATION[:2])
    assert prompt == (
        "<|im_start|>system\nReply in JSON.<|im_end|>\n"
        "<|im_start|>user\npump 3 stalled<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# Selection --------------------------------------------------------------------


def test_gguf_template_wins_over_manifest() -> None:
    assert select_template("{{ messages }}", "gemma", Path("m.gguf")) is None


def test_builtin_template_used_without_gguf_template() -> None:
    assert select_template(None, "gemma", Path("m.gguf")) is GEMMA


def test_no_template_at_all_names_model_and_fix() -> None:
    with pytest.raises(ModelLoadError) as caught:
        select_template(None, None, Path("/models/base.gguf"))
    message = str(caught.value)
    assert "/models/base.gguf" in message
    assert "chat_template" in message
    assert "'gemma'" in message
    assert caught.value.path == Path("/models/base.gguf")


def test_unknown_template_name_lists_known() -> None:
    with pytest.raises(ModelLoadError, match="'chatml', 'gemma'"):
        select_template("", "vicuna", Path("m.gguf"))


def test_every_manifest_template_is_builtin() -> None:
    for manifest in list_manifests():
        assert manifest.chat_template in BUILTIN_TEMPLATES, manifest.name


# Gemma 3 270M through the engine ---------------------------------------------


def _gemma_path() -> Path:
    path = model_file_path(load_manifest(GEMMA_MODEL))
    if path is None or not path.is_file():
        pytest.skip("Gemma 3 270M is not installed; `make gemma` installs it")
    return path


@pytest.fixture(scope="module")
def gemma() -> LlamaEngine:
    engine = LlamaEngine(
        _gemma_path(), n_ctx=2048, n_threads=1, chat_template=GEMMA.name
    )
    yield engine
    engine.close()


@pytest.mark.model
def test_gemma_without_template_name_is_rejected() -> None:
    path = _gemma_path()
    with pytest.raises(ModelLoadError) as caught:
        LlamaEngine(path, n_ctx=512, n_threads=1)
    assert str(path) in str(caught.value)
    assert "chat_template" in str(caught.value)


@pytest.mark.model
def test_gemma_prompt_has_one_bos(gemma: LlamaEngine) -> None:
    tokens = gemma.prompt_tokens(build_messages(LINE))
    bos = gemma._llama.token_bos()
    assert tokens[0] == bos
    assert tokens.count(bos) == 1


@pytest.mark.model
def test_gemma_schema_decoder_output_validates(gemma: LlamaEngine) -> None:
    schema = log_event_schema()
    spec = OutputSpec("log_event", schema_to_gbnf(schema), plan_from_schema(schema))
    completion = gemma.complete(build_messages(LINE), spec, SamplingParams())
    assert parse_log_event(completion.text)


@pytest.mark.model
def test_gemma_grammar_path_uses_builtin_template(gemma: LlamaEngine) -> None:
    gbnf = schema_to_gbnf(log_event_schema())
    completion = gemma.complete(build_messages(LINE), gbnf, SamplingParams())
    assert completion.finish_reason == "stop"
    assert completion.prompt_tokens == len(gemma.prompt_tokens(build_messages(LINE)))
    assert parse_log_event(completion.text)
