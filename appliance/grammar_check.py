"""Check that llama.cpp accepts a GBNF grammar, in a child process.

llama.cpp 0.3.36 returns a null sampler for a grammar it cannot parse, and
llama-cpp-python adds it to the sampler chain anyway, which segfaults the whole
process on the first token. Parsing the grammar in a child process first turns
that crash into a ``GrammarError``. A grammar that passed is remembered by its
SHA-256 in the data directory, so the check runs once per grammar and model.

Run as ``python -m appliance.grammar_check MODEL GRAMMAR_FILE``: exit code 0
means llama.cpp parsed the grammar, 3 means it rejected it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from appliance.errors import GrammarError

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 120.0
"""Seconds allowed for the child process, which loads only the vocabulary."""


def check_grammar(
    grammar: str, model_path: Path, cache_dir: Path | None = None
) -> None:
    """Raise ``GrammarError`` unless llama.cpp parses ``grammar`` for ``model_path``.

    Args:
        grammar: GBNF text.
        model_path: the GGUF file whose vocabulary the grammar is compiled against.
        cache_dir: where passed checks are remembered; None checks every time.
    """
    digest = hashlib.sha256(f"{model_path.name}\n{grammar}".encode()).hexdigest()
    marker = cache_dir / f"{digest}.ok" if cache_dir is not None else None
    if marker is not None and marker.exists():
        return
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    # A file of its own per check, so concurrent checks never share one.
    handle, name = tempfile.mkstemp(suffix=".gbnf", dir=cache_dir)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(grammar)
    grammar_file = Path(name)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance.grammar_check",
                str(model_path),
                str(grammar_file),
            ],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise GrammarError(
            f"grammar check timed out after {CHECK_TIMEOUT:.0f} s", str(grammar_file)
        ) from exc
    finally:
        grammar_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        reason = (
            "rejected it"
            if proc.returncode == 3
            else f"crashed (exit {proc.returncode})"
        )
        detail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise GrammarError(
            f"llama.cpp {reason} while parsing the grammar: {detail}", "#"
        )
    if marker is not None:
        marker.touch()
    logger.debug("grammar %s accepted by llama.cpp", digest[:12])


def _child(model_path: str, grammar_path: str) -> int:
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        print(f"cannot load vocabulary from {model_path!r}", file=sys.stderr)
        return 4
    vocab = llama_cpp.llama_model_get_vocab(model)
    grammar = Path(grammar_path).read_text(encoding="utf-8")
    sampler = llama_cpp.llama_sampler_init_grammar(
        vocab, grammar.encode("utf-8"), b"root"
    )
    ok = bool(sampler)
    if ok:
        llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_model_free(model)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
