"""The systemd unit, `make install-service` and the daemon under sd_notify."""

from __future__ import annotations

import configparser
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.store import DB_NAME, Store
from firmware_bridge.simulator import load_sample_lines
from tests.conftest import APPLIANCE, REPO_ROOT

UNIT = REPO_ROOT / "deploy" / "field-relay.service"
EXAMPLE_CONFIG = REPO_ROOT / "deploy" / "relay.toml.example"
INSTALLED_APPLIANCE = "/opt/field-relay/.venv/bin/appliance"


def _unit_sections() -> configparser.ConfigParser:
    # systemd allows repeated keys (DeviceAllow=, After=); keep the last value
    # of each, which is enough for keys that appear once.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def _unit_values(key: str) -> list[str]:
    """Return every value of ``key`` in the unit file, in order."""
    values = []
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            values.append(value.strip())
    return values


def test_unit_has_notify_watchdog_and_user() -> None:
    service = _unit_sections()["Service"]

    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] == "30"
    assert service["User"] == "field-relay"
    assert service["Group"] == "field-relay"
    assert service["SupplementaryGroups"] == "dialout"
    assert service["StateDirectory"] == "field-relay"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"


def test_unit_runs_installed_appliance_with_state_dir() -> None:
    command = _unit_sections()["Service"]["ExecStart"].split()

    assert command[:2] == [INSTALLED_APPLIANCE, "run"]
    assert command[command.index("--data-dir") + 1] == "/var/lib/field-relay"
    assert command[command.index("--config") + 1] == "/etc/field-relay/relay.toml"


def test_unit_stop_timeout_is_bounded() -> None:
    timeout = int(_unit_sections()["Service"]["TimeoutStopSec"])

    assert 0 < timeout <= 120


def test_unit_hardening_options() -> None:
    service = _unit_sections()["Service"]

    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectKernelTunables"] == "yes"
    assert service["ProtectControlGroups"] == "yes"
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()
    assert _unit_values("DeviceAllow") == ["char-ttyUSB rw", "char-ttyACM rw"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify rejects an ExecStart= binary that does not exist, so the copy
    # points at this checkout's appliance instead of /opt/field-relay.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_APPLIANCE, APPLIANCE))

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_example_config_passes_check(child_env: dict[str, str]) -> None:
    result = subprocess.run(
        [APPLIANCE, "config", "check", str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "valid, 1 link(s)" in result.stdout


def _install(destdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "install-service", f"DESTDIR={destdir}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_install_service_lays_out_files(tmp_path: Path) -> None:
    result = _install(tmp_path)

    unit = tmp_path / "etc/systemd/system/field-relay.service"
    config_dir = tmp_path / "etc/field-relay"
    assert result.returncode == 0, result.stderr
    assert unit.read_text() == UNIT.read_text()
    assert _mode(unit) == 0o644
    assert _mode(config_dir) == 0o750
    assert _mode(config_dir / "relay.toml") == 0o640
    assert _mode(config_dir / "relay.toml.example") == 0o644
    assert (config_dir / "relay.toml").read_text() == EXAMPLE_CONFIG.read_text()
    assert "daemon-reload skipped" in result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_install_service_keeps_edited_config(tmp_path: Path) -> None:
    assert _install(tmp_path).returncode == 0
    config = tmp_path / "etc/field-relay/relay.toml"
    config.write_text("# edited on site\n")

    result = _install(tmp_path)

    assert result.returncode == 0, result.stderr
    assert config.read_text() == "# edited on site\n"
    assert "kept the existing" in result.stdout


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))

    def close(self) -> None:
        self._sock.close()

    def wait_for(self, key: str, value: str, timeout: float, count: int = 1) -> None:
        """Receive until ``count`` messages have set ``key`` to ``value``.

        Raises:
            AssertionError: they did not arrive within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while self._count(key, value) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{count} x {key}={value} not received in {timeout} s; "
                    f"received {self.messages}"
                )
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            self.messages.append(fields)

    def _count(self, key: str, value: str) -> int:
        return sum(message.get(key) == value for message in self.messages)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


def _record_counts(data_dir: Path) -> tuple[int, int]:
    """Return (records stored, records not yet final) in ``data_dir``."""
    store = Store(data_dir / DB_NAME, readonly=True)
    try:
        total = sum(store.state_counts().values())
        return total, store.unfinished_count()
    finally:
        store.close()


def _raw_lines(data_dir: Path) -> list[str]:
    store = Store(data_dir / DB_NAME, readonly=True)
    try:
        rows = store.query("SELECT raw FROM records ORDER BY seq")
    finally:
        store.close()
    return [row["raw"] for row in rows]


def _wait_for_records(data_dir: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (data_dir / DB_NAME).exists() and _record_counts(data_dir)[0] >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} records after {timeout} s")


@pytest.mark.model
def test_daemon_under_notify_stops_cleanly_on_sigterm(
    tmp_path: Path, notify_socket: NotifySocket, child_env: dict[str, str]
) -> None:
    data_dir = tmp_path / "data"
    env = {
        **child_env,
        "NOTIFY_SOCKET": str(notify_socket.path),
        "WATCHDOG_USEC": "2000000",
    }
    # The demo device sends 2 lines/s instead of 5, so the backlog that the
    # second run infers at about one record per second stays small.
    command = [APPLIANCE, "run", "--demo", "--max-records", "1000"]
    command += ["--demo-rate", "2", "--data-dir", str(data_dir)]
    with open(tmp_path / "daemon.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        notify_socket.wait_for("READY", "1", timeout=120)
        notify_socket.wait_for("WATCHDOG", "1", timeout=10, count=2)
        _wait_for_records(data_dir, 3, timeout=60)
        process.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", "1", timeout=30)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stored, unfinished = _record_counts(data_dir)
    ready = next(m for m in notify_socket.messages if m.get("READY") == "1")

    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    assert ready["MAINPID"] == str(process.pid)
    assert stored >= 3

    # Records still unfinished at the stop are resumed, not lost: a second run
    # finishes them, and the stored lines are the sample's first lines in order.
    rerun = subprocess.run(
        [APPLIANCE, "run", "--demo", "--max-records", "1", "--data-dir", str(data_dir)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    total, unfinished_after = _record_counts(data_dir)
    raw = _raw_lines(data_dir)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert unfinished_after == 0
    assert total == stored + 1
    assert raw == load_sample_lines()[: len(raw)]
    if unfinished:
        assert f"resuming {unfinished} unfinished records" in rerun.stderr
