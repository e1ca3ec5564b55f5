"""Signed model bundles: the file format, reading and signature verification.

A bundle is a tar file (or a directory) with exactly three regular files:

- ``manifest.json``: the bundle manifest. It names the model and contains the
  SHA-256 and size of the GGUF file, the run settings (context size, chat
  template, sampling, threads, batch size) and optionally a canary set.
- ``manifest.sig``: a JSON object with the id of the signing key and the
  base64 Ed25519 signature over ``SIGNATURE_CONTEXT`` followed by the exact
  bytes of ``manifest.json``.
- ``model.gguf``: the model file.

The signature covers the manifest's bytes, and the manifest fixes the GGUF
file's hash and size, so a valid signature plus a matching hash prove that
every byte of the bundle is what the key's owner signed. The context prefix
keeps a signature made with the same key for another purpose from verifying
as a bundle signature. A verifier trusts a key only when its public key file
(``*.pub``, PEM) is in a trusted-key directory (``appliance.model_keys``).

``appliance.model_signing`` writes bundles, and ``appliance.model_install``
installs verified ones.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature

from appliance.errors import ModelChecksumError, ModelManifestError, SetupError
from appliance.model_canary import CanarySetError, parse_canary_set
from appliance.model_keys import (
    SYSTEM_TRUSTED_KEYS_DIR,
    KeyFileError,
    TrustedKey,
)
from appliance.model_manifest import ModelManifest, parse_manifest

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
"""Value of ``bundle_format`` in manifests that this code reads and writes."""
MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "manifest.sig"
MODEL_MEMBER = "model.gguf"
SIGNATURE_CONTEXT = b"field-relay model bundle v1\n"
"""Bytes signed in front of the manifest, which bind a signature to this use."""
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 4096

RUN_SETTING_KEYS = ("context_size", "chat_template", "sampling", "n_threads", "n_batch")
"""Keys of a model manifest that a bundle carries in its ``run`` object."""
_MANIFEST_KEYS = {
    "bundle_format",
    "name",
    "version",
    "description",
    "license",
    "created_at",
    "gguf",
    "run",
    "canary",
}
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
_BLOCK_BYTES = 1024 * 1024


# Errors -------------------------------------------------------------------------


class BundleError(SetupError):
    """Base class of the errors that reject a model bundle.

    A tampered model file raises ``ModelChecksumError`` instead, the error that
    every other model file with the wrong hash raises.

    Attributes:
        path: the bundle.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class BundleFormatError(BundleError):
    """The bundle is unreadable, lacks a member, or its manifest is invalid."""


class BundleSignatureError(BundleError):
    """The signature is missing, malformed, or does not match the manifest."""


class UntrustedKeyError(BundleSignatureError):
    """The bundle is signed by a key that is not among the trusted keys.

    Attributes:
        key_id: the id named in ``manifest.sig``.
    """

    def __init__(self, message: str, path: Path, key_id: str) -> None:
        super().__init__(message, path)
        self.key_id = key_id


# Manifest -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BundleManifest:
    """The signed description of one bundle."""

    name: str
    """Model name; installed models are named ``<name>-<first 8 hex of sha256>``."""
    sha256: str
    """SHA-256 of ``model.gguf``, lower-case hex."""
    size_bytes: int
    run: dict[str, Any]
    """Run settings with the keys of ``RUN_SETTING_KEYS`` that the signer set."""
    canary: dict[str, Any] | None
    """Canary set in the form of models/canary/default.json, or None for that set."""
    version: str = ""
    description: str = ""
    license: str = ""
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle_format": BUNDLE_FORMAT,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "license": self.license,
            "created_at": self.created_at,
            "gguf": {"sha256": self.sha256, "size_bytes": self.size_bytes},
            "run": self.run,
            "canary": self.canary,
        }

    def model_manifest_json(self, model_file: str) -> dict[str, Any]:
        """Return the model manifest (models/*.json form) for the installed file.

        ``model_file`` is the GGUF file's name, relative to the manifest.
        """
        return {
            "name": self.name,
            "description": self.description,
            "license": self.license,
            "source": {"kind": "path", "path": model_file},
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            **self.run,
        }


