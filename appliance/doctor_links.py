"""`appliance doctor` checks of the device links: serial ports and the BLE adapter."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from appliance.config import LinkConfig, Transport
from appliance.doctor_result import (
    CheckResult,
    Status,
    group_name,
    owner_and_mode,
    run_with_deadline,
)
from firmware_bridge.errors import PortError, PortNotFoundError, PortPermissionError
from firmware_bridge.serial_link import open_port, usb_port_resolver

BLUEZ_ADAPTER = "org.bluez.Adapter1"
DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
"""The system bus address that D-Bus clients use without DBUS_SYSTEM_BUS_ADDRESS."""


def check_serial_link(
    link: LinkConfig, live_links: dict[str, Any] | None, timeout: float
) -> CheckResult:
    """Check that a serial link's port exists and this user can open it.

    While a daemon runs it holds the port with an exclusive lock, so its own
    view of the link is reported instead of opening the port a second time.
    """
    name = f"port {link.name}"
    if live_links is not None and link.name in live_links:
        return _live_link_result(name, live_links[link.name])
    try:
        target = run_with_deadline(lambda: _open_and_close(link), timeout)
    except PortNotFoundError as exc:
        where = "vid, pid and serial_number" if link.usb else "port"
        fix = (
            f"plug the device in, or correct [[links]] {where} of link "
            f"{link.name!r}; `appliance scan` lists the serial ports present"
        )
        return CheckResult(name, Status.FAIL, str(exc), fix)
    except PortPermissionError as exc:
        group = _device_group(exc.port)
        fix = (
            f"add the service user to group {group!r}: `sudo usermod -aG {group} "
            "USER`, then log in again (the systemd unit sets "
            f"SupplementaryGroups={group})"
            if group
            else "grant the service user read and write access to the port"
        )
        return CheckResult(name, Status.FAIL, str(exc), fix)
    except (PortError, TimeoutError) as exc:
        fix = (
            f"correct [[links]] port of link {link.name!r}, or stop the program "
            "that holds the port (`fuser -v PATH` names it)"
        )
        return CheckResult(name, Status.FAIL, f"{_describe(link)}: {exc}", fix)
    detail = f"{target} opened"
    if "://" not in target:
        detail += f" ({owner_and_mode(Path(target))})"
        if os.geteuid() == 0:
            detail += "; checked as root, so the service user's access is not tested"
    return CheckResult(name, Status.PASS, detail)


def _open_and_close(link: LinkConfig) -> str:
    if link.usb is not None:
        usb = link.usb
        target = usb_port_resolver(usb.vid, usb.pid, usb.serial_number)()
    else:
        assert link.port is not None  # LinkConfig requires port or usb
        target = link.port
    port = open_port(target, link.baud, read_timeout=0.1, rtscts=link.rtscts)
    port.close()
    return target


def _describe(link: LinkConfig) -> str:
    if link.usb is not None:
        return f"USB adapter {link.usb.vid:04x}:{link.usb.pid:04x}"
    return str(link.port)


def _live_link_result(name: str, live: dict[str, Any]) -> CheckResult:
    state = live.get("state", "unknown")
    if state == "connected":
        detail = "connected; the running daemon holds the port"
        return CheckResult(name, Status.PASS, detail)
    detail = f"the running daemon reports state {state}: {live.get('last_error')}"
    fix = "fix the cause named above; the daemon reopens the port by itself"
    return CheckResult(name, Status.FAIL, detail, fix)


def _device_group(path: str) -> str | None:
    try:
        return group_name(os.stat(path).st_gid)
    except OSError:
        return None


def check_ble(links: list[LinkConfig], timeout: float) -> CheckResult:
    """Check that BlueZ runs on the D-Bus system bus with a powered adapter.

    A missing adapter fails only when a BLE link is configured.
    """
    ble_links = [link for link in links if link.transport == Transport.BLE]
    missing = Status.FAIL if ble_links else Status.WARN
    unused = (
        "" if ble_links else "; no BLE link is configured, so this is not a failure"
    )
    try:
        adapters = asyncio.run(asyncio.wait_for(_bluez_adapters(), timeout))
    except ImportError:
        detail = f"dbus-fast, which bleak uses for BlueZ, is not installed{unused}"
        fix = "BLE links work on Linux with BlueZ only"
        return CheckResult("ble adapter", missing, detail, fix)
    except (OSError, TimeoutError, ValueError) as exc:
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", DEFAULT_SYSTEM_BUS)
        reason = exc or type(exc).__name__
        detail = f"cannot reach the D-Bus system bus at {address} ({reason}){unused}"
        fix = "start D-Bus and BlueZ: `sudo systemctl start dbus bluetooth`"
        return CheckResult("ble adapter", missing, detail, fix)
    except RuntimeError as exc:
        detail = f"BlueZ does not answer on D-Bus: {exc}{unused}"
        fix = "start bluetoothd: `sudo systemctl start bluetooth`"
        return CheckResult("ble adapter", missing, detail, fix)
    if not adapters:
        detail = f"BlueZ reports no Bluetooth adapter{unused}"
        fix = "plug in a Bluetooth adapter; `bluetoothctl list` shows the adapters"
        return CheckResult("ble adapter", missing, detail, fix)
    configured = sorted(
        {link.ble.adapter for link in ble_links if link.ble and link.ble.adapter}
    )
    absent = [name for name in configured if name not in adapters]
    if absent:
        detail = (
            f"adapter {', '.join(absent)} not found; BlueZ reports "
            f"{', '.join(sorted(adapters))}"
        )
        fix = "correct [links.ble] adapter; `bluetoothctl list` shows the adapters"
        return CheckResult("ble adapter", missing, detail, fix)
    if configured:
        off = [name for name in configured if not adapters[name]]
    else:
        off = [] if any(adapters.values()) else sorted(adapters)
    if off:
        detail = f"adapter {', '.join(off)} is powered off{unused}"
        fix = "power it on with `bluetoothctl power on` and check `rfkill list`"
        return CheckResult("ble adapter", missing, detail, fix)
    described = ", ".join(
        f"{name} ({'on' if powered else 'off'})" for name, powered in adapters.items()
    )
    return CheckResult("ble adapter", Status.PASS, f"BlueZ adapters: {described}")


async def _bluez_adapters() -> dict[str, bool]:
    """Return each BlueZ adapter's name (hci0) and whether it is powered.

    Raises:
        OSError: the system bus cannot be reached.
        RuntimeError: BlueZ is not on the bus or rejected the call.
    """
    # bleak installs dbus-fast on Linux only.
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        reply = await bus.call(
            Message(
                destination="org.bluez",
                path="/",
                interface="org.freedesktop.DBus.ObjectManager",
                member="GetManagedObjects",
            )
        )
    finally:
        bus.disconnect()
    if reply is None:
        raise RuntimeError("no reply to GetManagedObjects")
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body else "no message"
        raise RuntimeError(f"{reply.error_name}: {text}")
    adapters = {}
    for path, interfaces in reply.body[0].items():
        if BLUEZ_ADAPTER in interfaces:
            powered = interfaces[BLUEZ_ADAPTER].get("Powered")
            adapters[path.rsplit("/", 1)[-1]] = bool(powered and powered.value)
    return adapters
