"""Device pairing: one random id and pre-shared key per device, kept in key files.

A ``PairingStore`` is a directory with one JSON key file per paired device,
named ``<device id in hex>.json``. The directory has mode 0700 and every key
file mode 0600. Each file is written to a temporary file in the same directory
and renamed over the old one with ``os.replace``, so a reader sees either the
whole old file or the whole new one. A key file that group or other users may
access is rejected rather than used, as OpenSSH rejects such private keys.

An export is the same JSON document written elsewhere for the device side:
the simulator loads it with ``load_export`` and firmware can read its hex
fields.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import stat
import string
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from firmware_bridge.crypto import DEVICE_ID_SIZE, PSK_SIZE
from firmware_bridge.errors import PairingError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the key file and export format. Readers reject any other version."""
STORE_DIR_NAME = "devices"
"""Folder of the appliance's data directory that contains its pairing store."""
KEY_FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
MAX_NAME_LENGTH = 64
"""Maximum characters in a device name."""

_KEY_FILE_PATTERN = re.compile(r"[0-9a-f]{16}\.json")
_DEVICE_ID_PATTERN = re.compile(r"[0-9a-fA-F]{16}")
_LOCK_NAME = ".lock"
_ID_ATTEMPTS = 8
"""Random ids drawn before giving up when each one is already taken."""
_EXPORT_FIX = "write it again with `appliance export-key DEVICE FILE`"
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)
"""``os.link`` errors of file systems that cannot hard-link, such as FAT."""


class _DamagedKeyFile(ValueError):
    """Unusable content in a key file, with a message naming the file and the fault."""


@dataclasses.dataclass(frozen=True)
class DeviceKey:
    """A paired device: its id, its pre-shared key and an operator-chosen name."""

    device_id: bytes
    """The 8-byte id that the device sends in its HELLO."""
    psk: bytes = dataclasses.field(repr=False)
    """The 32-byte pre-shared key, left out of ``repr`` so that logs never show it."""
    name: str
    created_at: datetime.datetime
    """When the device was paired, in UTC."""

    @property
    def device_id_hex(self) -> str:
        return self.device_id.hex()

    def to_json(self) -> dict[str, Any]:
        """Return the key file document: format version, hex id and key, name."""
        return {
            "format_version": FORMAT_VERSION,
            "device_id": self.device_id.hex(),
            "key": self.psk.hex(),
            "name": self.name,
            "created_at": self.created_at.isoformat(),
        }


@dataclasses.dataclass(frozen=True)
class UnusableKeyFile:
    """A key file in a pairing store that cannot be read, parsed or trusted."""

    path: Path
    device_id: bytes
    """The id in the file's name, which ``PairingStore.remove_key_file`` accepts."""
    error: PairingError
    """The reason the file is unusable, with a message naming the file and the fix."""


def validate_name(name: str) -> None:
    """Raise ``PairingError`` unless ``name`` can name a device.

    A name is 1 to 64 printable characters without surrounding spaces. It may
    not be 16 hex digits, because ``forget`` and ``export`` accept a device id
    in that form wherever they accept a name.
    """
    if not name or name != name.strip() or not name.isprintable():
        raise PairingError(
            f"device name {name!r} is invalid: use printable characters without "
            "leading or trailing spaces"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise PairingError(
            f"device name {name!r} has {len(name)} characters; the maximum is "
            f"{MAX_NAME_LENGTH}"
        )
    if _DEVICE_ID_PATTERN.fullmatch(name):
        raise PairingError(
            f"device name {name!r} looks like a device id; choose a name that is "
            "not 16 hex digits"
        )


def load_export(path: Path) -> DeviceKey:
    """Read a key exported by ``PairingStore.export``.

    Raises:
        PairingError: the file is missing, unreadable, readable by group or
            other users, not JSON, of another format version, or has an id or
            key of the wrong size. The message names the file and the fix, and
            never contains key material.
    """
    return _read_key_file(Path(path), _EXPORT_FIX)


def _read_key_file(
    path: Path, damaged_fix: str, require_private: bool = True
) -> DeviceKey:
    """Read and parse one key file.

    ``damaged_fix`` ends the message when the content is unusable. Without
    ``require_private`` a file that other users may access is read anyway.
    Only name checks and removal may do that, and they must not use its key.
    """
    try:
        with open(path, "rb") as handle:
            if require_private:
                _check_private(path, os.fstat(handle.fileno()))
            raw = handle.read()
    except FileNotFoundError:
        raise PairingError(
            f"key file {str(path)!r} not found: write it with "
            "`appliance pair NAME --export FILE` or `appliance export-key DEVICE FILE`"
        ) from None
    except OSError as exc:
        raise PairingError(
            f"cannot read key file {str(path)!r}: {exc.strerror}"
        ) from exc
    try:
        return _parse_document(path, _decode_json(path, raw))
    except _DamagedKeyFile as exc:
        raise PairingError(f"{exc}; {damaged_fix}") from None


def _decode_json(path: Path, raw: bytes) -> object:
    # The decoder's own messages would quote the offending byte, which may
    # belong to the key, so only its position is reported.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _DamagedKeyFile(
            f"key file {str(path)!r} is not valid JSON: it is not UTF-8 text "
            f"(invalid byte at offset {exc.start})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _DamagedKeyFile(
            f"key file {str(path)!r} is not valid JSON ({exc.msg} at line "
            f"{exc.lineno}, column {exc.colno})"
        ) from None


