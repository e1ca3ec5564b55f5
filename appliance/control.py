"""The daemon's control socket: JSON lines over a Unix socket in the data directory.

The TUI and the CLI talk to a running daemon through ``<data dir>/control.sock``.
Each request is one JSON object on one line, ``{"id": 1, "cmd": "status",
"args": {...}}``; each reply is one line, ``{"id": 1, "ok": true, "result":
...}`` or ``{"id": 1, "ok": false, "error": "..."}``. A client may send several
requests on one connection. docs/control.md lists the commands.

Access: the socket is created with mode 0660, so only the service user and
members of its group can connect; a technician joins that group to use the
TUI (docs/control.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, ControlError

logger = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o660
MAX_REQUEST_BYTES = 65536
"""Maximum request line length; a longer line gets an error reply and the connection closes."""

Handler = Callable[[dict[str, Any]], Any]


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


class ControlServer:
    """Serves registered commands on the data directory's control socket.

    Handlers run on the connection's thread and must be thread-safe. An
    ``ApplianceError`` or ``ValueError`` from a handler becomes an error reply
    with its message; other exceptions are logged and reported as internal
    errors, and the connection stays usable.
    """

    def __init__(self, data_dir: Path, handlers: dict[str, Handler]) -> None:
        self.path = socket_path(data_dir)
        self.handlers = dict(handlers)
        self.handlers.setdefault("commands", lambda args: sorted(self.handlers))
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve in a thread.

        Raises:
            ControlError: another live daemon already serves this socket.
        """
        if self.path.exists():
            if _alive(self.path):
                raise ControlError(
                    f"a daemon already serves {str(self.path)!r}; stop it first"
                )
            self.path.unlink()
        dispatch = self._dispatch

        class _Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
                    if not line:
                        return
                    if len(line) > MAX_REQUEST_BYTES:
                        self._send(
                            {"id": None, "ok": False, "error": "request too long"}
                        )
                        return
                    self._send(dispatch(line))

            def _send(self, reply: dict[str, Any]) -> None:
                data = json.dumps(reply, default=str).encode("utf-8") + b"\n"
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        old_umask = os.umask(0o117)
        try:
            server = socketserver.ThreadingUnixStreamServer(str(self.path), _Handler)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="control", daemon=True
        )
        self._thread.start()
        logger.info("control socket at %s (mode %o)", self.path, SOCKET_MODE)

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"id": None, "ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"id": None, "ok": False, "error": "request must be a JSON object"}
        request_id = request.get("id")
        command = request.get("cmd")
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None:
            return {
                "id": request_id,
                "ok": False,
                "error": f"unknown command {command!r}; known: {sorted(self.handlers)}",
            }
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return {"id": request_id, "ok": False, "error": "args must be an object"}
        try:
            return {"id": request_id, "ok": True, "result": handler(args)}
        except (ApplianceError, ValueError, KeyError) as exc:
            return {"id": request_id, "ok": False, "error": str(exc)}
        except Exception as exc:
            logger.exception("control command %s failed", command)
            return {"id": request_id, "ok": False, "error": f"internal error: {exc}"}

    def stop(self) -> None:
        """Stop serving and remove the socket. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class ControlClient:
    """A connection to a running daemon's control socket.

    Raises:
        ControlError: no daemon listens on the socket, access is denied, or a
            command failed (the daemon's message is kept).
    """

    def __init__(self, data_dir: Path, timeout: float = 10.0) -> None:
        self.path = socket_path(data_dir)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except FileNotFoundError:
            self._sock.close()
            raise ControlError(
                f"no daemon is running for {str(data_dir)!r} ({self.path.name} not "
                "found); start one with `appliance run`"
            ) from None
        except PermissionError:
            self._sock.close()
            raise ControlError(
                f"permission denied on {str(self.path)!r}: join the service's group "
                "(docs/control.md) or run as the service user"
            ) from None
        except OSError as exc:
            self._sock.close()
            raise ControlError(
                f"no daemon answers on {str(self.path)!r} ({exc.strerror}); start one "
                "with `appliance run`"
            ) from None
        self._reader = self._sock.makefile("rb")
        self._next_id = 0
        self._lock = threading.Lock()

    def call(self, command: str, **args: Any) -> Any:
        """Send one command and return its result."""
        with self._lock:
            self._next_id += 1
            request = {"id": self._next_id, "cmd": command, "args": args}
            try:
                self._sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
                line = self._reader.readline()
            except OSError as exc:
                raise ControlError(f"control socket failed: {exc}") from exc
        if not line:
            raise ControlError("the daemon closed the control connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(f"{command}: {reply.get('error')}")
        return reply.get("result")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def daemon_running(data_dir: Path) -> bool:
    """True when a daemon answers on the data directory's control socket."""
    path = socket_path(data_dir)
    return path.exists() and _alive(path)
