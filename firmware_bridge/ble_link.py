"""BLE link on bleak: notifications of one GATT characteristic into a ring buffer.

By default the link speaks the Nordic UART Service (NUS): in service
6E400001-B5A3-F393-E0A9-E50E24DCCA9E the device notifies on TX (6E400003) and
the appliance writes to RX (6E400002). ``BleTarget`` can name other UUIDs.

bleak runs in an asyncio event loop that the link owns, on a thread of its own,
and callers reach that loop through ``run_coroutine_threadsafe``. Notification
payloads go into the ring unparsed and in arrival order, so frames split across
notifications of any size are reassembled by the frame decoder above. The loop
never waits for the ring: each notification is put on a thread-safe hand-off
queue, and a hand-off thread calls ``ring.put``, which under the block policy
waits for space. One dedicated thread keeps the order, which a thread-pool
executor would not. A notification carries no flow control, so a device cannot
be held back; the hand-off queue is therefore capped at ``max_pending_bytes``,
and notifications beyond the cap are dropped and counted as overflows. The
device resends frames that the appliance does not acknowledge.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import re
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bleak import BleakClient, BleakScanner
from bleak.args.bluez import BlueZClientArgs, BlueZScannerArgs
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakCharacteristicNotFoundError,
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
    BleakGATTProtocolErrorCode,
)
from bleak.uuids import normalize_uuid_str

from firmware_bridge.counters import LinkCounters
from firmware_bridge.errors import (
    AdapterUnavailableError,
    BridgeError,
    BufferClosedError,
    DeviceNotFoundError,
    LinkLostError,
    PortError,
)
from firmware_bridge.link import Link, LinkState, backoff_delay
from firmware_bridge.ring_buffer import RingBuffer

logger = logging.getLogger(__name__)

T = TypeVar("T")

NUS_SERVICE_UUID = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"
NUS_RX_UUID = "6e400002-b5a3-f393-e0a9-e50e24dcca9e"
"""NUS characteristic the appliance writes to."""
NUS_TX_UUID = "6e400003-b5a3-f393-e0a9-e50e24dcca9e"
"""NUS characteristic the device notifies on."""

BLUEZ_IN_PROGRESS = "org.bluez.Error.InProgress"
BLUEZ_NOT_PERMITTED = "org.bluez.Error.NotPermitted"
BLUEZ_NOT_READY = "org.bluez.Error.NotReady"

STALE_CACHE_CODES = frozenset(
    {
        BleakGATTProtocolErrorCode.INVALID_HANDLE,
        BleakGATTProtocolErrorCode.ATTRIBUTE_NOT_FOUND,
        BleakGATTProtocolErrorCode.DATABASE_OUT_OF_SYNC,
    }
)
"""ATT errors meaning BlueZ's cached GATT handles no longer match the device."""

IN_PROGRESS_ATTEMPTS = 5
"""Maximum tries of a scan, connect or subscribe step while BlueZ returns InProgress."""
SUBSCRIBE_ATTEMPTS = 4
"""Maximum tries of StartNotify while BlueZ returns InProgress or ``Notify acquired``."""
DISCONNECT_TIMEOUT = 5.0
"""Seconds to wait for a disconnect before releasing the client anyway."""
CLOSE_TIMEOUT = 10.0
"""Seconds ``close`` waits for the event loop to disconnect and stop."""

ADDRESS_PATTERN = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")

MAPPED_BLEAK_ERRORS = (
    BleakBluetoothNotAvailableError,
    BleakCharacteristicNotFoundError,
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakGATTProtocolError,
    BleakError,
)
"""bleak exception classes that ``bridge_error`` translates."""


def _normalize_uuid(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(normalize_uuid_str(value)))
    except ValueError:
        raise ValueError(
            f"{field} {value!r} is not a UUID: give 16-bit hex such as '180f' or "
            "the 128-bit form such as '6e400001-b5a3-f393-e0a9-e50e24dcca9e'"
        ) from None


