"""Store-and-forward upload of queued records to an MQTT broker, and ``make_sink``.

Delivery rule: each queued record is published as one QoS 1 message, and it
moves to uploaded only after the broker's PUBACK for that message. paho-mqtt's
network thread only queues the acknowledged packet ids; the uploader's own
thread commits them in batches. A PUBACK with a failure reason code (0x80 or
above, MQTT 5 only) leaves the record queued. Two codes mean that no resend
can succeed (packet too large, payload format invalid), so their record moves
to dead, as does a record larger than the maximum packet size that an MQTT 5
broker announces. When the connection breaks, every record without a PUBACK
stays queued and is published again on the next connection, as a new message.

Duplicates: QoS 1 delivers at least once. A message whose PUBACK was lost with
the connection, or whose PUBACK arrived just before a crash and before the
commit, reaches the broker twice. Consumers must de-duplicate by the record
id, which every message carries as ``id`` in its JSON payload and, with MQTT 5,
in the user property ``record_id``.

Session: the client id is ``[mqtt] client_id`` and the session is persistent
(``mqtt_connection``), so the broker keeps it across reconnects, and across
its own restarts when it persists sessions.

Payload: the record's NDJSON line as the HTTP sink sends it (``sync.ndjson_line``)
without its line ending.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.config import MqttConfig, SyncConfig
from appliance.errors import SetupError
from appliance.mqtt_connection import (
    RC_NOT_AUTHORIZED,
    BrokerConnection,
    BrokerError,
    ConnectionLost,
    PubAck,
)
from appliance.rate_limit import SlidingWindowLimiter
from appliance.states import RecordState
from appliance.store import Store
from appliance.sync import SyncResult, Uploader, make_uploader, ndjson_line

logger = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2
"""Seconds an acknowledged record waits at most before its commit."""
EVENT_WAIT_S = 0.05
"""Seconds the uploader blocks waiting for a PUBACK before it checks the deadline."""
USER_PROPERTY_RECORD_ID = "record_id"

# PUBACK reason codes of MQTT 5 (MQTT 5.0, section 3.4.2.1), by value.
RC_TOPIC_INVALID = 0x90
RC_PACKET_TOO_LARGE = 0x95
RC_PAYLOAD_FORMAT_INVALID = 0x99
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
        batch_size: records read from the database at a time, and acknowledged
            records committed together at most.
        max_inflight: messages published and not yet acknowledged, at most.
        max_backoff: cap, in seconds, on the delay between failed attempts.
        limiter: shared limits; each message counts as one request of its
            payload size. None for no limit.
        **connection: client id, protocol, keepalive, TLS, credentials and
            timeout, as ``mqtt_connection.BrokerConnection`` takes them.

    Raises:
        SetupError: the topic template, the protocol, the CA bundle or the
            password file is invalid.
    """

    def __init__(
        self,
        db_path: Path,
        host: str,
        port: int = 1883,
        topic: str = "field-relay/{device_id}/records",
        batch_size: int = 200,
        max_inflight: int = 100,
        max_backoff: float = 30.0,
        limiter: SlidingWindowLimiter | None = None,
        **connection: Any,
    ) -> None:
        check_topic_template(topic)
        self.db_path = db_path
        self.topic = topic
        self.batch_size = batch_size
        self.max_inflight = max_inflight
        self.max_backoff = max_backoff
        self.limiter = limiter or SlidingWindowLimiter()
        self.connection = BrokerConnection(
            host, port, max_inflight=max_inflight, **connection
        )
        self.url = self.connection.url
        """The broker as a URL, for log lines."""
        self._pending: dict[int, _InFlight] = {}
        self._unmatched: dict[int, PubAck] = {}
        self._acked: list[tuple[_InFlight, str]] = []
        self._first_ack_at = 0.0
        self._buffer: deque[sqlite3.Row] = deque()
        self._cursor: tuple[float, str, int] | None = None
        self._lost: str | None = None
        self._stop_reason: BrokerError | None = None
        self._needs_backoff = False
        self._failures_in_row = 0
        self._rate_wait = 0.0

    @property
    def protocol_version(self) -> str:
        """The MQTT version of the current or next connection, ``5`` or ``3.1.1``."""
        return self.connection.protocol_version

    @property
    def session_present(self) -> bool:
        """Whether the broker resumed an existing session on the last CONNACK."""
        return self.connection.session_present

    # Public surface ------------------------------------------------------------

    def probe(self, timeout: float = 5.0) -> bool:
        """Connect to the broker if needed; return True when it responded.

        A broker that rejects the connection (credentials, protocol) counts as
        reachable, so that the next ``sync`` reports why.
        """
        if self.connection.is_open:
            # A connection lost since the last run is handled by ``sync``.
            return True
        try:
            self.connection.open(time.monotonic() + timeout, None)
        except BrokerError as exc:
            logger.debug("broker %s: %s", self.url, exc)
            return exc.permanent
        return True

    def close(self) -> None:
        """Disconnect from the broker. Safe to call more than once.

        Records whose PUBACK a sync run has not yet committed stay queued and
        are published again by the next uploader.
        """
        self.connection.close()
        self._pending.clear()
        self._unmatched.clear()
        self._rewind()

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
                # PUBACKs that arrived since the last look still count.
                self._handle_events(store, result, wait=0.0)
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
            if self._lost is not None:
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
            if not self.connection.is_open:
                try:
                    self.connection.open(deadline, stop)
                except BrokerError as exc:
                    self._fail(store, result, exc)
                continue
            self._publish_buffered(store, result, stop)
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

    def _publish_buffered(
        self, store: Store, result: SyncResult, stop: threading.Event | None
    ) -> None:
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
            info = self.connection.publish(topic, payload, properties)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # paho-mqtt still tracks a message with the same packet id, so the
                # record is tried again once PUBACKs have freed it.
                logger.debug("publish of %s deferred: %s", row["id"], info.rc)
                return
            self._buffer.popleft()
            self._track(
                info.mid, _InFlight(row["id"], topic, time.monotonic()), store, result
            )

    def _track(
        self, mid: int, entry: _InFlight, store: Store, result: SyncResult
    ) -> None:
        """Wait for the PUBACK of packet id ``mid`` on behalf of ``entry``."""
        if mid in self._pending:
            # paho-mqtt reuses a packet id as soon as its PUBACK arrived, so
            # that PUBACK is queued: apply it before the id names a new message.
            self._handle_events(store, result, wait=0.0)
        self._pending[mid] = entry
        early = self._unmatched.pop(mid, None)
        if early is not None:
            self._acknowledged(early, store, result)

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
        limit = self.connection.max_packet_size
        if limit is None:
            return False
        properties_size = len(properties.pack()) if properties is not None else 0
        # Fixed header of at most 5 bytes, topic with its length, packet id.
        size = 5 + 2 + len(topic.encode("utf-8")) + 2 + properties_size + len(payload)
        return size > limit

    # Events and commits ----------------------------------------------------------

    def _handle_events(self, store: Store, result: SyncResult, wait: float) -> None:
        """Apply the connection's PUBACKs and its loss, waiting up to ``wait`` s."""
        for event in self.connection.events(wait):
            if isinstance(event, ConnectionLost):
                self._lost = event.reason
            else:
                self._acknowledged(event, store, result)

    def _acknowledged(self, ack: PubAck, store: Store, result: SyncResult) -> None:
        entry = self._pending.pop(ack.mid, None)
        if entry is None:
            # Only the PUBACK of a message whose reused packet id is not yet
            # tracked can come unmatched; ``_track`` applies it.
            self._unmatched[ack.mid] = ack
            return
        if ack.reason_code < 0x80:
            if not self._acked:
                self._first_ack_at = time.monotonic()
            self._acked.append((entry, ack.reason))
            return
        message = (
            f"{self.url} refused the message of record {entry.record_id} on "
            f"{entry.topic!r}: {ack.reason}"
        )
        if ack.reason_code in PUBACK_REJECTS_RECORD:
            self._dead(store, entry.record_id, message)
        elif ack.reason_code in PUBACK_STOPS_RUN:
            message += f"; {PUBACK_STOPS_RUN[ack.reason_code]}; the records stay queued"
            self._fail(
                store, result, BrokerError(message, ack.reason_code, permanent=True)
            )
        else:
            self._fail(store, result, BrokerError(message, ack.reason_code))

    def _connection_lost(self, store: Store, result: SyncResult) -> None:
        reason, self._lost = self._lost, None
        # Joining paho-mqtt's thread first means every PUBACK that arrived
        # before the break is already queued; they still count.
        self.connection.close()
        self._handle_events(store, result, wait=0.0)
        in_flight = len(self._pending)
        self._pending.clear()
        self._unmatched.clear()
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
            f"{self.connection.max_packet_size} bytes that {self.url} announced",
        )


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
