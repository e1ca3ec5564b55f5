"""Builds running links from their configuration: transport, ring buffer, intake.

Each configured link gets its own ring buffer, counters, transport (serial or
BLE) and intake thread (framed or lines). Nothing is shared between links but
the database, so one failing device never stalls another.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from appliance.config import LinkConfig, Protocol, Transport
from appliance.frame_intake import FrameIntake, link_counts
from appliance.intake import LineIntake
from appliance.states import RecordKind
from appliance.store import Store
from firmware_bridge.counters import LinkCounters
from firmware_bridge.lines import LineEnding, LineSplitter
from firmware_bridge.link import Link
from firmware_bridge.pairing import PairingStore
from firmware_bridge.protocol import ApplianceEndpoint
from firmware_bridge.ring_buffer import OverflowPolicy, RingBuffer
from firmware_bridge.serial_link import SerialLink, usb_port_resolver

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunningLink:
    """One link's parts, for start, status and orderly stop."""

    config: LinkConfig
    ring: RingBuffer
    counters: LinkCounters
    link: Link
    intake: LineIntake | FrameIntake
    on_close: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    def counts(self) -> dict[str, int]:
        if isinstance(self.intake, FrameIntake):
            return link_counts(self.counters, self.intake.endpoint)
        return self.counters.as_dict()

    def start(self) -> None:
        self.link.start()
        self.intake.start()

    def stop(self) -> None:
        """Close the link first, then let intake commit what is buffered."""
        self.link.close()
        self.intake.stop()
        self.intake.join(timeout=5)
        self.ring.close()
        for action in self.on_close:
            action()


def open_transport(
    config: LinkConfig, ring: RingBuffer, counters: LinkCounters
) -> Link:
    """Return the configured transport, opened once so bad settings fail now.

    Raises:
        BridgeError: the port or device cannot be used as configured.
    """
    if config.transport == Transport.BLE:
        from firmware_bridge.ble_link import BleLink, BleTarget

        assert config.ble is not None
        target = BleTarget(
            address=config.ble.address,
            name=config.ble.name,
            service_uuid=config.ble.service_uuid,
            tx_uuid=config.ble.tx_uuid,
            rx_uuid=config.ble.rx_uuid,
            adapter=config.ble.adapter,
            scan_timeout=config.ble.scan_timeout,
        )
        link: Link = BleLink(config.name, target, ring, counters)
    else:
        if config.usb is not None:
            resolve = usb_port_resolver(
                config.usb.vid, config.usb.pid, config.usb.serial_number
            )
            link = SerialLink(
                config.name,
                resolve,
                ring,
                counters,
                baudrate=config.baud,
                rtscts=config.rtscts,
            )
        else:
            assert config.port is not None
            link = SerialLink(
                config.name,
                config.port,
                ring,
                counters,
                baudrate=config.baud,
                rtscts=config.rtscts,
            )
    link.open()
    return link


def open_link(
    config: LinkConfig,
    data_dir: Path,
    db: Path,
    work_ready: threading.Event,
    max_records: int | None,
    max_pending: int,
    hold: threading.Event | None = None,
) -> RunningLink:
    """Open one link's transport and build its intake; nothing runs until ``start``.

    Raises:
        BridgeError: the transport cannot be opened as configured.
    """
    counters = LinkCounters()
    store = Store(db)
    saved = store.load_link_counters(config.name)
    store.close()
    counters.add(saved)
    ring = RingBuffer(config.ring_bytes, OverflowPolicy(config.overflow))
    link = open_transport(config, ring, counters)
    intake: LineIntake | FrameIntake
    if config.protocol == Protocol.FRAMED:
        pairing = PairingStore(data_dir / "devices")

        intake = FrameIntake(
            config.name,
            ring,
            ApplianceEndpoint(pairing.lookup, link=config.name),
            link.write,
            counters,
            db,
            work_ready,
            max_records=max_records,
            max_pending=max_pending,
            kind=RecordKind(config.kind),
            hold=hold,
        )
        intake.load_counts(saved)
    else:
        splitter = LineSplitter(
            counters,
            LineEnding(config.line_ending),
            config.max_line_bytes,
            config.line_timeout,
        )
        intake = LineIntake(
            config.name,
            ring,
            splitter,
            db,
            work_ready,
            max_records=max_records,
            max_pending=max_pending,
            kind=RecordKind(config.kind),
            hold=hold,
        )
    logger.info(
        "link %s: %s over %s",
        config.name,
        config.protocol.value,
        config.transport.value,
    )
    return RunningLink(config, ring, counters, link, intake)


def remove_tree(path: Path) -> Callable[[], None]:
    """Return an action that deletes ``path`` (for ``RunningLink.on_close``)."""
    return lambda: shutil.rmtree(path, ignore_errors=True)
