"""One MQTT broker connection at a time, for the MQTT sink (``mqtt_sink``).

Each connection gets a new paho-mqtt client whose network thread ends with the
connection, so the owner decides when and how often to reconnect. The client's
callbacks run on that thread and only queue events; ``BrokerConnection.events``
hands them to the owner's thread, tagged so that a late event of an earlier
connection is never mistaken for one of the current connection.

The session is persistent: the client id stays the same and the broker keeps
the session (MQTT 5: Clean Start 0 with a Session Expiry Interval of
``SESSION_EXPIRY_S``; MQTT 3.1.1: Clean Session 0).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.errors import SetupError, UploadError

logger = logging.getLogger(__name__)

SESSION_EXPIRY_S = 86_400
"""MQTT 5 Session Expiry Interval sent on CONNECT, in seconds (one day). The
session only has to outlive outages and broker restarts: when it expires,
nothing is lost, because unacknowledged records are still queued."""
EVENT_WAIT_S = 0.05
"""Seconds one wait for the CONNACK lasts before the deadline is checked again."""
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}

# MQTT 5 reason codes (MQTT 5.0, section 2.4), by value. paho-mqtt maps the
# return codes of a 3.1.1 CONNACK onto the same values.
RC_UNSUPPORTED_PROTOCOL = 0x84
RC_CLIENT_ID_INVALID = 0x85
RC_BAD_CREDENTIALS = 0x86
RC_NOT_AUTHORIZED = 0x87
RC_BAD_AUTH_METHOD = 0x8C
CONNECT_REFUSALS_TO_FIX = {
    RC_UNSUPPORTED_PROTOCOL: "set [mqtt] protocol to auto or 3.1.1",
    RC_CLIENT_ID_INVALID: "set another [mqtt] client_id",
    RC_BAD_CREDENTIALS: "check [mqtt] username and password_file",
    RC_NOT_AUTHORIZED: "check [mqtt] username, password_file and the broker's "
    "access rules",
    RC_BAD_AUTH_METHOD: "check [mqtt] username and password_file",
}
"""CONNACK reason codes that retrying cannot cure, with the fix to print."""


class BrokerError(UploadError):
    """The broker was unreachable, refused the connection or refused a message.

    MQTT has no batches, so ``batch_id`` is empty and ``status`` is None.

    Attributes:
        reason_code: the MQTT reason code from CONNACK or PUBACK, or None for
            network and TLS errors.
        permanent: True when retrying cannot succeed until the configuration
            changes.
    """

    def __init__(
        self, message: str, reason_code: int | None = None, permanent: bool = False
    ) -> None:
        super().__init__(message, batch_id="")
        self.reason_code = reason_code
        self.permanent = permanent


@dataclasses.dataclass(frozen=True)
class PubAck:
    """The broker's PUBACK for one message of the current connection."""

    mid: int
    """The message's packet id, as ``publish`` returned it."""
    reason_code: int
    """0x00 or 0x10 (no matching subscribers) on success, 0x80 and above on refusal."""
    reason: str


@dataclasses.dataclass(frozen=True)
class ConnectionLost:
    """The current connection ended without ``close``."""

    reason: str


