"""Model calls through llama.cpp with a grammar, and the local answer cache.

One ``LlamaEngine`` owns the llama.cpp context; it is not thread-safe, so the
workflow calls it from a single inference worker thread. The answer cache
(diskcache) maps a hash of the model identity, grammar, prompt and sampling
parameters to the raw completion, so an identical line is answered without
running the model again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import diskcache
import numpy as np

from appliance.chat_templates import load_chat_format
from appliance.decoding import (
    DecodePlan,
    SchemaDecoder,
    VocabularyTable,
    max_output_tokens,
)
from appliance.errors import InferenceError, ModelLoadError, SetupError
from appliance.models import ModelSelection

DECODER_VERSION = 1
"""Bumped whenever the schema decoder's output for the same input may change."""

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one call."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 320
    """Upper bound on generated tokens; reaching it truncates the output."""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """The required shape of a model's output: a JSON schema and its GBNF grammar.

    When ``plan`` is set the engine decodes with ``SchemaDecoder``; otherwise it
    hands ``gbnf`` to llama.cpp's grammar sampler.
    """

    schema_id: str
    gbnf: str
    plan: DecodePlan | None = None

    @property
    def cache_key(self) -> str:
        """Text that changes whenever the constrained output could change."""
        mode = f"schema-decoder-{DECODER_VERSION}" if self.plan else "gbnf"
        return f"{self.schema_id}\n{mode}\n{self.gbnf}"


@dataclasses.dataclass(frozen=True)
class Completion:
    """The raw result of one model call."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """``stop`` when the grammar completed, ``length`` when max_tokens cut it off."""
    duration: float
    """Wall-clock seconds spent in llama.cpp (0 for cache hits)."""
    cached: bool = False
    forced_tokens: int = 0
    """Output tokens appended without a sampling step (schema decoder only)."""
    constraint_seconds: float = 0.0
    """Seconds spent on output constraints outside llama.cpp's forward pass."""
    loops_cut: int = 0
    """String fields ended early by the loop detector."""