def _check_private(path: Path, status: os.stat_result) -> None:
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise PairingError(
            f"key file {str(path)!r} has mode {mode:04o}, but only its owner may "
            f"have access to a device key; run `chmod 600 {path}`"
        )


def _parse_document(path: Path, document: object) -> DeviceKey:
    if not isinstance(document, dict):
        raise _DamagedKeyFile(f"key file {str(path)!r} does not contain a JSON object")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise _DamagedKeyFile(
            f"key file {str(path)!r} has format_version {version!r}; this "
            f"version of Field Relay reads only {FORMAT_VERSION}"
        )
    device_id = _hex_field(path, document, "device_id", DEVICE_ID_SIZE)
    psk = _hex_field(path, document, "key", PSK_SIZE, secret=True)
    name = document.get("name")
    if not isinstance(name, str):
        raise _DamagedKeyFile(f"key file {str(path)!r} has no text field 'name'")
    created_at = _time_field(path, document.get("created_at"))
    return DeviceKey(device_id, psk, name, created_at)


def _hex_field(
    path: Path, document: dict[str, Any], field: str, size: int, secret: bool = False
) -> bytes:
    """Decode a hex field of ``size`` bytes.

    The error for a ``secret`` field gives only the value's length, because
    the appliance logs it on every handshake of that device.
    """
    value = document.get(field)
    try:
        decoded = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        decoded = None
    if decoded is None or len(decoded) != size:
        raise _DamagedKeyFile(
            f"key file {str(path)!r}: field {field!r} must be {size} bytes as "
            f"{size * 2} hex digits, but {_describe_bad_hex(value, secret)}"
        )
    return decoded


def _describe_bad_hex(value: object, secret: bool) -> str:
    if value is None:
        return "it is missing or null"
    if not isinstance(value, str):
        return f"it is a JSON {_json_type_name(value)}"
    if not secret:
        return f"it is {value!r:.40}"
    digits = "".join(value.split())
    if all(character in string.hexdigits for character in digits):
        return f"it has {len(digits)} hex digits"
    return f"it has {len(value)} characters, not all of them hex digits"


def _json_type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


def _time_field(path: Path, value: object) -> datetime.datetime:
    # Exports written by other tools may leave the pairing time out.
    if value is None:
        return datetime.datetime.fromtimestamp(0, datetime.UTC)
    try:
        parsed = (
            datetime.datetime.fromisoformat(value) if isinstance(value, str) else None
        )
    except ValueError:
        parsed = None
    if parsed is None:
        raise _DamagedKeyFile(
            f"key file {str(path)!r}: field 'created_at' must be an ISO 8601 time, "
            f"not {value!r}"
        )
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed


def _store_file_fix(path: Path) -> str:
    return (
        f"delete it, or run `appliance unpair {path.stem}` to remove it, then "
        "pair that device again"
    )


