"""Serial link on pyserial: a reader thread that moves port bytes into a ring buffer.

Any port that ``serial.serial_for_url`` accepts works: a device path such as
``/dev/ttyUSB0``, a pty, ``socket://host:port`` or ``rfc2217://host:port``.
After a read failure the port is closed and reopened with capped exponential
backoff and full jitter; bytes already in the ring buffer are kept.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import threading
from collections.abc import Callable

import serial
from serial.tools import list_ports

from firmware_bridge.counters import LinkCounters
from firmware_bridge.errors import PortError, PortNotFoundError, PortPermissionError
from firmware_bridge.link import Link, LinkState, backoff_delay
from firmware_bridge.ring_buffer import RingBuffer

logger = logging.getLogger(__name__)

READ_CHUNK = 4096
"""Maximum bytes taken from the port per read call."""


WRITE_TIMEOUT = 1.0
"""Seconds a write may block on a device that stopped reading."""


def open_port(
    url: str, baudrate: int, read_timeout: float, rtscts: bool = False
) -> serial.SerialBase:
    """Open ``url`` with pyserial, translating its errors into ``PortError``.

    A local port is opened with an exclusive lock (``flock``), so a second
    appliance or another program cannot read the same device unnoticed.

    Raises:
        PortNotFoundError: the path does not exist or the URL cannot be reached.
        PortPermissionError: the path exists but this user may not open it.
        PortError: any other failure to open, with pyserial's reason.
    """
    try:
        options = {"exclusive": True} if "://" not in url else {}
        return serial.serial_for_url(
            url,
            baudrate=baudrate,
            timeout=read_timeout,
            write_timeout=WRITE_TIMEOUT,
            rtscts=rtscts,
            **options,
        )
    except (serial.SerialException, OSError, ValueError) as exc:
        raise _port_error(url, exc) from exc


def usb_port_resolver(
    vid: int, pid: int, serial_number: str | None = None
) -> Callable[[], str]:
    """Return a function that finds a USB serial adapter's current device path.

    The kernel may give a re-plugged adapter another name (ttyUSB0 becoming
    ttyUSB1); the vendor id, product id and serial number stay the same, so
    the link looks them up in pyserial's port listing before every open.
    """
    wanted = f"USB {vid:04x}:{pid:04x}" + (
        f" serial {serial_number!r}" if serial_number else ""
    )

    def resolve() -> str:
        seen = []
        for port in list_ports.comports():
            if port.vid is None:
                continue
            seen.append(f"{port.device} ({port.vid:04x}:{port.pid:04x})")
            if (port.vid, port.pid) == (vid, pid) and (
                serial_number is None or port.serial_number == serial_number
            ):
                return str(port.device)
        raise PortNotFoundError(
            f"no serial adapter matches {wanted}; USB serial ports present: "
            f"{', '.join(seen) or 'none'}. Plug the adapter in or correct vid, pid "
            "and serial_number (`appliance scan` lists them)",
            wanted,
        )

    resolve.__name__ = wanted
    return resolve


def _port_error(url: str, exc: BaseException) -> PortError:
    code = getattr(exc, "errno", None)
    if code is None:
        # pyserial's URL handlers raise SerialException without an errno and
        # keep the socket error as the context.
        code = getattr(exc.__cause__ or exc.__context__, "errno", None)
    if code == errno.ENOENT or ("://" not in url and not os.path.exists(url)):
        return PortNotFoundError(
            f"serial port {url!r} not found: check that the device is plugged in and "
            "pass its path or URL with --port",
            url,
        )
    if code in (errno.EACCES, errno.EPERM):
        group = _group_of(url)
        if group and group != "root":
            hint = (
                f"add the service user to group {group!r} (`sudo usermod -aG "
                f"{group} USER`, then log in again)"
            )
        else:
            hint = "grant the service user read and write access to it"
        return PortPermissionError(
            f"permission denied opening serial port {url!r}: {hint}", url
        )
    if "exclusively lock" in str(exc) or code in (errno.EAGAIN, errno.EBUSY):
        return PortError(
            f"serial port {url!r} is in use by another process: stop the other "
            "appliance or program reading it (`fuser -v PATH` shows which)",
            url,
        )
    if code == errno.EISDIR:
        return PortError(
            f"{url!r} is a directory, not a serial port: pass the device path, "
            "for example /dev/ttyUSB0",
            url,
        )
    if code == errno.ENOTTY or "Inappropriate ioctl" in str(exc):
        return PortError(
            f"{url!r} is not a serial port (it does not accept terminal settings): "
            "pass a tty device such as /dev/ttyUSB0, or a socket:// URL",
            url,
        )
    if code == errno.ECONNREFUSED:
        return PortNotFoundError(
            f"serial port {url!r} refused the connection: start the serial server "
            "or correct --port",
            url,
        )
    return PortError(f"cannot open serial port {url!r}: {exc}", url)


def _group_of(path: str) -> str | None:
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return None


class SerialLink(Link):
    """A named serial link feeding a ring buffer from a background thread.

    Call ``open()`` first so a port that cannot be opened fails at start with a
    clear error; ``start()`` then runs the reader until ``close()``.

    Args:
        name: the link name used in records and logs.
        url: any port pyserial accepts, or a function returning one before
            each open (``usb_port_resolver``), so a re-enumerated adapter is
            found under its new name.
        ring: the buffer the reader writes into.
        counters: the link's counters, updated in place.
        baudrate: line speed in bit/s; ignored by ptys and sockets.
        read_timeout: seconds a single read waits for the first byte.
        max_backoff: cap, in seconds, on the delay between reopen attempts.
        rtscts: RTS/CTS hardware flow control, so a full ring buffer (block
            policy) stops the device at the UART instead of losing bytes.
    """

    def __init__(
        self,
        name: str,
        url: str | Callable[[], str],
        ring: RingBuffer,
        counters: LinkCounters,
        baudrate: int = 115200,
        read_timeout: float = 0.1,
        max_backoff: float = 30.0,
        rtscts: bool = False,
    ) -> None:
        self.name = name
        self._resolve = url if callable(url) else None
        self.url = url if isinstance(url, str) else ""
        self.rtscts = rtscts
        self.ring = ring
        self.counters = counters
        self.baudrate = baudrate
        self.read_timeout = read_timeout
        self.max_backoff = max_backoff
        self.state = LinkState.CLOSED
        self.last_error: str | None = None
        self._port: serial.SerialBase | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    def open(self) -> None:
        """Open the port now; raises ``PortError`` when it cannot be opened."""
        self.state = LinkState.CONNECTING
        try:
            self._port = self._open_port()
        except PortError as exc:
            self.state = LinkState.CLOSED
            self.last_error = str(exc)
            raise
        self.state = LinkState.CONNECTED
        logger.info("link %s: opened %s at %d baud", self.name, self.url, self.baudrate)

    def start(self) -> None:
        """Start the reader thread; ``open()`` must have succeeded."""
        self._thread = threading.Thread(
            target=self._run, name=f"link-{self.name}", daemon=True
        )
        self._thread.start()

    def _open_port(self) -> serial.SerialBase:
        if self._resolve is not None:
            self.url = self._resolve()
        return open_port(self.url, self.baudrate, self.read_timeout, self.rtscts)

    def write(self, data: bytes) -> bool:
        """Write ``data`` to the port; return False when the port is down.

        A failed write is counted and not retried: the protocol above resends
        what matters (the device repeats unacknowledged frames, the appliance
        repeats acknowledgements when it sees them).
        """
        with self._write_lock:
            port = self._port
            if port is None:
                self.counters.write_errors += 1
                return False
            try:
                port.write(data)
            except (serial.SerialException, OSError) as exc:
                self.counters.write_errors += 1
                logger.debug("link %s: write failed: %s", self.name, exc)
                return False
        return True

    def pause(self) -> None:
        """Stop draining the port so the device is held back; bytes stay in the OS."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def close(self) -> None:
        """Stop the reader and close the port. Safe to call more than once."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._close_port()
        self.state = LinkState.CLOSED

    def _close_port(self) -> None:
        # Under the write lock, so a write never runs on a port being closed
        # (pyserial raises TypeError then, not SerialException).
        with self._write_lock:
            port, self._port = self._port, None
            if port is not None:
                try:
                    port.close()
                except (serial.SerialException, OSError):
                    logger.debug("link %s: error closing port ignored", self.name)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if self._port is None:
                if not self._reopen(attempt):
                    attempt += 1
                    continue
                attempt = 0
            if self._paused.is_set():
                self._stop.wait(0.05)
                continue
            try:
                waiting = self._port.in_waiting
                data = self._port.read(min(max(waiting, 1), READ_CHUNK))
            except (serial.SerialException, OSError) as exc:
                self.counters.read_errors += 1
                self.last_error = f"read failed: {exc}"
                logger.warning("link %s: read failed, reopening: %s", self.name, exc)
                self._close_port()
                self.state = LinkState.BACKING_OFF
                continue
            if data:
                self.counters.bytes += len(data)
                self._store(data)

    def _store(self, data: bytes) -> None:
        before_overflows = self.ring.overflows
        before_dropped = self.ring.dropped_bytes
        self.ring.put(data, should_stop=self._stop.is_set)
        self.counters.overflows += self.ring.overflows - before_overflows
        self.counters.overflow_dropped_bytes += self.ring.dropped_bytes - before_dropped

    def _reopen(self, attempt: int) -> bool:
        delay = backoff_delay(attempt, cap=self.max_backoff)
        if self._stop.wait(delay):
            return False
        try:
            self._port = self._open_port()
        except PortError as exc:
            self.last_error = str(exc)
            logger.warning(
                "link %s: reopen attempt %d failed: %s", self.name, attempt + 1, exc
            )
            return False
        self.counters.reconnects += 1
        self.state = LinkState.CONNECTED
        logger.info("link %s: reopened %s", self.name, self.url)
        return True