class LlamaEngine:
    """A loaded GGUF model that answers chat prompts under a GBNF grammar.

    Args:
        model_path: the GGUF file.
        n_ctx: context window in tokens.
        n_threads: CPU threads for generation and prompt evaluation.
        n_batch: tokens per prompt-evaluation batch.
        sha256: the file's SHA-256 from its manifest; it keys the answer cache.
            Without it the key uses the file's name, size and modification time.
        chat_template: name of the built-in chat template (see
            ``appliance.chat_templates``) used when the GGUF file has none.

    Raises:
        ModelLoadError: llama.cpp cannot load the file, or the file has no chat
            template and ``chat_template`` names no built-in one.
    """

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 4096,
        n_threads: int = 2,
        n_batch: int = 512,
        sha256: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        from llama_cpp import Llama

        self.model_path = model_path
        self.n_threads = n_threads
        started = time.perf_counter()
        try:
            with _quiet_stderr():
                self._llama = Llama(
                    model_path=str(model_path),
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    n_batch=n_batch,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load model {str(model_path)!r}: {exc}; check "
                "that the file is a complete GGUF file",
                model_path,
            ) from exc
        self.n_ctx = n_ctx
        try:
            self.chat_format = load_chat_format(self._llama, model_path, chat_template)
        except ModelLoadError:
            self._llama.close()
            raise
        table_started = time.perf_counter()
        self._table = VocabularyTable(
            # _model.token_to_piece in llama-cpp-python 0.3.36 returns its whole
            # 32-byte buffer; detokenize of one token slices it correctly.
            [self._llama._model.detokenize([t]) for t in range(self._llama.n_vocab())]
        )
        self.vocabulary_seconds = time.perf_counter() - table_started
        """Seconds spent building the schema decoder's vocabulary table."""
        self.load_seconds = time.perf_counter() - started
        stat = model_path.stat()
        self.identity = (
            sha256 or f"{model_path.name}:{stat.st_size}:{int(stat.st_mtime)}"
        )
        self._grammars: dict[str, Any] = {}
        self._anchors: dict[str, int] = {}
        self._lock = threading.Lock()
        logger.info(
            "model %s loaded in %.2f s (%d threads, context %d)",
            model_path.name,
            self.load_seconds,
            n_threads,
            n_ctx,
        )

    @property
    def vocabulary_size(self) -> int:
        """Number of tokens in the model's vocabulary."""
        return self._table.size

    def _grammar(self, text: str) -> Any:
        from llama_cpp import LlamaGrammar

        if text not in self._grammars:
            self._grammars[text] = LlamaGrammar.from_string(text, verbose=False)
        return self._grammars[text]

    def complete(
        self,
        messages: list[dict[str, str]],
        grammar: OutputSpec | str | None,
        params: SamplingParams,
    ) -> Completion:
        """Run one chat completion, constrained by ``grammar`` when given.

        An ``OutputSpec`` with a plan runs the schema decoder; GBNF text (or a
        spec without a plan) runs llama-cpp-python's own chat completion with
        llama.cpp's grammar sampler; None generates without constraint.

        Raises:
            InferenceError: llama.cpp failed, or the prompt does not leave room
                for the longest possible output in the context window.
        """
        # One llama.cpp context serves one call at a time; other callers queue.
        with self._lock:
            return self._complete_locked(messages, grammar, params)

    def _complete_locked(
        self,
        messages: list[dict[str, str]],
        grammar: OutputSpec | str | None,
        params: SamplingParams,
    ) -> Completion:
        if isinstance(grammar, OutputSpec) and grammar.plan is not None:
            return self._complete_schema(messages, grammar.plan, params)
        gbnf = grammar.gbnf if isinstance(grammar, OutputSpec) else grammar
        started = time.perf_counter()
        try:
            response = self._llama.create_chat_completion(
                messages=messages,
                grammar=self._grammar(gbnf) if gbnf else None,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                seed=params.seed,
            )
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(f"llama.cpp failed: {exc}") from exc
        choice = response["choices"][0]
        usage = response.get("usage", {})
        return Completion(
            text=choice["message"]["content"] or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=str(choice.get("finish_reason") or "stop"),
            duration=time.perf_counter() - started,
        )

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the model's chat template to ``messages`` and tokenize the result."""
        prompt = self.chat_format.formatter(messages=messages).prompt
        return self._llama.tokenize(
            prompt.encode("utf-8"), add_bos=self.chat_format.add_bos, special=True
        )

    def _anchor(self, messages: list[dict[str, str]]) -> int:
        """Return how many prompt tokens come before the last message's content.

        Found by rendering two different last messages and comparing tokens,
        which works for any chat template; remembered per shared prefix.
        """
        key = json.dumps(messages[:-1])
        if key not in self._anchors:
            first = self.prompt_tokens(
                [*messages[:-1], {"role": "user", "content": "a"}]
            )
            second = self.prompt_tokens(
                [*messages[:-1], {"role": "user", "content": "b"}]
            )
            size = 0
            while size < min(len(first), len(second)) and first[size] == second[size]:
                size += 1
            self._anchors[key] = size
        return self._anchors[key]

    def _complete_schema(
        self, messages: list[dict[str, str]], plan: DecodePlan, params: SamplingParams
    ) -> Completion:
        started = time.perf_counter()
        tokens = self.prompt_tokens(messages)
        budget = max_output_tokens(plan)
        if len(tokens) + budget > self.n_ctx:
            raise InferenceError(
                f"prompt of {len(tokens)} tokens plus the longest output of {budget} "
                f"tokens exceeds the context window of {self.n_ctx} tokens"
            )
        llama = self._llama
        # The shared prefix (system message and examples) is evaluated in a call
        # of its own and kept; the record's suffix is always evaluated afresh
        # from the same position. Each record therefore sees exactly the same
        # computation whatever came before, so temperature 0 is reproducible.
        anchor = self._anchor(messages)
        cached = llama.input_ids[:anchor].tolist()
        if llama.n_tokens >= anchor and cached == tokens[:anchor]:
            llama.n_tokens = anchor
        else:
            llama.n_tokens = 0
            llama.eval(tokens[:anchor])
        common = anchor
        try:
            llama.eval(tokens[common:])
            logits = np.ctypeslib.as_array(
                llama._ctx.get_logits(), shape=(self._table.size,)
            )
            result = SchemaDecoder(llama, self._table, plan).decode(
                logits.copy(), params.temperature, params.top_p, params.seed
            )
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(f"llama.cpp failed: {exc}") from exc
        return Completion(
            text=result.text,
            prompt_tokens=len(tokens),
            completion_tokens=result.sampled_tokens + result.forced_tokens,
            finish_reason="stop",
            duration=time.perf_counter() - started,
            forced_tokens=result.forced_tokens,
            constraint_seconds=result.constraint_seconds,
            loops_cut=result.loops_cut,
        )

    def close(self) -> None:
        """Free the llama.cpp context. Safe to call more than once."""
        llama, self._llama = getattr(self, "_llama", None), None
        if llama is not None:
            llama.close()


