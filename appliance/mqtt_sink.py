"""Store-and-forward upload of queued records to an MQTT broker, and ``make_sink``.

Delivery rule: each queued record is published as one QoS 1 message, and it
moves to uploaded only after the broker's PUBACK for that message. paho-mqtt's
network thread only hands the acknowledged packet ids to the uploader's own
thread, which commits them in batches. A PUBACK with a failure reason code
(0x80 or above, MQTT 5 only) leaves the record queued. When the connection
breaks, every record without a PUBACK stays queued and is published again on
the next connection, as a new message.

Duplicates: QoS 1 delivers at least once. A message whose PUBACK was lost with
the connection, or whose PUBACK arrived just before a crash and before the
commit, reaches the broker twice. Consumers must de-duplicate by the record
id, which every message carries as ``id`` in its JSON payload and, with MQTT 5,
in the user property ``record_id``.

Session: the client id is ``[mqtt] client_id`` and the session is persistent
(MQTT 5: Clean Start 0 with a Session Expiry Interval of ``SESSION_EXPIRY_S``;
MQTT 3.1.1: Clean Session 0), so the broker keeps the client's session across
reconnects and broker restarts.

Payload: the record's NDJSON line as the HTTP sink sends it (``sync.ndjson_line``)
without its line ending.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import queue
import random
import sqlite3
import ssl
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.config import MqttConfig, SyncConfig
from appliance.errors import SetupError, UploadError
from appliance.rate_limit import SlidingWindowLimiter
from appliance.states import RecordState
from appliance.store import Store
from appliance.sync import SyncResult, Uploader, make_uploader, ndjson_line

logger = logging.getLogger(__name__)

SESSION_EXPIRY_S = 86_400
"""MQTT 5 Session Expiry Interval sent on CONNECT, in seconds (one day). The
session only has to outlive outages and broker restarts: when it expires,
nothing is lost, because unacknowledged records are still queued."""
COMMIT_INTERVAL_S = 0.2
"""Seconds an acknowledged record waits at most before its commit."""
EVENT_WAIT_S = 0.05
"""Seconds the uploader blocks waiting for a PUBACK before it checks the deadline."""
USER_PROPERTY_RECORD_ID = "record_id"
PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}

# MQTT 5 reason codes (MQTT 5.0, section 2.4), by value.
RC_UNSUPPORTED_PROTOCOL = 0x84
RC_CLIENT_ID_INVALID = 0x85
RC_BAD_CREDENTIALS = 0x86
RC_NOT_AUTHORIZED = 0x87
RC_BAD_AUTH_METHOD = 0x8C
RC_TOPIC_INVALID = 0x90
RC_PACKET_TOO_LARGE = 0x95
RC_PAYLOAD_FORMAT_INVALID = 0x99
CONNECT_REFUSALS_TO_FIX = {
    RC_UNSUPPORTED_PROTOCOL: "set [mqtt] protocol to auto or 3.1.1",
    RC_CLIENT_ID_INVALID: "set another [mqtt] client_id",
    RC_BAD_CREDENTIALS: "check [mqtt] username and password_file",
    RC_NOT_AUTHORIZED: "check [mqtt] username, password_file and the broker's "
    "access rules",
    RC_BAD_AUTH_METHOD: "check [mqtt] username and password_file",
}
"""CONNACK reason codes that retrying cannot cure, with the fix to print."""
PUBACK_STOPS_RUN = {
    RC_NOT_AUTHORIZED: "check the broker's access rules for [mqtt] username",
    RC_TOPIC_INVALID: "check [mqtt] topic",
}
"""PUBACK reason codes caused by the configuration: the run stops, records stay queued."""
PUBACK_REJECTS_RECORD = {RC_PACKET_TOO_LARGE, RC_PAYLOAD_FORMAT_INVALID}
"""PUBACK reason codes that no resend of the same record can cure: it moves to dead."""
TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\0": "_"})
"""Characters replaced in values put into a topic: a level separator or a wildcard
would change which subscriptions match, and a topic name may not contain them."""


class BrokerError(UploadError):
    """The broker was unreachable, refused the connection or refused a message.

    MQTT has no batches, so ``batch_id`` is empty and ``status`` is None.

    Attributes:
        reason_code: the MQTT reason code from CONNACK, PUBACK or DISCONNECT,
            or None for network and TLS errors.
        permanent: True when retrying cannot succeed until the configuration
            changes.
    """

    def __init__(
        self, message: str, reason_code: int | None = None, permanent: bool = False
    ) -> None:
        super().__init__(message, batch_id="")
        self.reason_code = reason_code
        self.permanent = permanent


@dataclasses.dataclass
class _InFlight:
    """A published message waiting for its PUBACK."""

    record_id: str
    topic: str
    published_at: float
    """``time.monotonic()`` when the message was handed to paho-mqtt."""


class MqttUploader:
    """Publishes queued records to an MQTT broker at QoS 1.

    The same surface as ``sync.Uploader``: ``probe``, ``sync`` and ``close``.
    Call them from one thread. The connection stays open between sync runs.

    Args:
        db_path: the appliance database.
        host: the broker's host name or address.
        port: the broker's TCP port.
        topic: topic template; ``{device_id}`` is the id of the device a framed
            record came from (the link name for other records), ``{link}`` the
            link name.
        client_id: MQTT client id, fixed so that the broker keeps the session.
        protocol: ``"5"``, ``"3.1.1"``, or ``"auto"`` for MQTT 5 with a fall
            back to 3.1.1 when the broker rejects version 5.
        keepalive: seconds between keep-alive pings.
        max_inflight: messages published and not yet acknowledged, at most.
        tls: connect with TLS and verify the broker's certificate and host name.
        ca_bundle: CA certificates (PEM) to verify the broker with, instead of
            the system's; needs ``tls``.
        username: user name sent on CONNECT.
        password_file: file holding the password; needs ``username`` and must
            not be readable by group or others.
        batch_size: records read from the database at a time, and acknowledged
            records committed together at most.
        timeout: seconds allowed for the TCP and TLS connection and for the
            broker's CONNACK.
        max_backoff: cap, in seconds, on the delay between failed attempts.
        limiter: shared limits; each message counts as one request of its
            payload size. None for no limit.

    Raises:
        SetupError: the topic template, the CA bundle or the password file is
            invalid.
    """

    def __init__(
        self,
        db_path: Path,
        host: str,
        port: int = 1883,
        topic: str = "field-relay/{device_id}/records",
        client_id: str = "field-relay",
        protocol: str = "auto",
        keepalive: int = 30,
        max_inflight: int = 100,
        tls: bool = False,
        ca_bundle: Path | None = None,
        username: str | None = None,
        password_file: Path | None = None,
        batch_size: int = 200,
        timeout: float = 30.0,
        max_backoff: float = 30.0,
        limiter: SlidingWindowLimiter | None = None,
    ) -> None:
        if protocol not in ("auto", *PROTOCOLS):
            raise SetupError(
                f"MQTT protocol {protocol!r} is not supported; set [mqtt] protocol "
                "to auto, 5 or 3.1.1"
            )
        check_topic_template(topic)
        self.db_path = db_path
        self.host = host
        self.port = port
        self.topic = topic
        self.client_id = client_id
        self.protocol = protocol
        self.keepalive = keepalive
        self.max_inflight = max_inflight
        self.batch_size = batch_size
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.limiter = limiter or SlidingWindowLimiter()
        self.username = username
        self._password = _read_credentials(username, password_file)
        self._tls_context = _tls_context(tls, ca_bundle)
        self.url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        """The broker as a URL, for log lines."""
        self.protocol_version = "3.1.1" if protocol == "3.1.1" else "5"
        """The MQTT version used for the next connection; ``auto`` can lower it to 3.1.1."""
        self.session_present = False
        """Whether the broker resumed an existing session on the last CONNACK."""
        self._client: mqtt.Client | None = None
        self._generation = 0
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._connack: tuple[int, str, bool, int | None] | None = None
        self._lost: str | None = None
        self._max_packet_size: int | None = None
        self._pending: dict[int, _InFlight] = {}
        self._acked: list[tuple[_InFlight, str]] = []
        self._first_ack_at = 0.0
        self._buffer: deque[sqlite3.Row] = deque()
        self._cursor: tuple[float, str, int] | None = None
        self._stop_reason: BrokerError | None = None
        self._needs_backoff = False
        self._failures_in_row = 0
        self._rate_wait = 0.0
        if username and password_file and not self._tls_context:
            if not _is_loopback(host):
                logger.warning(
                    "MQTT password for %s goes to %s without TLS; set [mqtt] tls = "
                    "true to encrypt it",
                    username,
                    self.url,
                )

    # Public surface ------------------------------------------------------------

    def probe(self, timeout: float = 5.0) -> bool:
        """Connect to the broker if needed; return True when it answered.

        A broker that refuses the connection (credentials, protocol) counts as
        reachable, so that the next ``sync`` reports why it refused.
        """
        if self._client is not None:
            # A connection lost since the last run is handled by ``sync``.
            return True
        try:
            self._connect(time.monotonic() + timeout, None)
        except BrokerError as exc:
            logger.debug("broker %s: %s", self.url, exc)
            return exc.permanent
        return True

    def close(self) -> None:
        """Disconnect from the broker. Safe to call more than once.

        Records whose PUBACK has not arrived stay queued and are published
        again by the next uploader.
        """
        self._drop_connection()

    def sync(
        self, deadline: float | None, stop: threading.Event | None = None
    ) -> SyncResult:
        """Publish queued records until none remain, ``deadline`` passes or ``stop`` is set.

        A lost connection and a transient refusal are retried with capped
        exponential backoff and full jitter. A refusal caused by the
        configuration ends the run with the records still queued.
        """
        result = SyncResult()
        started = time.monotonic()
        self._stop_reason = None
        self._rewind()
        store = Store(self.db_path)
        try:
            self._run(store, result, deadline, stop)
        finally:
            try:
                self._commit(store, result)
                result.remaining = store.state_counts()[RecordState.QUEUED]
            finally:
                store.close()
        logger.log(
            logging.INFO if result.records or result.failures else logging.DEBUG,
            "sync to %s: %d records uploaded in %.1f s, %d still queued, %d in flight",
            self.url,
            result.records,
            time.monotonic() - started,
            result.remaining,
            len(self._pending),
        )
        return result

    # The sync loop -------------------------------------------------------------

    def _run(
        self,
        store: Store,
        result: SyncResult,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        while stop is None or not stop.is_set():
            self._handle_events(store, result, wait=0.0)
            if self._lost is not None and self._client is not None:
                self._connection_lost(store, result)
            self._commit_if_due(store, result)
            if self._stop_reason is not None:
                logger.error("sync stopped: %s", self._stop_reason)
                result.last_error = str(self._stop_reason)
                return
            if self._needs_backoff:
                self._needs_backoff = False
                if not self._back_off(deadline, stop):
                    return
                continue
            if not self._buffer and not self._refill(store) and not self._pending:
                if self._cursor is None:
                    return
                # Records passed over on this pass (a lost connection, a
                # refused message, a clock set back) wait behind the cursor.
                self._commit(store, result)
                self._rewind()
                continue
            if self._client is None:
                try:
                    self._connect(deadline, stop)
                except BrokerError as exc:
                    self._fail(store, result, exc)
                continue
            self._publish_buffered(store, stop)
            if deadline is not None and time.monotonic() > deadline:
                return
            self._handle_events(store, result, wait=EVENT_WAIT_S)

    def _back_off(self, deadline: float | None, stop: threading.Event | None) -> bool:
        """Sleep before the next attempt; return False when the run must end instead."""
        ceiling = min(self.max_backoff, 0.5 * 2**self._failures_in_row)
        wait = random.uniform(0, ceiling)
        if deadline is not None and time.monotonic() + wait > deadline:
            return False
        if stop is not None:
            return not stop.wait(wait)
        time.sleep(wait)
        return True

    def _fail(self, store: Store, result: SyncResult, exc: BrokerError) -> None:
        """Count a failed attempt in the result and ``sync_state``, then stop or back off."""
        result.failures += 1
        result.last_error = str(exc)
        self._failures_in_row += 1
        with store.transaction() as conn:
            store.add_sync_counts(conn, retries=0 if exc.permanent else 1)
            store.set_sync_state(
                conn, last_error=str(exc)[:500], last_error_at=time.time()
            )
        if exc.permanent:
            self._stop_reason = exc
        else:
            logger.warning("%s; retrying", exc)
            self._needs_backoff = True

    def _rewind(self) -> None:
        """Read queued records from the oldest again, skipping those in flight."""
        self._cursor = None
        self._buffer.clear()

    def _refill(self, store: Store) -> bool:
        """Read the next queued records after the cursor; return True when any came."""
        sql = (
            "SELECT r.*, m.device_id AS device_id FROM records AS r"
            " LEFT JOIN messages AS m ON m.record_id = r.id WHERE r.state = ?"
        )
        params: list[Any] = [str(RecordState.QUEUED)]
        if self._cursor is not None:
            sql += " AND (r.received_at, r.link, r.seq) > (?, ?, ?)"
            params += self._cursor
        # After a rewind the records in flight come first again and are skipped.
        extra = len(self._pending) if self._cursor is None else 0
        sql += " ORDER BY r.received_at, r.link, r.seq LIMIT ?"
        params.append(self.batch_size + extra)
        rows = store.query(sql, tuple(params))
        if not rows:
            return False
        last = rows[-1]
        self._cursor = (last["received_at"], last["link"], last["seq"])
        in_flight = {entry.record_id for entry in self._pending.values()}
        acked = {entry.record_id for entry, _ in self._acked}
        skip = in_flight | acked
        self._buffer.extend(row for row in rows if row["id"] not in skip)
        return bool(self._buffer)

    def _publish_buffered(self, store: Store, stop: threading.Event | None) -> None:
        client = self._client
        assert client is not None
        limited = self.limiter.requests_per_minute or self.limiter.bytes_per_minute
        while self._buffer and len(self._pending) < self.max_inflight:
            row = self._buffer[0]
            topic = render_topic(
                self.topic, row["device_id"] or row["link"], row["link"]
            )
            payload = ndjson_line(row)[:-1]
            properties = self._publish_properties(row["id"])
            if self._too_large(topic, payload, properties):
                self._buffer.popleft()
                self._reject_oversized(store, row["id"], len(payload))
                continue
            if limited:
                self._rate_wait += self.limiter.acquire(len(payload), stop)
                if stop is not None and stop.is_set():
                    return
            info = client.publish(topic, payload, qos=1, properties=properties)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # paho-mqtt still holds a message with the same packet id; the
                # record is tried again once PUBACKs have freed it.
                logger.debug("publish of %s deferred: %s", row["id"], info.rc)
                return
            self._buffer.popleft()
            self._pending[info.mid] = _InFlight(row["id"], topic, time.monotonic())

    def _publish_properties(self, record_id: str) -> Properties | None:
        if self.protocol_version != "5":
            return None
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [(USER_PROPERTY_RECORD_ID, record_id)]
        properties.PayloadFormatIndicator = 1
        properties.ContentType = "application/json"
        return properties

    def _too_large(
        self, topic: str, payload: bytes, properties: Properties | None
    ) -> bool:
        """Return True when the PUBLISH packet exceeds the broker's announced maximum.

        NOTE: only MQTT 5 brokers announce a maximum packet size. A 3.1.1 broker
        closes the connection on a packet above its limit, so such a record
        stays queued and every sync fails on it until the limit is raised.
        """
        if self._max_packet_size is None:
            return False
        properties_size = len(properties.pack()) if properties is not None else 0
        # Fixed header of at most 5 bytes, topic with its length, packet id.
        size = 5 + 2 + len(topic.encode("utf-8")) + 2 + properties_size + len(payload)
        return size > self._max_packet_size

    # Connections ---------------------------------------------------------------

    def _connect(self, deadline: float | None, stop: threading.Event | None) -> None:
        """Open a connection and wait for the broker's CONNACK.

        With protocol ``auto``, a broker that rejects MQTT 5 is tried again
        at once with 3.1.1, and 3.1.1 is kept for later connections.

        Raises:
            BrokerError: the connection failed or the broker refused it.
        """
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

    def _open(self, timeout: float, stop: threading.Event | None) -> None:
        self._generation += 1
        self._connack = None
        self._lost = None
        client = self._new_client()
        version = self.protocol_version
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
        client.loop_start()
        expires = time.monotonic() + timeout
        while self._connack is None and self._lost is None:
            if time.monotonic() >= expires:
                break
            if stop is not None and stop.is_set():
                break
            self._handle_events(None, None, wait=EVENT_WAIT_S)
        if self._connack is None:
            _shut(client)
            if self._lost is not None:
                raise BrokerError(
                    f"{self.url} closed the connection before its CONNACK "
                    f"({self._lost})"
                )
            raise BrokerError(f"{self.url} sent no CONNACK within {timeout:g} s")
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
        self._max_packet_size = max_packet_size
        logger.info(
            "connected to %s as %s (MQTT %s, %s session)",
            self.url,
            self.client_id,
            version,
            "resumed" if session_present else "new",
        )

    def _new_client(self) -> mqtt.Client:
        version = PROTOCOLS[self.protocol_version]
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if version == mqtt.MQTTv5 else False,
            userdata=self._generation,
            protocol=version,
            # The uploader reconnects itself, with its own backoff and a new
            # client, so paho-mqtt's network thread ends with the connection.
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

    def _drop_connection(self) -> None:
        """Close the connection; records in flight stay queued for a later publish."""
        client, self._client = self._client, None
        if client is not None:
            _shut(client)
        # Events of the closed connection, PUBACKs included, no longer count:
        # their records are still queued and are published again.
        self._drain_events()
        self._pending.clear()
        self._rewind()
        self._lost = None

    # paho-mqtt callbacks, run on its network thread ------------------------------
    # They only queue events; the database is written on the uploader's thread.

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

    # Events and commits, on the uploader's thread --------------------------------

    def _drain_events(self) -> None:
        while True:
            try:
                self._events.get_nowait()
            except queue.Empty:
                return

    def _handle_events(
        self, store: Store | None, result: SyncResult | None, wait: float
    ) -> None:
        """Apply queued paho-mqtt events, waiting up to ``wait`` seconds for the first."""
        try:
            event = self._events.get(timeout=wait) if wait > 0 else None
        except queue.Empty:
            event = None
        while True:
            if event is not None:
                self._apply(event, store, result)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _apply(
        self, event: tuple[Any, ...], store: Store | None, result: SyncResult | None
    ) -> None:
        kind, generation = event[0], event[1]
        if generation != self._generation:
            return
        if kind == "connack":
            self._connack = event[2:]
        elif kind == "disconnect":
            self._lost = event[3]
        elif kind == "puback":
            self._acknowledged(event[2], event[3], event[4], store, result)

    def _acknowledged(
        self,
        mid: int,
        code: int,
        reason: str,
        store: Store | None,
        result: SyncResult | None,
    ) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        if code < 0x80:
            if not self._acked:
                self._first_ack_at = time.monotonic()
            self._acked.append((entry, reason))
            return
        assert store is not None and result is not None
        message = (
            f"{self.url} refused the message of record {entry.record_id} on "
            f"{entry.topic!r}: {reason}"
        )
        if code in PUBACK_REJECTS_RECORD:
            self._dead(store, entry.record_id, message)
        elif code in PUBACK_STOPS_RUN:
            message += f"; {PUBACK_STOPS_RUN[code]}; the records stay queued"
            self._fail(store, result, BrokerError(message, code, permanent=True))
        else:
            self._fail(store, result, BrokerError(message, code))

    def _connection_lost(self, store: Store, result: SyncResult) -> None:
        reason = self._lost
        client, self._client = self._client, None
        assert client is not None
        # Joining paho-mqtt's thread first means every PUBACK that arrived
        # before the break is already queued; they still count.
        _shut(client)
        self._handle_events(store, result, wait=0.0)
        in_flight = len(self._pending)
        self._pending.clear()
        self._commit(store, result)
        self._rewind()
        self._fail(
            store,
            result,
            BrokerError(
                f"connection to {self.url} lost ({reason}); {in_flight} records "
                "without PUBACK stay queued and are published again"
            ),
        )

    def _commit_if_due(self, store: Store, result: SyncResult) -> None:
        if not self._acked:
            return
        due = time.monotonic() - self._first_ack_at >= COMMIT_INTERVAL_S
        if due or len(self._acked) >= self.batch_size:
            self._commit(store, result)

    def _commit(self, store: Store, result: SyncResult) -> None:
        """Mark acknowledged records uploaded, with an event each, in one transaction."""
        acked, self._acked = self._acked, []
        if not acked and not self._rate_wait:
            return
        now = time.time()
        finished = time.monotonic()
        moved = 0
        with store.transaction() as conn:
            for entry, reason in acked:
                if not store.move(
                    conn,
                    entry.record_id,
                    RecordState.QUEUED,
                    RecordState.UPLOADED,
                    uploaded_at=now,
                ):
                    continue
                moved += 1
                store.add_event(
                    conn,
                    entry.record_id,
                    "upload",
                    RecordState.QUEUED,
                    RecordState.UPLOADED,
                    1,
                    finished - entry.published_at,
                    detail={"broker": self.url, "topic": entry.topic, "puback": reason},
                )
            store.add_sync_counts(
                conn, batches=1 if acked else 0, rate_limit_wait_s=self._rate_wait
            )
            if acked:
                store.set_sync_state(conn, last_success_at=now)
        self._rate_wait = 0.0
        if acked:
            self._failures_in_row = 0
            result.batches += 1
            result.records += moved
            logger.debug("%d acknowledged records committed as uploaded", moved)

    def _dead(self, store: Store, record_id: str, reason: str) -> None:
        with store.transaction() as conn:
            if store.move(
                conn,
                record_id,
                RecordState.QUEUED,
                RecordState.DEAD,
                error=reason[:500],
            ):
                store.add_event(
                    conn,
                    record_id,
                    "upload",
                    RecordState.QUEUED,
                    RecordState.DEAD,
                    1,
                    0.0,
                    error=reason[:500],
                    detail={"broker": self.url},
                )
                store.add_sync_counts(conn, rejected=1)
        logger.error("record %s moved to dead: %s", record_id, reason)

    def _reject_oversized(self, store: Store, record_id: str, size: int) -> None:
        self._dead(
            store,
            record_id,
            f"message of {size} payload bytes exceeds the maximum packet size of "
            f"{self._max_packet_size} bytes that {self.url} announced",
        )


def _shut(client: mqtt.Client) -> None:
    """Disconnect a paho-mqtt client and join its network thread."""
    client.disconnect()
    client.loop_stop()


def make_sink(
    db_path: Path,
    sync_config: SyncConfig,
    mqtt_config: MqttConfig,
    url: str | None = None,
    batch_size: int | None = None,
    compress: bool | None = None,
) -> Uploader | MqttUploader:
    """Build the uploader that ``[sync] sink`` selects.

    ``url``, ``batch_size`` and ``compress`` override the configuration;
    ``url`` and ``compress`` apply to the HTTP sink only.

    Raises:
        SetupError: the selected sink has no URL or broker host, or its token
            file, password file, CA bundle or topic template is invalid.
    """
    if sync_config.sink == "http":
        target = url or sync_config.url
        if not target:
            raise SetupError(
                "no upload URL: set [sync] url, pass --upload-url, or set [sync] "
                'sink = "mqtt" with an [mqtt] host'
            )
        return make_uploader(db_path, target, sync_config, batch_size, compress)
    if not mqtt_config.host:
        raise SetupError(
            '[sync] sink is "mqtt" but [mqtt] host is empty; set the broker\'s host'
        )
    if url:
        logger.warning(
            'upload URL %s ignored: [sync] sink is "mqtt", so records go to %s',
            url,
            mqtt_config.host,
        )
    return MqttUploader(
        db_path,
        mqtt_config.host,
        port=mqtt_config.port,
        topic=mqtt_config.topic,
        client_id=mqtt_config.client_id,
        protocol=mqtt_config.protocol,
        keepalive=mqtt_config.keepalive,
        max_inflight=mqtt_config.max_inflight,
        tls=mqtt_config.tls,
        ca_bundle=mqtt_config.ca_bundle,
        username=mqtt_config.username,
        password_file=mqtt_config.password_file,
        batch_size=batch_size or sync_config.batch_records,
        timeout=sync_config.timeout,
        max_backoff=sync_config.max_backoff,
        limiter=SlidingWindowLimiter(
            sync_config.requests_per_minute, sync_config.bytes_per_minute
        ),
    )


def check_topic_template(template: str) -> None:
    """Check that a topic template only uses ``{device_id}`` and ``{link}``.

    Raises:
        SetupError: the template has another placeholder, a wildcard or is empty.
    """
    try:
        sample = template.format(device_id="d", link="l")
    except (KeyError, IndexError, ValueError) as exc:
        raise SetupError(
            f"[mqtt] topic {template!r} is invalid ({type(exc).__name__}: {exc}); "
            "use only the placeholders {device_id} and {link}"
        ) from None
    if not sample or "+" in sample or "#" in sample or "\0" in sample:
        raise SetupError(
            f"[mqtt] topic {template!r} is empty or contains a wildcard (+, #); "
            "a message needs one concrete topic"
        )


def render_topic(template: str, device_id: str, link: str) -> str:
    """Return the topic for one record, with unsafe characters in the values replaced."""
    return template.format(
        device_id=device_id.translate(TOPIC_UNSAFE), link=link.translate(TOPIC_UNSAFE)
    )


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
