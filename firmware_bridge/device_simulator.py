"""Device simulator for the framed protocol, with faults on the bytes it writes.

``FramedDeviceSimulator`` runs a ``DeviceEndpoint`` in a thread on the device
end of a link and submits message bodies from an iterable. Faults act on the
frames the device writes, never on the appliance's replies. Each burst of
output is split at the 0x00 delimiters, and every frame may be dropped,
corrupted, duplicated, held back behind the next frame or delayed. Random
garbage may precede a frame, and a frame may go out in several writes cut at
random bytes. Resets restart the endpoint with its queue intact, as a device
with persistent storage reboots. Disconnects close the port for a while, as a
USB serial adapter disappears when it is unplugged. On a pty the appliance
must then reopen the symlink path, which ``firmware_bridge.device_ports``
points at a new pty.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator

from firmware_bridge.device_ports import DevicePort, open_device_port
from firmware_bridge.errors import PortError
from firmware_bridge.pairing import DeviceKey
from firmware_bridge.protocol import DeviceEndpoint, DeviceState
from firmware_bridge.simulator import load_sample_lines

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.05
"""Maximum wait for the appliance's bytes before the endpoint's timers run."""
SPLIT_GAP_SECONDS = 0.001
"""Pause between the pieces of a frame written with ``split_writes``."""
REORDER_HOLD_SECONDS = 0.05
"""Maximum time a reordered frame waits for another frame to overtake it."""
RECONNECT_RETRY_SECONDS = 0.5
"""Pause before reopening a port that failed or could not be opened."""
MAX_GARBAGE_BYTES = 32


@dataclasses.dataclass(frozen=True)
class FaultOptions:
    """Faults applied to the frames the simulated device writes, all off by default.

    Probabilities are per frame and between 0 and 1.
    """

    drop: float = 0.0
    """Probability that a frame is not written."""
    corrupt: float = 0.0
    """Probability that one bit of a frame is flipped."""
    duplicate: float = 0.0
    """Probability that a frame is written twice in a row."""
    reorder: float = 0.0
    """Probability that a frame is held back and written after the next one."""
    delay: float = 0.0
    """Maximum seconds a frame waits before it is written. Frames keep their order."""
    split_writes: bool = False
    """Write each frame in one to four pieces cut at random bytes, 1 ms apart."""
    garbage: float = 0.0
    """Probability that 1 to 32 random bytes and a 0x00 are written before a frame."""
    reset_every: int | None = None
    """Restart the endpoint after every N acknowledged messages, keeping its
    queue. The write in progress is cut at a random byte."""
    disconnect_every: int | None = None
    """Close the port after every N acknowledged messages."""
    disconnect_seconds: float = 1.0
    """Seconds the port stays closed after each disconnect."""
    seed: int | None = None
    """Seed of the fault generator. None draws different faults on each run."""

    def __post_init__(self) -> None:
        for name in ("drop", "corrupt", "duplicate", "reorder", "garbage"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault {name}={value!r} must be between 0 and 1")
        if self.delay < 0 or self.disconnect_seconds < 0:
            raise ValueError(
                f"delay={self.delay!r} and disconnect_seconds="
                f"{self.disconnect_seconds!r} must not be negative"
            )
        for name in ("reset_every", "disconnect_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r} must be at least 1 or None")


@dataclasses.dataclass
class SimulatorStats:
    """Fault and traffic counts of one simulator run."""

    frames: int = 0
    """Frames the endpoint produced, before faults."""
    bytes_written: int = 0
    """Bytes the port accepted, faults included."""
    frames_dropped: int = 0
    frames_corrupted: int = 0
    frames_duplicated: int = 0
    frames_reordered: int = 0
    garbage_insertions: int = 0
    split_frames: int = 0
    """Frames written in more than one piece."""
    resets: int = 0
    disconnects: int = 0
    """Disconnects injected by ``disconnect_every``."""
    port_failures: int = 0
    """Reads or writes that failed and made the simulator reopen the port."""
    bytes_lost: int = 0
    """Output discarded while the port was closed or by a reset."""


class _FaultInjector:
    """Turns a burst of frames into timed writes according to ``FaultOptions``."""

    def __init__(self, options: FaultOptions, stats: SimulatorStats) -> None:
        self.options = options
        self.stats = stats
        self.rng = random.Random(options.seed)
        self.writes: collections.deque[tuple[float, bytes]] = collections.deque()
        """Pending writes as (monotonic time not before which to write, bytes)."""
        self._held_frame: tuple[float, bytes] | None = None
        self._last_release = 0.0

    def add(self, output: bytes, now: float) -> None:
        """Schedule the frames in ``output``, each between 0x00 delimiters."""
        for body in output.split(b"\x00"):
            if body:
                self.stats.frames += 1
                self._add_frame(b"\x00" + body + b"\x00", now)

    def release_held(self, now: float) -> None:
        """Write a held-back frame that no other frame overtook in time."""
        if (
            self._held_frame is not None
            and now - self._held_frame[0] >= REORDER_HOLD_SECONDS
        ):
            frame = self._held_frame[1]
            self._held_frame = None
            self._schedule(frame, now)

    def next_deadline(self) -> float | None:
        """Return the earliest time at which a pending write or held frame is due."""
        times = [self.writes[0][0]] if self.writes else []
        if self._held_frame is not None:
            times.append(self._held_frame[0] + REORDER_HOLD_SECONDS)
        return min(times) if times else None

    def discard(self) -> int:
        """Drop every pending write and the held frame, and return the bytes dropped."""
        lost = sum(len(data) for _, data in self.writes)
        if self._held_frame is not None:
            lost += len(self._held_frame[1])
        self.writes.clear()
        self._held_frame = None
        return lost

    def _add_frame(self, frame: bytes, now: float) -> None:
        options, rng = self.options, self.rng
        if rng.random() < options.drop:
            self.stats.frames_dropped += 1
            return
        if rng.random() < options.corrupt:
            frame = self._corrupted(frame)
        copies = [frame]
        if rng.random() < options.duplicate:
            self.stats.frames_duplicated += 1
            copies.append(frame)
        overtaken = self._held_frame
        if overtaken is None and rng.random() < options.reorder:
            self.stats.frames_reordered += 1
            self._held_frame = (now, copies.pop())
        for copy in copies:
            self._schedule(copy, now)
        if overtaken is not None:
            self._held_frame = None
            self._schedule(overtaken[1], now)

    def _corrupted(self, frame: bytes) -> bytes:
        self.stats.frames_corrupted += 1
        damaged = bytearray(frame)
        # The delimiters stay intact, so noise damages one frame, not two.
        position = self.rng.randrange(1, len(frame) - 1)
        damaged[position] ^= 1 << self.rng.randrange(8)
        return bytes(damaged)

    def _schedule(self, frame: bytes, now: float) -> None:
        options, rng = self.options, self.rng
        if rng.random() < options.garbage:
            self.stats.garbage_insertions += 1
            size = rng.randint(1, MAX_GARBAGE_BYTES)
            frame = rng.randbytes(size) + b"\x00" + frame
        # A delay never lets a frame overtake one scheduled before it.
        release = max(now + rng.uniform(0.0, options.delay), self._last_release)
        pieces = self._pieces(frame) if options.split_writes else [frame]
        for piece in pieces:
            self.writes.append((release, piece))
            release += SPLIT_GAP_SECONDS if len(pieces) > 1 else 0.0
        self._last_release = release

    def _pieces(self, frame: bytes) -> list[bytes]:
        count = min(self.rng.randint(1, 4), len(frame))
        if count == 1:
            return [frame]
        self.stats.split_frames += 1
        cuts = sorted(self.rng.sample(range(1, len(frame)), count - 1))
        bounds = [0, *cuts, len(frame)]
        return [frame[start:end] for start, end in itertools.pairwise(bounds)]


def sample_messages() -> Iterator[bytes]:
    """Yield the bundled BGL sample lines as UTF-8 message bodies."""
    for line in load_sample_lines():
        yield line.encode("utf-8")


class FramedDeviceSimulator:
    """A simulated device that sends messages over the framed protocol.

    Call ``start()`` to open the port and start the thread, and ``stop()`` to
    end it. ``finished`` is set once the iterable is exhausted and the
    appliance has acknowledged every message submitted.

    Args:
        key: the device's id and key, from ``load_export`` or a pairing store.
        port: a pyserial URL (``socket://``, ``rfc2217://``), a serial device
            path, or a path at which to publish a pty as a symlink.
        messages: message bodies to send, at most 1024 bytes each; by default
            the bundled BGL sample lines, UTF-8 encoded.
        faults: faults applied to the frames the device writes.
        rate: messages per second to submit; 0 submits as fast as the send
            queue allows.
        max_queue: unacknowledged messages above which no more are submitted,
            as a device with a bounded buffer.
        window, retransmit_after, handshake_timeout: passed to ``DeviceEndpoint``.
        baudrate: line speed in bit/s of a serial device; ptys ignore it.
        stream_id, first_number: continue an earlier stream, as a device with
            persistent storage does after a power cycle (see ``DeviceEndpoint``).
    """

    def __init__(
        self,
        key: DeviceKey,
        port: str,
        messages: Iterable[bytes] | None = None,
        faults: FaultOptions | None = None,
        rate: float = 0.0,
        max_queue: int = 128,
        window: int = 32,
        retransmit_after: float = 1.0,
        handshake_timeout: float = 1.0,
        baudrate: int = 115200,
        stream_id: bytes | None = None,
        first_number: int = 0,
    ) -> None:
        if rate < 0 or max_queue < 1:
            raise ValueError(f"rate={rate!r} must be >= 0 and max_queue >= 1")
        self.key = key
        self.port_name = port
        self.faults = faults or FaultOptions()
        self.rate = rate
        self.max_queue = max_queue
        self.baudrate = baudrate

        self.endpoint = DeviceEndpoint(
            key.device_id,
            key.psk,
            window=window,
            retransmit_after=retransmit_after,
            handshake_timeout=handshake_timeout,
            stream_id=stream_id,
            first_number=first_number,
        )
        self.stats = SimulatorStats()
        self.finished = threading.Event()
        """Set once every message is submitted and acknowledged."""
        self.stopped = threading.Event()
        """Set when the thread has ended, by ``stop()`` or by ``error``."""
        self.error: BaseException | None = None
        """The exception that ended the thread, if one did."""

        self._messages = iter(messages if messages is not None else sample_messages())
        self._exhausted = False
        self._sent = 0
        self._first_number = first_number
        self._injector = _FaultInjector(self.faults, self.stats)
        self._port: DevicePort | None = None
        self._reconnect_at: float | None = None
        self._reopen_failures = 0
        self._next_submit_at = 0.0
        self._next_reset = self.faults.reset_every
        self._next_disconnect = self.faults.disconnect_every
        self._last_state = self.endpoint.state

        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"device-{key.device_id_hex}", daemon=True
        )

    @property
    def sent(self) -> int:
        """Messages submitted to the endpoint so far."""
        return self._sent

    @property
    def acked(self) -> int:
        """One past the last acknowledged message number: acknowledgements are
        cumulative, so every message below it is acknowledged."""
        return self.endpoint.acked

    @property
    def port_path(self) -> str | None:
        """The path the appliance opens: the pty symlink or the serial port."""
        return self._port.path if self._port is not None else None

    def start(self) -> None:
        """Open the port, so a bad ``port`` raises ``PortError`` here, then start."""
        self._port = open_device_port(self.port_name, self.baudrate)
        self._thread.start()
        logger.info(
            "device %s: simulator started on %s",
            self.key.device_id_hex,
            self._port.describe(),
        )

    def stop(self) -> None:
        """Stop the thread and release the port, removing a pty symlink and its
        lock file. Safe to call more than once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._port is not None:
            self._port.release()

    def __enter__(self) -> FramedDeviceSimulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._step()
        except Exception as exc:
            self.error = exc
            logger.exception("device %s: simulator stopped", self.key.device_id_hex)
        finally:
            self.stopped.set()

    def _step(self) -> None:
        now = time.monotonic()
        self._reconnect_if_due(now)
        self._submit(now)
        output = self.endpoint.poll(now)
        if output and self._port is not None and self._port.is_open:
            self._injector.add(output, now)
        elif output:
            self.stats.bytes_lost += len(output)
        self._injector.release_held(now)
        self._log_state()
        self._check_progress(now)
        blocked = self._write_due(now)
        data = self._wait_and_read(now, blocked)
        if data:
            self.endpoint.receive(data, time.monotonic())

    def _submit(self, now: float) -> None:
        while not self._exhausted and self.endpoint.unacknowledged < self.max_queue:
            if self.rate and now < self._next_submit_at:
                return
            body = next(self._messages, None)
            if body is None:
                self._exhausted = True
                return
            self.endpoint.submit(body)
            self._sent += 1
            if self.rate:
                self._next_submit_at = max(self._next_submit_at, now) + 1 / self.rate

    def _check_progress(self, now: float) -> None:
        acked = self.endpoint.acked
        if self._exhausted and acked >= self._first_number + self._sent:
            if not self.finished.is_set():
                logger.info(
                    "device %s: all %d messages acknowledged",
                    self.key.device_id_hex,
                    self._sent,
                )
            self.finished.set()
            return
        reset_every = self.faults.reset_every
        if reset_every and self._next_reset is not None and acked >= self._next_reset:
            self._next_reset = (acked // reset_every + 1) * reset_every
            self._reset()
        disconnect_every = self.faults.disconnect_every
        if (
            disconnect_every
            and self._next_disconnect is not None
            and acked >= self._next_disconnect
        ):
            self._next_disconnect = (acked // disconnect_every + 1) * disconnect_every
            self._disconnect(now)

    def _reset(self) -> None:
        """Restart the endpoint as a reboot would, cutting the pending write short."""
        self.stats.resets += 1
        writes = self._injector.writes
        if writes and self._port is not None and self._port.is_open:
            _, first = writes.popleft()
            cut = self._injector.rng.randrange(len(first) + 1)
            self._write_all(first[:cut])
            self.stats.bytes_lost += len(first) - cut
        self.stats.bytes_lost += self._injector.discard()
        self.endpoint.restart(new_stream=False)
        logger.info(
            "device %s: reset %d at %d acknowledged messages",
            self.key.device_id_hex,
            self.stats.resets,
            self.endpoint.acked,
        )

    def _disconnect(self, now: float) -> None:
        self._close_port()
        self.stats.disconnects += 1
        self._reconnect_at = now + self.faults.disconnect_seconds
        logger.info(
            "device %s: disconnected for %.2f s",
            self.key.device_id_hex,
            self.faults.disconnect_seconds,
        )

    def _close_port(self) -> None:
        self.stats.bytes_lost += self._injector.discard()
        if self._port is not None:
            self._port.close()

    def _reconnect_if_due(self, now: float) -> None:
        if self._reconnect_at is None or now < self._reconnect_at:
            return
        assert self._port is not None
        try:
            self._port.reopen()
        except (OSError, PortError) as exc:
            self._reopen_failures += 1
            # A warning for the first failure in a row and every 20th after it.
            level = (
                logging.WARNING if self._reopen_failures % 20 == 1 else logging.DEBUG
            )
            logger.log(
                level,
                "device %s: reopening %s failed (attempt %d), retrying every %.1f s: %s",
                self.key.device_id_hex,
                self.port_name,
                self._reopen_failures,
                RECONNECT_RETRY_SECONDS,
                exc,
            )
            self._reconnect_at = now + RECONNECT_RETRY_SECONDS
            return
        self._reopen_failures = 0
        self._reconnect_at = None
        logger.info(
            "device %s: reconnected on %s",
            self.key.device_id_hex,
            self._port.describe(),
        )

    def _write_due(self, now: float) -> bool:
        """Write the pending writes that are due, and return True if the port is full."""
        port = self._port
        writes = self._injector.writes
        while writes and writes[0][0] <= now and port is not None and port.is_open:
            release, data = writes[0]
            try:
                written = port.write(data)
            except OSError as exc:
                self._port_failed(now, exc)
                return False
            self.stats.bytes_written += written
            if written < len(data):
                writes[0] = (release, data[written:])
                return True
            writes.popleft()
        return False

    def _write_all(self, data: bytes) -> None:
        assert self._port is not None
        view = memoryview(data)
        deadline = time.monotonic() + 1.0
        while view and time.monotonic() < deadline:
            try:
                written = self._port.write(bytes(view))
            except OSError:
                return
            self.stats.bytes_written += written
            view = view[written:]
            if view:
                self._port.wait(TICK_SECONDS, want_write=True)

    def _wait_and_read(self, now: float, blocked: bool) -> bytes:
        port = self._port
        if port is None or not port.is_open:
            self._stop.wait(self._timeout(now))
            return b""
        due = self._injector.writes and self._injector.writes[0][0] <= now
        try:
            port.wait(self._timeout(now), want_write=bool(blocked or due))
            return port.read()
        except OSError as exc:
            self._port_failed(now, exc)
            return b""

    def _timeout(self, now: float) -> float:
        deadlines = [now + TICK_SECONDS]
        injector_deadline = self._injector.next_deadline()
        if injector_deadline is not None and injector_deadline > now:
            deadlines.append(injector_deadline)
        if self._reconnect_at is not None:
            deadlines.append(self._reconnect_at)
        if self.rate and not self._exhausted:
            deadlines.append(self._next_submit_at)
        return max(0.0, min(deadlines) - now)

    def _port_failed(self, now: float, exc: OSError) -> None:
        self.stats.port_failures += 1
        logger.warning(
            "device %s: port %s failed, reopening in %.1f s: %s",
            self.key.device_id_hex,
            self.port_name,
            RECONNECT_RETRY_SECONDS,
            exc,
        )
        self._close_port()
        self._reconnect_at = now + RECONNECT_RETRY_SECONDS

    def _log_state(self) -> None:
        state = self.endpoint.state
        if state == self._last_state:
            return
        if state == DeviceState.REFUSED:
            logger.error(
                "device %s: the appliance rejected it as not paired; pair it with "
                "`appliance pair NAME --export FILE` and pass that file with --key",
                self.key.device_id_hex,
            )
        else:
            logger.debug("device %s: %s", self.key.device_id_hex, state.value)
        self._last_state = state
