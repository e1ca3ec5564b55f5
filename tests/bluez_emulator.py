"""An emulated BlueZ on a private D-Bus daemon, for running bleak's BlueZ backend in tests.

``PrivateBus`` starts a ``dbus-daemon`` with its own configuration file and
socket in a temporary directory, so nothing touches the machine's system bus.
``BluezEmulator`` owns the name ``org.bluez`` on that bus and exports, with
dbus-fast, the objects bleak talks to: ``org.bluez.Adapter1`` at
``/org/bluez/hci0``, one ``org.bluez.Device1`` per peripheral seen while
discovering, and the peripheral's ``GattService1``, ``GattCharacteristic1`` and
``GattDescriptor1`` objects once it connects. ``GetManagedObjects`` at ``/``,
``InterfacesAdded``, ``InterfacesRemoved`` and ``PropertiesChanged`` come from
dbus-fast's own object manager and property support.

The model follows BlueZ's ``src/gatt-client.c`` and ``main.conf`` defaults:

- Object paths name handles in hex (``service000c/char000d/desc000f``), and a
  GATT notification is a ``PropertiesChanged`` signal on ``Value``.
- ``StartNotify`` fails with ``org.bluez.Error.NotPermitted: Notify acquired``
  while another client holds the characteristic through ``AcquireNotify``, and
  ``StopNotify`` releases that hold.
- BlueZ caches each device's GATT table (``Cache = always``, the default in
  ``main.conf``). A reconnect exports the cached objects without discovery,
  and only ``RemoveDevice`` clears the cache. When the peripheral's real
  handles have moved, ATT requests on the cached objects fail with
  ``org.bluez.Error.Failed: Operation failed with ATT error: 0x01``.
- While the adapter is powered off, adapter and connect calls fail with
  ``org.bluez.Error.NotReady``, and powering off drops every connection.

Simplifications, each of which a test could otherwise mistake for BlueZ:

- There is one adapter, and no pairing, ``AcquireWrite`` or ``AcquireNotify``.
- A characteristic has one notify session, whatever the D-Bus sender.
- ``StartNotify`` on a disconnected device fails instead of being queued.
- The peripheral never sends a Service Changed indication.
"""

import asyncio
import collections
import dataclasses
import logging
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from dbus_fast import BusType, DBusError, Message, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusDict,
    DBusInt16,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt16,
    DBusUInt32,
)
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method
from dbus_fast.service import dbus_property as _dbus_property

logger = logging.getLogger(__name__)

T = TypeVar("T")

DBusStrList = Annotated[list[str], DBusSignature("as")]
DBusPathList = Annotated[list[str], DBusSignature("ao")]
DBusManufacturerData = Annotated[dict[int, Variant], DBusSignature("a{qv}")]

BLUEZ_VERSION = "5.66"
"""Version the ``bluetoothctl`` shim reports; bleak accepts 5.55 and later."""

ADAPTER_PATH = "/org/bluez/hci0"
ADAPTER_ADDRESS = "00:1A:7D:DA:71:13"
ADAPTER_MAX_MTU = 517
"""Largest ATT MTU BlueZ offers in an MTU exchange (``ExchangeMTU`` default in main.conf)."""

NUS_SERVICE_UUID = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"
NUS_RX_UUID = "6e400002-b5a3-f393-e0a9-e50e24dcca9e"
NUS_TX_UUID = "6e400003-b5a3-f393-e0a9-e50e24dcca9e"
CCCD_UUID = "00002902-0000-1000-8000-00805f9b34fb"
BATTERY_SERVICE_UUID = "0000180f-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL_UUID = "00002a19-0000-1000-8000-00805f9b34fb"

IN_PROGRESS = "org.bluez.Error.InProgress"
NOT_PERMITTED = "org.bluez.Error.NotPermitted"
NOT_READY = "org.bluez.Error.NotReady"
FAILED = "org.bluez.Error.Failed"
DOES_NOT_EXIST = "org.bluez.Error.DoesNotExist"
NOT_SUPPORTED = "org.bluez.Error.NotSupported"
INVALID_ARGUMENTS = "org.bluez.Error.InvalidArguments"