class BrokerConnection:
    """Opens, uses and closes connections to one broker under one client id.

    Args:
        host: the broker's host name or address.
        port: the broker's TCP port.
        client_id: MQTT client id, fixed so that the broker keeps the session.
        protocol: ``"5"``, ``"3.1.1"``, or ``"auto"`` for MQTT 5 with a fall
            back to 3.1.1 when the broker rejects version 5.
        keepalive: seconds between keep-alive pings.
        max_inflight: messages paho-mqtt sends before it waits for PUBACKs.
        tls: connect with TLS and verify the broker's certificate and host name.
        ca_bundle: CA certificates (PEM) to verify the broker with, instead of
            the system's; needs ``tls``.
        username: user name sent on CONNECT.
        password_file: file holding the password; needs ``username`` and must
            not be readable by group or others.
        timeout: seconds allowed for the TCP and TLS connection and for the
            broker's CONNACK.

    Raises:
        SetupError: the protocol, the CA bundle or the password file is invalid.
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        client_id: str = "field-relay",
        protocol: str = "auto",
        keepalive: int = 30,
        max_inflight: int = 100,
        tls: bool = False,
        ca_bundle: Path | None = None,
        username: str | None = None,
        password_file: Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        if protocol not in ("auto", *PROTOCOLS):
            raise SetupError(
                f"MQTT protocol {protocol!r} is not supported; set [mqtt] protocol "
                "to auto, 5 or 3.1.1"
            )

        self.host = host
        self.port = port
        self.client_id = client_id
        self.protocol = protocol
        self.keepalive = keepalive
        self.max_inflight = max_inflight
        self.timeout = timeout
        self.username = username
        self._password = _read_credentials(username, password_file)
        self._tls_context = _tls_context(tls, ca_bundle)

        self.url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        """The broker as a URL, for messages and log lines."""
        self.protocol_version = "3.1.1" if protocol == "3.1.1" else "5"
        """The MQTT version of the next connection; ``auto`` can lower it to 3.1.1."""
        self.session_present = False
        """Whether the broker resumed an existing session on the last CONNACK."""
        self.max_packet_size: int | None = None
        """The largest packet the broker accepts, when an MQTT 5 broker announced it."""

        self._client: mqtt.Client | None = None
        self._generation = 0
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._connack: tuple[int, str, bool, int | None] | None = None
        self._lost: str | None = None

        if password_file is not None and not tls and not _is_loopback(host):
            logger.warning(
                "MQTT password for %s goes to %s without TLS; set [mqtt] tls = "
                "true to encrypt it",
                username,
                self.url,
            )

    @property
    def is_open(self) -> bool:
        """True from a successful ``open`` until ``close``, even if the link broke since."""
        return self._client is not None

    def open(self, deadline: float | None, stop: threading.Event | None) -> None:
        """Connect and wait for the broker's CONNACK.

        With protocol ``auto``, a broker that rejects MQTT 5 is tried again
        at once with 3.1.1, and 3.1.1 is kept for later connections.

        Raises:
            BrokerError: the connection failed or the broker refused it.
        """
        self.close()
        timeout = self.timeout
        if deadline is not None:
            timeout = min(timeout, max(0.1, deadline - time.monotonic()))
        try:
            self._open(timeout, stop)
        except BrokerError as exc:
            fallback = (
                exc.reason_code == RC_UNSUPPORTED_PROTOCOL
                and self.protocol == "auto"
                and self.protocol_version == "5"
            )
            if not fallback:
                raise
            logger.info(
                "broker %s rejects MQTT 5; connecting with MQTT 3.1.1", self.url
            )
            self.protocol_version = "3.1.1"
            self._open(timeout, stop)

    def close(self) -> None:
        """Disconnect and join paho-mqtt's network thread. Safe to call more than once.

        Events the connection queued before it closed stay readable with
        ``events`` until the next ``open``.
        """
        client, self._client = self._client, None
        if client is not None:
            _shut(client)

    def publish(
        self, topic: str, payload: bytes, properties: Properties | None
    ) -> mqtt.MQTTMessageInfo:
        """Hand one QoS 1 message to paho-mqtt; its PUBACK comes later from ``events``."""
        if self._client is None:
            raise RuntimeError("publish needs an open connection")
        return self._client.publish(topic, payload, qos=1, properties=properties)

    def events(self, wait: float) -> list[PubAck | ConnectionLost]:
        """Return the current connection's queued events, waiting up to ``wait`` s for one."""
        found: list[PubAck | ConnectionLost] = []
        try:
            event = self._events.get(timeout=wait) if wait > 0 else None
        except queue.Empty:
            event = None
        while True:
            if event is not None:
                item = self._apply(event)
                if item is not None:
                    found.append(item)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return found

    def _apply(self, event: tuple[Any, ...]) -> PubAck | ConnectionLost | None:
        kind, generation = event[0], event[1]
        if generation != self._generation:
            return None
        if kind == "connack":
            self._connack = event[2:]
            return None
        if kind == "disconnect":
            self._lost = event[3]
            # A connection refused in ``open`` or ended by ``close`` was never
            # handed to the owner, so its end is no loss to report.
            return ConnectionLost(event[3]) if self._client is not None else None
        return PubAck(event[2], event[3], event[4])

    def _open(self, timeout: float, stop: threading.Event | None) -> None:
        self._generation += 1
        self._connack = None
        self._lost = None
        client = self._new_client()
        version = self.protocol_version
        self._send_connect(client, version)
        client.loop_start()
        self._wait_for_connack(client, timeout, stop)

        assert self._connack is not None
        code, reason, session_present, max_packet_size = self._connack
        if code >= 0x80:
            _shut(client)
            fix = CONNECT_REFUSALS_TO_FIX.get(code)
            message = f"{self.url} refused the MQTT {version} connection: {reason}"
            raise BrokerError(
                message + (f"; {fix}" if fix else ""),
                reason_code=code,
                permanent=fix is not None,
            )

        self._client = client
        self.session_present = session_present
        self.max_packet_size = max_packet_size
        logger.info(
            "connected to %s as %s (MQTT %s, %s session)",
            self.url,
            self.client_id,
            version,
            "resumed" if session_present else "new",
        )

    def _send_connect(self, client: mqtt.Client, version: str) -> None:
        """Open the TCP (and TLS) connection and send CONNECT with a persistent session.

        Raises:
            BrokerError: the connection or the TLS handshake failed.
        """
        try:
            if version == "5":
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = SESSION_EXPIRY_S
                client.connect(
                    self.host,
                    self.port,
                    self.keepalive,
                    clean_start=False,
                    properties=properties,
                )
            else:
                client.connect(self.host, self.port, self.keepalive)
        except ssl.SSLCertVerificationError as exc:
            raise BrokerError(
                f"TLS verification of {self.url} failed: {exc.verify_message}; set "
                "[mqtt] ca_bundle to the CA that signed the broker's certificate",
                permanent=True,
            ) from exc
        except (OSError, ValueError) as exc:
            raise BrokerError(
                f"cannot connect to {self.url}: {type(exc).__name__}: {exc}"
            ) from exc

    def _wait_for_connack(
        self, client: mqtt.Client, timeout: float, stop: threading.Event | None
    ) -> None:
        """Wait until the CONNACK arrives.

        Raises:
            BrokerError: the connection closed first, or ``timeout`` passed or
                ``stop`` was set before it came.
        """
        expires = time.monotonic() + timeout
        while self._connack is None and self._lost is None:
            if time.monotonic() >= expires or (stop is not None and stop.is_set()):
                break
            # No PUBACK can come before the CONNACK, so nothing is dropped here.
            self.events(EVENT_WAIT_S)
        if self._connack is not None:
            return
        _shut(client)
        if self._lost is not None:
            raise BrokerError(
                f"{self.url} closed the connection before its CONNACK ({self._lost})"
            )
        raise BrokerError(f"{self.url} sent no CONNACK within {timeout:g} s")

    def _new_client(self) -> mqtt.Client:
        version = PROTOCOLS[self.protocol_version]
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if version == mqtt.MQTTv5 else False,
            userdata=self._generation,
            protocol=version,
            # The owner reconnects with its own backoff and a new client, so
            # paho-mqtt's network thread ends with the connection.
            reconnect_on_failure=False,
        )
        client.connect_timeout = self.timeout
        client.max_inflight_messages_set(self.max_inflight)
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
        if self.username:
            client.username_pw_set(self.username, self._password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    # paho-mqtt callbacks, run on its network thread: they only queue events.

    def _on_connect(
        self,
        client: mqtt.Client,
        generation: int,
        flags: mqtt.ConnectFlags,
        reason: Any,
        properties: Properties | None,
    ) -> None:
        max_packet_size = getattr(properties, "MaximumPacketSize", None)
        self._events.put(
            (
                "connack",
                generation,
                reason.value,
                str(reason),
                flags.session_present,
                max_packet_size,
            )
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        generation: int,
        flags: mqtt.DisconnectFlags,
        reason: Any,
        properties: Properties | None,
    ) -> None:
        self._events.put(("disconnect", generation, reason.value, str(reason)))

    def _on_publish(
        self,
        client: mqtt.Client,
        generation: int,
        mid: int,
        reason: Any,
        properties: Properties | None,
    ) -> None:
        self._events.put(("puback", generation, mid, reason.value, str(reason)))


def _shut(client: mqtt.Client) -> None:
    """Disconnect a paho-mqtt client and join its network thread."""
    client.disconnect()
    client.loop_stop()


def read_password(path: Path) -> str:
    """Return the MQTT password stored in ``path``, without surrounding whitespace.

    Raises:
        SetupError: the file is missing, empty, or readable by group or others.
    """
    try:
        mode = path.stat().st_mode
        password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SetupError(
            f"MQTT password file {str(path)!r} cannot be read ({exc.strerror}); "
            "create it with the password on one line and mode 0600"
        ) from exc
    if mode & 0o077:
        raise SetupError(
            f"MQTT password file {str(path)!r} has mode {mode & 0o777:o}, so other "
            f"users could read the password: run chmod 600 {path}"
        )
    if not password:
        raise SetupError(
            f"MQTT password file {str(path)!r} is empty; write the password into it"
        )
    return password


def _read_credentials(username: str | None, password_file: Path | None) -> str | None:
    if password_file is None:
        return None
    if not username:
        raise SetupError(
            "[mqtt] password_file is set without a username; set [mqtt] username"
        )
    return read_password(password_file)


def _tls_context(tls: bool, ca_bundle: Path | None) -> ssl.SSLContext | None:
    if ca_bundle is not None and not tls:
        raise SetupError(
            "[mqtt] ca_bundle is set but tls is false; set [mqtt] tls = true or "
            "remove ca_bundle"
        )
    if not tls:
        return None
    if ca_bundle is not None and not ca_bundle.is_file():
        raise SetupError(
            f"CA bundle {str(ca_bundle)!r} not found; set [mqtt] ca_bundle to a PEM "
            "file or remove it to use the system's certificates"
        )
    try:
        context = ssl.create_default_context(
            cafile=str(ca_bundle) if ca_bundle is not None else None
        )
    except ssl.SSLError as exc:
        raise SetupError(
            f"CA bundle {str(ca_bundle)!r} is not valid PEM: {exc}; set [mqtt] "
            "ca_bundle to the broker's CA certificate"
        ) from exc
    context.sslsocket_class = _ClosingSSLSocket
    return context


class _ClosingSSLSocket(ssl.SSLSocket):
    """A TLS socket that closes itself when its handshake fails.

    paho-mqtt 2.2.0 (``Client._ssl_wrap_socket``) drops the socket without
    closing it when the handshake raises, for example on a certificate that
    does not verify, so each failed attempt would hold a descriptor until
    garbage collection.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError:
            self.close()
            raise


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