@dataclasses.dataclass(frozen=True)
class BleTarget:
    """Target device of a BLE link, and the GATT characteristics that carry its bytes.

    A device matches when it has every one of ``address`` and ``name`` that is
    set. With neither set, the first device advertising ``service_uuid`` is used.

    Raises:
        ValueError: an address, UUID, timeout or MTU is malformed or out of range.
    """

    address: str | None = None
    """Bluetooth address such as ``C4:7F:0E:12:34:56``; case does not matter."""
    name: str | None = None
    """Advertised local name, matched exactly."""
    service_uuid: str = NUS_SERVICE_UUID
    """GATT service that contains ``tx_uuid`` and ``rx_uuid``."""
    tx_uuid: str = NUS_TX_UUID
    """Characteristic the device notifies on (device to appliance)."""
    rx_uuid: str = NUS_RX_UUID
    """Characteristic the appliance writes to (appliance to device)."""
    adapter: str | None = None
    """BlueZ adapter such as ``hci0``; None uses the first powered adapter."""
    scan_timeout: float = 10.0
    """Seconds one scan looks for the device."""
    connect_timeout: float = 20.0
    """Seconds one connection attempt, service discovery included, may take."""
    mtu: int | None = None
    """ATT MTU to assume for writes (chunks of MTU - 3 bytes); None uses the
    value BlueZ reports for the connection."""
    write_with_response: bool = False
    """Use ATT Write Requests, acknowledged by the device, instead of Write
    Commands."""

    def __post_init__(self) -> None:
        if self.address is not None:
            address = self.address.upper()
            if not ADDRESS_PATTERN.match(address):
                raise ValueError(
                    f"BLE address {self.address!r} is invalid: give six hex octets "
                    "separated by colons, such as C4:7F:0E:12:34:56"
                )
            object.__setattr__(self, "address", address)
        for field in ("service_uuid", "tx_uuid", "rx_uuid"):
            value = _normalize_uuid(getattr(self, field), field)
            object.__setattr__(self, field, value)
        if self.scan_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError(
                f"scan_timeout ({self.scan_timeout!r}) and connect_timeout "
                f"({self.connect_timeout!r}) must be positive seconds"
            )
        if self.mtu is not None and not 23 <= self.mtu <= 517:
            raise ValueError(
                f"mtu {self.mtu!r} is out of range: ATT allows 23 to 517 bytes"
            )

    @property
    def scans_by_service(self) -> bool:
        return self.address is None and self.name is None

    @property
    def label(self) -> str:
        """The target as shown in status and stored in ``PortError.port``."""
        if self.address is not None:
            return f"ble:{self.address}"
        if self.name is not None:
            return f"ble:name={self.name}"
        return f"ble:service={self.service_uuid}"

    def describe(self) -> str:
        """Return the matching rule in words, for messages."""
        parts = []
        if self.address is not None:
            parts.append(f"address {self.address}")
        if self.name is not None:
            parts.append(f"name {self.name!r}")
        if not parts:
            parts.append(f"advertising service {self.service_uuid}")
        return " and ".join(parts)

    def matches(self, device: BLEDevice, advertisement: AdvertisementData) -> bool:
        """Return True when an advertisement comes from the wanted device."""
        if self.address is not None and device.address.upper() != self.address:
            return False
        if self.name is not None and self.name not in (
            advertisement.local_name,
            device.name,
        ):
            return False
        if self.scans_by_service:
            advertised = {u.lower() for u in advertisement.service_uuids}
            return self.service_uuid in advertised
        return True


def bridge_error(target: BleTarget, link: str, exc: BaseException) -> BridgeError:
    """Translate a bleak, D-Bus socket or timeout error into a ``BridgeError``.

    This is the one place where foreign errors of the BLE link are mapped;
    ``MAPPED_BLEAK_ERRORS`` lists the bleak classes it handles.
    """
    adapter = target.adapter or "default adapter"
    if isinstance(exc, BleakBluetoothNotAvailableError) or (
        isinstance(exc, BleakDBusError) and exc.dbus_error == BLUEZ_NOT_READY
    ):
        return AdapterUnavailableError(
            f"Bluetooth {adapter} is not available ({exc}): power it on with "
            "`bluetoothctl power on` and check `rfkill list`",
            target.label,
        )
    # TimeoutError is an OSError, so it is checked first.
    if isinstance(exc, TimeoutError):
        return LinkLostError(
            f"BLE link {link} timed out connecting to {target.describe()}: move the "
            "appliance closer to the device or raise connect_timeout",
            link,
        )
    if isinstance(exc, OSError):
        return AdapterUnavailableError(
            f"cannot reach BlueZ on the D-Bus system bus ({exc}): start D-Bus and "
            "bluetoothd with `systemctl start dbus bluetooth`",
            target.label,
        )
    if isinstance(exc, BleakDeviceNotFoundError):
        return DeviceNotFoundError(
            f"BLE device {exc.identifier} is not known to BlueZ (it may have been "
            "removed when a scan stopped): make sure it is advertising and in range",
            target.label,
        )
    if isinstance(exc, BleakCharacteristicNotFoundError):
        return PortError(
            f"BLE device {target.describe()} has no characteristic "
            f"{exc.char_specifier}: set the service, TX and RX UUIDs that its "
            "firmware exposes",
            target.label,
        )
    if isinstance(exc, BleakGATTProtocolError):
        return LinkLostError(
            f"GATT request on link {link} failed with ATT error "
            f"{exc.code.name} (0x{int(exc.code):02x})",
            link,
        )
    if isinstance(exc, BleakDBusError):
        details = f": {exc.dbus_error_details}" if exc.dbus_error_details else ""
        return LinkLostError(
            f"BlueZ call on link {link} failed with {exc.dbus_error}{details}", link
        )
    return LinkLostError(f"BLE link {link} failed: {exc}", link)


