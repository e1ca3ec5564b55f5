"""Ed25519 keys for model bundles: creating, reading and trusting them.

The signer keeps the private key (PKCS #8 PEM, mode 0600). An appliance trusts
the public keys (SubjectPublicKeyInfo PEM, ``*.pub``) in its trusted-key
directories, and ``appliance.model_bundles`` verifies bundle signatures with
them. A key is named by its id, the first 16 hex digits of the SHA-256 of its
32 raw public-key bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from appliance.errors import SetupError

SYSTEM_TRUSTED_KEYS_DIR = Path("/etc/field-relay/trusted-keys")
TRUSTED_KEYS_SUBDIR = "trusted-keys"
"""Subdirectory of the data directory that contains trusted public keys."""


class KeyFileError(SetupError):
    """A signing or trusted public key file is missing, invalid or unsafe.

    Attributes:
        path: the key file or the directory that contains it.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclasses.dataclass(frozen=True)
class TrustedKey:
    """A public key that may sign bundles, and the file it was read from."""

    key_id: str
    path: Path
    public_key: Ed25519PublicKey


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the key's id: the first 16 hex digits of the SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def default_trusted_key_dirs(data_dir: Path) -> list[Path]:
    """Return ``<data dir>/trusted-keys`` and ``/etc/field-relay/trusted-keys``."""
    return [data_dir / TRUSTED_KEYS_SUBDIR, SYSTEM_TRUSTED_KEYS_DIR]


def generate_key_pair(
    private_path: Path, public_path: Path, *, force: bool = False
) -> str:
    """Create an Ed25519 key pair and return its key id.

    The private key is written unencrypted as PKCS #8 PEM with mode 0600, the
    public key as SubjectPublicKeyInfo PEM with mode 0644.

    Raises:
        KeyFileError: a file exists and ``force`` is false, or a file cannot be
            written.
    """
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise KeyFileError(
                    f"key file {str(path)!r} already exists; choose another path "
                    "or pass --force to replace it",
                    path,
                )
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_atomically(private_path, private_pem, 0o600)
    _write_atomically(public_path, public_pem, 0o644)
    return key_id(private_key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted Ed25519 private key in PEM form.

    Raises:
        KeyFileError: the file is missing, not a PEM Ed25519 private key, or
            readable by other users.
    """
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"cannot read signing key {str(path)!r}: {exc.strerror}", path
        ) from exc
    if mode & 0o077:
        raise KeyFileError(
            f"signing key {str(path)!r} is accessible by other users (mode "
            f"{stat.S_IMODE(mode):04o}); run `chmod 600 {path}`",
            path,
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"signing key {str(path)!r} is not an unencrypted PEM private key: {exc}",
            path,
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"signing key {str(path)!r} is a {type(key).__name__}, not an Ed25519 "
            "key; create one with `appliance models keygen`",
            path,
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key in PEM form.

    Raises:
        KeyFileError: the file is unreadable or not a PEM Ed25519 public key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"cannot read public key {str(path)!r}: {exc.strerror}", path
        ) from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"public key {str(path)!r} is not a PEM public key: {exc}; replace it "
            "with the .pub file that `appliance models keygen` wrote",
            path,
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(
            f"public key {str(path)!r} is a {type(key).__name__}, not an Ed25519 key",
            path,
        )
    return key


def load_trusted_keys(directories: Sequence[Path]) -> dict[str, TrustedKey]:
    """Load every ``*.pub`` file in ``directories``, keyed by key id.

    A directory that does not exist is skipped. A key file or directory that
    other users can write is rejected, because anyone who can add a key there
    can sign a model for this appliance.

    Raises:
        KeyFileError: a key file is invalid or writable by group or others, or
            a directory is writable by group or others.
    """
    keys: dict[str, TrustedKey] = {}
    for directory in directories:
        if not directory.is_dir():
            continue
        _check_not_shared_writable(directory)
        for path in sorted(directory.glob("*.pub")):
            _check_not_shared_writable(path)
            public_key = load_public_key(path)
            identifier = key_id(public_key)
            keys.setdefault(identifier, TrustedKey(identifier, path, public_key))
    return keys


def _check_not_shared_writable(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & 0o022:
        raise KeyFileError(
            f"trusted key path {str(path)!r} is writable by group or others (mode "
            f"{stat.S_IMODE(mode):04o}), so anyone could add a key; run "
            f"`chmod go-w {path}`",
            path,
        )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise KeyFileError(
            f"cannot write key file {str(path)!r}: {exc.strerror}", path
        ) from exc
