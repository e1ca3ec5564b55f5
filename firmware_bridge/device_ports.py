"""The device end of a link for simulators: a pty published as a symlink, or pyserial.

A simulated device writes to the master side of a pty, and the appliance opens
the slave side by a symlink path (``<dir>/ttyDEVICE -> /dev/pts/N``) that the
simulator owns. Closing the port removes the symlink and reopening creates a
new pty behind the same path, as a USB serial adapter disappears on unplug and
comes back under the same udev name. Any other port is opened with pyserial.

A simulator owns a symlink path while it holds an exclusive ``flock`` on the
lock file next to it (``<dir>/.ttyDEVICE.lock``, which contains its pid), from
``open_device_port`` until ``release``, disconnects included. The kernel drops
the lock when the process ends, even by SIGKILL. So a symlink whose lock no
process holds is stale and may be replaced, and a second simulator cannot take
over a path that a live one still publishes. Simulators from before this lock
file existed take no lock, so they are not detected.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import logging
import os
import select
import shlex
import stat
import time
from pathlib import Path

import serial

from firmware_bridge.errors import PortError
from firmware_bridge.serial_link import open_port
from firmware_bridge.simulator import PtyPair

logger = logging.getLogger(__name__)

READ_CHUNK = 4096
"""Maximum bytes taken from the port per read."""
PTY_DIRECTORY = "/dev/pts/"
_LOCK_ATTEMPTS = 5
"""Maximum attempts to lock a lock file that its previous owner deletes meanwhile."""


class DevicePort(abc.ABC):
    """The device end of a link, with non-blocking reads and writes."""

    path: str
    """Path or URL that the appliance opens: the pty symlink, or the port itself."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Return a description of the port for logs and the CLI."""

    @abc.abstractmethod
    def wait(self, timeout: float, want_write: bool) -> None:
        """Block until bytes can be read, or written with ``want_write``, or
        ``timeout`` seconds pass."""

    @abc.abstractmethod
    def read(self) -> bytes:
        """Return the bytes available now, possibly none."""

    @abc.abstractmethod
    def write(self, data: bytes) -> int:
        """Write what the port accepts now and return that many bytes."""

    @abc.abstractmethod
    def reopen(self) -> None:
        """Open the port again after ``close``.

        Raises:
            OSError or PortError: the port cannot be opened yet.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Close the port, which ``reopen`` may open again. Safe to call more
        than once."""

    def release(self) -> None:
        """Close the port for good and give up any claim on its path.

        Safe to call more than once, and ``reopen`` fails afterwards.
        """
        self.close()


class PtyLinkPort(DevicePort):
    """A pty published as a symlink, so the slave's name can change underneath.

    The symlink is replaced atomically (a new link renamed over the old one)
    and removed on ``close``, as a device node disappears on unplug. The lock
    file ``.<link name>.lock`` next to the symlink stays locked from the
    constructor until ``release``.

    Raises:
        PortError: another live simulator holds the lock on ``link_path``.
        OSError: the lock file or the symlink cannot be created.
    """

    def __init__(self, link_path: Path) -> None:
        self.path = str(link_path)
        self._link = link_path
        self._pty: PtyPair | None = None
        self._lock = PathLock(lock_path_for(link_path))
        self._lock.acquire(link_path)
        try:
            self.reopen()
        except BaseException:
            self._lock.release()
            raise

    @property
    def is_open(self) -> bool:
        return self._pty is not None

    @property
    def pty_path(self) -> str | None:
        """The slave device the symlink points at, such as /dev/pts/3."""
        return self._pty.slave_path if self._pty is not None else None

    def describe(self) -> str:
        return f"{self.path} -> {self.pty_path or 'nothing (disconnected)'}"

    def reopen(self) -> None:
        if not self._lock.held:
            raise PortError(
                f"the pty link {self.path!r} was released and cannot be reopened",
                self.path,
            )
        pty = PtyPair()
        os.set_blocking(pty.master_fd, False)
        temporary = self._link.with_name(f".{self._link.name}.{os.getpid()}.tmp")
        try:
            temporary.unlink(missing_ok=True)
            os.symlink(pty.slave_path, temporary)
            os.replace(temporary, self._link)
        except OSError:
            pty.close()
            raise
        self._pty = pty

    def wait(self, timeout: float, want_write: bool) -> None:
        assert self._pty is not None
        fd = self._pty.master_fd
        select.select([fd], [fd] if want_write else [], [], timeout)

    def read(self) -> bytes:
        assert self._pty is not None
        try:
            return os.read(self._pty.master_fd, READ_CHUNK)
        except BlockingIOError:
            return b""

    def write(self, data: bytes) -> int:
        assert self._pty is not None
        try:
            return os.write(self._pty.master_fd, data)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        pty, self._pty = self._pty, None
        if pty is None:
            return
        try:
            if os.readlink(self._link) == pty.slave_path:
                self._link.unlink()
        except OSError:
            logger.debug("pty link %s was already gone", self._link)
        pty.close()

    def release(self) -> None:
        self.close()
        self._lock.release()


def lock_path_for(link_path: Path) -> Path:
    """Return the lock file that guards the pty symlink ``link_path``."""
    return link_path.with_name(f".{link_path.name}.lock")


