"""Pytest plugin for BLE tests: the ``--ble-hardware`` flag and its marker.

Tests marked ``ble_hardware`` need a real Bluetooth adapter and device, so they
are skipped unless pytest runs with ``--ble-hardware``. The device is named by
``FIELD_RELAY_BLE_ADDRESS`` or ``FIELD_RELAY_BLE_NAME``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from firmware_bridge.ble_link import BleTarget


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--ble-hardware",
        action="store_true",
        default=False,
        help=(
            "run tests marked ble_hardware against a real Bluetooth adapter and the "
            "device named by FIELD_RELAY_BLE_ADDRESS or FIELD_RELAY_BLE_NAME"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ble_hardware: needs a real Bluetooth adapter and device; runs only with "
        "--ble-hardware",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if config.getoption("--ble-hardware"):
        return
    skip = pytest.mark.skip(
        reason="needs a real Bluetooth adapter and device: run with --ble-hardware"
    )
    for item in items:
        if "ble_hardware" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ble_hardware_target() -> BleTarget:
    """The real device to test against, from the environment."""
    # Imported here so that loading this plugin does not require bleak.
    from firmware_bridge.ble_link import BleTarget

    address = os.environ.get("FIELD_RELAY_BLE_ADDRESS") or None
    name = os.environ.get("FIELD_RELAY_BLE_NAME") or None
    if address is None and name is None:
        pytest.fail(
            "--ble-hardware needs the device: set FIELD_RELAY_BLE_ADDRESS "
            "(such as C4:7F:0E:12:34:56) or FIELD_RELAY_BLE_NAME"
        )
    return BleTarget(address=address, name=name, scan_timeout=20.0)
