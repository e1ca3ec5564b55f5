"""A real Mosquitto broker on loopback for MQTT tests and benchmarks.

``Mosquitto`` runs ``/usr/sbin/mosquitto`` (Debian package ``mosquitto``) on
127.0.0.1 with its own configuration file and persistence directory in a
directory the caller owns, never the system's. Persistence is on, so a broker
that is stopped with SIGTERM and started again keeps its sessions and queued
messages. The port stays the same across restarts. ``require_mosquitto``
skips the calling test when the binary is missing.

``BrokerProxy`` sits in front of a broker to break connections while the
broker keeps running, or to refuse MQTT 5 the way a 3.1.1-only broker does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

import pytest

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
"""Seconds the broker may take to accept connections after it starts."""
STOP_TIMEOUT = 10.0
"""Seconds the broker may take to exit after SIGTERM before it is killed."""
START_ATTEMPTS = 3
"""Starts tried on fresh ports when another process took the chosen one."""


def require_mosquitto() -> None:
    """Skip the calling test when the Mosquitto broker is not installed."""
    if not (MOSQUITTO.is_file() and os.access(MOSQUITTO, os.X_OK)):
        pytest.skip(
            f"{MOSQUITTO} not found: install the Debian package mosquitto "
            "(.ci/run installs it when missing)"
        )


def mosquitto_version() -> str:
    """Return the broker's version line, such as ``mosquitto version 2.0.11``."""
    help_text = subprocess.run(
        [str(MOSQUITTO), "-h"], capture_output=True, text=True, timeout=10, check=False
    )
    lines = (help_text.stdout + help_text.stderr).splitlines()
    return next((line for line in lines if "version" in line), "mosquitto")