def parse_bundle_manifest(data: bytes, path: Path) -> BundleManifest:
    """Validate a bundle manifest's JSON, including its run settings and canary.

    Raises:
        BundleFormatError: the bytes are not a JSON object of the supported
            format, or a field is missing or invalid; the message names it.
    """

    def invalid(field: str, problem: str) -> BundleFormatError:
        return BundleFormatError(
            f"bundle {str(path)!r}: manifest field {field} {problem}", path
        )

    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleFormatError(
            f"bundle {str(path)!r}: {MANIFEST_MEMBER} is not UTF-8 JSON: {exc}", path
        ) from exc
    if not isinstance(value, dict):
        raise BundleFormatError(
            f"bundle {str(path)!r}: {MANIFEST_MEMBER} is not a JSON object", path
        )
    if value.get("bundle_format") != BUNDLE_FORMAT:
        raise invalid(
            "bundle_format",
            f"is {value.get('bundle_format')!r}; this appliance reads format "
            f"{BUNDLE_FORMAT} only",
        )
    unknown = sorted(set(value) - _MANIFEST_KEYS)
    if unknown:
        raise invalid(
            unknown[0], f"is unknown; allowed keys are {sorted(_MANIFEST_KEYS)}"
        )

    name = value.get("name")
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise invalid(
            "name",
            f"{name!r} is not 1-64 letters, digits, '.', '_' or '-' starting with "
            "a letter or digit",
        )
    texts = {}
    for key in ("version", "description", "license", "created_at"):
        text = value.get(key, "")
        if not isinstance(text, str):
            raise invalid(key, f"{text!r} is not a string")
        texts[key] = text

    gguf = value.get("gguf")
    if not isinstance(gguf, dict) or set(gguf) != {"sha256", "size_bytes"}:
        raise invalid("gguf", "must be an object with exactly sha256 and size_bytes")
    sha256 = gguf["sha256"]
    size = gguf["size_bytes"]
    if not isinstance(sha256, str) or not _SHA256_PATTERN.fullmatch(sha256):
        raise invalid("gguf.sha256", f"{sha256!r} is not 64 lower-case hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise invalid("gguf.size_bytes", f"{size!r} is not a positive integer")

    run = value.get("run", {})
    if not isinstance(run, dict):
        raise invalid("run", "must be an object")
    unknown_run = sorted(set(run) - set(RUN_SETTING_KEYS))
    if unknown_run:
        raise invalid(
            f"run.{unknown_run[0]}", f"is unknown; allowed keys are {RUN_SETTING_KEYS}"
        )
    canary = value.get("canary")
    if canary is not None and not isinstance(canary, dict):
        raise invalid("canary", "must be an object or null")

    manifest = BundleManifest(
        name=name, sha256=sha256, size_bytes=size, run=run, canary=canary, **texts
    )
    check_model_settings(manifest, path)
    try:
        parse_canary_set(canary)
    except CanarySetError as exc:
        raise invalid("canary", f"is invalid: {exc}") from exc
    return manifest


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A signed manifest must mean one thing: with a repeated key, readers that
    # keep the first value and readers that keep the last would disagree.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def check_model_settings(manifest: BundleManifest, path: Path) -> ModelManifest:
    """Validate the model manifest that installing ``manifest`` would write.

    Raises:
        BundleFormatError: a run setting is invalid; the message names the key.
    """
    with tempfile.TemporaryDirectory(prefix="field-relay-bundle-") as scratch:
        manifest_path = Path(scratch) / f"{manifest.name}.json"
        manifest_path.write_text(
            json.dumps(manifest.model_manifest_json(MODEL_MEMBER)), encoding="utf-8"
        )
        try:
            return parse_manifest(manifest_path)
        except ModelManifestError as exc:
            raise BundleFormatError(
                f"bundle {str(path)!r}: the run setting {exc.field or '?'} is "
                f"invalid: {exc}",
                path,
            ) from exc


# Reading ------------------------------------------------------------------------


class BundleReader:
    """Read access to the members of a bundle tar file or directory.

    Raises (on open):
        BundleFormatError: the path is neither a readable tar file nor a
            directory, or it contains a member other than the three expected
            regular files.
    """

    MEMBERS = (MANIFEST_MEMBER, SIGNATURE_MEMBER, MODEL_MEMBER)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            self._check_directory()
        elif path.is_file():
            self._open_tar()
        else:
            raise BundleFormatError(f"bundle {str(path)!r} not found", path)

    def _check_directory(self) -> None:
        extra = sorted(
            p.name for p in self.path.iterdir() if p.name not in self.MEMBERS
        )
        if extra:
            raise BundleFormatError(
                f"bundle directory {str(self.path)!r} contains unexpected files "
                f"{extra!r}; a bundle contains only {list(self.MEMBERS)!r}",
                self.path,
            )

    def _open_tar(self) -> None:
        try:
            self._tar = tarfile.open(self.path, "r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            self.close()
            raise BundleFormatError(
                f"bundle {str(self.path)!r} is not a readable tar file: {exc}",
                self.path,
            ) from exc
        for member in members:
            problem = None
            if member.name not in self.MEMBERS:
                problem = f"unexpected member {member.name!r}"
            elif not member.isreg():
                problem = f"member {member.name!r} is not a regular file"
            elif member.name in self._members:
                problem = f"member {member.name!r} appears twice"
            if problem is not None:
                self.close()
                raise BundleFormatError(
                    f"bundle {str(self.path)!r}: {problem}; a bundle contains only "
                    f"the regular files {list(self.MEMBERS)!r}",
                    self.path,
                )
            self._members[member.name] = member

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the tar file. Safe to call more than once."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def has(self, member: str) -> bool:
        if self._tar is not None:
            return member in self._members
        return (self.path / member).is_file()

    def size(self, member: str) -> int:
        if self._tar is not None:
            return self._members[member].size
        return (self.path / member).stat().st_size

    @contextlib.contextmanager
    def open(self, member: str) -> Iterator[IO[bytes]]:
        """Open a member for reading.

        Raises:
            BundleFormatError: the member is missing.
        """
        if not self.has(member):
            raise BundleFormatError(
                f"bundle {str(self.path)!r} has no {member}", self.path
            )
        if self._tar is None:
            with (self.path / member).open("rb") as file:
                yield file
            return
        extracted = self._tar.extractfile(self._members[member])
        assert extracted is not None  # isreg() was checked on open
        with extracted:
            yield extracted

    def read_small(self, member: str, limit: int) -> bytes:
        """Return a member's bytes, at most ``limit`` of them.

        Raises:
            BundleFormatError: the member is missing or larger than ``limit``.
        """
        if self.has(member) and self.size(member) > limit:
            raise BundleFormatError(
                f"bundle {str(self.path)!r}: {member} is {self.size(member)} bytes, "
                f"more than the {limit} allowed",
                self.path,
            )
        with self.open(member) as file:
            return file.read(limit + 1)


# Verification -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature verified with a trusted key."""

    path: Path
    manifest: BundleManifest
    key: TrustedKey
    manifest_bytes: bytes
    """``manifest.json`` exactly as signed."""
    signature_bytes: bytes
    """``manifest.sig`` exactly as read."""


def verify_signature(
    reader: BundleReader, trusted_keys: dict[str, TrustedKey]
) -> VerifiedBundle:
    """Check the manifest's signature against ``trusted_keys`` and parse it.

    The model file is not read; ``verify_model_file`` or ``copy_model_file``
    checks it against the manifest.

    Raises:
        BundleFormatError: the manifest is missing or invalid.
        BundleSignatureError: the signature is missing, malformed or wrong.
        UntrustedKeyError: the signing key is not trusted.
        KeyFileError: ``trusted_keys`` is empty.
    """
    path = reader.path
    manifest_bytes = reader.read_small(MANIFEST_MEMBER, MAX_MANIFEST_BYTES)
    if not reader.has(SIGNATURE_MEMBER):
        raise BundleSignatureError(
            f"bundle {str(path)!r} is not signed: it has no {SIGNATURE_MEMBER}; "
            "install only bundles signed with `appliance models sign`",
            path,
        )
    signature_bytes = reader.read_small(SIGNATURE_MEMBER, MAX_SIGNATURE_BYTES)
    signer, signature = _parse_signature(signature_bytes, path)
    if not trusted_keys:
        raise KeyFileError(
            "no trusted public keys found, so no bundle can be verified; copy the "
            "signer's .pub file to <data dir>/trusted-keys/ or "
            f"{SYSTEM_TRUSTED_KEYS_DIR}/",
            SYSTEM_TRUSTED_KEYS_DIR,
        )
    key = trusted_keys.get(signer)
    if key is None:
        raise UntrustedKeyError(
            f"bundle {str(path)!r} is signed by key {signer}, which is not trusted "
            f"here (trusted keys: {', '.join(sorted(trusted_keys))}); if you trust "
            "its signer, copy their .pub file into a trusted-keys directory",
            path,
            signer,
        )
    try:
        key.public_key.verify(signature, SIGNATURE_CONTEXT + manifest_bytes)
    except InvalidSignature:
        raise BundleSignatureError(
            f"bundle {str(path)!r}: the signature by key {signer} does not match "
            f"{MANIFEST_MEMBER}, so the manifest or the signature was changed after "
            "signing; do not install it, and get the bundle again from its signer",
            path,
        ) from None
    manifest = parse_bundle_manifest(manifest_bytes, path)
    logger.debug("bundle %s: signature by key %s (%s) verified", path, signer, key.path)
    return VerifiedBundle(path, manifest, key, manifest_bytes, signature_bytes)


def _parse_signature(data: bytes, path: Path) -> tuple[str, bytes]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleSignatureError(
            f"bundle {str(path)!r}: {SIGNATURE_MEMBER} is not UTF-8 JSON: {exc}", path
        ) from exc
    if not isinstance(value, dict) or value.get("algorithm") != "ed25519":
        raise BundleSignatureError(
            f"bundle {str(path)!r}: {SIGNATURE_MEMBER} must be a JSON object with "
            "algorithm 'ed25519', key_id and signature",
            path,
        )
    signer = value.get("key_id")
    if not isinstance(signer, str) or not _KEY_ID_PATTERN.fullmatch(signer):
        raise BundleSignatureError(
            f"bundle {str(path)!r}: {SIGNATURE_MEMBER} key_id {signer!r} is not 16 "
            "lower-case hex digits",
            path,
        )
    try:
        signature = base64.b64decode(str(value.get("signature")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleSignatureError(
            f"bundle {str(path)!r}: {SIGNATURE_MEMBER} signature is not base64: {exc}",
            path,
        ) from exc
    if len(signature) != 64:
        raise BundleSignatureError(
            f"bundle {str(path)!r}: {SIGNATURE_MEMBER} signature is {len(signature)} "
            "bytes; an Ed25519 signature is 64",
            path,
        )
    return signer, signature


def copy_model_file(
    reader: BundleReader, manifest: BundleManifest, destination: Path | None
) -> None:
    """Stream ``model.gguf`` into ``destination`` while checking it against the manifest.

    With ``destination`` None the file is only hashed. A written file is
    flushed to disk with ``fsync`` before the check passes.

    Raises:
        BundleFormatError: the bundle has no model file.
        ModelChecksumError: the size or SHA-256 differs from the signed
            manifest, so the file was changed after signing.
        OSError: ``destination`` cannot be written.
    """
    path = reader.path
    size = reader.size(MODEL_MEMBER) if reader.has(MODEL_MEMBER) else None
    if size is not None and size != manifest.size_bytes:
        raise ModelChecksumError(
            f"bundle {str(path)!r}: {MODEL_MEMBER} is {size} bytes but the signed "
            f"manifest says {manifest.size_bytes}, so the file was changed after "
            "signing; do not install it",
            path,
            str(manifest.size_bytes),
            str(size),
        )
    digest = hashlib.sha256()
    started = time.perf_counter()
    with reader.open(MODEL_MEMBER) as source, _optional_output(destination) as output:
        while block := source.read(_BLOCK_BYTES):
            digest.update(block)
            if output is not None:
                output.write(block)
        if output is not None:
            output.flush()
            os.fsync(output.fileno())
    actual = digest.hexdigest()
    if actual != manifest.sha256:
        raise ModelChecksumError(
            f"bundle {str(path)!r}: {MODEL_MEMBER} has sha256 {actual} but the "
            f"signed manifest says {manifest.sha256}, so the file was changed after "
            "signing; do not install it",
            path,
            manifest.sha256,
            actual,
        )
    logger.debug(
        "bundle %s: %s matches its manifest (%d bytes hashed in %.2f s)",
        path,
        MODEL_MEMBER,
        manifest.size_bytes,
        time.perf_counter() - started,
    )


@contextlib.contextmanager
def _optional_output(path: Path | None) -> Iterator[IO[bytes] | None]:
    if path is None:
        yield None
        return
    with path.open("xb") as file:
        yield file


def verify_bundle(path: Path, trusted_keys: dict[str, TrustedKey]) -> VerifiedBundle:
    """Check a bundle's signature, manifest and model file without installing it.

    Raises:
        BundleError, KeyFileError: see ``verify_signature``.
        ModelChecksumError: the model file differs from the signed manifest.
    """
    with BundleReader(path) as reader:
        verified = verify_signature(reader, trusted_keys)
        copy_model_file(reader, verified.manifest, None)
    return verified