class PathLock:
    """An exclusive, non-blocking ``flock`` on a lock file that contains the owner's pid.

    ``release`` deletes the file while it is still locked. A process that
    opened the file just before then locks a deleted inode, so ``acquire``
    checks that the path still names the inode it locked and tries again if
    not.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, link_path: Path) -> None:
        """Lock the file, creating it if needed, and write this process's pid.

        Raises:
            PortError: another process holds the lock; the message names
                ``link_path``, the owner's pid and the fix.
            OSError: the lock file cannot be created or opened.
        """
        for _ in range(_LOCK_ATTEMPTS):
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                os.close(fd)
                raise _in_use_error(link_path, self.path, owner) from None
            except BaseException:
                os.close(fd)
                raise
            if _names_same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise PortError(
            f"cannot lock {str(self.path)!r}: other processes replaced it "
            f"{_LOCK_ATTEMPTS} times while it was being locked; try again",
            str(link_path),
        )

    def release(self) -> None:
        """Delete the lock file and unlock it. Safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if _names_same_file(fd, self.path):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(fd)


def _names_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _in_use_error(link_path: Path, lock_path: Path, owner: int | None) -> PortError:
    owner_text = f"pid {owner}" if owner is not None else "another process"
    return PortError(
        f"cannot publish the device at {str(link_path)!r}: a running simulator "
        f"({owner_text}) owns it and holds the lock {str(lock_path)!r}; stop "
        "that simulator or pass another path with --port",
        str(link_path),
    )


class SerialUrlPort(DevicePort):
    """A port opened with pyserial: a serial device path or a pyserial URL.

    NOTE: writes block while the peer does not read (a full socket buffer or
    hardware flow control), because pyserial's non-blocking write spins on a
    full buffer instead of returning.
    """

    def __init__(self, url: str, baudrate: int = 115200) -> None:
        self.path = url
        self.baudrate = baudrate
        self._serial: serial.SerialBase | None = None
        self._serial = open_port(url, baudrate, read_timeout=0)

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def describe(self) -> str:
        return self.path

    def reopen(self) -> None:
        self._serial = open_port(self.path, self.baudrate, read_timeout=0)

    def wait(self, timeout: float, want_write: bool) -> None:
        assert self._serial is not None
        try:
            fd = self._serial.fileno()
        except (AttributeError, NotImplementedError):
            # Handlers without a descriptor (rfc2217://) are polled.
            time.sleep(min(timeout, 0.01))
            return
        select.select([fd], [fd] if want_write else [], [], timeout)

    def read(self) -> bytes:
        assert self._serial is not None
        # With a zero timeout, pyserial returns what is buffered, up to the size.
        return self._serial.read(READ_CHUNK)

    def write(self, data: bytes) -> int:
        assert self._serial is not None
        return self._serial.write(data) or 0

    def close(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            try:
                port.close()
            except OSError:
                logger.debug("error closing %s ignored", self.path)


def open_device_port(port: str, baudrate: int = 115200) -> DevicePort:
    """Open the device end of a link named by ``port``.

    A URL (``socket://``, ``rfc2217://``), a serial device or a symlink to one
    is opened with pyserial. A path that does not exist, or that is a symlink
    into /dev/pts left by an earlier run, becomes a new pty published there,
    unless a live simulator still holds that path's lock file.

    Raises:
        PortError: a directory, a regular file or a dangling symlink is at the
            path, another simulator owns the path, or the port cannot be
            opened. The message names ``port`` and the fix.
    """
    if "://" in port:
        return SerialUrlPort(port, baudrate)
    path = Path(port)
    if path.is_symlink():
        target = os.readlink(path)
        if target.startswith(PTY_DIRECTORY):
            return _open_pty_link(path)
        if not path.exists():
            raise _dangling_symlink_error(port, target)
    elif not path.exists():
        return _open_pty_link(path)
    mode = path.stat().st_mode
    if stat.S_ISCHR(mode):
        return SerialUrlPort(port, baudrate)
    if stat.S_ISDIR(mode):
        raise PortError(
            f"--port {port!r} is a directory; pass a path inside it at which to "
            f"publish the pty symlink, such as {str(path / 'ttyDEVICE')!r}",
            port,
        )
    raise PortError(
        f"cannot publish the device at {port!r}: it is a regular file or other "
        "non-device file, not a serial device or a pty symlink; pass a path that "
        "does not exist yet with --port, or move the file away",
        port,
    )


def _dangling_symlink_error(port: str, target: str) -> PortError:
    if target.startswith("/dev/"):
        return PortError(
            f"--port {port!r} is a symlink to {target!r}, which does not exist: "
            f"plug that device in, or remove the symlink (`rm {shlex.quote(port)}`) "
            "to publish a simulated pty there",
            port,
        )
    return PortError(
        f"--port {port!r} is a symlink to {target!r}, which does not exist and is "
        f"not a device; remove the symlink (`rm {shlex.quote(port)}`) to publish a "
        "simulated pty there, or pass another path with --port",
        port,
    )


def _open_pty_link(path: Path) -> PtyLinkPort:
    try:
        return PtyLinkPort(path)
    except OSError as exc:
        raise PortError(
            f"cannot create the device pty link {str(path)!r}: {exc.strerror}; "
            "pass a path in a writable directory with --port",
            str(path),
        ) from exc
