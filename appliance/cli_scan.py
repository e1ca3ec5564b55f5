"""`appliance scan`: list serial ports and nearby BLE devices."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import click

from firmware_bridge.serial_link import list_ports

logger = logging.getLogger(__name__)


def serial_ports() -> list[dict[str, Any]]:
    """Serial ports from pyserial's listing, with USB identity where known."""
    ports = []
    for port in sorted(list_ports.comports(), key=lambda p: p.device):
        ports.append(
            {
                "device": port.device,
                "description": port.description,
                "vid": f"{port.vid:04x}" if port.vid is not None else None,
                "pid": f"{port.pid:04x}" if port.pid is not None else None,
                "serial_number": port.serial_number,
            }
        )
    return ports


def ble_devices(timeout: float) -> list[dict[str, Any]]:
    """Nearby BLE devices from one bleak scan, strongest signal first.

    Raises:
        RuntimeError: no BLE adapter or BlueZ is reachable; the message says why.
    """
    from bleak import BleakScanner
    from bleak.exc import BleakError

    async def scan() -> list[dict[str, Any]]:
        found = await BleakScanner.discover(timeout=timeout, return_adv=True)
        return [
            {
                "address": device.address,
                "name": adv.local_name or device.name,
                "rssi": adv.rssi,
                "service_uuids": sorted(adv.service_uuids),
            }
            for device, adv in found.values()
        ]

    try:
        devices = asyncio.run(scan())
    except (BleakError, OSError, EOFError) as exc:
        raise RuntimeError(f"BLE scan failed: {exc or type(exc).__name__}") from exc
    return sorted(devices, key=lambda d: -(d["rssi"] or -999))


def scan_all(ble_seconds: float) -> dict[str, Any]:
    """Return serial ports and, when ``ble_seconds`` > 0, BLE devices.

    A failed BLE scan is reported in ``ble_error`` with the fix, so the serial
    ports are still listed.
    """
    result: dict[str, Any] = {"serial": serial_ports(), "ble": [], "ble_error": None}
    if ble_seconds > 0:
        try:
            result["ble"] = ble_devices(ble_seconds)
        except RuntimeError as exc:
            result["ble_error"] = (
                f"{exc}. Check that a Bluetooth adapter is present and powered "
                "(`bluetoothctl show`) and that bluetoothd is running"
            )
    return result


@click.command("scan")
@click.option(
    "--ble-seconds",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds to scan for BLE devices; 0 skips the BLE scan.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def scan_command(ble_seconds: float, as_json: bool) -> None:
    """List serial ports (with USB vendor, product and serial number) and BLE devices."""
    result = scan_all(ble_seconds)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo("serial ports")
    for port in result["serial"]:
        usb = f" usb {port['vid']}:{port['pid']}" if port["vid"] else ""
        serial = f" serial {port['serial_number']}" if port["serial_number"] else ""
        click.echo(f"  {port['device']:<20} {port['description']}{usb}{serial}")
    if not result["serial"]:
        click.echo("  none found")
    if ble_seconds > 0:
        click.echo("BLE devices")
        for device in result["ble"]:
            click.echo(
                f"  {device['address']}  {device['rssi'] or '':>4} dBm  "
                f"{device['name'] or '(no name)'}"
            )
        if result["ble_error"]:
            click.echo(f"  {result['ble_error']}", err=True)
            sys.exit(1)
        if not result["ble"]:
            click.echo("  none found")
