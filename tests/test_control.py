"""The control socket: protocol, errors and permissions, on a real Unix socket."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest

from appliance.control import ControlClient, ControlServer, daemon_running, socket_path
from appliance.errors import ControlError


@pytest.fixture
def server(tmp_path: Path):
    calls: list[dict] = []

    def echo(args: dict) -> dict:
        calls.append(args)
        return {"echo": args}

    def fail(args: dict) -> None:
        raise ValueError("bad value 7; use 8")

    def crash(args: dict) -> None:
        raise RuntimeError("boom")

    control = ControlServer(tmp_path, {"echo": echo, "fail": fail, "crash": crash})
    control.start()
    yield control
    control.stop()


def test_call_returns_the_result(server: ControlServer, tmp_path: Path) -> None:
    with ControlClient(tmp_path) as client:
        assert client.call("echo", a=1) == {"echo": {"a": 1}}
        assert client.call("echo", b="x") == {"echo": {"b": "x"}}


def test_socket_admits_owner_and_group_only(
    server: ControlServer, tmp_path: Path
) -> None:
    mode = stat.S_IMODE(socket_path(tmp_path).stat().st_mode)
    assert mode == 0o660


def test_handler_error_is_reported(server: ControlServer, tmp_path: Path) -> None:
    with ControlClient(tmp_path) as client:
        with pytest.raises(ControlError, match="bad value 7; use 8"):
            client.call("fail")
        with pytest.raises(ControlError, match="internal error: boom"):
            client.call("crash")
        # The connection is still usable after errors.
        assert client.call("echo") == {"echo": {}}


def test_unknown_command_lists_known_ones(
    server: ControlServer, tmp_path: Path
) -> None:
    with ControlClient(tmp_path) as client:
        with pytest.raises(ControlError, match="unknown command 'nope'.*echo"):
            client.call("nope")
        assert "echo" in client.call("commands")


def test_malformed_requests_get_errors(server: ControlServer, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(socket_path(tmp_path)))
        reader = raw.makefile("rb")
        for line in (b"not json\n", b"[1, 2]\n", b'{"cmd": "echo", "args": 5}\n'):
            raw.sendall(line)
            reply = json.loads(reader.readline())
            assert reply["ok"] is False
            assert reply["error"]
        reader.close()


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no daemon is running"):
        ControlClient(tmp_path)
    assert not daemon_running(tmp_path)


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path(tmp_path)))
    stale.close()  # the file stays, nobody listens
    control = ControlServer(tmp_path, {"echo": lambda args: "ok"})
    control.start()
    try:
        assert daemon_running(tmp_path)
        with ControlClient(tmp_path) as client:
            assert client.call("echo") == "ok"
    finally:
        control.stop()
    assert not socket_path(tmp_path).exists()


def test_second_server_on_live_socket_is_refused(
    server: ControlServer, tmp_path: Path
) -> None:
    with pytest.raises(ControlError, match="already serves"):
        ControlServer(tmp_path, {}).start()
