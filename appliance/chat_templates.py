"""Chat templates built into the appliance, for GGUF files that carry none.

A model manifest's ``chat_template`` names one of ``BUILTIN_TEMPLATES``. The
engine prefers the template stored in the GGUF file's metadata
(``tokenizer.chat_template``) and uses the named built-in template only when
the file has none, as the Gemma 3 270M base model's file does.

A built-in template renders the whole prompt, including the BOS token when the
model needs one, so prompts rendered with it are tokenized without adding
another BOS. llama-cpp-python's chat handler does the same, because its
``Jinja2ChatFormatter`` marks the special tokens as already added.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from appliance.errors import ModelLoadError


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A named Jinja2 chat template and the token text that ends a model turn."""

    name: str
    source: str
    """Jinja2 text rendered with ``messages``, ``bos_token``, ``eos_token`` and
    ``add_generation_prompt``, as Hugging Face chat templates are."""
    end_of_turn: str
    """Text of the special token that closes a model turn; generation stops on it."""


# Gemma's turn format, from "Gemma formatting and system instructions"
# (https://ai.google.dev/gemma/docs/core/prompt-structure): each turn is
# <start_of_turn>ROLE, a newline, the text and <end_of_turn>, with the roles
# user and model. Gemma has no system role, so the system text opens the next
# user turn, separated from the user's text by a blank line.
GEMMA = ChatTemplate(
    name="gemma",
    source=(
        "{{- bos_token -}}"
        "{%- set state = namespace(system='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- set state.system = state.system ~ message['content'] ~ '\\n\\n' -%}"
        "{%- elif message['role'] == 'user' -%}"
        "{{- '<start_of_turn>user\\n' ~ state.system ~ message['content']"
        " ~ '<end_of_turn>\\n' -}}"
        "{%- set state.system = '' -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- '<start_of_turn>model\\n' ~ message['content'] ~ '<end_of_turn>\\n' -}}"
        "{%- else -%}"
        "{{- raise_exception('the gemma chat template has no role '"
        " ~ message['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        # A system message with no user turn after it still reaches the model.
        "{%- if state.system -%}"
        "{{- '<start_of_turn>user\\n' ~ state.system | trim ~ '<end_of_turn>\\n' -}}"
        "{%- endif -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
    ),
    end_of_turn="<end_of_turn>",
)

# ChatML, the format of SmolLM2-Instruct's own template: <|im_start|>ROLE, a
# newline, the text, <|im_end|> and a newline. It uses no BOS token.
CHATML = ChatTemplate(
    name="chatml",
    source=(
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content']"
        " ~ '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    end_of_turn="<|im_end|>",
)

BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    template.name: template for template in (CHATML, GEMMA)
}
"""Templates a manifest's ``chat_template`` may name, by name."""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """The prompt formatter of one loaded model and its tokenization setting."""

    formatter: Any
    """A ``llama_cpp.llama_chat_format.Jinja2ChatFormatter``."""
    add_bos: bool
    """Whether tokenizing the rendered prompt adds the model's BOS token."""
    builtin: ChatTemplate | None
    """The built-in template in use, or None for the GGUF file's own template."""


def select_template(
    gguf_template: str | None, name: str | None, model_path: Path
) -> ChatTemplate | None:
    """Return the built-in template to use, or None to use the GGUF file's own.

    Args:
        gguf_template: ``tokenizer.chat_template`` from the GGUF metadata, if any.
        name: the manifest's ``chat_template``, if any.
        model_path: the GGUF file, named in errors.

    Raises:
        ModelLoadError: the file has no template and ``name`` is None or not a
            built-in template.
    """
    if gguf_template:
        return None
    known = sorted(BUILTIN_TEMPLATES)
    if name is None:
        raise ModelLoadError(
            f"model {str(model_path)!r} has no chat template in its GGUF metadata "
            "and its manifest names none: set chat_template in the model's "
            f"manifest (models/NAME.json) to one of {known!r}, the turn format the "
            "model was trained on, or use a GGUF file that contains a chat template",
            model_path,
        )
    template = BUILTIN_TEMPLATES.get(name)
    if template is None:
        raise ModelLoadError(
            f"model {str(model_path)!r} has no chat template in its GGUF metadata "
            f"and chat_template {name!r} is not a built-in template: use one of "
            f"{known!r}",
            model_path,
        )
    return template


def load_chat_format(llama: Any, model_path: Path, name: str | None) -> ChatFormat:
    """Build the chat formatter for a loaded ``llama_cpp.Llama``.

    The GGUF file's own template wins. Otherwise the built-in template ``name``
    is used, and it also becomes the chat handler of llama-cpp-python's
    ``create_chat_completion``, so that the GBNF path and the schema decoder
    format prompts alike.

    Raises:
        ModelLoadError: no usable template, see ``select_template``.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    gguf_template = llama.metadata.get("tokenizer.chat_template")
    builtin = select_template(gguf_template, name, model_path)
    eos, bos = llama.token_eos(), llama.token_bos()
    eos_text = llama._model.token_get_text(eos) if eos != -1 else ""
    bos_text = llama._model.token_get_text(bos) if bos != -1 else ""
    if builtin is None:
        formatter = Jinja2ChatFormatter(
            template=gguf_template, eos_token=eos_text, bos_token=bos_text
        )
        add_bos = llama.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"
        return ChatFormat(formatter, add_bos, None)

    stop_ids = {eos} if eos != -1 else set()
    end_ids = llama.tokenize(
        builtin.end_of_turn.encode("utf-8"), add_bos=False, special=True
    )
    # Without a single token for the end of a turn, generation without a grammar
    # stops only at EOS or max_tokens.
    if len(end_ids) == 1:
        stop_ids.add(end_ids[0])
    formatter = Jinja2ChatFormatter(
        template=builtin.source,
        eos_token=eos_text,
        bos_token=bos_text,
        stop_token_ids=sorted(stop_ids),
    )
    llama.chat_handler = formatter.to_chat_handler()
    return ChatFormat(formatter, False, builtin)