class _StaleCacheError(Exception):
    """BlueZ's cached GATT table does not match the device (internal signal)."""


@dataclasses.dataclass
class _Session:
    """One live connection: the client and the two characteristics it uses."""

    client: BleakClient
    tx: BleakGATTCharacteristic
    rx: BleakGATTCharacteristic


@dataclasses.dataclass
class _Loss:
    """Record of how the current session ended, for the supervisor."""

    client: BleakClient
    reason: str
    dropped: bool
    """True when the connection fell (a read error); False when we ended it."""
    forget_cache: bool


class BleLink(Link):
    """A named BLE link feeding a ring buffer from bleak's event loop.

    Call ``open()`` first so that a missing device or adapter fails at start
    with a clear error; ``start()`` then keeps the link connected until
    ``close()``. Counters: ``bytes`` counts notification bytes received,
    ``read_errors`` connections that dropped, ``reconnects`` connections made
    again after a drop, ``write_errors`` failed writes, and ``overflows`` full
    rings and full hand-off queues.

    Args:
        name: the link name used in records and logs.
        target: the device to connect to and the UUIDs to use.
        ring: the buffer notifications are written into.
        counters: the link's counters, updated in place.
        write_timeout: seconds one ``write`` call may take, all chunks included.
        backoff_base: seconds of the first reconnect delay's upper bound.
        max_backoff: cap, in seconds, on the delay between reconnect attempts.
        adapter_poll_interval: seconds between attempts while the adapter is
            powered off or missing.
        in_progress_delay: seconds to wait before repeating a call that BlueZ
            returned ``org.bluez.Error.InProgress``.
        max_pending_bytes: cap on bytes waiting in the hand-off queue; None
            uses the ring's capacity.
    """

    def __init__(
        self,
        name: str,
        target: BleTarget,
        ring: RingBuffer,
        counters: LinkCounters,
        *,
        write_timeout: float = 5.0,
        backoff_base: float = 0.5,
        max_backoff: float = 30.0,
        adapter_poll_interval: float = 1.0,
        in_progress_delay: float = 0.25,
        max_pending_bytes: int | None = None,
    ) -> None:
        self.name = name
        self.target = target
        self.ring = ring
        self.counters = counters
        self.write_timeout = write_timeout
        self.backoff_base = backoff_base
        self.max_backoff = max_backoff
        self.adapter_poll_interval = adapter_poll_interval
        self.in_progress_delay = in_progress_delay
        self.max_pending_bytes = max_pending_bytes or ring.capacity
        self.state = LinkState.CLOSED
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._handoff: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._handoff_thread: threading.Thread | None = None
        self._pending_lock = threading.Lock()
        self._pending_bytes = 0
        self._dropping = False
        self._session: _Session | None = None
        self._loss: _Loss | None = None
        self._lost = asyncio.Event()
        self._forget_cache = False
        self._supervisor: asyncio.Task[None] | None = None

    # Link interface

    def open(self) -> None:
        """Scan for the target and connect once; does nothing when already connected.

        Raises:
            DeviceNotFoundError: no device matched within ``scan_timeout``.
            AdapterUnavailableError: the adapter is missing or powered off, or
                BlueZ cannot be reached.
            PortError: the device lacks the configured service or characteristics.
            LinkLostError: connecting or subscribing failed or timed out.
        """
        if self._session is not None:
            return
        loop = self._start_threads()
        self.state = LinkState.CONNECTING
        # Two scans and two connects when a stale GATT cache is cleared.
        timeout = 2 * (self.target.scan_timeout + self.target.connect_timeout) + 10
        future = asyncio.run_coroutine_threadsafe(self._connect(), loop)
        connected = False
        try:
            future.result(timeout=timeout)
            connected = True
        except TimeoutError:
            future.cancel()
            error = LinkLostError(
                f"BLE link {self.name} did not connect to {self.target.describe()} "
                f"within {timeout:g} s: check the device, or raise scan_timeout and "
                "connect_timeout",
                self.name,
            )
            self.last_error = str(error)
            raise error from None
        except BridgeError as exc:
            self.last_error = str(exc)
            raise
        finally:
            if not connected:
                self._stop_threads()
                self.state = LinkState.CLOSED
        self.state = LinkState.CONNECTED
        logger.info(
            "link %s: connected to %s, writes of up to %d bytes",
            self.name,
            self.target.label,
            self.max_write_size or 0,
        )

    def start(self) -> None:
        """Keep the link connected in the background until ``close``.

        Connects first when ``open`` was not called. Without ``start`` a
        dropped connection stays down.
        """
        loop = self._start_threads()
        if self._supervisor is not None:
            return
        if self._session is None and self.state is LinkState.CLOSED:
            self.state = LinkState.CONNECTING
        started = threading.Event()

        def create_supervisor() -> None:
            self._supervisor = loop.create_task(self._supervise())
            started.set()

        loop.call_soon_threadsafe(create_supervisor)
        started.wait(timeout=CLOSE_TIMEOUT)

    def write(self, data: bytes) -> bool:
        """Write ``data`` to the RX characteristic in chunks; False when the link is down.

        Chunks are at most ``max_write_size`` bytes and go out in order from the
        caller's thread through the link's event loop. A failed or timed-out
        write is counted and not retried: the protocol above resends.

        Raises:
            RuntimeError: called from the link's own event loop thread, where
                waiting for the write would deadlock.
        """
        if threading.current_thread() is self._loop_thread:
            raise RuntimeError(
                f"BleLink.write on link {self.name} called from its loop"
            )
        if not data:
            return True
        with self._write_lock:
            session, loop = self._session, self._loop
            if session is None or loop is None:
                self.counters.write_errors += 1
                return False
            future = asyncio.run_coroutine_threadsafe(
                self._write_chunks(session, bytes(data)), loop
            )
            try:
                future.result(timeout=self.write_timeout)
            except TimeoutError:
                future.cancel()
                return self._write_failed(
                    session, f"timed out after {self.write_timeout:g} s", stale=False
                )
            except concurrent.futures.CancelledError:
                return self._write_failed(session, "cancelled by close", stale=False)
            except (BleakError, OSError) as exc:
                return self._write_failed(session, str(exc), stale=_is_stale(exc))
            except EOFError:
                # dbus-fast raises EOFError when bleak closes the D-Bus
                # connection under a write because the device disconnected.
                return self._write_failed(
                    session, "the device disconnected during the write", stale=False
                )
        return True

    def close(self) -> None:
        """Disconnect, stop the event loop and hand-off threads. Safe to call twice."""
        self._stop.set()
        self._stop_threads()
        self.state = LinkState.CLOSED

    @property
    def max_write_size(self) -> int | None:
        """Bytes per write chunk on the current connection; None while down."""
        session = self._session
        return self._chunk_size(session) if session is not None else None

    # Threads

    def _start_threads(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._run_loop,
                args=(loop,),
                name=f"link-{self.name}",
                daemon=True,
            )
            self._loop = loop
            # A fresh event per loop: an asyncio.Event binds to the first loop
            # that waits on it.
            self._lost = asyncio.Event()
            self._loop_thread.start()
        if self._handoff_thread is None:
            self._handoff_thread = threading.Thread(
                target=self._deliver, name=f"link-{self.name}-handoff", daemon=True
            )
            self._handoff_thread.start()
        return self._loop

    def _stop_threads(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is not None and thread is not None and thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                future.result(timeout=CLOSE_TIMEOUT)
            except (TimeoutError, BleakError, OSError) as exc:
                logger.warning(
                    "link %s: disconnect on close failed: %s", self.name, exc
                )
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=CLOSE_TIMEOUT)
        self._loop = None
        self._loop_thread = None
        handoff, self._handoff_thread = self._handoff_thread, None
        if handoff is not None:
            self._handoff.put(None)
            handoff.join(timeout=CLOSE_TIMEOUT)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Cancel what bleak left running (its bus watcher) so that no task
            # is destroyed while pending when the loop closes.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _shutdown(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await self._disconnect_quietly(session.client)
        loss, self._loss = self._loss, None
        if loss is not None:
            await self._disconnect_quietly(loss.client)
        # NOTE: bleak keeps one BlueZ manager per event loop and offers no public
        # way to close it. Its D-Bus socket stays open until bleak creates a
        # manager for another loop, or until the process exits.

    # Notifications

    def _on_notification(
        self, _sender: BleakGATTCharacteristic, data: bytearray
    ) -> None:
        """Queue a notification for the hand-off thread; runs on the event loop."""
        size = len(data)
        self.counters.bytes += size
        with self._pending_lock:
            if self._pending_bytes + size > self.max_pending_bytes:
                self.counters.overflows += 1
                self.counters.overflow_dropped_bytes += size
                if not self._dropping:
                    logger.warning(
                        "link %s: hand-off queue full (%d bytes), dropping notifications",
                        self.name,
                        self._pending_bytes,
                    )
                self._dropping = True
                return
            self._dropping = False
            self._pending_bytes += size
        self._handoff.put(bytes(data))

    def _deliver(self) -> None:
        """Move queued notifications into the ring, in order, until the sentinel."""
        while True:
            data = self._handoff.get()
            if data is None:
                return
            overflows, dropped = self.ring.overflows, self.ring.dropped_bytes
            try:
                self.ring.put(data, should_stop=self._stop.is_set)
            except BufferClosedError:
                logger.debug(
                    "link %s: ring closed, %d bytes discarded", self.name, len(data)
                )
            with self._pending_lock:
                self._pending_bytes -= len(data)
                self.counters.overflows += self.ring.overflows - overflows
                self.counters.overflow_dropped_bytes += (
                    self.ring.dropped_bytes - dropped
                )

    # Connecting

    def _bluez_client_args(self) -> BlueZClientArgs:
        return (
            BlueZClientArgs(adapter=self.target.adapter) if self.target.adapter else {}
        )

    def _bluez_scanner_args(self) -> BlueZScannerArgs:
        return (
            BlueZScannerArgs(adapter=self.target.adapter) if self.target.adapter else {}
        )

    async def _connect(self) -> None:
        """Connect a new session and make it current.

        Raises:
            BridgeError: translated by ``bridge_error``, or a ``PortError`` when
                the characteristics are missing even after rediscovery.
        """
        try:
            session = await self._connect_session()
        except (BleakError, TimeoutError, OSError) as exc:
            raise bridge_error(self.target, self.name, exc) from exc
        self._session = session

    async def _connect_session(self) -> _Session:
        """Find the device, connect and subscribe, clearing a stale GATT cache once."""
        device = await self._find_device()
        if self._forget_cache:
            device = await self._forget_and_find(device, "a write hit stale handles")
        try:
            return await self._open_session(device)
        except _StaleCacheError as stale:
            device = await self._forget_and_find(device, str(stale))
        try:
            return await self._open_session(device)
        except _StaleCacheError as again:
            raise PortError(
                f"BLE device {device.address} ({self.target.describe()}) lacks what "
                f"the link needs even after GATT rediscovery: {again}. Set the "
                "service, TX and RX UUIDs that its firmware exposes",
                self.target.label,
            ) from again

    async def _find_device(self) -> BLEDevice:
        target = self.target

        async def scan() -> BLEDevice | None:
            if target.scans_by_service:
                return await BleakScanner.find_device_by_filter(
                    target.matches,
                    timeout=target.scan_timeout,
                    service_uuids=[target.service_uuid],
                    bluez=self._bluez_scanner_args(),
                )
            return await BleakScanner.find_device_by_filter(
                target.matches,
                timeout=target.scan_timeout,
                bluez=self._bluez_scanner_args(),
            )

        device = await self._retry_in_progress("scan", scan)
        if device is None:
            raise DeviceNotFoundError(
                f"no BLE device with {target.describe()} found within "
                f"{target.scan_timeout:g} s on {target.adapter or 'the default adapter'}: "
                "check that the device is powered, advertising and in range, or "
                "correct the address, name or service UUID",
                target.label,
            )
        return device

    async def _forget_and_find(self, device: BLEDevice, reason: str) -> BLEDevice:
        """Remove the device from BlueZ, dropping its GATT cache, and scan again.

        NOTE: RemoveDevice also deletes a bond. A bonded device must then be
        paired again by hand, because the link itself never pairs.
        """
        logger.warning(
            "link %s: stale GATT cache for %s (%s); removing it from BlueZ and "
            "discovering again",
            self.name,
            device.address,
            reason,
        )
        self._forget_cache = False
        try:
            await BleakClient(device, bluez=self._bluez_client_args()).unpair()
        except BleakDeviceNotFoundError:
            logger.debug("link %s: %s was already removed", self.name, device.address)
        return await self._find_device()

    async def _open_session(self, device: BLEDevice) -> _Session:
        client = BleakClient(
            device,
            disconnected_callback=self._on_disconnected,
            timeout=self.target.connect_timeout,
            bluez=self._bluez_client_args(),
        )
        try:
            await self._retry_in_progress("connect", client.connect)
            tx, rx = self._characteristics(client)
            await self._subscribe(client, tx)
        except BaseException:
            await self._disconnect_quietly(client)
            raise
        return _Session(client, tx, rx)

    def _characteristics(
        self, client: BleakClient
    ) -> tuple[BleakGATTCharacteristic, BleakGATTCharacteristic]:
        target = self.target
        service = client.services.get_service(target.service_uuid)
        if service is None:
            raise _StaleCacheError(f"service {target.service_uuid} not found")
        tx = service.get_characteristic(target.tx_uuid)
        rx = service.get_characteristic(target.rx_uuid)
        if tx is None or rx is None:
            missing = target.tx_uuid if tx is None else target.rx_uuid
            raise _StaleCacheError(
                f"characteristic {missing} not found in service {target.service_uuid}"
            )
        return tx, rx

    async def _subscribe(
        self, client: BleakClient, tx: BleakGATTCharacteristic
    ) -> None:
        """Start notifications on TX, recovering from InProgress and a held notify."""
        for attempt in range(1, SUBSCRIBE_ATTEMPTS + 1):
            try:
                await client.start_notify(tx, self._on_notification)
                return
            except BleakGATTProtocolError as exc:
                if exc.code in STALE_CACHE_CODES:
                    raise _StaleCacheError(
                        f"subscribing to {tx.uuid} failed with {exc.code.name}"
                    ) from exc
                raise
            except BleakDBusError as exc:
                if attempt == SUBSCRIBE_ATTEMPTS:
                    raise
                if not await self._recover_subscribe(client, tx, exc):
                    raise

    async def _recover_subscribe(
        self, client: BleakClient, tx: BleakGATTCharacteristic, exc: BleakDBusError
    ) -> bool:
        """Prepare another StartNotify after ``exc``; return False if none can help."""
        if exc.dbus_error == BLUEZ_IN_PROGRESS:
            logger.warning(
                "link %s: StartNotify on %s is in progress; trying again",
                self.name,
                tx.uuid,
            )
        elif (
            exc.dbus_error == BLUEZ_NOT_PERMITTED
            and "notify acquired" in str(exc).lower()
        ):
            # Another client has acquired the characteristic through AcquireNotify,
            # and BlueZ's StopNotify releases that acquisition, whoever made it.
            logger.warning(
                "link %s: notify on %s already acquired by another client; stopping "
                "it and subscribing again",
                self.name,
                tx.uuid,
            )
            try:
                await client.stop_notify(tx)
            except BleakError as stop_exc:
                logger.debug("link %s: StopNotify failed: %s", self.name, stop_exc)
        else:
            return False
        await asyncio.sleep(self.in_progress_delay)
        return True

    async def _retry_in_progress(
        self, step: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """Run ``call``, repeating it while BlueZ returns InProgress."""
        attempt = 1
        while True:
            try:
                return await call()
            except BleakDBusError as exc:
                if (
                    exc.dbus_error != BLUEZ_IN_PROGRESS
                    or attempt >= IN_PROGRESS_ATTEMPTS
                ):
                    raise
                logger.warning(
                    "link %s: %s returned InProgress (attempt %d of %d); retrying in "
                    "%.2f s",
                    self.name,
                    step,
                    attempt,
                    IN_PROGRESS_ATTEMPTS,
                    self.in_progress_delay,
                )
            await asyncio.sleep(self.in_progress_delay)
            attempt += 1

    async def _disconnect_quietly(self, client: BleakClient) -> None:
        """Disconnect and release ``client``'s D-Bus connection, logging failures."""
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT):
                await client.disconnect()
        except (BleakError, TimeoutError, OSError) as exc:
            logger.debug("link %s: disconnect failed: %s", self.name, exc)

    # Staying connected

    def _on_disconnected(self, client: BleakClient) -> None:
        """bleak's disconnect callback, on the event loop."""
        self._end_session(
            client, "the device disconnected", dropped=True, forget_cache=False
        )

    def _end_session(
        self, client: BleakClient, reason: str, *, dropped: bool, forget_cache: bool
    ) -> None:
        """Hand the current session to the supervisor for reconnection.

        Ignores clients that are not the current session: those are being set
        up or torn down by the link itself.
        """
        session = self._session
        if session is None or session.client is not client or self._stop.is_set():
            return
        self._session = None
        self._loss = _Loss(client, reason, dropped, forget_cache)
        self.state = LinkState.BACKING_OFF
        self._lost.set()

    async def _supervise(self) -> None:
        after_loss = False
        while True:
            if self._session is not None:
                await self._lost.wait()
            if self._lost.is_set():
                self._lost.clear()
                await self._handle_loss()
                after_loss = True
            await self._reconnect(after_loss)

    async def _handle_loss(self) -> None:
        loss, self._loss = self._loss, None
        if loss is None:
            return
        if loss.dropped:
            self.counters.read_errors += 1
        self._forget_cache = loss.forget_cache
        self.last_error = f"link lost: {loss.reason}"
        logger.warning("link %s: %s; reconnecting", self.name, self.last_error)
        await self._disconnect_quietly(loss.client)

    async def _reconnect(self, after_loss: bool) -> None:
        """Connect again, with backoff, until it works or the task is cancelled."""
        attempt = 0
        adapter_missing = False
        while True:
            if after_loss or attempt > 0:
                await asyncio.sleep(self._retry_delay(attempt, adapter_missing))
            try:
                await self._connect()
            except BridgeError as exc:
                adapter_missing = isinstance(exc, AdapterUnavailableError)
                self._log_failed_attempt(attempt, exc)
                self.state = LinkState.BACKING_OFF
                attempt += 1
                continue
            if after_loss:
                self.counters.reconnects += 1
            self.state = LinkState.CONNECTED
            logger.info(
                "link %s: connected to %s after %d failed attempts",
                self.name,
                self.target.label,
                attempt,
            )
            return

    def _retry_delay(self, attempt: int, adapter_missing: bool) -> float:
        if adapter_missing:
            # Waiting for the adapter to come back: poll at a steady pace.
            return self.adapter_poll_interval
        return backoff_delay(attempt, base=self.backoff_base, cap=self.max_backoff)

    def _log_failed_attempt(self, attempt: int, exc: BridgeError) -> None:
        message = str(exc)
        # Repeats of the same failure (an adapter left off for hours) go to debug.
        level = logging.DEBUG if message == self.last_error else logging.WARNING
        logger.log(
            level, "link %s: attempt %d failed: %s", self.name, attempt + 1, message
        )
        self.last_error = message

    # Writing

    def _chunk_size(self, session: _Session) -> int:
        if self.target.mtu is not None:
            return self.target.mtu - 3
        return session.rx.max_write_without_response_size

    async def _write_chunks(self, session: _Session, data: bytes) -> None:
        size = self._chunk_size(session)
        for start in range(0, len(data), size):
            await session.client.write_gatt_char(
                session.rx,
                data[start : start + size],
                response=self.target.write_with_response,
            )

    def _write_failed(self, session: _Session, reason: str, *, stale: bool) -> bool:
        self.counters.write_errors += 1
        logger.debug("link %s: write failed: %s", self.name, reason)
        loop = self._loop
        if stale and loop is not None:
            loop.call_soon_threadsafe(
                lambda: self._end_session(
                    session.client,
                    f"write hit stale GATT handles ({reason})",
                    dropped=False,
                    forget_cache=True,
                )
            )
        return False


def _is_stale(exc: BaseException) -> bool:
    if isinstance(exc, BleakCharacteristicNotFoundError):
        return True
    return isinstance(exc, BleakGATTProtocolError) and exc.code in STALE_CACHE_CODES
