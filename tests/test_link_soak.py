"""Soak of `appliance run --config` with three faulty links, checked for exactly-once.

One daemon reads three simulated framed devices, all ``kind = "json"`` so that
no model inference limits the rate:

- ``serial-unplug``: a pty device that drops and corrupts frames and is
  unplugged and plugged in again (its symlink disappears for a second).
- ``serial-reenum``: a device behind a simulated USB serial adapter that
  re-enumerates. The adapter's stable path is re-pointed to a new pty and the
  old pty is closed, as a udev ``/dev/serial/by-id`` link moves from ttyUSB0
  to ttyUSB1. The appliance reopens the same path after the read error,
  through its ordinary reconnect logic. No real USB exists here, so the
  ``usb = {vid, pid}`` lookup is not exercised.
- ``ble-nus``: a BLE peripheral on the emulated BlueZ (tests/ble_device.py)
  whose connection drops every few seconds and whose adapter is power cycled.

Devices send JSON objects ``{"seq": n, "device": NAME}`` until the run time is
up. The test then waits for every message to be acknowledged and stops the
daemon with SIGTERM. It checks that each link stored every message exactly
once and in order, that every link reconnected, that the daemon exited 0 and
ran the whole time, and that its resident memory stayed flat.

``FIELD_RELAY_LINK_SOAK_SECONDS`` sets the slow run's length (default 600),
and ``make soak-links`` runs it with its output shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import select
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.store import Store
from firmware_bridge.ble_link import BleLink, BleTarget
from firmware_bridge.counters import LinkCounters
from firmware_bridge.device_simulator import FaultOptions, FramedDeviceSimulator
from firmware_bridge.link import LinkState
from firmware_bridge.pairing import PairingStore
from firmware_bridge.ring_buffer import RingBuffer
from firmware_bridge.simulator import PtyPair
from tests.ble_device import BleDeviceSimulator, BleFaults
from tests.bluez_emulator import BluezEmulator, PrivateBus, write_bluetoothctl_shim
from tests.conftest import APPLIANCE

SOAK_SECONDS = float(os.environ.get("FIELD_RELAY_LINK_SOAK_SECONDS", "600"))
SHORT_SECONDS = 20.0

UNPLUG_LINK = "serial-unplug"
REENUM_LINK = "serial-reenum"
BLE_LINK = "ble-nus"
LINKS = (UNPLUG_LINK, REENUM_LINK, BLE_LINK)
BLE_ADDRESS = "C4:7F:0E:50:AC:01"
BLE_NAME = "relay-soak"

READY_TIMEOUT = 180.0
"""Seconds the daemon may take to load the model and connect every link."""
DRAIN_TIMEOUT = 120.0
"""Seconds after the last message is submitted for every device to see it acknowledged."""
STOP_TIMEOUT = 60.0
"""Seconds the daemon may take to exit after SIGTERM."""
RSS_GROWTH_LIMIT_KIB = 16 * 1024
"""Maximum rise of the daemon's mean RSS from the first to the last sampling
window. In 10-minute runs the mean rose by about 2 to 3 MiB. The full run
stores about 30,000 messages, so a leak of about 560 bytes per message fails it,
while the short run catches only leaks of kilobytes per message."""


@dataclasses.dataclass(frozen=True)
class SoakPlan:
    """Rates, faults and sampling of one soak run."""

    duration: float
    """Seconds the devices submit messages, counted once every link is connected."""
    serial_rate: float = 20.0
    """Messages per second each serial device submits."""
    ble_rate: float = 10.0
    """Messages per second the BLE device submits."""
    unplug_every: int = 200
    """Acknowledged messages between two unplugs of the unplug link."""
    unplug_seconds: float = 1.0
    """Seconds the unplugged device stays away."""
    drop: float = 0.05
    """Probability that the unplug link's device drops a frame it writes."""
    corrupt: float = 0.05
    """Probability that the unplug link's device flips a bit in a frame."""
    reenumerate_at: tuple[float, ...] = ()
    """Seconds into the run at which the USB adapter re-enumerates."""
    ble_disconnect_every: float = 5.0
    """Seconds each BLE connection lasts before the peripheral drops it."""
    power_cycle_at: tuple[float, ...] = ()
    """Seconds after the first BLE connection at which the adapter is powered off."""
    power_off_seconds: float = 3.0
    rss_interval: float = 5.0
    """Seconds between RSS samples."""
    rss_window: float = 60.0
    """Seconds at the start and at the end of the run whose RSS samples are compared."""


