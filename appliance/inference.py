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
import time
from pathlib import Path
from typing import Any

import diskcache

from appliance.errors import InferenceError, ModelLoadError

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


class LlamaEngine:
    """A loaded GGUF model that answers chat prompts under a GBNF grammar.

    Args:
        model_path: the GGUF file.
        n_ctx: context window in tokens.
        n_threads: CPU threads for generation and prompt evaluation.
    """

    def __init__(self, model_path: Path, n_ctx: int = 2048, n_threads: int = 1) -> None:
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
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load model {str(model_path)!r}: {exc}; check "
                "that the file is a complete GGUF file",
                model_path,
            ) from exc
        self.load_seconds = time.perf_counter() - started
        stat = model_path.stat()
        self.identity = f"{model_path.name}:{stat.st_size}:{int(stat.st_mtime)}"
        self._grammars: dict[str, Any] = {}
        logger.info(
            "model %s loaded in %.2f s (%d threads, context %d)",
            model_path.name,
            self.load_seconds,
            n_threads,
            n_ctx,
        )

    def _grammar(self, text: str) -> Any:
        from llama_cpp import LlamaGrammar

        if text not in self._grammars:
            self._grammars[text] = LlamaGrammar.from_string(text, verbose=False)
        return self._grammars[text]

    def complete(
        self,
        messages: list[dict[str, str]],
        grammar: str | None,
        params: SamplingParams,
    ) -> Completion:
        """Run one chat completion, constrained by ``grammar`` when given.

        Raises:
            InferenceError: llama.cpp failed, for example because the prompt is
                longer than the context window.
        """
        started = time.perf_counter()
        try:
            response = self._llama.create_chat_completion(
                messages=messages,
                grammar=self._grammar(grammar) if grammar else None,
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

    def close(self) -> None:
        """Free the llama.cpp context. Safe to call more than once."""
        llama, self._llama = getattr(self, "_llama", None), None
        if llama is not None:
            llama.close()


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
        self.cache = diskcache.Cache(str(cache_dir), size_limit=size_limit)
        self.hits = 0
        self.misses = 0

    @property
    def model_name(self) -> str:
        return self.engine.model_path.name

    def complete(
        self,
        messages: list[dict[str, str]],
        grammar: str | None,
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
            self.cache.set(key, dataclasses.asdict(completion))
        return completion

    def _key(
        self,
        messages: list[dict[str, str]],
        grammar: str | None,
        params: SamplingParams,
    ) -> str:
        material = json.dumps(
            [self.engine.identity, grammar, messages, dataclasses.asdict(params)],
            sort_keys=True,
        )
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    def close(self) -> None:
        self.cache.close()
        self.engine.close()
