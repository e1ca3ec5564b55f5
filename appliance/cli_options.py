"""Click options shared by several `appliance` commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--model`` and ``--threads``, the options of every command that infers."""
    func = click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="llama.cpp CPU threads; default: the model manifest's n_threads.",
    )(func)
    return click.option(
        "--model",
        help="Model name from `appliance models list`, or a GGUF model file; "
        "default: the bundled SmolLM2-135M-Instruct.",
    )(func)