def free_port() -> int:
    """Return a loopback TCP port that had no listener a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class BrokerStartError(RuntimeError):
    """Mosquitto exited or did not accept connections after it was started."""


class Mosquitto:
    """One Mosquitto process on 127.0.0.1, restartable on the same port.

    Args:
        directory: contains the configuration, the persistence file and the log;
            created when missing.
        password_file: a ``mosquitto_passwd`` file; connections without valid
            credentials are then refused.
        acl_file: a Mosquitto ACL file limiting which topics users may publish
            or subscribe to.
        tls: certificate, key and CA file paths (PEM) for a TLS-only listener,
            or None for plain TCP.
        max_packet_size: largest MQTT packet the broker accepts, in bytes; it
            announces the limit to MQTT 5 clients in CONNACK. None for no limit.

    Use it as a context manager, or call ``start`` and ``close``.
    """

    def __init__(
        self,
        directory: Path,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        max_packet_size: int | None = None,
    ) -> None:
        require_mosquitto()
        self.directory = directory
        self.password_file = password_file
        self.acl_file = acl_file
        self.tls = tls
        self.max_packet_size = max_packet_size
        self.port = 0
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def host(self) -> str:
        return HOST

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Mosquitto:
        """Start the broker and wait until it accepts TCP connections.

        The first start picks a free port; later starts reuse it.

        Raises:
            BrokerStartError: the broker exited or did not listen in time.
        """
        if self.running:
            return self
        if self.port:
            self._launch()
            return self
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            try:
                self._launch()
                return self
            except BrokerStartError:
                # Another process may have taken the port between the probe
                # and the broker's bind, so a new port gets another try.
                if attempt == START_ATTEMPTS:
                    raise
        return self

    def stop(self, graceful: bool = True) -> None:
        """Stop the broker; safe to call when it is not running.

        ``graceful`` sends SIGTERM, after which Mosquitto writes its sessions to
        the persistence file. Otherwise SIGKILL ends it at once, losing what
        it had not saved yet.
        """
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the broker gracefully, wait ``down_seconds``, start it on the same port."""
        self.stop()
        if down_seconds > 0:
            time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def log_text(self) -> str:
        """Return the broker's log so far, or an empty string before the first start."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _launch(self) -> None:
        self.config_path.write_text(self._config_text(), encoding="utf-8")
        self._process = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerStartError(
                    f"mosquitto exited with code {code} on port {self.port}; "
                    f"log {self.log_path}:\n{self.log_text()[-2000:]}"
                )
            if _accepts_connections(self.port):
                return
            time.sleep(0.05)
        self.stop(graceful=False)
        raise BrokerStartError(
            f"mosquitto did not listen on {HOST}:{self.port} within "
            f"{START_TIMEOUT:g} s; log {self.log_path}:\n{self.log_text()[-2000:]}"
        )

    def _config_text(self) -> str:
        lines = [
            f"listener {self.port} {HOST}",
            f"allow_anonymous {'false' if self.password_file else 'true'}",
            # Started as root, Mosquitto switches to the user named here; the
            # current user keeps the temporary directory writable.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "persistence true",
            f"persistence_location {self.directory}/",
            "persistence_file mosquitto.db",
            # 0 removes the limit of 1000 messages queued for an offline
            # persistent session, above which Mosquitto drops QoS 1 messages.
            "max_queued_messages 0",
            # Small PUBACKs otherwise wait for Nagle's algorithm.
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.max_packet_size is not None:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if self.tls is not None:
            certfile, keyfile, cafile = self.tls
            lines += [
                f"certfile {certfile}",
                f"keyfile {keyfile}",
                f"cafile {cafile}",
            ]
        return "\n".join(lines) + "\n"


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """Write a Mosquitto password file with hashed passwords for ``users``.

    Raises:
        subprocess.CalledProcessError: ``mosquitto_passwd`` failed.
    """
    if not MOSQUITTO_PASSWD.is_file():
        pytest.skip(f"{MOSQUITTO_PASSWD} not found: install the package mosquitto")
    path.write_text("", encoding="utf-8")
    for user, password in users.items():
        subprocess.run(
            [str(MOSQUITTO_PASSWD), "-b", str(path), user, password],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return path


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


MQTT_CONNECT = 0x10
MQTT_5 = 5
CONNACK_UNACCEPTABLE_PROTOCOL = bytes([0x20, 0x02, 0x00, 0x01])
"""An MQTT 3.1.1 CONNACK with return code 1, unacceptable protocol version
(MQTT 3.1.1, section 3.2.2.3), which a 3.1.1-only broker sends to a newer
client before it closes the connection."""


class BrokerProxy:
    """A TCP relay on 127.0.0.1 in front of a broker, for faults the broker has no setting for.

    ``drop_connections`` breaks every relayed connection while the broker keeps
    running, as a lost network would. With ``reject_mqtt5``, the proxy reads
    the first packet of each connection. It responds to a CONNECT with
    protocol level 5 by ``CONNACK_UNACCEPTABLE_PROTOCOL`` and a close, as a
    broker that only speaks MQTT 3.1.1 does, because Mosquitto 2.0 cannot
    reject MQTT 5 on a listener. Everything else is relayed byte for byte.

    Attributes:
        rejected: MQTT 5 connections rejected so far.
        relayed: connections relayed to the broker so far.
    """

    def __init__(self, broker_port: int, reject_mqtt5: bool = False) -> None:
        self.broker_port = broker_port
        self.reject_mqtt5 = reject_mqtt5
        self.rejected = 0
        self.relayed = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen()
        self._listener.settimeout(0.2)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="broker-proxy", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def __enter__(self) -> BrokerProxy:
        self._accept_thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closing.set()
        self.drop_connections()
        self._accept_thread.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def drop_connections(self) -> int:
        """Break every open connection on both sides; return how many there were."""
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(sockets) // 2

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(
                target=self._serve,
                args=(client,),
                name="broker-proxy-connection",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            client.settimeout(5.0)
            try:
                first = _read_packet(client)
            except (OSError, ValueError):
                return
            is_connect = first[0] & 0xF0 == MQTT_CONNECT
            if self.reject_mqtt5 and is_connect and _protocol_level(first) == MQTT_5:
                self.rejected += 1
                with contextlib.suppress(OSError):
                    client.sendall(CONNACK_UNACCEPTABLE_PROTOCOL)
                return
            try:
                broker = socket.create_connection((HOST, self.broker_port), timeout=5)
            except OSError:
                return
            stack.enter_context(broker)
            with self._lock:
                self._open |= {client, broker}
            stack.callback(self._forget, client, broker)
            self.relayed += 1
            broker.sendall(first)
            self._relay(client, broker)

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(sockets)

    def _relay(self, client: socket.socket, broker: socket.socket) -> None:
        client.settimeout(None)
        broker.settimeout(None)
        peers = {client: broker, broker: client}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _ in selector.select(timeout=0.2):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                        if not data:
                            return
                        peers[source].sendall(data)
                    except OSError:
                        return


def _read_packet(sock: socket.socket) -> bytes:
    """Read one whole MQTT control packet: fixed header, remaining length, body."""
    header = _read_exact(sock, 1)
    length_bytes = b""
    length = 0
    for shift in range(0, 28, 7):
        byte = _read_exact(sock, 1)
        length_bytes += byte
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
    else:
        raise ValueError("MQTT remaining length longer than 4 bytes")
    return header + length_bytes + _read_exact(sock, length)


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ValueError("connection closed inside an MQTT packet")
        data += chunk
    return data


def _protocol_level(connect: bytes) -> int:
    """Return the protocol level byte of a CONNECT packet (4 is 3.1.1, 5 is MQTT 5)."""
    position = 1
    while connect[position] & 0x80:
        position += 1
    position += 1
    name_length = int.from_bytes(connect[position : position + 2], "big")
    return connect[position + 2 + name_length]