def plan_for(duration: float) -> SoakPlan:
    """Return the plan for a run of ``duration`` seconds, faults spread over it."""
    if duration >= 120:
        return SoakPlan(
            duration=duration,
            reenumerate_at=(duration / 3, 2 * duration / 3),
            power_cycle_at=(duration / 2,),
        )
    return SoakPlan(
        duration=duration,
        unplug_every=60,
        reenumerate_at=(duration / 2,),
        ble_disconnect_every=3.0,
        power_cycle_at=(duration * 0.6,),
        power_off_seconds=2.0,
        rss_interval=max(0.5, duration / 20),
        rss_window=duration / 4,
    )


def json_messages(device: str, stop: threading.Event) -> Iterator[bytes]:
    """Yield ``{"seq": n, "device": device}`` for n = 0, 1, ... until ``stop`` is set."""
    for seq in itertools.count():
        if stop.is_set():
            return
        yield json.dumps({"seq": seq, "device": device}).encode("utf-8")


class UsbSerialAdapter:
    """A USB serial adapter between a device's UART and the host, able to re-enumerate.

    The adapter reads and writes the device's pty on one side and a host pty
    on the other, published as a symlink at ``link_path`` the way udev
    publishes ``/dev/serial/by-id`` names. ``reenumerate`` creates a new host
    pty, re-points the symlink to it atomically and closes the old pty, so the
    appliance's open port fails while the path keeps working. Bytes inside the
    adapter at that moment are lost, as they are in a real adapter.
    """

    def __init__(self, device_path: str, link_path: Path) -> None:
        self.link_path = link_path
        self.reenumerations = 0
        self.bytes_lost = 0
        self.error: OSError | EOFError | None = None
        """The failure that stopped the relay early, if one did."""
        self._device_fd = os.open(device_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self._host = self._publish_host()
        self._request = threading.Event()
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usb-adapter")

    @property
    def host_path(self) -> str:
        """The host tty the symlink points at now, such as /dev/pts/7."""
        return self._host.slave_path

    def start(self) -> None:
        self._thread.start()

    def reenumerate(self, timeout: float = 5.0) -> None:
        """Move the host side to a new pty and wait until the move is done."""
        self._done.clear()
        self._request.set()
        if not self._done.wait(timeout):
            raise TimeoutError(f"USB adapter at {self.link_path} did not re-enumerate")

    def stop(self) -> None:
        """Stop relaying and close both sides. Safe to call twice."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._host.close()
        if self._device_fd >= 0:
            os.close(self._device_fd)
            self._device_fd = -1

    def _publish_host(self) -> PtyPair:
        pty = PtyPair()
        os.set_blocking(pty.master_fd, False)
        temporary = self.link_path.with_name(f".{self.link_path.name}.tmp")
        temporary.unlink(missing_ok=True)
        os.symlink(pty.slave_path, temporary)
        os.replace(temporary, self.link_path)
        return pty

    def _swap_host(self, to_host: bytearray) -> None:
        old, self._host = self._host, self._publish_host()
        old.close()
        self.bytes_lost += len(to_host)
        to_host.clear()
        self.reenumerations += 1

    def _run(self) -> None:
        to_host = bytearray()
        to_device = bytearray()
        while not self._stop.is_set():
            if self._request.is_set():
                self._request.clear()
                self._swap_host(to_host)
                self._done.set()
            try:
                self._relay(to_host, to_device)
            except (OSError, EOFError) as exc:
                # The device side fails only when its simulator closes the pty.
                self.error = exc
                return

    def _relay(self, to_host: bytearray, to_device: bytearray) -> None:
        """Move the bytes that are ready, reading a side only while its queue is empty."""
        device, host = self._device_fd, self._host.master_fd
        readers = [
            fd for fd, queued in ((device, to_host), (host, to_device)) if not queued
        ]
        writers = [
            fd for fd, queued in ((host, to_host), (device, to_device)) if queued
        ]
        readable, writable, _ = select.select(readers, writers, [], 0.05)
        if device in readable:
            to_host += _read_available(device)
        if host in readable:
            to_device += _read_available(host)
        if host in writable:
            del to_host[: _write_available(host, to_host)]
        if device in writable:
            del to_device[: _write_available(device, to_device)]


def _read_available(fd: int) -> bytes:
    try:
        data = os.read(fd, 4096)
    except (BlockingIOError, InterruptedError):
        return b""
    if not data:
        raise EOFError(f"file descriptor {fd} reached end of file")
    return data


def _write_available(fd: int, data: bytearray) -> int:
    try:
        return os.write(fd, data)
    except (BlockingIOError, InterruptedError):
        return 0


@dataclasses.dataclass
class RssSample:
    """One reading of the daemon's memory and CPU time."""

    seconds: float
    """Seconds since the run started."""
    rss_kib: int
    cpu_seconds: float
    """User plus system CPU time of the daemon so far."""


def sample_process(pid: int, started: float) -> RssSample:
    """Read VmRSS from /proc/PID/status and CPU time from /proc/PID/stat."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return RssSample(
        time.monotonic() - started, rss_kib, ticks / os.sysconf("SC_CLK_TCK")
    )


def mean_rss(samples: list[RssSample]) -> float:
    return sum(s.rss_kib for s in samples) / len(samples)


def cpu_share(samples: list[RssSample]) -> float:
    """Return the daemon's CPU time over the samples' span, as a share of one core."""
    span = samples[-1].seconds - samples[0].seconds
    if span <= 0:
        return 0.0
    return (samples[-1].cpu_seconds - samples[0].cpu_seconds) / span


@dataclasses.dataclass
class SoakResult:
    """What one soak run measured, for the checks and the printed summary."""

    plan: SoakPlan
    returncode: int | None
    alive_at_every_sample: bool
    daemon_log: str
    status: dict[str, Any]
    """``appliance status --json`` taken while the daemon still ran."""
    final_status: dict[str, Any]
    """``appliance status --json`` after the daemon exited."""
    sent: dict[str, int]
    acked: dict[str, int]
    drained: dict[str, bool]
    """Per link: whether the device saw every message acknowledged in time."""
    stored_seqs: dict[str, list[int]]
    """Per link: the ``seq`` of each stored JSON message, in record order."""
    record_states: dict[str, set[str]]
    message_numbers: dict[str, list[int]]
    """Per link: device message numbers from the ``messages`` table, in record order."""
    samples: list[RssSample]
    unplugs: int
    frames_dropped: int
    frames_corrupted: int
    reenumerations: int
    adapter_error: OSError | EOFError | None
    ble_forced_disconnects: int
    ble_power_cycles: int
    ble_subscriptions: int

    def rss_windows(self) -> tuple[list[RssSample], list[RssSample]]:
        """Return the samples of the first and of the last ``rss_window`` seconds."""
        window = self.plan.rss_window
        end = self.samples[-1].seconds
        first = [s for s in self.samples if s.seconds <= window]
        last = [s for s in self.samples if s.seconds >= end - window]
        return first, last

    def summary(self) -> str:
        """Render the counts, faults, memory and CPU samples as text for the output."""
        lines = [f"link soak: {self.plan.duration:g} s of faults"]
        for link in LINKS:
            counters = self.final_status["links"].get(link, {})
            lines.append(
                f"  {link:<14} sent {self.sent[link]:>6}  stored "
                f"{len(self.stored_seqs[link]):>6}  reconnects "
                f"{counters.get('reconnects', 0):>4}  handshakes "
                f"{counters.get('handshakes', 0):>4}  crc errors "
                f"{counters.get('crc_errors', 0):>4}  duplicates "
                f"{counters.get('duplicate_messages', 0):>5}"
            )

        lines.append(
            f"  faults: {self.unplugs} unplugs, {self.frames_dropped} frames "
            f"dropped, {self.frames_corrupted} corrupted, {self.reenumerations} "
            f"re-enumerations, {self.ble_forced_disconnects} BLE disconnects, "
            f"{self.ble_power_cycles} adapter power cycles, "
            f"{self.ble_subscriptions} BLE subscriptions"
        )

        first, last = self.rss_windows()
        window = self.plan.rss_window
        lines.append(
            f"  RSS mean first {window:g} s {mean_rss(first) / 1024:.1f} MiB, "
            f"last {window:g} s {mean_rss(last) / 1024:.1f} MiB"
        )
        lines.append(
            f"  daemon CPU {self.samples[-1].cpu_seconds:.1f} s in all, "
            f"{cpu_share(first):.0%} of a core in the first {window:g} s, "
            f"{cpu_share(last):.0%} in the last {window:g} s"
        )

        errors = [line for line in self.daemon_log.splitlines() if " ERROR " in line]
        lines.append(f"  daemon log: {len(errors)} ERROR lines")
        lines += [f"    {line}" for line in errors[:10]]

        lines.append("  samples (s, RSS MiB, CPU s):")
        lines += [
            f"    {s.seconds:7.1f} {s.rss_kib / 1024:8.1f} {s.cpu_seconds:8.1f}"
            for s in self.samples
        ]
        return "\n".join(lines)


@pytest.fixture
def bluez() -> Iterator[tuple[BluezEmulator, dict[str, str]]]:
    """An emulated BlueZ on a private bus, and the environment that points bleak at it."""
    with PrivateBus() as bus:
        # bleak rejects BlueZ older than 5.55 after running `bluetoothctl
        # --version`, so the shim reports the version the emulator models.
        shim = write_bluetoothctl_shim(bus.directory)
        environment = {
            "DBUS_SYSTEM_BUS_ADDRESS": bus.address,
            "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
        }
        emulator = BluezEmulator(bus.address)
        emulator.start()
        try:
            yield emulator, environment
        finally:
            emulator.stop()


def write_config(path: Path, unplug_port: str, reenum_port: Path) -> None:
    path.write_text(
        f"""
[[links]]
name = "{UNPLUG_LINK}"
port = "{unplug_port}"
kind = "json"

[[links]]
name = "{REENUM_LINK}"
port = "{reenum_port}"
kind = "json"

[[links]]
name = "{BLE_LINK}"
transport = "ble"
kind = "json"
ble = {{ name = "{BLE_NAME}", scan_timeout = 5.0 }}
""",
        encoding="utf-8",
    )


def appliance_json(command: list[str], data_dir: Path) -> dict[str, Any]:
    result = subprocess.run(
        [APPLIANCE, *command, "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def wait_until_connected(proc: subprocess.Popen[bytes], data_dir: Path) -> bool:
    """Poll `appliance status` until every link is connected or the daemon exits."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if (data_dir / "appliance.db").exists():
            links = appliance_json(["status"], data_dir)["links"]
            if all(links.get(name, {}).get("state") == "connected" for name in LINKS):
                return True
        time.sleep(1.0)
    return False


def wait_until_final(data_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = appliance_json(["status"], data_dir)["records"]
        if records["received"] + records["inferred"] + records["validated"] == 0:
            return
        time.sleep(1.0)


def stored_messages(
    data_dir: Path,
) -> tuple[dict[str, list[int]], dict[str, set[str]], dict[str, list[int]]]:
    """Read back every record with `appliance records` and the ``messages`` table."""
    output = subprocess.run(
        [APPLIANCE, "records", "--format", "jsonl", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    records = [json.loads(line) for line in output.splitlines()]
    records.sort(key=lambda record: (record["link"], record["seq"]))
    seqs: dict[str, list[int]] = {link: [] for link in LINKS}
    states: dict[str, set[str]] = {link: set() for link in LINKS}
    for record in records:
        seqs[record["link"]].append(json.loads(record["raw"])["seq"])
        states[record["link"]].add(record["state"])
    numbers: dict[str, list[int]] = {link: [] for link in LINKS}
    uri = f"file:{data_dir / 'appliance.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        rows = conn.execute(
            "SELECT r.link, m.number FROM messages AS m"
            " JOIN records AS r ON r.id = m.record_id ORDER BY r.link, r.seq"
        )
        for link, number in rows:
            numbers[link].append(number)
    return seqs, states, numbers


@dataclasses.dataclass
class SoakDevices:
    """The three simulated devices, and the USB adapter in front of one of them."""

    unplug: FramedDeviceSimulator
    reenum: FramedDeviceSimulator
    ble: BleDeviceSimulator
    adapter: UsbSerialAdapter | None = None

    def by_link(self) -> dict[str, FramedDeviceSimulator | BleDeviceSimulator]:
        return {UNPLUG_LINK: self.unplug, REENUM_LINK: self.reenum, BLE_LINK: self.ble}

    def start(self, adapter_path: Path) -> None:
        """Start the devices, the re-enumeration device behind the adapter."""
        self.unplug.start()
        self.reenum.start()
        assert self.reenum.port_path is not None
        self.adapter = UsbSerialAdapter(self.reenum.port_path, adapter_path)
        self.adapter.start()
        self.ble.start()

    def stop(self) -> None:
        # The adapter stops first, so the device closing its pty is no failure.
        if self.adapter is not None:
            self.adapter.stop()
        for device in self.by_link().values():
            device.stop()


def make_devices(
    tmp_path: Path,
    data_dir: Path,
    emulator: BluezEmulator,
    plan: SoakPlan,
    stop_sending: threading.Event,
) -> SoakDevices:
    """Pair one device per link and build its simulator with the plan's faults."""
    pairing = PairingStore(data_dir / "devices")
    keys = {link: pairing.pair(link) for link in LINKS}
    unplug = FramedDeviceSimulator(
        keys[UNPLUG_LINK],
        str(tmp_path / "ttyUNPLUG"),
        messages=json_messages(UNPLUG_LINK, stop_sending),
        faults=FaultOptions(
            drop=plan.drop,
            corrupt=plan.corrupt,
            disconnect_every=plan.unplug_every,
            disconnect_seconds=plan.unplug_seconds,
            seed=7,
        ),
        rate=plan.serial_rate,
    )
    reenum = FramedDeviceSimulator(
        keys[REENUM_LINK],
        str(tmp_path / "uart-reenum"),
        messages=json_messages(REENUM_LINK, stop_sending),
        rate=plan.serial_rate,
    )
    ble = BleDeviceSimulator(
        emulator,
        keys[BLE_LINK],
        BLE_ADDRESS,
        BLE_NAME,
        messages=json_messages(BLE_LINK, stop_sending),
        faults=BleFaults(
            disconnect_every=plan.ble_disconnect_every,
            power_cycles_at=plan.power_cycle_at,
            power_off_seconds=plan.power_off_seconds,
        ),
        rate=plan.ble_rate,
    )
    return SoakDevices(unplug, reenum, ble)


def start_daemon(
    config: Path, data_dir: Path, log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start `appliance run --config` with its output in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [APPLIANCE, "run", "--config", str(config), "--data-dir", str(data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def sample_while_faulting(
    proc: subprocess.Popen[bytes], adapter: UsbSerialAdapter, plan: SoakPlan
) -> tuple[list[RssSample], bool]:
    """Re-enumerate the adapter on schedule and sample the daemon until time is up.

    Returns the samples, and whether the daemon was running at every sample.
    """
    started = time.monotonic()
    reenumerations = list(plan.reenumerate_at)
    samples: list[RssSample] = []
    next_sample = 0.0
    while (elapsed := time.monotonic() - started) < plan.duration:
        if reenumerations and elapsed >= reenumerations[0]:
            reenumerations.pop(0)
            adapter.reenumerate()
        if elapsed >= next_sample:
            if proc.poll() is not None:
                return samples, False
            samples.append(sample_process(proc.pid, started))
            next_sample += plan.rss_interval
        time.sleep(0.1)

    if proc.poll() is not None:
        return samples, False
    samples.append(sample_process(proc.pid, started))
    return samples, True


def drain(devices: SoakDevices, data_dir: Path, stop_sending: threading.Event) -> None:
    """End the message streams and wait until each is acknowledged and final."""
    stop_sending.set()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    for device in devices.by_link().values():
        device.finished.wait(max(0.0, deadline - time.monotonic()))
    wait_until_final(data_dir, timeout=60.0)


def terminate(proc: subprocess.Popen[bytes]) -> int | None:
    """Send SIGTERM and return the exit code, or None if the daemon did not exit."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None


def run_soak(
    tmp_path: Path,
    child_env: dict[str, str],
    bluez: tuple[BluezEmulator, dict[str, str]],
    plan: SoakPlan,
) -> SoakResult:
    """Run the daemon against the three faulty devices for ``plan.duration`` seconds."""
    emulator, bus_environment = bluez
    data_dir = tmp_path / "data"
    stop_sending = threading.Event()
    devices = make_devices(tmp_path, data_dir, emulator, plan, stop_sending)
    (tmp_path / "by-id").mkdir()
    adapter_path = tmp_path / "by-id" / "usb-FieldRelay_UART_A1-if00-port0"
    config = tmp_path / "relay.toml"
    log_path = tmp_path / "daemon.log"
    proc: subprocess.Popen[bytes] | None = None

    try:
        devices.start(adapter_path)
        assert devices.unplug.port_path is not None
        assert devices.adapter is not None
        write_config(config, devices.unplug.port_path, adapter_path)
        proc = start_daemon(config, data_dir, log_path, child_env | bus_environment)
        if not wait_until_connected(proc, data_dir):
            pytest.fail(
                "the daemon did not connect every link within "
                f"{READY_TIMEOUT:g} s:\n{log_path.read_text()[-4000:]}"
            )

        samples, alive = sample_while_faulting(proc, devices.adapter, plan)
        if alive:
            drain(devices, data_dir, stop_sending)
            alive = proc.poll() is None
        status = appliance_json(["status"], data_dir)
        returncode = terminate(proc)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        devices.stop()

    seqs, states, numbers = stored_messages(data_dir)
    by_link = devices.by_link()
    return SoakResult(
        plan=plan,
        returncode=returncode,
        alive_at_every_sample=alive,
        daemon_log=log_path.read_text(errors="replace"),
        status=status,
        final_status=appliance_json(["status"], data_dir),
        sent={link: device.sent for link, device in by_link.items()},
        acked={link: device.acked for link, device in by_link.items()},
        drained={link: device.finished.is_set() for link, device in by_link.items()},
        stored_seqs=seqs,
        record_states=states,
        message_numbers=numbers,
        samples=samples,
        unplugs=devices.unplug.stats.disconnects,
        frames_dropped=devices.unplug.stats.frames_dropped,
        frames_corrupted=devices.unplug.stats.frames_corrupted,
        reenumerations=devices.adapter.reenumerations,
        adapter_error=devices.adapter.error,
        ble_forced_disconnects=devices.ble.stats.forced_disconnects,
        ble_power_cycles=devices.ble.stats.power_cycles,
        ble_subscriptions=devices.ble.stats.subscriptions,
    )


def check_soak(result: SoakResult) -> None:
    """Assert exactly-once delivery, reconnects, a clean exit and flat memory."""
    print(result.summary())
    log_tail = result.daemon_log[-4000:]

    assert result.alive_at_every_sample, f"the daemon exited early:\n{log_tail}"
    assert result.returncode == 0, f"exit code after SIGTERM:\n{log_tail}"
    assert "Traceback" not in result.daemon_log, log_tail
    for link in LINKS:
        sent = result.sent[link]
        assert sent > 0, f"{link}: the device sent nothing"
        assert result.drained[link], f"{link}: {result.acked[link]} of {sent} acked"
        assert result.acked[link] == sent, link
        assert result.stored_seqs[link] == list(range(sent)), link
        assert result.message_numbers[link] == list(range(sent)), link
        assert result.record_states[link] == {"queued"}, link
        assert result.status["links"][link]["reconnects"] > 0, link
        assert result.status["links"][link]["state"] != "closed", link

    plan = result.plan
    assert result.unplugs > 0
    assert result.frames_dropped > 0
    assert result.frames_corrupted > 0
    assert result.reenumerations == len(plan.reenumerate_at)
    assert result.adapter_error is None
    assert result.ble_forced_disconnects > 0
    assert result.ble_power_cycles == len(plan.power_cycle_at)

    first, last = result.rss_windows()
    growth = mean_rss(last) - mean_rss(first)
    assert growth <= RSS_GROWTH_LIMIT_KIB, f"RSS rose by {growth / 1024:.1f} MiB"


@pytest.mark.model
def test_link_faults_short_run(tmp_path, child_env, bluez):
    check_soak(run_soak(tmp_path, child_env, bluez, plan_for(SHORT_SECONDS)))


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(SOAK_SECONDS + READY_TIMEOUT + DRAIN_TIMEOUT + 300)
def test_link_soak_full_run(tmp_path, child_env, bluez):
    check_soak(run_soak(tmp_path, child_env, bluez, plan_for(SOAK_SECONDS)))


# Found by the soak


def test_unfinished_count_searches_state_index(tmp_path):
    store = Store(tmp_path / "appliance.db")
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    store.unfinished_count()
    store.conn.set_trace_callback(None)
    count_sql = next(sql for sql in statements if "COUNT(*)" in sql)
    plan = store.conn.execute(f"EXPLAIN QUERY PLAN {count_sql}").fetchall()
    store.close()

    assert [row["detail"].split()[0] for row in plan] == ["SEARCH"], count_sql


def test_ble_write_during_disconnect_returns_false(bluez, monkeypatch):
    emulator, environment = bluez
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    emulator.add_peripheral(BLE_ADDRESS, BLE_NAME)
    link = BleLink(
        "ble-race",
        BleTarget(name=BLE_NAME, scan_timeout=2.0),
        RingBuffer(65536),
        LinkCounters(),
        backoff_base=0.05,
        max_backoff=0.2,
    )
    escaped: list[BaseException] = []
    stop = threading.Event()

    def write_until_stopped() -> None:
        while not stop.is_set():
            try:
                written = link.write(b"\x00" * 60)
            except Exception as exc:
                escaped.append(exc)
                return
            if not written:
                time.sleep(0.001)

    link.open()
    link.start()
    writer = threading.Thread(target=write_until_stopped, name="ble-race-writer")
    writer.start()
    try:
        # Each forced disconnect lands during a write about one time in four
        # here, so 40 of them miss the race with odds of about 1 in 100,000.
        for _ in range(40):
            if escaped:
                break
            deadline = time.monotonic() + 5.0
            while link.state is not LinkState.CONNECTED and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.05)
            with contextlib.suppress(RuntimeError):
                emulator.force_disconnect(BLE_ADDRESS)
    finally:
        stop.set()
        writer.join(timeout=10)
        link.close()

    assert escaped == []
