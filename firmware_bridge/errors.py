"""Exceptions raised by the firmware bridge.

Every error derives from ``BridgeError`` and is grouped by what the caller can do::

    BridgeError
    ├── PortError            the port cannot be used; the operator must act
    │   ├── PortNotFoundError       the path or URL names no port
    │   ├── PortPermissionError     the port exists but this user may not open it
    │   ├── DeviceNotFoundError     no BLE device matched the target during a scan
    │   └── AdapterUnavailableError the Bluetooth adapter is missing or powered off
    ├── LinkLostError        an open link dropped; reconnecting may help
    ├── BufferClosedError    a ring buffer was used after close (misuse)
    ├── FrameError           a frame is malformed or its CRC fails; counted, skipped
    ├── AuthenticationError  a frame fails its MAC or AEAD tag, or is replayed
    └── PairingError         a device is not paired, or its key file is unusable
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error raised by firmware_bridge."""


class PortError(BridgeError):
    """A serial port or BLE device could not be opened.

    Attributes:
        port: the port path or URL, or the BLE target, as configured.
    """

    def __init__(self, message: str, port: str) -> None:
        super().__init__(message)
        self.port = port


class PortNotFoundError(PortError):
    """The configured port does not exist."""


class PortPermissionError(PortError):
    """The port exists but the current user lacks permission to open it."""


class LinkLostError(BridgeError):
    """An open link failed while reading or writing.

    Attributes:
        link: the link name.
    """

    def __init__(self, message: str, link: str) -> None:
        super().__init__(message)
        self.link = link


class BufferClosedError(BridgeError):
    """A ring buffer was written after it was closed."""


class FrameError(BridgeError):
    """A frame could not be decoded.

    Attributes:
        crc: True when the frame was whole but its CRC-32C did not match.
    """

    def __init__(self, message: str, crc: bool = False) -> None:
        super().__init__(message)
        self.crc = crc


class AuthenticationError(BridgeError):
    """A frame failed authentication: a bad tag or MAC, or a replayed sequence."""


class PairingError(BridgeError):
    """A device is unknown to the appliance, or its pairing file cannot be used."""


class DeviceNotFoundError(PortError):
    """No BLE device matching the configured address, name or service was found."""


class AdapterUnavailableError(PortError):
    """The Bluetooth adapter or BlueZ cannot be used: missing, powered off or unreachable."""
