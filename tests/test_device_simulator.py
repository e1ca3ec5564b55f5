"""Tests for the framed device simulator against a real appliance endpoint on a pty.

The appliance side runs in the test thread: pyserial reads the simulator's
symlink path, an ``ApplianceEndpoint`` decodes the frames, and every message
is committed to a dict before it is acknowledged, as the daemon commits to
SQLite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial

from firmware_bridge.device_ports import lock_path_for, open_device_port
from firmware_bridge.device_simulator import FaultOptions, FramedDeviceSimulator
from firmware_bridge.errors import PortError
from firmware_bridge.pairing import DeviceKey, PairingStore
from firmware_bridge.protocol import ApplianceEndpoint, DeviceState, Message
from firmware_bridge.simulator import load_sample_lines
from tests.conftest import APPLIANCE

WAIT_SECONDS = 60.0
"""Maximum seconds a run may take. Passing runs of 300 messages take 1 to 5 s."""
ALL_FAULTS = FaultOptions(
    drop=0.05,
    corrupt=0.05,
    duplicate=0.05,
    reorder=0.05,
    split_writes=True,
    garbage=0.05,
    seed=7,
)


class ApplianceSide:
    """The appliance end of the link: pyserial on ``path`` and an endpoint.

    A read or write failure closes the port, and the next ``step`` reopens the
    path, as the daemon's serial link does after a device disappears.
    """

    def __init__(self, path: str, lookup: Callable[[bytes], bytes | None]) -> None:
        self.path = path
        self.committed: dict[tuple[str, str], int] = {}
        self.endpoint = ApplianceEndpoint(lookup, self._next_number)
        self.messages: list[Message] = []
        self.opens = 0
        self._port: serial.SerialBase | None = None

    def _next_number(self, device_id: str, stream_id: str) -> int:
        return self.committed.get((device_id, stream_id), 0)

    def run_until(self, done: Callable[[], bool], timeout: float = WAIT_SECONDS):
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self.step()

    def step(self) -> None:
        if self._port is None:
            try:
                self._port = serial.serial_for_url(self.path, timeout=0.05)
            except (serial.SerialException, OSError):
                time.sleep(0.05)
                return
            self.opens += 1
        try:
            data = self._port.read(max(self._port.in_waiting, 1))
            output = self.exchange(data)
            if output:
                self._port.write(output)
        except (serial.SerialException, OSError):
            self.close()

    def exchange(self, data: bytes) -> bytes:
        """Commit the messages in ``data`` and return the bytes to send back."""
        self._commit(data)
        return self.endpoint.take_output()

    def _commit(self, data: bytes) -> None:
        now = time.monotonic()
        messages = self.endpoint.receive(data, now)
        while True:
            for message in messages:
                self.messages.append(message)
                stream = (message.device_id, message.stream_id)
                self.committed[stream] = message.number + 1
            self.endpoint.committed_up_to(self.endpoint.expected)
            if not self.endpoint.pending:
                return
            messages = self.endpoint.receive(b"", now)

    @property
    def bodies(self) -> list[bytes]:
        return [message.body for message in self.messages]

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None


@pytest.fixture
def key(tmp_path: Path) -> DeviceKey:
    return PairingStore(tmp_path / "devices").pair("sim-1")


@pytest.fixture
def link_path(tmp_path: Path) -> str:
    return str(tmp_path / "ttyDEVICE")


@pytest.fixture
def appliance(tmp_path: Path, link_path: str) -> Iterator[ApplianceSide]:
    side = ApplianceSide(link_path, PairingStore(tmp_path / "devices").lookup)
    yield side
    side.close()


def fast_simulator(
    key: DeviceKey,
    port: str,
    messages: list[bytes] | None = None,
    faults: FaultOptions | None = None,
) -> FramedDeviceSimulator:
    """Return a simulator whose timers are short enough that a lost frame
    costs a fraction of a second."""
    return FramedDeviceSimulator(
        key,
        port,
        messages,
        faults,
        window=16,
        retransmit_after=0.2,
        handshake_timeout=0.3,
    )


def numbered(count: int) -> list[bytes]:
    return [f"message {number}".encode() for number in range(count)]


def run_simulator(
    appliance: ApplianceSide,
    key: DeviceKey,
    link_path: str,
    messages: list[bytes],
    faults: FaultOptions,
) -> FramedDeviceSimulator:
    simulator = fast_simulator(key, link_path, messages, faults)
    with simulator:
        appliance.run_until(simulator.finished.is_set)
    assert simulator.error is None
    return simulator


def test_faults_deliver_each_message_once(appliance, key, link_path):
    messages = numbered(300)

    simulator = run_simulator(appliance, key, link_path, messages, ALL_FAULTS)

    assert simulator.finished.is_set()
    assert appliance.bodies == messages
    assert [message.number for message in appliance.messages] == list(range(300))
    # Every fault kind happened, and the appliance saw its effects.
    stats = simulator.stats
    assert stats.frames_dropped > 0
    assert stats.frames_corrupted > 0
    assert stats.frames_duplicated > 0
    assert stats.frames_reordered > 0
    assert stats.garbage_insertions > 0
    assert stats.split_frames > 0
    assert appliance.endpoint.decoder.stats.crc_errors > 0
    assert appliance.endpoint.stats.duplicate_messages > 0
    assert appliance.endpoint.stats.message_gaps > 0


def test_delay_keeps_order(appliance, key, link_path):
    messages = numbered(100)
    faults = FaultOptions(delay=0.01, seed=3)

    run_simulator(appliance, key, link_path, messages, faults)

    assert appliance.bodies == messages
    assert appliance.endpoint.stats.message_gaps == 0


def test_reset_resends_unacknowledged(appliance, key, link_path):
    messages = numbered(300)
    faults = FaultOptions(reset_every=60, drop=0.02, seed=11)

    simulator = run_simulator(appliance, key, link_path, messages, faults)

    assert appliance.bodies == messages
    assert simulator.stats.resets == 4
    assert simulator.endpoint.stats.handshakes >= 5


def test_reset_keeps_stream(appliance, key, link_path):
    faults = FaultOptions(reset_every=60, seed=11)

    run_simulator(appliance, key, link_path, numbered(300), faults)

    assert len(appliance.committed) == 1
    assert list(appliance.committed.values()) == [300]


def test_disconnect_reopens_symlink(appliance, key, link_path):
    messages = numbered(300)
    faults = FaultOptions(disconnect_every=100, disconnect_seconds=0.2, seed=5)

    simulator = run_simulator(appliance, key, link_path, messages, faults)

    assert appliance.bodies == messages
    assert simulator.stats.disconnects == 2
    assert appliance.opens == 3


def test_disconnect_removes_then_restores_symlink(appliance, key, link_path):
    faults = FaultOptions(disconnect_every=50, disconnect_seconds=1.0, seed=5)
    simulator = fast_simulator(key, link_path, numbered(100), faults)

    with simulator:
        appliance.run_until(lambda: simulator.stats.disconnects == 1)
        absent_while_disconnected = not os.path.lexists(link_path)
        appliance.run_until(simulator.finished.is_set)
        target = os.readlink(link_path)

    assert absent_while_disconnected
    assert target.startswith("/dev/pts/")
    assert simulator.finished.is_set()


def serve_socket(
    server: socket.socket, simulator: FramedDeviceSimulator, appliance: ApplianceSide
) -> int:
    """Relay bytes between the simulator's connections and ``appliance`` until it
    finishes; return the number of connections accepted."""
    server.settimeout(0.05)
    connections = 0
    deadline = time.monotonic() + WAIT_SECONDS
    while not simulator.finished.is_set() and time.monotonic() < deadline:
        try:
            connection, _ = server.accept()
        except TimeoutError:
            continue
        connections += 1
        with connection:
            connection.settimeout(0.05)
            while not simulator.finished.is_set() and time.monotonic() < deadline:
                try:
                    data = connection.recv(4096)
                except TimeoutError:
                    data = b""
                else:
                    if not data:
                        break
                connection.sendall(appliance.exchange(data))
    return connections


def test_socket_url_delivers_messages(appliance, key):
    messages = numbered(100)
    server = socket.create_server(("127.0.0.1", 0))
    url = f"socket://127.0.0.1:{server.getsockname()[1]}"
    faults = FaultOptions(drop=0.05, split_writes=True, seed=2)
    simulator = fast_simulator(key, url, messages, faults)

    with server, simulator:
        connections = serve_socket(server, simulator, appliance)

    assert simulator.error is None
    assert appliance.bodies == messages
    assert connections == 1
    assert simulator.port_path == url


def test_socket_url_reconnects(appliance, key):
    messages = numbered(150)
    server = socket.create_server(("127.0.0.1", 0))
    url = f"socket://127.0.0.1:{server.getsockname()[1]}"
    faults = FaultOptions(disconnect_every=50, disconnect_seconds=0.1, seed=2)
    simulator = fast_simulator(key, url, messages, faults)

    with server, simulator:
        connections = serve_socket(server, simulator, appliance)

    assert appliance.bodies == messages
    assert simulator.stats.disconnects == 2
    assert connections == 3


def test_socket_url_refused_raises(key):
    server = socket.create_server(("127.0.0.1", 0))
    url = f"socket://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    simulator = FramedDeviceSimulator(key, url, numbered(1))

    with pytest.raises(PortError) as raised:
        simulator.start()

    assert url in str(raised.value)


def test_stop_removes_symlink(key, link_path):
    simulator = FramedDeviceSimulator(key, link_path, numbered(1))

    simulator.start()
    assert os.readlink(link_path).startswith("/dev/pts/")
    simulator.stop()

    assert not os.path.lexists(link_path)


def test_start_replaces_stale_pty_symlink(key, link_path):
    os.symlink("/dev/pts/999", link_path)
    simulator = FramedDeviceSimulator(key, link_path, numbered(1))

    with simulator:
        target = os.readlink(link_path)

    assert target != "/dev/pts/999"


def test_regular_file_at_port_rejected(key, tmp_path):
    occupied = tmp_path / "notes.txt"
    occupied.write_text("keep me")
    simulator = FramedDeviceSimulator(key, str(occupied), numbered(1))

    with pytest.raises(PortError) as raised:
        simulator.start()

    assert str(occupied) in str(raised.value)
    assert occupied.read_text() == "keep me"


def test_unpaired_device_rejected(appliance, link_path):
    stranger = PairingStore(Path(link_path).parent / "elsewhere").pair("stranger")
    simulator = fast_simulator(stranger, link_path, numbered(5))

    with simulator:
        appliance.run_until(lambda: simulator.endpoint.state == DeviceState.REFUSED)

    assert simulator.endpoint.state == DeviceState.REFUSED
    assert appliance.endpoint.stats.unpaired_hellos >= 1
    assert appliance.messages == []


def test_default_messages_are_sample_lines(appliance, key, link_path):
    simulator = fast_simulator(key, link_path)

    with simulator:
        appliance.run_until(simulator.finished.is_set)

    expected = [line.encode("utf-8") for line in load_sample_lines()]
    assert appliance.bodies == expected
    assert simulator.sent == len(expected)


def test_oversize_message_stops_with_error(key, link_path):
    simulator = FramedDeviceSimulator(key, link_path, [b"x" * 2000])

    with simulator:
        simulator.stopped.wait(5)

    assert simulator.error is not None
    assert "2000 bytes" in str(simulator.error)


@pytest.mark.parametrize(
    "options",
    [
        {"drop": 1.5},
        {"garbage": -0.1},
        {"delay": -1.0},
        {"reset_every": 0},
        {"disconnect_every": 0},
    ],
)
def test_fault_options_out_of_range(options):
    with pytest.raises(ValueError) as raised:
        FaultOptions(**options)

    assert next(iter(options)) in str(raised.value)


def test_cli_simulate_until_acknowledged(appliance, key, tmp_path, link_path):
    PairingStore(tmp_path / "devices").export("sim-1", tmp_path / "sim-1.json")
    lines = tmp_path / "lines.txt"
    lines.write_text("first\nsecond\nthird\n")
    process = subprocess.Popen(
        [
            APPLIANCE,
            "simulate",
            "--port",
            link_path,
            "--key",
            str(tmp_path / "sim-1.json"),
        ]
        + ["--lines", str(lines), "--count", "50", "--drop", "0.05", "--seed", "1"]
        + ["--timeout", str(WAIT_SECONDS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        appliance.run_until(lambda: process.poll() is not None)
        stdout, stderr = process.communicate(timeout=WAIT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert appliance.bodies == [b"first", b"second", b"third"] * 16 + [
        b"first",
        b"second",
    ]
    assert stdout.startswith("acknowledged 50 of 50 messages")


def test_stop_removes_lock_file(key, link_path):
    simulator = FramedDeviceSimulator(key, link_path, numbered(1))

    simulator.start()
    assert lock_path_for(Path(link_path)).read_text() == f"{os.getpid()}\n"
    simulator.stop()

    assert not lock_path_for(Path(link_path)).exists()


def test_second_simulator_on_live_path_rejected(key, link_path):
    first = FramedDeviceSimulator(key, link_path, numbered(1))
    second = FramedDeviceSimulator(key, link_path, numbered(1))

    with first:
        target = os.readlink(link_path)
        with pytest.raises(PortError) as raised:
            second.start()
        target_after = os.readlink(link_path)

    assert repr(link_path) in str(raised.value)
    assert f"pid {os.getpid()}" in str(raised.value)
    assert target_after == target


def test_path_free_after_first_stops(key, link_path):
    with FramedDeviceSimulator(key, link_path, numbered(1)):
        pass
    second = FramedDeviceSimulator(key, link_path, numbered(1))

    with second:
        target = os.readlink(link_path)

    assert target.startswith("/dev/pts/")


def test_disconnected_path_stays_owned(key, link_path):
    owner = open_device_port(link_path)
    owner.close()
    try:
        assert not os.path.lexists(link_path)
        with pytest.raises(PortError) as raised:
            open_device_port(link_path)
    finally:
        owner.release()

    assert repr(link_path) in str(raised.value)


def test_released_port_cannot_reopen(link_path):
    port = open_device_port(link_path)
    port.release()

    with pytest.raises(PortError):
        port.reopen()

    assert not os.path.lexists(link_path)


def test_unheld_lock_file_is_stale(key, link_path):
    os.symlink("/dev/pts/999", link_path)
    lock_path_for(Path(link_path)).write_text("999999\n")

    with FramedDeviceSimulator(key, link_path, numbered(1)):
        target = os.readlink(link_path)

    assert target != "/dev/pts/999"
    assert not lock_path_for(Path(link_path)).exists()


def test_directory_port_rejected(key, tmp_path):
    simulator = FramedDeviceSimulator(key, str(tmp_path), numbered(1))

    with pytest.raises(PortError) as raised:
        simulator.start()

    message = str(raised.value)
    assert repr(str(tmp_path)) in message
    assert "is a directory" in message
    assert str(tmp_path / "ttyDEVICE") in message


def test_dangling_symlink_port_rejected(key, tmp_path):
    link = tmp_path / "ttyOLD"
    link.symlink_to(tmp_path / "gone")
    simulator = FramedDeviceSimulator(key, str(link), numbered(1))

    with pytest.raises(PortError) as raised:
        simulator.start()

    message = str(raised.value)
    assert repr(str(link)) in message
    assert repr(str(tmp_path / "gone")) in message
    assert f"rm {link}" in message
    assert "plugged in" not in message


def test_dangling_device_symlink_port_rejected(key, tmp_path):
    link = tmp_path / "ttyADAPTER"
    link.symlink_to("/dev/ttyUSB-field-relay-missing")
    simulator = FramedDeviceSimulator(key, str(link), numbered(1))

    with pytest.raises(PortError) as raised:
        simulator.start()

    assert "plug that device in" in str(raised.value)
    assert f"rm {link}" in str(raised.value)


def start_cli_simulator(key_file: Path, link_path: str) -> subprocess.Popen[str]:
    """Start `appliance simulate` on ``link_path`` and wait for its symlink."""
    process = subprocess.Popen(
        [APPLIANCE, "simulate", "--port", link_path, "--key", str(key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A background job of a non-interactive shell inherits SIGINT ignored,
        # and simulate keeps ignored signals ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + WAIT_SECONDS
    while not os.path.lexists(link_path) and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            break
        time.sleep(0.02)
    return process


@pytest.fixture
def key_file(tmp_path: Path, key: DeviceKey) -> Path:
    path = tmp_path / "sim-1.json"
    PairingStore(tmp_path / "devices").export(key.device_id, path)
    return path


@pytest.mark.parametrize(
    ("stop_signal", "exit_code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
)
def test_cli_simulate_signal_removes_symlink(
    key_file, link_path, stop_signal, exit_code
):
    process = start_cli_simulator(key_file, link_path)
    assert process.poll() is None

    process.send_signal(stop_signal)
    stdout, stderr = process.communicate(timeout=WAIT_SECONDS)

    assert process.returncode == exit_code, stderr
    assert stdout.startswith("acknowledged 0 of")
    assert not os.path.lexists(link_path)
    assert not lock_path_for(Path(link_path)).exists()


def test_cli_simulate_live_path_rejected(key_file, link_path):
    first = start_cli_simulator(key_file, link_path)
    try:
        target = os.readlink(link_path)
        second = subprocess.run(
            [APPLIANCE, "simulate", "--port", link_path, "--key", str(key_file)],
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
        )
        target_after = os.readlink(link_path)
    finally:
        first.terminate()
        first.communicate(timeout=WAIT_SECONDS)

    assert second.returncode == 1
    assert second.stderr.startswith(
        f"error: cannot publish the device at {link_path!r}"
    )
    assert f"pid {first.pid}" in second.stderr
    assert target_after == target


def test_killed_simulator_path_reused(key, key_file, link_path):
    process = start_cli_simulator(key_file, link_path)
    process.kill()
    process.communicate(timeout=WAIT_SECONDS)
    assert os.path.lexists(link_path)

    with FramedDeviceSimulator(key, link_path, numbered(1)):
        target = os.readlink(link_path)

    assert target.startswith("/dev/pts/")
    assert not os.path.lexists(link_path)


@pytest.mark.slow
def test_faults_ten_thousand_messages(appliance, key, link_path):
    messages = numbered(10_000)
    faults = FaultOptions(
        drop=0.02,
        corrupt=0.02,
        duplicate=0.02,
        reorder=0.02,
        split_writes=True,
        garbage=0.02,
        reset_every=2_500,
        disconnect_every=4_000,
        disconnect_seconds=0.2,
        seed=10_000,
    )
    simulator = fast_simulator(key, link_path, messages, faults)

    with simulator:
        appliance.run_until(simulator.finished.is_set, timeout=600)

    assert simulator.error is None
    assert appliance.bodies == messages