def load_engine(selection: ModelSelection, threads: int | None = None) -> LlamaEngine:
    """Load the selected model with its manifest's settings.

    ``threads`` overrides the manifest's ``n_threads``.

    Raises:
        ModelLoadError: llama.cpp cannot load the file or no chat template fits.
    """
    manifest = selection.manifest
    return LlamaEngine(
        selection.path,
        n_ctx=manifest.context_size,
        n_threads=threads or manifest.n_threads,
        n_batch=manifest.n_batch,
        sha256=selection.sha256,
        chat_template=selection.chat_template,
    )


@contextlib.contextmanager
def _quiet_stderr():  # type: ignore[no-untyped-def]
    """Silence llama.cpp's C-level loader messages on file descriptor 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CachedEngine:
    """Wraps an engine with a diskcache answer cache in ``cache_dir``.

    Args:
        engine: the engine that answers cache misses.
        cache_dir: directory of the cache.
        size_limit: maximum cache size in bytes; diskcache evicts least
            recently stored entries beyond it.
    """

    def __init__(
        self, engine: LlamaEngine, cache_dir: Path, size_limit: int = 64 * 2**20
    ) -> None:
        self.engine = engine
        try:
            self.cache = diskcache.Cache(str(cache_dir), size_limit=size_limit)
        except (OSError, sqlite3.Error) as exc:
            raise SetupError(
                f"cannot open the answer cache in {str(cache_dir)!r}: {exc}; free "
                "space on the data directory's file system"
            ) from exc
        # diskcache keeps hit and miss counts in the cache itself, so
        # `appliance status` can read them from another process.
        self.cache.stats(enable=True)
        self.hits = 0
        self.misses = 0

    @property
    def model_name(self) -> str:
        return self.engine.model_path.name

    def complete(
        self,
        messages: list[dict[str, str]],
        grammar: OutputSpec | str | None,
        params: SamplingParams,
    ) -> Completion:
        key = self._key(messages, grammar, params)
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return dataclasses.replace(Completion(**hit), duration=0.0, cached=True)
        self.misses += 1
        completion = self.engine.complete(messages, grammar, params)
        if completion.finish_reason == "stop":
            try:
                self.cache.set(key, dataclasses.asdict(completion))
            except (OSError, sqlite3.Error) as exc:
                # The answer is still good; only its reuse is lost.
                logger.warning("answer cache write failed, continuing: %s", exc)
        return completion

    def _key(
        self,
        messages: list[dict[str, str]],
        grammar: OutputSpec | str | None,
        params: SamplingParams,
    ) -> str:
        constraint = grammar.cache_key if isinstance(grammar, OutputSpec) else grammar
        material = json.dumps(
            [self.engine.identity, constraint, messages, dataclasses.asdict(params)],
            sort_keys=True,
        )
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    def close(self) -> None:
        self.cache.close()
        self.engine.close()