ADVERTISING_INTERVAL = 0.05
"""Seconds between emulated advertisements of each peripheral while discovering."""
CONNECT_LATENCY = 0.01
"""Seconds a ``Connect`` call takes before the link is up."""
NOTIFICATIONS_PER_EVENT = 8
"""Notifications sent back to back before the emulator waits for dbus-daemon,
much as a connection event carries a few packets before the radio pauses."""
CALL_TIMEOUT = 10.0
"""Seconds a control call from a test thread waits for the emulator loop."""

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""
"""A session-type bus: with no ``<allow user>`` element, dbus-daemon accepts only
the user that started it, and the policy lets that user own and call anything."""


def dbus_property(access: PropertyAccess = PropertyAccess.READ) -> Any:
    """Declare a D-Bus property, read-only unless ``access`` is given."""
    return _dbus_property(access=access)


class PrivateBus:
    """A ``dbus-daemon`` of our own, listening on a socket in a temporary directory.

    Use it as a context manager; ``address`` is the value for
    ``DBUS_SYSTEM_BUS_ADDRESS``.
    """

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="bluez-emu-")
        self.directory = Path(self._directory.name)
        self.address = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> "PrivateBus":
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            raise RuntimeError("dbus-daemon not found: install the dbus-daemon package")
        config = self.directory / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.directory / "bus"))
        # The daemon's own warnings (such as failing to raise its fd limit when
        # not run by init) go to a log file beside the socket.
        with open(self.directory / "daemon.log", "w") as log:
            self._process = subprocess.Popen(
                [daemon, f"--config-file={config}", "--nofork", "--print-address=1"],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self._process.stdout is not None
        self.address = self._process.stdout.readline().strip()
        if not self.address:
            self.close()
            raise RuntimeError(f"dbus-daemon with {config} printed no address")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the daemon and remove the directory. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait(timeout=5)
            if process.stdout is not None:
                process.stdout.close()
        self._directory.cleanup()


def write_bluetoothctl_shim(directory: Path, version: str = BLUEZ_VERSION) -> Path:
    """Write a ``bluetoothctl`` that prints ``version`` and return its folder.

    bleak runs ``bluetoothctl --version`` once per process and rejects BlueZ
    older than 5.55. The emulator replaces bluetoothd, so the version reported
    is the emulator's, not that of whatever BlueZ the machine has.
    """
    folder = directory / "bin"
    folder.mkdir(exist_ok=True)
    script = folder / "bluetoothctl"
    script.write_text(f'#!/bin/sh\necho "bluetoothctl: {version}"\n')
    script.chmod(0o755)
    return folder


@dataclasses.dataclass(frozen=True)
class CharacteristicSpec:
    """One characteristic of a peripheral's GATT table."""

    uuid: str
    flags: tuple[str, ...]
    """BlueZ flag names: ``read``, ``write``, ``write-without-response``, ``notify``."""


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """One primary service of a peripheral's GATT table."""

    uuid: str
    characteristics: tuple[CharacteristicSpec, ...]


def nus_service(
    service_uuid: str = NUS_SERVICE_UUID,
    rx_uuid: str = NUS_RX_UUID,
    tx_uuid: str = NUS_TX_UUID,
) -> ServiceSpec:
    """Return a Nordic UART Service, or one laid out like it with other UUIDs."""
    return ServiceSpec(
        service_uuid,
        (
            CharacteristicSpec(rx_uuid, ("write", "write-without-response")),
            CharacteristicSpec(tx_uuid, ("notify",)),
        ),
    )


BATTERY_SERVICE = ServiceSpec(
    BATTERY_SERVICE_UUID, (CharacteristicSpec(BATTERY_LEVEL_UUID, ("read",)),)
)


@dataclasses.dataclass(frozen=True)
class CharacteristicEntry:
    """A characteristic placed at handles: its declaration, and its CCCD if any."""

    spec: CharacteristicSpec
    handle: int
    cccd_handle: int | None


@dataclasses.dataclass(frozen=True)
class ServiceEntry:
    spec: ServiceSpec
    handle: int
    characteristics: tuple[CharacteristicEntry, ...]


def lay_out(
    services: tuple[ServiceSpec, ...], first_handle: int
) -> tuple[ServiceEntry, ...]:
    """Assign ATT handles in declaration order, as a GATT server does.

    A service takes one handle, a characteristic two (declaration and value),
    and a characteristic that can notify a third for its CCCD.
    """
    handle = first_handle
    table = []
    for service in services:
        service_handle = handle
        handle += 1
        entries = []
        for characteristic in service.characteristics:
            cccd = None
            if "notify" in characteristic.flags or "indicate" in characteristic.flags:
                cccd = handle + 2
            entries.append(CharacteristicEntry(characteristic, handle, cccd))
            handle += 3 if cccd is not None else 2
        table.append(ServiceEntry(service, service_handle, tuple(entries)))
    return tuple(table)


@dataclasses.dataclass
class Peripheral:
    """A device in radio range of the emulated adapter."""

    address: str
    name: str
    services: tuple[ServiceSpec, ...]
    advertised_uuids: tuple[str, ...]
    mtu: int
    """Largest ATT MTU the peripheral accepts; the link uses min(this, 517)."""
    first_handle: int = 0x000C
    advertising: bool = True
    """False models a device that is switched off or out of range."""
    cached_layout: tuple[ServiceEntry, ...] | None = None
    """BlueZ's cache of this device's GATT table; None until the first discovery."""
    acquire_notify_on_connect: str | None = None
    """UUID of the characteristic another client acquires by AcquireNotify after each connect."""
    received: bytearray = dataclasses.field(default_factory=bytearray)
    """Every byte the central wrote, in order."""
    write_sizes: list[int] = dataclasses.field(default_factory=list)
    """Length of each ``WriteValue`` the central made."""

    @property
    def layout(self) -> tuple[ServiceEntry, ...]:
        """The peripheral's real GATT table."""
        return lay_out(self.services, self.first_handle)

    @property
    def device_path(self) -> str:
        return f"{ADAPTER_PATH}/dev_{self.address.replace(':', '_')}"


class Adapter(ServiceInterface):
    """``org.bluez.Adapter1`` of the single emulated controller."""

    def __init__(self, emulator: "BluezEmulator") -> None:
        super().__init__("org.bluez.Adapter1")
        self._emulator = emulator
        self.powered = True
        self.discovering = False
        self.discovery_uuids: list[str] = []

    @dbus_method()
    def StartDiscovery(self) -> None:
        self._emulator.begin_call("StartDiscovery", needs_power=True)
        if not self.discovering:
            self.discovering = True
            self.emit_properties_changed({"Discovering": True})
            self._emulator.start_advertising()

    @dbus_method()
    def StopDiscovery(self) -> None:
        self._emulator.begin_call("StopDiscovery", needs_power=True)
        if not self.discovering:
            raise DBusError(FAILED, "No discovery started")
        self._emulator.stop_discovery()

    @dbus_method()
    def SetDiscoveryFilter(self, filters: DBusDict) -> None:
        self._emulator.begin_call("SetDiscoveryFilter", needs_power=True)
        uuids = filters.get("UUIDs")
        self.discovery_uuids = [u.lower() for u in uuids.value] if uuids else []

    @dbus_method()
    def GetDiscoveryFilters(self) -> DBusStrList:
        return ["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData"]

    @dbus_method()
    def RemoveDevice(self, device: DBusObjectPath) -> None:
        self._emulator.begin_call("RemoveDevice")
        self._emulator.remove_device(device)

    @dbus_property()
    def Address(self) -> DBusStr:
        return ADAPTER_ADDRESS

    @dbus_property()
    def AddressType(self) -> DBusStr:
        return "public"

    @dbus_property()
    def Name(self) -> DBusStr:
        return "field-relay-test"

    @dbus_property()
    def Alias(self) -> DBusStr:
        return "field-relay-test"

    @dbus_property()
    def Class(self) -> DBusUInt32:
        return 0

    @dbus_property(PropertyAccess.READWRITE)
    def Powered(self) -> DBusBool:
        return self.powered

    @Powered.setter  # type: ignore[no-redef]
    def Powered(self, value: DBusBool) -> None:
        self._emulator.set_adapter_power(value)

    @dbus_property()
    def Discoverable(self) -> DBusBool:
        return False

    @dbus_property()
    def Pairable(self) -> DBusBool:
        return False

    @dbus_property()
    def Discovering(self) -> DBusBool:
        return self.discovering

    @dbus_property()
    def UUIDs(self) -> DBusStrList:
        return []

    @dbus_property()
    def Modalias(self) -> DBusStr:
        return "usb:v1D6Bp0246d0542"

    @dbus_property()
    def Roles(self) -> DBusStrList:
        return ["central", "peripheral"]


class Device(ServiceInterface):
    """``org.bluez.Device1`` of one peripheral."""

    def __init__(self, emulator: "BluezEmulator", peripheral: Peripheral) -> None:
        super().__init__("org.bluez.Device1")
        self._emulator = emulator
        self.peripheral = peripheral
        self.connected = False
        self.services_resolved = False
        self.rssi = -55
        self.characteristics: list[Characteristic] = []
        self.exported_paths: list[str] = []

    @dbus_method()
    async def Connect(self) -> None:
        self._emulator.begin_call("Connect", needs_power=True)
        if self.connected:
            return
        if not self.peripheral.advertising:
            await asyncio.sleep(CONNECT_LATENCY)
            raise DBusError(FAILED, "Software caused connection abort")
        await asyncio.sleep(CONNECT_LATENCY)
        self._emulator.connect_device(self)

    @dbus_method()
    async def Disconnect(self) -> None:
        self._emulator.begin_call("Disconnect")
        self._emulator.disconnect_device(self)

    @dbus_property()
    def Address(self) -> DBusStr:
        return self.peripheral.address

    @dbus_property()
    def AddressType(self) -> DBusStr:
        return "random"

    @dbus_property()
    def Name(self) -> DBusStr:
        return self.peripheral.name

    @dbus_property()
    def Alias(self) -> DBusStr:
        return self.peripheral.name

    @dbus_property()
    def Adapter(self) -> DBusObjectPath:
        return ADAPTER_PATH

    @dbus_property()
    def Paired(self) -> DBusBool:
        return False

    @dbus_property()
    def Bonded(self) -> DBusBool:
        return False

    @dbus_property()
    def Trusted(self) -> DBusBool:
        return False

    @dbus_property()
    def Blocked(self) -> DBusBool:
        return False

    @dbus_property()
    def LegacyPairing(self) -> DBusBool:
        return False

    @dbus_property()
    def Connected(self) -> DBusBool:
        return self.connected

    @dbus_property()
    def ServicesResolved(self) -> DBusBool:
        return self.services_resolved

    @dbus_property()
    def UUIDs(self) -> DBusStrList:
        return list(self.peripheral.advertised_uuids)

    @dbus_property()
    def RSSI(self) -> DBusInt16:
        return self.rssi

    @dbus_property()
    def ManufacturerData(self) -> DBusManufacturerData:
        return {}

    @dbus_property()
    def ServiceData(self) -> DBusDict:
        return {}


class GattService(ServiceInterface):
    """``org.bluez.GattService1`` as exported from BlueZ's cache."""

    def __init__(self, entry: ServiceEntry, device_path: str) -> None:
        super().__init__("org.bluez.GattService1")
        self.entry = entry
        self._device_path = device_path

    @dbus_property()
    def UUID(self) -> DBusStr:
        return self.entry.spec.uuid

    @dbus_property()
    def Primary(self) -> DBusBool:
        return True

    @dbus_property()
    def Device(self) -> DBusObjectPath:
        return self._device_path

    @dbus_property()
    def Includes(self) -> DBusPathList:
        return []


class Characteristic(ServiceInterface):
    """``org.bluez.GattCharacteristic1`` as exported from BlueZ's cache."""

    def __init__(
        self,
        emulator: "BluezEmulator",
        device: "Device",
        entry: CharacteristicEntry,
        service_path: str,
    ) -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self._emulator = emulator
        self.device = device
        self.entry = entry
        self._service_path = service_path
        self.value = b""
        self.notifying = False
        self.notify_acquired = False
        self.mtu = 23

    @dbus_method()
    def ReadValue(self, options: DBusDict) -> DBusBytes:
        self._emulator.begin_call("ReadValue")
        self._check_att_request()
        return self.value

    @dbus_method()
    def WriteValue(self, value: DBusBytes, options: DBusDict) -> None:
        self._emulator.begin_call("WriteValue")
        self._check_att_request()
        kind = options["type"].value if "type" in options else "request"
        flags = self.entry.spec.flags
        if kind == "command" and "write-without-response" not in flags:
            raise DBusError(NOT_SUPPORTED, "Operation is not supported")
        if kind != "command" and "write" not in flags:
            raise DBusError(NOT_PERMITTED, "Write not permitted")
        if kind == "command" and len(value) > self.mtu - 3:
            # A Write Command has no long-write fallback: ATT_MTU - 3 is the limit.
            raise DBusError(INVALID_ARGUMENTS, "Invalid Length")
        self.device.peripheral.received += value
        self.device.peripheral.write_sizes.append(len(value))

    @dbus_method()
    def StartNotify(self) -> None:
        self._emulator.begin_call("StartNotify")
        if self.notify_acquired:
            raise DBusError(NOT_PERMITTED, "Notify acquired")
        if "notify" not in self.entry.spec.flags:
            raise DBusError(NOT_SUPPORTED, "Operation is not supported")
        self._check_att_request()
        if not self.notifying:
            self.notifying = True
            self.emit_properties_changed({"Notifying": True})

    @dbus_method()
    def StopNotify(self) -> None:
        self._emulator.begin_call("StopNotify")
        if self.notify_acquired:
            # BlueZ closes the AcquireNotify socket of whichever client acquired it.
            self.set_notify_acquired(False)
            return
        if not self.notifying:
            raise DBusError(FAILED, "No notify session started")
        self.notifying = False
        self.emit_properties_changed({"Notifying": False})

    def set_notify_acquired(self, acquired: bool) -> None:
        self.notify_acquired = acquired
        self.emit_properties_changed({"NotifyAcquired": acquired})

    def _check_att_request(self) -> None:
        if not self.device.connected:
            raise DBusError(FAILED, "Not connected")
        real = {
            (c.handle, c.spec.uuid)
            for s in self.device.peripheral.layout
            for c in s.characteristics
        }
        if (self.entry.handle, self.entry.spec.uuid) not in real:
            # The cached handle no longer contains this characteristic on the peripheral.
            raise DBusError(FAILED, "Operation failed with ATT error: 0x01")

    @dbus_property()
    def UUID(self) -> DBusStr:
        return self.entry.spec.uuid

    @dbus_property()
    def Service(self) -> DBusObjectPath:
        return self._service_path

    @dbus_property()
    def Value(self) -> DBusBytes:
        return self.value

    @dbus_property()
    def Notifying(self) -> DBusBool:
        return self.notifying

    @dbus_property()
    def NotifyAcquired(self) -> DBusBool:
        return self.notify_acquired

    @dbus_property()
    def WriteAcquired(self) -> DBusBool:
        return False

    @dbus_property()
    def Flags(self) -> DBusStrList:
        return list(self.entry.spec.flags)

    @dbus_property()
    def MTU(self) -> DBusUInt16:
        return self.mtu


class Descriptor(ServiceInterface):
    """``org.bluez.GattDescriptor1``: the CCCD of a notifying characteristic."""

    def __init__(self, characteristic_path: str) -> None:
        super().__init__("org.bluez.GattDescriptor1")
        self._characteristic_path = characteristic_path

    @dbus_property()
    def UUID(self) -> DBusStr:
        return CCCD_UUID

    @dbus_property()
    def Characteristic(self) -> DBusObjectPath:
        return self._characteristic_path

    @dbus_property()
    def Value(self) -> DBusBytes:
        return b"\x00\x00"

    @dbus_property()
    def Flags(self) -> DBusStrList:
        return ["read", "write"]


class BluezEmulator:
    """Serves ``org.bluez`` on ``bus_address`` from its own event loop thread.

    The public methods are for tests: they run on the caller's thread and wait
    for the emulator loop to apply them. ``calls`` counts the D-Bus method calls
    received, by member name.
    """

    def __init__(self, bus_address: str) -> None:
        self.bus_address = bus_address
        self.calls: collections.Counter[str] = collections.Counter()
        self.peripherals: dict[str, Peripheral] = {}
        self._devices: dict[str, Device] = {}
        self._faults: dict[str, collections.deque[tuple[str, str]]] = (
            collections.defaultdict(collections.deque)
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bluez-emulator", daemon=True
        )
        self._bus: MessageBus | None = None
        self._adapter = Adapter(self)
        self._advertiser: asyncio.Task[None] | None = None

    # Life cycle

    def start(self) -> None:
        """Connect to the bus, own ``org.bluez`` and export the adapter."""
        self._thread.start()
        self._run(self._start())

    async def _start(self) -> None:
        self._bus = MessageBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM)
        await self._bus.connect()
        await self._bus.request_name("org.bluez")
        self._bus.export(ADAPTER_PATH, self._adapter)

    def stop(self) -> None:
        """Disconnect from the bus and stop the loop thread. Safe to call twice."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self._run(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=CALL_TIMEOUT)
        self._loop.close()

    async def _stop(self) -> None:
        await self._stop_advertising()
        if self._bus is not None:
            self._bus.disconnect()
            await self._bus.wait_for_disconnect()

    def _run(self, coroutine: Awaitable[T]) -> T:
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coroutine), self._loop)
        return future.result(timeout=CALL_TIMEOUT)

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return function(*args)

        return self._run(call())

    # Test controls

    def add_peripheral(
        self,
        address: str,
        name: str,
        services: tuple[ServiceSpec, ...] = (nus_service(),),
        advertised_uuids: tuple[str, ...] | None = None,
        mtu: int = 247,
        cached_services: tuple[ServiceSpec, ...] | None = None,
    ) -> Peripheral:
        """Put an advertising peripheral in range.

        ``advertised_uuids`` defaults to the UUIDs of ``services``.
        ``cached_services`` pre-loads BlueZ's GATT cache with an older table,
        as if the device had been connected before a firmware update.
        """
        peripheral = Peripheral(
            address=address.upper(),
            name=name,
            services=services,
            advertised_uuids=(
                advertised_uuids
                if advertised_uuids is not None
                else tuple(s.uuid for s in services)
            ),
            mtu=mtu,
        )
        if cached_services is not None:
            peripheral.cached_layout = lay_out(cached_services, peripheral.first_handle)
        self._call(self.peripherals.__setitem__, peripheral.address, peripheral)
        return peripheral

    def fail_next(self, member: str, error: str, message: str, count: int = 1) -> None:
        """Make the next ``count`` calls of D-Bus method ``member`` fail with ``error``."""
        for _ in range(count):
            self._call(self._faults[member].append, (error, message))

    def notify(
        self, address: str, data: bytes, size: int, uuid: str = NUS_TX_UUID
    ) -> None:
        """Send ``data`` as notifications of at most ``size`` bytes each.

        Raises:
            ValueError: ``size`` exceeds ATT_MTU - 3 of the connection.
            RuntimeError: the device is not connected or the central has not
                subscribed, so BlueZ would not forward the notification.
        """
        self._run(self._notify(address.upper(), data, size, uuid))

    def force_disconnect(self, address: str) -> None:
        """Drop the connection from the peripheral's side (supervision timeout)."""
        self._call(self._force_disconnect, address.upper())

    def set_advertising(self, address: str, advertising: bool) -> None:
        """Switch the peripheral's advertising (power or range) on or off."""
        self._call(
            setattr, self.peripherals[address.upper()], "advertising", advertising
        )

    def set_powered(self, powered: bool) -> None:
        """Power the adapter off or on, as ``bluetoothctl power off`` does."""
        self._call(self.set_adapter_power, powered)

    def change_gatt_handles(self, address: str, first_handle: int) -> None:
        """Move the peripheral's GATT table to new handles, leaving BlueZ's cache stale."""
        self._call(
            setattr, self.peripherals[address.upper()], "first_handle", first_handle
        )

    def acquire_notify_on_connect(self, address: str, uuid: str = NUS_TX_UUID) -> None:
        """Have another client take ``uuid`` by AcquireNotify after each connect."""
        peripheral = self.peripherals[address.upper()]
        self._call(setattr, peripheral, "acquire_notify_on_connect", uuid)

    def is_connected(self, address: str) -> bool:
        device = self._devices.get(address.upper())
        return device is not None and device.connected

    def is_notifying(self, address: str, uuid: str = NUS_TX_UUID) -> bool:
        device = self._devices.get(address.upper())
        if device is None:
            return False
        return any(
            c.notifying for c in device.characteristics if c.entry.spec.uuid == uuid
        )

    def exported_paths(self, address: str) -> list[str]:
        device = self._devices.get(address.upper())
        return list(device.exported_paths) if device is not None else []

    # Called from the D-Bus interfaces, on the emulator loop

    def begin_call(self, member: str, needs_power: bool = False) -> None:
        """Count a method call and raise the fault queued for it, if any."""
        self.calls[member] += 1
        faults = self._faults.get(member)
        if faults:
            error, message = faults.popleft()
            raise DBusError(error, message)
        if needs_power and not self._adapter.powered:
            raise DBusError(NOT_READY, "Resource Not Ready")

    def start_advertising(self) -> None:
        if self._advertiser is None or self._advertiser.done():
            self._advertiser = self._loop.create_task(self._advertise())

    def stop_discovery(self) -> None:
        self._adapter.discovering = False
        self._adapter.emit_properties_changed({"Discovering": False})
        if self._advertiser is not None:
            self._advertiser.cancel()

    async def _stop_advertising(self) -> None:
        task, self._advertiser = self._advertiser, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _advertise(self) -> None:
        """Report each advertising peripheral the way BlueZ does while discovering.

        A first advertisement exports the device (``InterfacesAdded``), later
        ones change its ``RSSI``, and bleak's scanner reports either.
        """
        while self._adapter.discovering:
            for peripheral in list(self.peripherals.values()):
                if self._advertises_to_filter(peripheral):
                    self._report_advertisement(peripheral)
            await asyncio.sleep(ADVERTISING_INTERVAL)

    def _advertises_to_filter(self, peripheral: Peripheral) -> bool:
        device = self._devices.get(peripheral.address)
        if not peripheral.advertising or (device is not None and device.connected):
            return False
        filter_uuids = self._adapter.discovery_uuids
        return not filter_uuids or bool(
            set(filter_uuids) & set(peripheral.advertised_uuids)
        )

    def _report_advertisement(self, peripheral: Peripheral) -> None:
        assert self._bus is not None
        device = self._devices.get(peripheral.address)
        if device is None:
            device = Device(self, peripheral)
            self._devices[peripheral.address] = device
            self._bus.export(peripheral.device_path, device)
            return
        device.rssi = -56 if device.rssi == -55 else -55
        device.emit_properties_changed({"RSSI": device.rssi})

    def connect_device(self, device: Device) -> None:
        """Bring the link up, export the GATT objects and mark services resolved."""
        peripheral = device.peripheral
        device.connected = True
        device.emit_properties_changed({"Connected": True})
        if peripheral.cached_layout is None:
            peripheral.cached_layout = peripheral.layout
        if not device.exported_paths:
            self._export_gatt(device, peripheral.cached_layout)
        mtu = min(peripheral.mtu, ADAPTER_MAX_MTU)
        for characteristic in device.characteristics:
            characteristic.mtu = mtu
            characteristic.emit_properties_changed({"MTU": mtu})
            if characteristic.entry.spec.uuid == peripheral.acquire_notify_on_connect:
                characteristic.set_notify_acquired(True)
        device.services_resolved = True
        device.emit_properties_changed({"ServicesResolved": True})

    def _export_gatt(self, device: "Device", layout: tuple[ServiceEntry, ...]) -> None:
        assert self._bus is not None
        base = device.peripheral.device_path
        for service_entry in layout:
            service_path = f"{base}/service{service_entry.handle:04x}"
            self._bus.export(service_path, GattService(service_entry, base))
            device.exported_paths.append(service_path)
            for entry in service_entry.characteristics:
                path = f"{service_path}/char{entry.handle:04x}"
                characteristic = Characteristic(self, device, entry, service_path)
                self._bus.export(path, characteristic)
                device.characteristics.append(characteristic)
                device.exported_paths.append(path)
                if entry.cccd_handle is not None:
                    descriptor_path = f"{path}/desc{entry.cccd_handle:04x}"
                    self._bus.export(descriptor_path, Descriptor(path))
                    device.exported_paths.append(descriptor_path)

    def disconnect_device(self, device: Device) -> None:
        """Take the link down; the GATT objects stay exported from the cache."""
        if not device.connected:
            return
        for characteristic in device.characteristics:
            if characteristic.notifying:
                characteristic.notifying = False
                characteristic.emit_properties_changed({"Notifying": False})
            if characteristic.notify_acquired:
                characteristic.set_notify_acquired(False)
        device.services_resolved = False
        device.emit_properties_changed({"ServicesResolved": False})
        device.connected = False
        device.emit_properties_changed({"Connected": False})

    def remove_device(self, path: str) -> None:
        """Forget a device and its GATT cache, as ``RemoveDevice`` does."""
        assert self._bus is not None
        device = next(
            (d for d in self._devices.values() if d.peripheral.device_path == path),
            None,
        )
        if device is None:
            raise DBusError(DOES_NOT_EXIST, "Does Not Exist")
        self.disconnect_device(device)
        for exported in reversed(device.exported_paths):
            self._bus.unexport(exported)
        self._bus.unexport(path)
        device.peripheral.cached_layout = None
        del self._devices[device.peripheral.address]

    def set_adapter_power(self, powered: bool) -> None:
        if powered == self._adapter.powered:
            return
        if not powered:
            for device in list(self._devices.values()):
                self.disconnect_device(device)
            if self._adapter.discovering:
                self.stop_discovery()
        self._adapter.powered = powered
        self._adapter.emit_properties_changed({"Powered": powered})

    async def _notify(self, address: str, data: bytes, size: int, uuid: str) -> None:
        device = self._devices.get(address)
        if device is None or not device.connected:
            raise RuntimeError(f"{address} is not connected")
        characteristic = next(
            (c for c in device.characteristics if c.entry.spec.uuid == uuid), None
        )
        if characteristic is None or not characteristic.notifying:
            raise RuntimeError(f"no client subscribed to {uuid} on {address}")
        if size > characteristic.mtu - 3:
            raise ValueError(
                f"notification of {size} bytes exceeds ATT_MTU - 3 = "
                f"{characteristic.mtu - 3} on {address}"
            )
        for index, start in enumerate(range(0, len(data), size), start=1):
            characteristic.value = data[start : start + size]
            characteristic.emit_properties_changed({"Value": characteristic.value})
            if index % NOTIFICATIONS_PER_EVENT == 0:
                await self._wait_for_daemon()

    async def _wait_for_daemon(self) -> None:
        """Return once dbus-daemon has read every message sent so far.

        The daemon handles messages in order, so its reply to ``GetId`` follows the
        signals before it. Without this pause a burst of about 1,400 signals
        filled the socket buffer, and dbus-fast 5.2.0 then dropped the
        connection (``BlockingIOError`` in ``_MessageWriter.write_callback``).
        """
        assert self._bus is not None
        await self._bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetId",
            )
        )

    def _force_disconnect(self, address: str) -> None:
        device = self._devices.get(address)
        if device is None or not device.connected:
            raise RuntimeError(f"{address} is not connected")
        self.disconnect_device(device)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
