"""The device end of a link for simulators: a pty published as a symlink, or pyserial.

A simulated device writes to the master side of a pty, and the appliance opens
the slave side by a symlink path (``<dir>/ttyDEVICE -> /dev/pts/N``) that the
simulator owns. Closing the port removes the symlink and reopening creates a
new pty behind the same path, as a USB serial adapter disappears on unplug and
comes back under the same udev name. Any other port is opened with pyserial.
"""

from __future__ import annotations

import abc
import logging
import os
import select
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
        """Close the port. Safe to call more than once."""


class PtyLinkPort(DevicePort):
    """A pty published as a symlink, so the slave's name can change underneath.

    The symlink is replaced atomically (a new link renamed over the old one)
    and removed on ``close``, as a device node disappears on unplug.
    """

    def __init__(self, link_path: Path) -> None:
        self.path = str(link_path)
        self._link = link_path
        self._pty: PtyPair | None = None
        self.reopen()

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
    into /dev/pts left by an earlier run, becomes a new pty published there.

    Raises:
        PortError: something other than a symlink or a device is at the path,
            or the port cannot be opened.
    """
    if "://" in port:
        return SerialUrlPort(port, baudrate)
    path = Path(port)
    if path.is_symlink():
        if os.readlink(path).startswith("/dev/pts/"):
            return _open_pty_link(path)
        return SerialUrlPort(port, baudrate)
    if not path.exists():
        return _open_pty_link(path)
    if stat.S_ISCHR(path.stat().st_mode):
        return SerialUrlPort(port, baudrate)
    raise PortError(
        f"cannot publish the device at {port!r}: a file that is not a symlink or "
        "a serial device is in the way; pass a free path with --port",
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
