"""A simulated BLE device: the emulated BlueZ peripheral's NUS run by a DeviceEndpoint.

``BleDeviceSimulator`` puts a peripheral with the Nordic UART Service in range
of ``tests/bluez_emulator.BluezEmulator`` and runs the device side of the
framed protocol behind it in a thread. The endpoint's frames go out as TX
notifications of at most ATT_MTU - 3 bytes each, and whatever the appliance
writes to RX is fed back to the endpoint. Like typical NUS firmware, the
device starts a new handshake on every new subscription, and it keeps its
unacknowledged messages across connections. Bytes produced while no central
is subscribed are lost, and the protocol resends them.

Faults act on the connection, not on single notifications: the peripheral
drops the link after each ``disconnect_every`` seconds of subscription, and
the adapter is powered off and on at set times after the first connection.

It lives under tests/ because it drives the emulator, which exists only here.
On real hardware the device is firmware, and firmware_bridge has no BLE
peripheral role to host a simulator.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable

from firmware_bridge.pairing import DeviceKey
from firmware_bridge.protocol import DeviceEndpoint, DeviceState
from tests.bluez_emulator import BluezEmulator, Peripheral, nus_service

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.01
"""Pause between two passes of the device loop when it has nothing to send."""
ATT_HEADER_BYTES = 3
"""Opcode and handle of an ATT notification: its payload is ATT_MTU - 3 bytes."""


@dataclasses.dataclass(frozen=True)
class BleFaults:
    """Connection faults of a simulated BLE device, all off by default."""

    disconnect_every: float | None = None
    """Seconds a subscription lasts before the peripheral drops the link, as
    a supervision timeout does. None never drops it."""
    power_cycles_at: tuple[float, ...] = ()
    """Seconds after the first subscription at which the adapter is powered off."""
    power_off_seconds: float = 2.0
    """Seconds the adapter stays off in each power cycle."""

    def __post_init__(self) -> None:
        if self.disconnect_every is not None and self.disconnect_every <= 0:
            raise ValueError(
                f"disconnect_every={self.disconnect_every!r} must be positive or None"
            )
        if self.power_off_seconds < 0 or any(t < 0 for t in self.power_cycles_at):
            raise ValueError(
                f"power_off_seconds={self.power_off_seconds!r} and power_cycles_at="
                f"{self.power_cycles_at!r} must not be negative"
            )


@dataclasses.dataclass
class BleDeviceStats:
    """Traffic and fault counts of one simulated BLE device."""

    subscriptions: int = 0
    """Subscriptions of a central to TX, one per connection that got that far."""
    notifications: int = 0
    bytes_notified: int = 0
    bytes_received: int = 0
    """Bytes the central wrote to RX."""
    bytes_lost: int = 0
    """Endpoint output discarded because no central was subscribed."""
    forced_disconnects: int = 0
    power_cycles: int = 0


class BleDeviceSimulator:
    """A BLE peripheral that sends messages over the framed protocol.

    Call ``start()`` to put the peripheral in range and start the thread, and
    ``stop()`` to end it. ``finished`` is set once ``messages`` is exhausted
    and the appliance has acknowledged every message submitted.

    Args:
        emulator: the running emulated BlueZ.
        key: the device's id and key from a pairing store.
        address, name: the peripheral's Bluetooth address and advertised name.
        messages: message bodies to send, at most 1024 bytes each.
        faults: connection faults.
        rate: messages per second to submit, or 0 to submit as fast as the
            queue allows.
        max_queue: unacknowledged messages above which no more are submitted.
        mtu: the peripheral's largest ATT MTU. Notifications carry MTU - 3 bytes.
        window, retransmit_after, handshake_timeout: passed to ``DeviceEndpoint``.
    """

    def __init__(
        self,
        emulator: BluezEmulator,
        key: DeviceKey,
        address: str,
        name: str,
        messages: Iterable[bytes],
        faults: BleFaults | None = None,
        rate: float = 0.0,
        max_queue: int = 128,
        mtu: int = 23,
        window: int = 32,
        retransmit_after: float = 1.0,
        handshake_timeout: float = 1.0,
    ) -> None:
        if rate < 0 or max_queue < 1:
            raise ValueError(f"rate={rate!r} must be >= 0 and max_queue >= 1")
        if mtu < 23:
            raise ValueError(f"mtu={mtu!r} is below the ATT minimum of 23 bytes")
        self.emulator = emulator
        self.key = key
        self.address = address.upper()
        self.name = name
        self.faults = faults or BleFaults()
        self.rate = rate
        self.max_queue = max_queue
        self.mtu = mtu
        self.endpoint = DeviceEndpoint(
            key.device_id,
            key.psk,
            window=window,
            retransmit_after=retransmit_after,
            handshake_timeout=handshake_timeout,
        )
        self.stats = BleDeviceStats()
        self.finished = threading.Event()
        """Set once every message is submitted and acknowledged."""
        self.error: BaseException | None = None
        """The exception that ended the thread, if one did."""

        self._messages = iter(messages)
        self._exhausted = False
        self._sent = 0
        self._next_submit_at = 0.0
        self._peripheral: Peripheral | None = None
        self._read_offset = 0
        self._subscription: int | None = None
        """The emulator's StartNotify count when the current subscription began."""
        self._subscribed_at = 0.0
        self._first_subscribed_at: float | None = None
        self._power_cycles = sorted(self.faults.power_cycles_at)
        self._power_on_at: float | None = None
        self._last_state = self.endpoint.state
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"ble-device-{key.device_id_hex}", daemon=True
        )

    @property
    def sent(self) -> int:
        """Messages submitted to the endpoint so far."""
        return self._sent

    @property
    def acked(self) -> int:
        """One past the last acknowledged message number."""
        return self.endpoint.acked

    def start(self) -> None:
        """Put the advertising peripheral in range and start the device thread."""
        self._peripheral = self.emulator.add_peripheral(
            self.address, self.name, services=(nus_service(),), mtu=self.mtu
        )
        self._thread.start()
        logger.info(
            "BLE device %s: advertising as %r at %s",
            self.key.device_id_hex,
            self.name,
            self.address,
        )

    def stop(self) -> None:
        """Stop the thread and leave the adapter powered. Safe to call twice."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._power_on_at is not None:
            self._power_on_at = None
            self.emulator.set_powered(True)

    def __enter__(self) -> BleDeviceSimulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._step():
                    self._stop.wait(TICK_SECONDS)
        except Exception as exc:
            self.error = exc
            logger.exception("BLE device %s: simulator stopped", self.key.device_id_hex)

    def _step(self) -> bool:
        """Run one pass of the device loop and return True if it sent something."""
        now = time.monotonic()
        self._apply_faults(now)
        written = self._take_written()
        if written:
            self.endpoint.receive(written, now)
        self._follow_subscription(now)
        self._submit(now)
        output = self.endpoint.poll(now)
        self._log_state()
        self._check_finished()
        if not output:
            return False
        if self._subscription is None:
            self.stats.bytes_lost += len(output)
            return False
        return self._notify(output)

    def _take_written(self) -> bytes:
        """Return the bytes the central wrote to RX since the last call."""
        assert self._peripheral is not None
        # The emulator appends every RX write to ``received`` and never trims it.
        received = self._peripheral.received
        data = bytes(received[self._read_offset :])
        self._read_offset += len(data)
        self.stats.bytes_received += len(data)
        return data

    def _follow_subscription(self, now: float) -> None:
        """Notice a central subscribing or going away, and handshake on each new one.

        A forced disconnect followed by a quick reconnect can fall between two
        passes, so a new subscription is recognized by a change in the
        emulator's count of StartNotify calls, not by the subscribed flag alone.
        """
        subscribed = self.emulator.is_notifying(self.address)
        if not subscribed:
            if self._subscription is not None:
                logger.debug("BLE device %s: central went away", self.key.device_id_hex)
            self._subscription = None
            return
        count = self.emulator.calls["StartNotify"]
        if count == self._subscription:
            return
        self._subscription = count
        self._subscribed_at = now
        if self._first_subscribed_at is None:
            self._first_subscribed_at = now
        self.stats.subscriptions += 1
        # A new connection starts a new session, and the send queue survives.
        self.endpoint.restart(new_stream=False)
        logger.debug(
            "BLE device %s: central subscribed (%d)",
            self.key.device_id_hex,
            self.stats.subscriptions,
        )

    def _apply_faults(self, now: float) -> None:
        faults = self.faults
        if (
            faults.disconnect_every is not None
            and self._subscription is not None
            and now - self._subscribed_at >= faults.disconnect_every
        ):
            self._subscription = None
            try:
                self.emulator.force_disconnect(self.address)
            except RuntimeError:
                logger.debug(
                    "BLE device %s: already disconnected", self.key.device_id_hex
                )
            else:
                self.stats.forced_disconnects += 1
        if self._power_on_at is not None and now >= self._power_on_at:
            self._power_on_at = None
            self.emulator.set_powered(True)
            logger.info("BLE device %s: adapter powered on", self.key.device_id_hex)
        first = self._first_subscribed_at
        if (
            self._power_cycles
            and first is not None
            and now - first >= self._power_cycles[0]
        ):
            self._power_cycles.pop(0)
            self.emulator.set_powered(False)
            self._power_on_at = now + faults.power_off_seconds
            self.stats.power_cycles += 1
            logger.info(
                "BLE device %s: adapter powered off for %.1f s",
                self.key.device_id_hex,
                faults.power_off_seconds,
            )

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

    def _notify(self, output: bytes) -> bool:
        size = self.mtu - ATT_HEADER_BYTES
        try:
            self.emulator.notify(self.address, output, size)
        except RuntimeError as exc:
            # The central went away between the check and the notification.
            self.stats.bytes_lost += len(output)
            logger.debug("BLE device %s: %s", self.key.device_id_hex, exc)
            return False
        self.stats.notifications += -(-len(output) // size)
        self.stats.bytes_notified += len(output)
        return True

    def _check_finished(self) -> None:
        if self._exhausted and self.endpoint.acked >= self._sent:
            if not self.finished.is_set():
                logger.info(
                    "BLE device %s: all %d messages acknowledged",
                    self.key.device_id_hex,
                    self._sent,
                )
            self.finished.set()

    def _log_state(self) -> None:
        state = self.endpoint.state
        if state != self._last_state:
            level = logging.ERROR if state == DeviceState.REFUSED else logging.DEBUG
            logger.log(level, "BLE device %s: %s", self.key.device_id_hex, state.value)
            self._last_state = state