def _write_private_json(
    path: Path, document: dict[str, Any], overwrite: bool = True
) -> None:
    """Write ``document`` to ``path`` with mode 0600, atomically.

    The JSON goes to a temporary file in the same directory, is flushed to
    disk, and replaces ``path`` with ``os.replace``, or without ``overwrite``
    is hard-linked to ``path``, which fails if ``path`` exists. On failure the
    temporary file is removed and ``path`` is unchanged.

    Raises:
        PairingError: the file cannot be written, or exists and ``overwrite``
            is false, naming it and the reason.
    """
    data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    # mkstemp creates the file with mode 0600, and the umask can only clear bits.
    try:
        fd, temp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise PairingError(
            f"cannot write key file {str(path)!r}: {exc.strerror}"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temp_name, path)
        else:
            _rename_no_replace(temp_name, path)
    except FileExistsError:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise PairingError(
            f"file {str(path)!r} already exists; pass --force to overwrite it, "
            "or choose another file"
        ) from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise PairingError(
            f"cannot write key file {str(path)!r}: {exc.strerror}"
        ) from exc
    _fsync_directory(path.parent)


def _rename_no_replace(source: str, target: Path) -> None:
    """Rename ``source`` to ``target``, raising ``FileExistsError`` if it exists."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # NOTE: without hard links the check and the rename are two steps, so
        # a file created at ``target`` between them is replaced.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from exc
        os.replace(source, target)
        return
    os.unlink(source)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable. Some file systems cannot fsync a directory.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync of directory %s is not supported", directory)
    finally:
        os.close(fd)


class PairingStore:
    """The appliance's paired devices: one key file per device in ``directory``.

    ``lookup`` serves the protocol on every HELLO from a cache that one
    ``os.stat`` of the key file keeps current, so a device paired, replaced or
    forgotten by another process takes effect at its next handshake. Changes
    (``pair``, ``forget``, ``remove_key_file``) hold an exclusive ``flock`` on
    ``<directory>/.lock``, so two ``appliance pair`` commands cannot both take
    one name.

    An unusable key file (damaged, or open to other users) does not stop
    ``pair``, ``forget``, ``get`` or ``export`` for other devices, and ``scan``
    reports it, but ``list`` and ``lookup`` of its own id raise. Looking up a
    name skips files that cannot be parsed and logs a warning, but still reads
    names from files that are only open to other users, because ``chmod 600``
    would bring those back.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[bytes, tuple[tuple[int, int, int, int], bytes]] = {}
        self._cache_lock = threading.Lock()

    def key_path(self, device_id: bytes) -> Path:
        return self.directory / f"{device_id.hex()}.json"

    def pair(self, name: str, replace: bool = False) -> DeviceKey:
        """Create a random device id and key for ``name`` and store them.

        With ``replace``, a device already paired under ``name`` is forgotten
        after the new key is stored, so its old key stops working.

        Raises:
            PairingError: the name is invalid, already paired (without
                ``replace``), or the key file cannot be written. Key files that
                cannot be parsed are skipped with a warning, so a name that
                one of them held may be paired again.
        """
        validate_name(name)
        with self._locked():
            previous = self._find_name(name)
            if previous is not None and not replace:
                raise PairingError(
                    f"device name {name!r} is already paired as "
                    f"{previous.device_id_hex}; choose another name, forget it "
                    f"with `appliance unpair {shlex.quote(name)}`, or pair again "
                    "with --replace"
                )
            key = DeviceKey(
                self._new_device_id(),
                os.urandom(PSK_SIZE),
                name,
                datetime.datetime.now(datetime.UTC).replace(microsecond=0),
            )
            _write_private_json(self.key_path(key.device_id), key.to_json())
            if previous is not None:
                self._remove(previous.device_id)
        logger.info("paired device %s as %s", name, key.device_id_hex)
        return key

    def lookup(self, device_id: bytes) -> bytes | None:
        """Return the PSK of a paired device, or None when it is not paired.

        The appliance calls this for every HELLO. A cache hit costs one
        ``os.stat``; the file is read again when its inode, size, mode or
        modification time changed.

        Raises:
            PairingError: the device's key file exists but is unusable
                (readable by other users, not JSON, wrong sizes, or its id
                differs from its file name).
        """
        path = self.key_path(device_id)
        try:
            status = os.stat(path)
        except FileNotFoundError:
            self._forget_cached(device_id)
            return None
        except OSError as exc:
            raise PairingError(
                f"cannot read key file {str(path)!r}: {exc.strerror}"
            ) from exc
        stamp = (status.st_ino, status.st_size, status.st_mode, status.st_mtime_ns)
        with self._cache_lock:
            cached = self._cache.get(device_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        self._check_directory()
        key = self._load(path)
        if key is None:
            return None
        with self._cache_lock:
            self._cache[device_id] = (stamp, key.psk)
        return key.psk

    def list(self) -> list[DeviceKey]:
        """Return every paired device, oldest first.

        Raises:
            PairingError: a key file is unusable, naming it and the fix.
                ``scan`` lists the usable devices in that case.
        """
        keys, unusable = self.scan()
        if unusable:
            raise unusable[0].error
        return keys

    def scan(self) -> tuple[builtins.list[DeviceKey], builtins.list[UnusableKeyFile]]:
        """Read every key file and return the usable devices, oldest first,
        and the unusable files in file name order.

        Raises:
            PairingError: the pairing directory is open to other users or
                cannot be read.
        """
        keys = []
        unusable = []
        for path in self._key_files():
            try:
                keys.append(self._read(path))
            except PairingError as exc:
                device_id = bytes.fromhex(path.stem)
                unusable.append(UnusableKeyFile(path, device_id, exc))
        keys.sort(key=lambda key: (key.created_at, key.name))
        return keys, unusable

    def get(self, device: bytes | str) -> DeviceKey:
        """Return the device with this id (bytes or 16 hex digits) or name.

        Raises:
            PairingError: no such device is paired, or its key file is unusable.
        """
        device_id = parse_device_id(device)
        if device_id is not None:
            key = self._load(self.key_path(device_id))
            if key is not None:
                return key
        if isinstance(device, str):
            match = self._find_name(device)
            if match is not None:
                # The name may come from a file open to other users, whose
                # key must not be handed out: read it again with all checks.
                return self._read(self.key_path(match.device_id))
        raise self._not_found(device)

    def forget(self, device: bytes | str) -> DeviceKey:
        """Remove a device by id or name so its key is rejected from now on.

        Returns the removed device. A session already established with it
        lasts until its next handshake. A key file that other users may access
        is removed as well.

        Raises:
            PairingError: no such device is paired, its key file cannot be
                parsed (``remove_key_file`` removes it by id), or its file
                cannot be removed.
        """
        with self._locked():
            key = self._find(device)
            if key is None:
                raise self._not_found(device)
            self._remove(key.device_id)
        logger.info("forgot device %s (%s)", key.name, key.device_id_hex)
        return key

    def remove_key_file(self, device_id: bytes | str) -> DeviceKey | None:
        """Remove the key file of ``device_id`` (bytes or 16 hex digits),
        whatever its content.

        Returns the device if the file could be parsed, or None if it was
        damaged. Either way the device's key is rejected from now on.

        Raises:
            PairingError: ``device_id`` is not an id, no key file has that id,
                or the file cannot be removed.
        """
        parsed_id = parse_device_id(device_id)
        if parsed_id is None:
            raise PairingError(
                f"{device_id!r} is not a device id; pass the 16 hex digits "
                "that `appliance devices` shows"
            )
        path = self.key_path(parsed_id)
        with self._locked():
            if not os.path.lexists(path):
                raise self._not_found(device_id)
            try:
                key = self._read(path, require_private=False)
            except PairingError as exc:
                logger.info("removing unusable key file %s: %s", path, exc)
                key = None
            self._remove(parsed_id)
        logger.info("removed key file %s", path)
        return key

    def export(
        self, device: bytes | str, path: Path, overwrite: bool = True
    ) -> DeviceKey:
        """Write a device's key to ``path`` for the simulator or firmware.

        The export has mode 0600 and is written atomically; ``load_export``
        reads it back. Without ``overwrite`` an existing ``path`` is kept and
        an error raised.

        Raises:
            PairingError: no such device is paired, ``path`` exists and
                ``overwrite`` is false, or ``path`` cannot be written.
        """
        key = self.get(device)
        _write_private_json(Path(path), key.to_json(), overwrite=overwrite)
        logger.info("exported the key of device %s to %s", key.name, path)
        return key

    def _find(self, device: bytes | str) -> DeviceKey | None:
        """Return the device with this id or name, reading files open to other
        users too, or None."""
        device_id = parse_device_id(device)
        if device_id is not None:
            path = self.key_path(device_id)
            if path.exists():
                return self._read(path, require_private=False)
        if isinstance(device, str):
            return self._find_name(device)
        return None

    def _not_found(self, device: bytes | str) -> PairingError:
        label = device.hex() if isinstance(device, bytes) else device
        message = (
            f"no paired device with id or name {label!r} in "
            f"{str(self.directory)!r}; list them with `appliance devices`"
        )
        unusable = self._count_unusable()
        if unusable:
            message += f", which also lists the {unusable} unusable key file(s)"
        return PairingError(message)

    def _count_unusable(self) -> int:
        try:
            return len(self.scan()[1])
        except PairingError:
            return 0

    def _read(self, path: Path, require_private: bool = True) -> DeviceKey:
        key = _read_key_file(path, _store_file_fix(path), require_private)
        if path.name != f"{key.device_id_hex}.json":
            raise PairingError(
                f"key file {str(path)!r} contains device id {key.device_id_hex}, "
                "which does not match its file name; rename it to "
                f"{key.device_id_hex}.json"
            )
        return key

    def _load(self, path: Path) -> DeviceKey | None:
        if not path.exists():
            return None
        return self._read(path)

    def _key_files(self) -> Iterator[Path]:
        if not self.directory.exists():
            return iter(())
        self._check_directory()
        return iter(
            sorted(
                path
                for path in self.directory.iterdir()
                if _KEY_FILE_PATTERN.fullmatch(path.name)
            )
        )

    def _find_name(self, name: str) -> DeviceKey | None:
        """Return the device called ``name``, or None.

        Files open to other users are read for their names, so ``chmod 600``
        cannot bring back a second device with the same name. Files that
        cannot be parsed are skipped with a warning.
        """
        for path in self._key_files():
            try:
                key = self._read(path, require_private=False)
            except PairingError as exc:
                logger.warning(
                    "skipped an unusable key file while looking for device name %r: %s",
                    name,
                    exc,
                )
                continue
            if key.name == name:
                return key
        return None

    def _new_device_id(self) -> bytes:
        for _ in range(_ID_ATTEMPTS):
            device_id = os.urandom(DEVICE_ID_SIZE)
            if not self.key_path(device_id).exists():
                return device_id
        raise PairingError(
            f"no free device id after {_ID_ATTEMPTS} random draws in "
            f"{str(self.directory)!r}; check that os.urandom works"
        )

    def _remove(self, device_id: bytes) -> None:
        path = self.key_path(device_id)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PairingError(
                f"cannot remove key file {str(path)!r}: {exc.strerror}"
            ) from exc
        self._forget_cached(device_id)
        _fsync_directory(self.directory)

    def _forget_cached(self, device_id: bytes) -> None:
        with self._cache_lock:
            self._cache.pop(device_id, None)

    def _check_directory(self) -> None:
        try:
            mode = stat.S_IMODE(os.stat(self.directory).st_mode)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PairingError(
                f"cannot read pairing directory {str(self.directory)!r}: {exc.strerror}"
            ) from exc
        if mode & 0o077:
            raise PairingError(
                f"pairing directory {str(self.directory)!r} has mode {mode:04o}, but "
                "only its owner may have access to device keys; run "
                f"`chmod 700 {self.directory}`"
            )

    def _ensure_directory(self) -> None:
        try:
            if not self.directory.exists():
                self.directory.mkdir(mode=DIRECTORY_MODE, parents=True)
                # mkdir applies the umask, which may also clear owner bits.
                os.chmod(self.directory, DIRECTORY_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise PairingError(
                f"cannot create pairing directory {str(self.directory)!r}: "
                f"{exc.strerror}; check the data directory's permissions"
            ) from exc
        if not self.directory.is_dir():
            raise PairingError(
                f"pairing directory {str(self.directory)!r} is not a directory; "
                "move that file away"
            )
        self._check_directory()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_directory()
        lock_path = self.directory / _LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, KEY_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def parse_device_id(device: bytes | str) -> bytes | None:
    """Return ``device`` as an 8-byte id if it is one, in bytes or 16 hex digits,
    or None."""
    if isinstance(device, bytes):
        return device if len(device) == DEVICE_ID_SIZE else None
    if _DEVICE_ID_PATTERN.fullmatch(device):
        return bytes.fromhex(device)
    return None
