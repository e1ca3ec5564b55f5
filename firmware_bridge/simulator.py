"""Device simulator for line-mode links, and the pseudo-terminal the demo uses.

The simulator replays text lines into the master side of a pty; the appliance
opens the slave side exactly as it would open ``/dev/ttyUSB0``. Writes block
when the appliance stops reading, as a real UART device is held back.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import tty
from collections.abc import Sequence
from importlib import resources

logger = logging.getLogger(__name__)

SAMPLE_NAME = "BGL_2k.log"
"""The bundled loghub BGL sample (see firmware_bridge/samples/LICENSE)."""


def load_sample_lines() -> list[str]:
    """Return the bundled BGL sample as a device prints it.

    Each line of the dataset starts with its alert label (``-`` or an alert
    category). A real device never prints that label, so it is removed here.
    """
    text = (
        resources.files("firmware_bridge")
        .joinpath("samples", SAMPLE_NAME)
        .read_text(encoding="utf-8", errors="replace")
    )
    lines = []
    for line in text.splitlines():
        _label, _, message = line.partition(" ")
        if message:
            lines.append(message)
    return lines


class PtyPair:
    """A pseudo-terminal pair in raw mode: the device writes to ``master_fd``.

    The slave descriptor stays open for the pair's lifetime so the pty does not
    hang up while the appliance reopens it.
    """

    def __init__(self) -> None:
        self.master_fd, self._slave_fd = os.openpty()
        tty.setraw(self._slave_fd)
        self.slave_path = os.ttyname(self._slave_fd)

    def close(self) -> None:
        """Close both ends. Safe to call more than once."""
        for fd in (self.master_fd, self._slave_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.master_fd = self._slave_fd = -1


class LineDeviceSimulator:
    """Replays lines into a file descriptor at a fixed rate in a thread.

    Args:
        fd: where to write, usually ``PtyPair.master_fd``.
        lines: the lines to send, without line endings.
        rate: lines per second; 0 sends as fast as the reader accepts.
        start: index of the first line to send; replay wraps around at the end.
        line_ending: bytes appended to every line.
    """

    def __init__(
        self,
        fd: int,
        lines: Sequence[str],
        rate: float = 5.0,
        start: int = 0,
        line_ending: bytes = b"\r\n",
    ) -> None:
        if not lines:
            raise ValueError("the simulator needs at least one line to send")
        self.fd = fd
        os.set_blocking(fd, False)
        self.lines = lines
        self.rate = rate
        self.position = start % len(lines)
        self.line_ending = line_ending
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="device-sim", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sending. Safe to call more than once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic()
        while not self._stop.is_set():
            line = self.lines[self.position].encode("utf-8") + self.line_ending
            if not self._write_all(line):
                return
            self.sent += 1
            self.position = (self.position + 1) % len(self.lines)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if self._stop.is_set():
                return False
            _, writable, _ = select.select([], [self.fd], [], 0.2)
            if not writable:
                continue
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                continue
            except OSError as exc:
                logger.info("device simulator stopped: %s", exc)
                return False
            view = view[written:]
        return True
