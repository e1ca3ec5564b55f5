"""Signing model bundles: the signer's side of ``appliance.model_bundles``.

``sign_bundle`` hashes a GGUF file, writes the bundle manifest as canonical JSON
(sorted keys, no spaces, UTF-8), signs ``SIGNATURE_CONTEXT`` plus those bytes
with an Ed25519 private key, and packs manifest, signature and model into one
tar file. It verifies the finished file with the same key before renaming it
to the output path, so a bundle written here passes verification with that key.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from appliance.model_bundles import (
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    RUN_SETTING_KEYS,
    SIGNATURE_CONTEXT,
    SIGNATURE_MEMBER,
    BundleFormatError,
    BundleManifest,
    VerifiedBundle,
    parse_bundle_manifest,
    verify_bundle,
)
from appliance.model_keys import TrustedKey, key_id, load_private_key
from appliance.model_manifest import ModelManifest

GGUF_MAGIC = b"GGUF"
"""First four bytes of every GGUF file."""


def canonical_json(value: Any) -> bytes:
    """Return the bytes that ``models sign`` writes: sorted keys, no spaces, UTF-8."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


@dataclasses.dataclass(frozen=True)
class SignRequest:
    """Input of ``sign_bundle``: the model file and the manifest's fields."""

    gguf: Path
    name: str
    settings: ModelManifest
    """Manifest whose run settings, description and licence the bundle copies."""
    version: str = ""
    description: str | None = None
    """Replaces the settings manifest's description when given."""
    license: str | None = None
    """Replaces the settings manifest's licence when given."""
    canary: dict[str, Any] | None = None
    """Canary set, or None to use the installing appliance's default set."""


def sign_bundle(
    request: SignRequest, private_key_path: Path, output: Path, *, force: bool = False
) -> VerifiedBundle:
    """Hash the GGUF file, sign a manifest for it and write the bundle tar file.

    The finished file is verified with the signing key's own public key before
    it replaces ``output``.

    Raises:
        KeyFileError: the signing key cannot be used.
        BundleFormatError: the GGUF file is missing or not GGUF, ``output``
            exists without ``force``, or a manifest field is invalid.
        ModelChecksumError: the GGUF file changed while it was packed;
            ``output`` is left as it was.
        OSError: ``output`` cannot be written.
    """
    private_key = load_private_key(private_key_path)
    if output.exists() and not force:
        raise BundleFormatError(
            f"bundle {str(output)!r} already exists; choose another --output or "
            "pass --force to replace it",
            output,
        )
    sha256, size = _hash_gguf(request.gguf)
    settings = request.settings
    manifest = BundleManifest(
        name=request.name,
        sha256=sha256,
        size_bytes=size,
        run={key: getattr(settings, key) for key in RUN_SETTING_KEYS},
        canary=request.canary,
        version=request.version,
        description=(
            settings.description if request.description is None else request.description
        ),
        license=settings.license if request.license is None else request.license,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    manifest_bytes = canonical_json(manifest.to_json())
    parse_bundle_manifest(manifest_bytes, output)
    public_key = private_key.public_key()
    signature = private_key.sign(SIGNATURE_CONTEXT + manifest_bytes)
    signature_bytes = canonical_json(
        {
            "algorithm": "ed25519",
            "key_id": key_id(public_key),
            "signature": base64.b64encode(signature).decode("ascii"),
        }
    )
    own_key = TrustedKey(key_id(public_key), private_key_path, public_key)
    return _write_bundle(output, manifest_bytes, signature_bytes, request.gguf, own_key)


def _hash_gguf(path: Path) -> tuple[str, int]:
    try:
        with path.open("rb") as file:
            if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise BundleFormatError(
                    f"{str(path)!r} is not a GGUF file: it does not start with "
                    f"{GGUF_MAGIC!r}",
                    path,
                )
            file.seek(0)
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        return digest, path.stat().st_size
    except OSError as exc:
        raise BundleFormatError(
            f"cannot read model file {str(path)!r}: {exc.strerror}", path
        ) from exc


def _write_bundle(
    output: Path,
    manifest_bytes: bytes,
    signature_bytes: bytes,
    gguf: Path,
    own_key: TrustedKey,
) -> VerifiedBundle:
    """Write the tar file next to ``output``, verify it, then rename it into place.

    Verification also catches a GGUF file that changed after it was hashed.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=output.parent, prefix=f".{output.name}.", suffix=".tmp", delete=False
    )
    temporary = Path(handle.name)
    try:
        with handle, tarfile.open(fileobj=handle, mode="w") as tar:
            # Small members first, so a reader finds the manifest without
            # reading past the model.
            _add_member(
                tar, MANIFEST_MEMBER, io.BytesIO(manifest_bytes), len(manifest_bytes)
            )
            _add_member(
                tar, SIGNATURE_MEMBER, io.BytesIO(signature_bytes), len(signature_bytes)
            )
            with gguf.open("rb") as model:
                _add_member(tar, MODEL_MEMBER, model, gguf.stat().st_size)
        with temporary.open("rb+") as written:
            os.fsync(written.fileno())
        verified = verify_bundle(temporary, {own_key.key_id: own_key})
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return dataclasses.replace(verified, path=output)


def _add_member(tar: tarfile.TarFile, name: str, data: IO[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    tar.addfile(info, data)
