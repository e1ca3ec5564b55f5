"""`appliance doctor`: each check against a real port, file system, bus or server."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import grp
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.control import ControlServer
from appliance.doctor import CheckResult, Status
from appliance.doctor_host import check_clock, check_daemon
from appliance.doctor_links import check_ble, check_serial_link
from appliance.doctor_model import check_model
from appliance.doctor_sink import check_sink
from tests.bluez_emulator import BluezEmulator, PrivateBus
from tests.conftest import APPLIANCE
from tests.http_receiver import HttpReceiver, unused_port_url

FAKE_MODEL_BYTES = b"GGUF, but not a real model\n" * 10


def _doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [APPLIANCE, "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _line(output: str, status: str, name: str) -> str:
    """Return the output line of check ``name``; fail if its status differs."""
    for line in output.splitlines():
        if line.split(":", 1)[0].split(" ", 1)[-1] == name:
            assert line.startswith(f"{status} "), output
            return line
    raise AssertionError(f"no line for check {name!r} in:\n{output}")


def _fix_after(output: str, name: str) -> str:
    """Return the fix line printed under check ``name``, or '' when there is none."""
    lines = output.splitlines()
    for index, line in enumerate(lines[:-1]):
        if line.split(":", 1)[0].split(" ", 1)[-1] == name:
            following = lines[index + 1]
            return following.strip() if following.startswith("     fix:") else ""
    return ""


def _write_config(directory: Path, text: str) -> Path:
    path = directory / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def pty_path() -> Iterator[str]:
    """The slave path of a fresh pty, a serial port that every user can open."""
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


@pytest.fixture
def fake_manifest_dir(tmp_path: Path) -> Path:
    """Manifests with model 'fake-model': a small file with a wrong SHA-256."""
    directory = tmp_path / "manifests"
    directory.mkdir()
    model = tmp_path / "fake.gguf"
    model.write_bytes(FAKE_MODEL_BYTES)
    manifest = {
        "name": "fake-model",
        "source": {"kind": "path", "path": str(model)},
        "sha256": "0" * 64,
        "size_bytes": len(FAKE_MODEL_BYTES),
    }
    (directory / "fake-model.json").write_text(json.dumps(manifest))
    return directory


def test_doctor_passes_healthy_setup(
    tmp_path: Path, pty_path: str, child_env: dict[str, str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = _write_config(
        tmp_path,
        f'[[links]]\nname = "pump-a"\nport = "{pty_path}"\nprotocol = "lines"\n',
    )

    result = _doctor(child_env, "--config", str(config), "--data-dir", str(data_dir))

    assert result.returncode == 0, result.stdout + result.stderr
    _line(result.stdout, "PASS", "config")
    _line(result.stdout, "PASS", "data dir")
    _line(result.stdout, "PASS", "disk space")
    _line(result.stdout, "PASS", "inodes")
    assert "smollm2-135m-instruct: OK" in _line(result.stdout, "PASS", "model")
    assert pty_path in _line(result.stdout, "PASS", "port pump-a")
    _line(result.stdout, "INFO", "daemon")
    assert "FAIL" not in result.stdout


def test_doctor_reports_missing_port(tmp_path: Path, child_env: dict[str, str]) -> None:
    missing = tmp_path / "ttyUSB9"
    config = _write_config(
        tmp_path, f'[[links]]\nname = "pump-a"\nport = "{missing}"\n'
    )

    result = _doctor(child_env, "--config", str(config), "--data-dir", str(tmp_path))

    assert result.returncode == 1
    assert "not found" in _line(result.stdout, "FAIL", "port pump-a")
    assert "appliance scan" in _fix_after(result.stdout, "port pump-a")
    assert result.stdout.rstrip().endswith("1 of 10 checks failed")


def _check_port_as_nobody(link_config: Config) -> dict[str, str]:
    """Run the serial port check in a forked child that has dropped root for nobody.

    Forking keeps the modules already imported, so the child needs no access
    to the interpreter or the repository.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = check_serial_link(link_config.links[0], None, timeout=3.0)
            os.write(write_end, json.dumps(dataclasses.asdict(result)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(output)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_doctor_names_group_for_denied_port(pty_path: str) -> None:
    try:
        dialout = grp.getgrnam("dialout").gr_gid
    except KeyError:
        pytest.skip("no group dialout on this machine")
    os.chown(pty_path, 0, dialout)
    os.chmod(pty_path, 0o660)
    config = Config.model_validate({"links": [{"name": "pump-a", "port": pty_path}]})

    result = _check_port_as_nobody(config)

    assert result["status"] == "FAIL"
    assert "permission denied" in result["detail"]
    assert "group 'dialout'" in result["fix"]
    assert "usermod -aG dialout" in result["fix"]


def test_doctor_reports_wrong_model_hash(
    tmp_path: Path, fake_manifest_dir: Path, child_env: dict[str, str]
) -> None:
    config = _write_config(tmp_path, '[model]\nname = "fake-model"\n')

    result = _doctor(
        child_env,
        "--config",
        str(config),
        "--data-dir",
        str(tmp_path),
        "--manifest-dir",
        str(fake_manifest_dir),
    )

    assert result.returncode == 1
    line = _line(result.stdout, "FAIL", "model")
    assert "fake-model: MISMATCH" in line
    assert f"manifest expects {'0' * 64}" in line
    assert "replace it with the file the manifest describes" in _fix_after(
        result.stdout, "model"
    )


def test_doctor_model_hash_cached_until_file_changes(
    tmp_path: Path, fake_manifest_dir: Path
) -> None:
    config = Config.model_validate({"model": {"name": "fake-model"}})
    cache = tmp_path / "doctor-cache.json"

    first = check_model(config, fake_manifest_dir, None, cache)
    second = check_model(config, fake_manifest_dir, None, cache)
    model = tmp_path / "fake.gguf"
    model.write_bytes(FAKE_MODEL_BYTES)
    os.utime(model, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = check_model(config, fake_manifest_dir, None, cache)

    assert first.status == Status.FAIL
    assert "cached result" not in first.detail
    assert second.status == Status.FAIL
    assert "cached result" in second.detail
    assert "cached result" not in third.detail


def test_doctor_model_cache_records_true_hash(tmp_path: Path) -> None:
    directory = tmp_path / "manifests"
    directory.mkdir()
    model = tmp_path / "good.gguf"
    model.write_bytes(FAKE_MODEL_BYTES)
    digest = hashlib.sha256(FAKE_MODEL_BYTES).hexdigest()
    manifest = {"source": {"kind": "path", "path": str(model)}, "sha256": digest}
    (directory / "good-model.json").write_text(json.dumps(manifest))
    config = Config.model_validate({"model": {"name": "good-model"}})
    cache = tmp_path / "doctor-cache.json"

    first = check_model(config, directory, None, cache)
    second = check_model(config, directory, None, cache)

    assert first.status == Status.PASS
    assert second.status == Status.PASS
    assert "cached result" in second.detail
    assert json.loads(cache.read_text())[str(model)]["status"] == "OK"


def test_doctor_reports_missing_model_file(
    tmp_path: Path, fake_manifest_dir: Path
) -> None:
    (tmp_path / "fake.gguf").unlink()
    config = Config.model_validate({"model": {"name": "fake-model"}})

    result = check_model(config, fake_manifest_dir, None, None)

    assert result.status == Status.FAIL
    assert "MISSING" in result.detail
    assert "copy the GGUF file there" in result.fix


def test_doctor_fails_disk_threshold_above_free_space(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    result = _doctor(child_env, "--data-dir", str(tmp_path), "--min-free-mb", "1e12")

    assert result.returncode == 1
    assert "below the minimum of" in _line(result.stdout, "FAIL", "disk space")
    assert "quota_bytes" in _fix_after(result.stdout, "disk space")


@contextlib.contextmanager
def _tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs with ``options`` on ``mount_point``, or skip the test."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _fill_until_full(directory: Path, create: str) -> None:
    """Write one large file ('bytes') or many empty files ('inodes') until ENOSPC."""
    try:
        if create == "bytes":
            with open(directory / "filler", "wb") as filler:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        for index in range(100_000):
            (directory / f"f{index}").touch()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        return
    raise AssertionError(f"{directory} never filled up")


def test_doctor_reports_full_disk(tmp_path: Path, child_env: dict[str, str]) -> None:
    with _tmpfs(tmp_path / "mnt", "size=1m") as mount:
        data_dir = mount / "data"
        data_dir.mkdir()
        args = ["--data-dir", str(data_dir), "--min-free-mb", "0.25"]
        before = _doctor(child_env, *args)
        _fill_until_full(data_dir, "bytes")
        after = _doctor(child_env, *args)

    _line(before.stdout, "PASS", "disk space")
    assert after.returncode == 1
    assert "0.0 MiB free" in _line(after.stdout, "FAIL", "disk space")
    assert "delete files on that file system" in _fix_after(after.stdout, "disk space")


def test_doctor_reports_exhausted_inodes(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    with _tmpfs(tmp_path / "mnt", "size=4m,nr_inodes=64") as mount:
        data_dir = mount / "data"
        data_dir.mkdir()
        args = ["--data-dir", str(data_dir), "--min-free-inodes", "10"]
        before = _doctor(child_env, *args)
        _fill_until_full(data_dir, "inodes")
        after = _doctor(child_env, *args)

    _line(before.stdout, "PASS", "inodes")
    assert after.returncode == 1
    assert "0 of 64 inodes free" in _line(after.stdout, "FAIL", "inodes")
    assert "delete unneeded small files" in _fix_after(after.stdout, "inodes")


def test_doctor_json_lists_every_check(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    result = _doctor(child_env, "--data-dir", str(tmp_path), "--json")

    report = json.loads(result.stdout)
    names = [check["name"] for check in report["checks"]]
    assert result.returncode == 0
    assert report["ok"] is True
    assert names == [
        "config",
        "data dir",
        "disk space",
        "inodes",
        "model",
        "ble adapter",
        "clock",
        "sink",
        "daemon",
    ]


def test_doctor_warns_about_clock_before_2025() -> None:
    past = datetime.datetime(2020, 6, 1, tzinfo=datetime.UTC).timestamp()

    result = check_clock(now=past)

    assert result.status == Status.WARN
    assert "2020-06-01" in result.detail
    assert "timedatectl set-ntp true" in result.fix


def test_doctor_clock_passes_now() -> None:
    result = check_clock()

    assert result.status in (Status.PASS, Status.WARN)
    assert "before" not in result.detail


@pytest.fixture
def bluez(monkeypatch: pytest.MonkeyPatch) -> Iterator[BluezEmulator]:
    """The BlueZ emulator on a private D-Bus daemon, as the system bus."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed")
    with PrivateBus() as bus:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        emulator = BluezEmulator(bus.address)
        emulator.start()
        try:
            yield emulator
        finally:
            emulator.stop()


BLE_LINK = Config.model_validate(
    {"links": [{"name": "tank-1", "transport": "ble", "ble": {"name": "FR-Probe"}}]}
).links


def test_doctor_ble_passes_with_powered_adapter(bluez: BluezEmulator) -> None:
    result = check_ble(BLE_LINK, timeout=3.0)

    assert result.status == Status.PASS
    assert "hci0 (on)" in result.detail


def test_doctor_ble_fails_powered_off_adapter(bluez: BluezEmulator) -> None:
    bluez.set_powered(False)

    result = check_ble(BLE_LINK, timeout=3.0)

    assert result.status == Status.FAIL
    assert "hci0 is powered off" in result.detail
    assert "bluetoothctl power on" in result.fix


def test_doctor_ble_without_bus_warns_or_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")

    unused = check_ble([], timeout=3.0)
    needed = check_ble(BLE_LINK, timeout=3.0)

    assert unused.status == Status.WARN
    assert "no BLE link is configured" in unused.detail
    assert needed.status == Status.FAIL
    assert "systemctl start dbus bluetooth" in needed.fix


def _sink_config(url: str, token_file: Path | None = None) -> Config:
    sync: dict[str, str] = {"url": url}
    if token_file is not None:
        sync["token_file"] = str(token_file)
    return Config.model_validate({"sync": sync})


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {result.name: result for result in results}


def test_doctor_sink_reachable_passes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o600)

    with HttpReceiver() as receiver:
        results = _by_name(check_sink(_sink_config(receiver.url, token), 3.0))

    assert results["token file"].status == Status.PASS
    assert "mode 0600" in results["token file"].detail
    assert results["sink"].status == Status.PASS


def test_doctor_sink_unreachable_warns() -> None:
    results = _by_name(check_sink(_sink_config(unused_port_url()), 3.0))

    assert results["sink"].status == Status.WARN
    assert "unreachable" in results["sink"].detail
    assert "[sync] url" in results["sink"].fix


def test_doctor_token_readable_by_others_fails(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o644)

    results = _by_name(check_sink(_sink_config(unused_port_url(), token), 3.0))

    assert results["token file"].status == Status.FAIL
    assert "chmod 600" in results["token file"].detail
    assert "mode 0600" in results["token file"].fix


class _UnauthorizedHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_doctor_sink_refusing_token_fails(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("wrong\n")
    token.chmod(0o600)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _UnauthorizedHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ingest"
    try:
        results = _by_name(check_sink(_sink_config(url, token), 3.0))
    finally:
        server.shutdown()
        server.server_close()

    assert results["sink"].status == Status.FAIL
    assert "HTTP 401" in results["sink"].detail
    assert "token_file" in results["sink"].fix


def test_doctor_silent_sink_times_out(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    # A listening socket that never accepts: the TCP handshake completes from
    # the backlog, and the HEAD request never gets a response.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/ingest"
        config = _write_config(tmp_path, f'[sync]\nurl = "{url}"\n')
        started = time.monotonic()
        result = _doctor(
            child_env,
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path),
            "--timeout",
            "1",
        )
        elapsed = time.monotonic() - started

    assert "unreachable" in _line(result.stdout, "WARN", "sink")
    assert elapsed < 20


def test_doctor_reads_live_link_state_from_daemon(
    tmp_path: Path, pty_path: str
) -> None:
    links = {
        "pump-a": {"state": "connected", "last_error": None},
        "pump-b": {"state": "backing_off", "last_error": "serial port gone"},
    }
    server = ControlServer(
        tmp_path,
        {
            "status": lambda args: {
                "daemon": {"pid": 4242, "model": "m"},
                "links": links,
            }
        },
    )
    server.start()
    try:
        daemon, live = check_daemon(tmp_path, timeout=3.0)
    finally:
        server.stop()
    config = Config.model_validate(
        {
            "links": [
                {"name": "pump-a", "port": pty_path},
                {"name": "pump-b", "port": pty_path},
            ]
        }
    )

    connected = check_serial_link(config.links[0], live, timeout=3.0)
    failing = check_serial_link(config.links[1], live, timeout=3.0)

    assert daemon.status == Status.INFO
    assert "pid 4242" in daemon.detail
    assert connected.status == Status.PASS
    assert failing.status == Status.FAIL
    assert "serial port gone" in failing.detail
