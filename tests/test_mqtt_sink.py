"""MQTT upload: ``MqttUploader``, ``make_sink`` and ``appliance sync`` with an MQTT sink.

Tests that publish run a real Mosquitto broker on a free loopback port with
its own configuration (``tests.mosquitto``), and are skipped when it is not
installed. They read what arrived with a real MQTT consumer that keeps a
persistent session, so it misses nothing while the broker restarts. QoS 1
allows the broker to deliver a record twice. The consumer de-duplicates by
record id, as any consumer of this sink must, and the tests check that no
record is missing and that every copy is identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.config import MqttConfig, SyncConfig
from appliance.daemon import Daemon, RunOptions
from appliance.errors import SetupError
from appliance.mqtt_sink import MqttUploader, make_sink
from appliance.rate_limit import SlidingWindowLimiter
from appliance.states import RecordKind, RecordState
from appliance.store import DB_NAME, Store
from appliance.sync import Uploader, ndjson_line
from tests.mosquitto import (
    HOST,
    BrokerProxy,
    Mosquitto,
    free_port,
    write_password_file,
)
from tests.test_sync import add_queued_records, record_states

APPLIANCE = Path(sys.executable).parent / "appliance"
CLI_TIMEOUT = 60.0
"""Seconds any single CLI run may take before the test fails."""
SYNC_DEADLINE = 60.0
"""Seconds an in-process ``MqttUploader.sync`` may keep retrying."""
DELIVERY_TIMEOUT = 30.0
"""Seconds the consumer may take to receive what the broker acknowledged."""
RESTART_RECORDS = 2_000
SOAK_RECORDS = 10_000


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def db_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


# A consumer with a persistent session ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Received:
    """One message as the consumer got it."""

    topic: str
    payload: bytes
    qos: int
    user_properties: dict[str, str]
    content_type: str | None

    @property
    def record(self) -> dict[str, Any]:
        return dict(json.loads(self.payload))


class Consumer:
    """A paho-mqtt subscriber that stores every message, across broker restarts.

    Its MQTT 5 session is persistent (Clean Start 0, one hour expiry) and it
    reconnects by itself, so the broker queues messages for it while it is away.
    """

    def __init__(
        self,
        port: int,
        client_id: str = "test-consumer",
        topic_filter: str = "#",
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.port = port
        self.topic_filter = topic_filter
        self._messages: list[Received] = []
        self._condition = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self._client.reconnect_delay_set(1, 1)
        if tls_context is not None:
            self._client.tls_set_context(tls_context)
        if credentials is not None:
            self._client.username_pw_set(*credentials)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self) -> Consumer:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self._client.connect(
            HOST, self.port, keepalive=10, clean_start=False, properties=properties
        )
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"consumer got no SUBACK from port {self.port}")
        return self

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def messages(self) -> list[Received]:
        with self._condition:
            return list(self._messages)

    def record_ids(self) -> set[str]:
        return {message.record["id"] for message in self.messages}

    def wait_for(self, record_ids: set[str], timeout: float) -> set[str]:
        """Wait until every id in ``record_ids`` arrived; return those still missing."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                missing = record_ids - {m.record["id"] for m in self._messages}
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self._condition.wait(min(remaining, 0.5))

    def wait_for_count(self, count: int, timeout: float) -> int:
        """Wait until ``count`` distinct records arrived; return how many did."""
        deadline = time.monotonic() + timeout
        while True:
            received = len(self.record_ids())
            if received >= count or time.monotonic() >= deadline:
                return received
            time.sleep(0.01)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: Any,
        properties: Any,
    ) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, *args: Any) -> None:
        self._subscribed.set()

    def _on_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        properties = getattr(message, "properties", None)
        user_properties = dict(getattr(properties, "UserProperty", []) or [])
        received = Received(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            user_properties=user_properties,
            content_type=getattr(properties, "ContentType", None),
        )
        with self._condition:
            self._messages.append(received)
            self._condition.notify_all()


@pytest.fixture
def consumer(broker: Mosquitto) -> Iterator[Consumer]:
    subscriber = Consumer(broker.port).start()
    try:
        yield subscriber
    finally:
        subscriber.close()


# Helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def open_uploader(db_path: Path, port: int, **options: Any) -> Iterator[MqttUploader]:
    options.setdefault("max_backoff", 1.0)
    options.setdefault("timeout", 5.0)
    uploader = MqttUploader(db_path, HOST, port, **options)
    try:
        yield uploader
    finally:
        uploader.close()


def expected_payloads(db_path: Path) -> dict[str, bytes]:
    """Return each queued record's MQTT payload: its NDJSON line without the newline."""
    store = Store(db_path, readonly=True)
    try:
        rows = store.list_records(str(RecordState.QUEUED))
        return {row["id"]: ndjson_line(row)[:-1] for row in rows}
    finally:
        store.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``appliance`` command and return its exit code and output."""
    return subprocess.run(
        [str(APPLIANCE), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def status_json(data_dir: Path) -> dict[str, Any]:
    status = run_cli("status", "--json", "--data-dir", str(data_dir))
    assert status.returncode == 0, status.stderr
    return dict(json.loads(status.stdout))


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def add_framed_record(db_path: Path, link: str, device_id: str, number: int) -> str:
    """Insert a queued record tied to a device message, as the framed intake does."""
    store = Store(db_path)
    try:
        with store.transaction() as conn:
            seq = store.next_seq_in(conn, link)
            raw = json.dumps({"device": device_id, "number": number})
            record_id = store.insert_record(
                conn, link, seq, raw, raw.encode("utf-8"), RecordKind.JSON
            )
            assert record_id is not None
            store.record_message(conn, link, device_id, "stream-1", number, record_id)
            assert store.move(
                conn, record_id, RecordState.RECEIVED, RecordState.QUEUED, data=raw
            )
        return record_id
    finally:
        store.close()


# Delivery ---------------------------------------------------------------------------


def test_sync_publishes_each_record_at_qos1(
    db_path: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    record_ids = add_queued_records(db_path, 5)
    payloads = expected_payloads(db_path)

    with open_uploader(db_path, broker.port) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert result.records == 5
    assert result.batches >= 1
    assert result.failures == 0
    assert result.remaining == 0
    assert consumer.wait_for(set(record_ids), DELIVERY_TIMEOUT) == set()
    messages = consumer.messages
    assert len(messages) == 5
    for message in messages:
        record_id = message.record["id"]
        assert message.payload == payloads[record_id]
        assert message.user_properties == {"record_id": record_id}
        assert message.content_type == "application/json"
        assert message.topic == "field-relay/sensor-a/records"
        assert message.qos == 1
    assert set(record_states(db_path).values()) == {"uploaded"}


def test_uploaded_event_names_topic(
    db_path: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    (record_id,) = add_queued_records(db_path, 1)

    with open_uploader(db_path, broker.port) as uploader:
        uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    store = Store(db_path, readonly=True)
    try:
        events = store.events_for(record_id)
        row = store.get_record(record_id)
    finally:
        store.close()
    upload = events[-1]
    assert upload["step"] == "upload"
    assert upload["to_state"] == "uploaded"
    detail = json.loads(upload["detail"])
    assert detail["topic"] == "field-relay/sensor-a/records"
    assert detail["broker"] == f"mqtt://{HOST}:{broker.port}"
    assert row is not None
    assert row["uploaded_at"] is not None


def test_second_sync_publishes_nothing(
    db_path: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    record_ids = add_queued_records(db_path, 3)

    with open_uploader(db_path, broker.port) as uploader:
        first = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
        assert consumer.wait_for(set(record_ids), DELIVERY_TIMEOUT) == set()
        second = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert first.records == 3
    assert second.records == 0
    assert second.batches == 0
    time.sleep(0.3)
    assert len(consumer.messages) == 3


def test_unreachable_broker_keeps_records_queued(db_path: Path) -> None:
    record_ids = add_queued_records(db_path, 4)

    with open_uploader(db_path, free_port(), max_backoff=0.2) as uploader:
        result = uploader.sync(deadline=time.monotonic() + 2.0)

    assert result.records == 0
    assert result.failures >= 1
    assert result.remaining == 4
    assert result.last_error is not None
    assert "ConnectionRefusedError" in result.last_error
    states = record_states(db_path)
    assert sorted(states) == sorted(record_ids)
    assert set(states.values()) == {"queued"}
    store = Store(db_path, readonly=True)
    try:
        sync_state = store.sync_state()
    finally:
        store.close()
    assert sync_state["retries"] >= 1
    assert "ConnectionRefusedError" in sync_state["last_error"]


def test_refused_puback_keeps_records_queued(tmp_path: Path, db_path: Path) -> None:
    # Anonymous clients may publish under allowed/ only, so the broker responds to
    # every record's PUBLISH with a PUBACK of reason code 0x87, Not authorized.
    acl = write_private(tmp_path / "acl", "topic write allowed/#\ntopic read #\n")
    add_queued_records(db_path, 3)

    with Mosquitto(tmp_path / "broker", acl_file=acl) as broker:
        with open_uploader(db_path, broker.port) as uploader:
            started = time.monotonic()
            result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
            elapsed = time.monotonic() - started

    assert result.records == 0
    assert result.remaining == 3
    assert result.last_error is not None
    assert "Not authorized" in result.last_error
    assert "access rules" in result.last_error
    # A refusal caused by the configuration ends the run instead of retrying.
    assert elapsed < 10.0
    assert set(record_states(db_path).values()) == {"queued"}


def test_rate_limiter_counts_payload_bytes(
    db_path: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    add_queued_records(db_path, 5)
    payload_bytes = sum(len(p) for p in expected_payloads(db_path).values())
    window = 10**9
    limiter = SlidingWindowLimiter(bytes_per_minute=window)

    with open_uploader(db_path, broker.port, limiter=limiter) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert result.records == 5
    # The window is full exactly when it contains the five payloads' bytes.
    assert limiter.delay(window - payload_bytes) == 0
    assert limiter.delay(window - payload_bytes + 1) > 0


def test_oversized_record_moves_to_dead(tmp_path: Path, db_path: Path) -> None:
    small_ids = add_queued_records(db_path, 2)
    store = Store(db_path)
    try:
        with store.transaction() as conn:
            raw = json.dumps({"blob": "x" * 4000})
            big_id = store.insert_record(
                conn, "big", 1, raw, raw.encode("utf-8"), RecordKind.JSON
            )
            assert big_id is not None
            store.move(conn, big_id, RecordState.RECEIVED, RecordState.QUEUED, data=raw)
    finally:
        store.close()

    with Mosquitto(tmp_path / "broker", max_packet_size=2048) as broker:
        with open_uploader(db_path, broker.port) as uploader:
            result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    states = record_states(db_path)
    assert result.records == 2
    assert result.remaining == 0
    assert [states[record_id] for record_id in small_ids] == ["uploaded", "uploaded"]
    assert states[big_id] == "dead"
    store = Store(db_path, readonly=True)
    try:
        row = store.get_record(big_id)
        rejected = store.sync_state()["rejected"]
    finally:
        store.close()
    assert row is not None
    assert "maximum packet size of 2048 bytes" in row["error"]
    assert rejected == 1


# Topics -----------------------------------------------------------------------------


def test_topic_uses_device_id_and_link(
    db_path: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    framed_id = add_framed_record(db_path, "pump", "0011223344556677", 0)
    (plain_id,) = add_queued_records(db_path, 1, link="replay:/tmp/a+b#c")

    with open_uploader(
        db_path, broker.port, topic="site/{device_id}/{link}/records"
    ) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert result.records == 2
    assert consumer.wait_for({framed_id, plain_id}, DELIVERY_TIMEOUT) == set()
    topics = {m.record["id"]: m.topic for m in consumer.messages}
    assert topics[framed_id] == "site/0011223344556677/pump/records"
    # '/', '+' and '#' in a value would add topic levels or wildcards.
    assert topics[plain_id] == "site/replay:_tmp_a_b_c/replay:_tmp_a_b_c/records"


@pytest.mark.parametrize(
    "template", ["field-relay/{device}/records", "records/{0}", "a/#", "a/+/b", ""]
)
def test_invalid_topic_template_rejected(db_path: Path, template: str) -> None:
    with pytest.raises(SetupError, match=r"\[mqtt\] topic"):
        MqttUploader(db_path, HOST, topic=template)


# Sessions and reconnects -------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_session_resumed_after_reconnect(
    db_path: Path, broker: Mosquitto, protocol: str
) -> None:
    with open_uploader(db_path, broker.port, protocol=protocol) as first:
        assert first.probe()
        assert first.session_present is False

    with open_uploader(db_path, broker.port, protocol=protocol) as second:
        assert second.probe()
        assert second.session_present is True
        assert second.protocol_version == protocol


def test_dropped_connection_republishes_unacked(
    db_path: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    record_ids = add_queued_records(db_path, RESTART_RECORDS)
    outcome: dict[str, Any] = {}

    with BrokerProxy(broker.port) as proxy:
        with open_uploader(db_path, proxy.port, max_inflight=50) as uploader:
            thread = threading.Thread(
                target=lambda: outcome.update(
                    result=uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
                ),
                daemon=True,
            )
            thread.start()
            before_drop = consumer.wait_for_count(RESTART_RECORDS // 5, 20)
            dropped = proxy.drop_connections()
            thread.join(timeout=SYNC_DEADLINE + 10)
            session_present = uploader.session_present

    assert not thread.is_alive()
    assert dropped == 1
    assert before_drop < RESTART_RECORDS
    result = outcome["result"]
    assert result.failures >= 1
    assert result.remaining == 0
    assert session_present is True
    assert proxy.relayed >= 2
    assert consumer.wait_for(set(record_ids), DELIVERY_TIMEOUT) == set()
    assert set(record_states(db_path).values()) == {"uploaded"}


def sync_through_restarts(
    data_dir: Path, broker: Mosquitto, consumer: Consumer, count: int, restarts: int
) -> None:
    """Sync ``count`` records while the broker restarts, and check nothing is lost.

    Each restart is a graceful stop (Mosquitto saves its sessions), half a
    second down, and a start on the same port, triggered when the consumer has
    received an equal share of the records.
    """
    db_path = data_dir / DB_NAME
    record_ids = add_queued_records(db_path, count)
    payloads = expected_payloads(db_path)
    outcome: dict[str, Any] = {}
    received_at_restart = []

    with open_uploader(db_path, broker.port) as uploader:
        thread = threading.Thread(
            target=lambda: outcome.update(
                result=uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
            ),
            daemon=True,
        )
        thread.start()
        for restart in range(1, restarts + 1):
            share = count * restart // (restarts + 2)
            received_at_restart.append(consumer.wait_for_count(share, SYNC_DEADLINE))
            broker.restart(down_seconds=0.5)
        thread.join(timeout=SYNC_DEADLINE + 10)

    assert not thread.is_alive()
    assert all(received < count for received in received_at_restart)
    result = outcome["result"]
    assert result.remaining == 0
    assert result.failures >= restarts
    assert consumer.wait_for(set(record_ids), DELIVERY_TIMEOUT) == set()
    messages = consumer.messages
    distinct = {message.record["id"] for message in messages}
    assert distinct == set(record_ids)
    # A copy delivered twice must be the same message, so de-duplicating by
    # id leaves exactly one record per id.
    for message in messages:
        assert message.payload == payloads[message.record["id"]]
    assert set(record_states(db_path).values()) == {"uploaded"}

    status = status_json(data_dir)
    assert status["records"]["uploaded"] == count
    assert status["records"]["queued"] == 0
    assert status["sync"]["retries"] >= restarts
    assert status["sync"]["last_success_at"] is not None
    assert "mqtt://" in status["sync"]["last_error"]


def test_broker_restart_loses_nothing(
    data_dir: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    sync_through_restarts(data_dir, broker, consumer, RESTART_RECORDS, restarts=1)


@pytest.mark.slow
def test_broker_restarts_10000_records(
    data_dir: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    sync_through_restarts(data_dir, broker, consumer, SOAK_RECORDS, restarts=3)


# Protocol versions ------------------------------------------------------------------
# Mosquitto 2.0 cannot refuse MQTT 5 on a listener, so a BrokerProxy in front of
# it refuses version 5 as a 3.1.1-only broker does and relays 3.1.1 connections.


def test_auto_falls_back_to_311(
    db_path: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    record_ids = add_queued_records(db_path, 3)

    with BrokerProxy(broker.port, reject_mqtt5=True) as proxy:
        with open_uploader(db_path, proxy.port, protocol="auto") as uploader:
            result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
            version = uploader.protocol_version

    assert proxy.rejected == 1
    assert version == "3.1.1"
    assert result.records == 3
    assert result.failures == 0
    assert consumer.wait_for(set(record_ids), DELIVERY_TIMEOUT) == set()
    for message in consumer.messages:
        # MQTT 3.1.1 has no properties; the id is still in the payload.
        assert message.user_properties == {}
        assert message.qos == 1


def test_protocol_5_refused_keeps_records(db_path: Path, broker: Mosquitto) -> None:
    add_queued_records(db_path, 2)

    with BrokerProxy(broker.port, reject_mqtt5=True) as proxy:
        with open_uploader(db_path, proxy.port, protocol="5") as uploader:
            result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert proxy.rejected == 1
    assert result.records == 0
    assert result.remaining == 2
    assert result.last_error is not None
    assert "Unsupported protocol version" in result.last_error
    assert "[mqtt] protocol" in result.last_error


# Credentials --------------------------------------------------------------------------


def test_password_authenticates(tmp_path: Path, db_path: Path) -> None:
    passwords = write_password_file(
        tmp_path / "passwd", {"relay": "s3cret", "reader": "r3ad"}
    )
    secret = write_private(tmp_path / "mqtt-password", "s3cret\n")
    record_ids = add_queued_records(db_path, 2)

    with Mosquitto(tmp_path / "broker", password_file=passwords) as broker:
        consumer = Consumer(broker.port, credentials=("reader", "r3ad")).start()
        try:
            with open_uploader(
                db_path, broker.port, username="relay", password_file=secret
            ) as uploader:
                result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
            missing = consumer.wait_for(set(record_ids), DELIVERY_TIMEOUT)
        finally:
            consumer.close()

    assert result.records == 2
    assert missing == set()


def test_wrong_password_stops_sync(tmp_path: Path, db_path: Path) -> None:
    passwords = write_password_file(tmp_path / "passwd", {"relay": "s3cret"})
    wrong = write_private(tmp_path / "mqtt-password", "guess\n")
    add_queued_records(db_path, 2)

    with Mosquitto(tmp_path / "broker", password_file=passwords) as broker:
        with open_uploader(
            db_path, broker.port, username="relay", password_file=wrong
        ) as uploader:
            started = time.monotonic()
            result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
            elapsed = time.monotonic() - started

    assert result.records == 0
    assert result.failures == 1
    assert result.remaining == 2
    assert result.last_error is not None
    # Mosquitto 2.0.11 responds to a wrong password with 0x87 Not authorized;
    # other brokers send 0x86 Bad user name or password.
    assert "refused the MQTT 5 connection" in result.last_error
    assert "password_file" in result.last_error
    assert elapsed < 10.0
    assert set(record_states(db_path).values()) == {"queued"}


def test_password_file_readable_by_others_rejected(
    tmp_path: Path, db_path: Path
) -> None:
    secret = write_private(tmp_path / "mqtt-password", "s3cret\n", mode=0o644)

    with pytest.raises(SetupError, match="chmod 600") as raised:
        MqttUploader(db_path, HOST, username="relay", password_file=secret)

    assert "mode 644" in str(raised.value)


def test_missing_password_file_rejected(tmp_path: Path, db_path: Path) -> None:
    with pytest.raises(SetupError, match="cannot be read"):
        MqttUploader(db_path, HOST, username="relay", password_file=tmp_path / "absent")


def test_empty_password_file_rejected(tmp_path: Path, db_path: Path) -> None:
    secret = write_private(tmp_path / "mqtt-password", "\n")

    with pytest.raises(SetupError, match="is empty"):
        MqttUploader(db_path, HOST, username="relay", password_file=secret)


def test_password_file_needs_username(tmp_path: Path, db_path: Path) -> None:
    secret = write_private(tmp_path / "mqtt-password", "s3cret\n")

    with pytest.raises(SetupError, match=r"set \[mqtt\] username"):
        MqttUploader(db_path, HOST, password_file=secret)


# TLS ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca: Path
    certificate: Path
    key: Path


def write_tls_files(directory: Path) -> TlsFiles:
    """Write a throwaway CA and a server certificate for 127.0.0.1 signed by it (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "field-relay test CA")]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(
        ca=directory / "ca.pem",
        certificate=directory / "server.pem",
        key=directory / "server.key",
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.certificate.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    os.chmod(files.key, 0o600)
    return files


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, TlsFiles]]:
    files = write_tls_files(tmp_path / "tls")
    tls = (files.certificate, files.key, files.ca)
    with Mosquitto(tmp_path / "broker", tls=tls) as server:
        yield server, files


def test_tls_with_ca_bundle_delivers(
    db_path: Path, tls_broker: tuple[Mosquitto, TlsFiles]
) -> None:
    broker, files = tls_broker
    record_ids = add_queued_records(db_path, 2)
    context = ssl.create_default_context(cafile=str(files.ca))
    consumer = Consumer(broker.port, tls_context=context).start()
    try:
        with open_uploader(
            db_path, broker.port, tls=True, ca_bundle=files.ca
        ) as uploader:
            result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)
            url = uploader.url
        missing = consumer.wait_for(set(record_ids), DELIVERY_TIMEOUT)
    finally:
        consumer.close()

    assert url == f"mqtts://{HOST}:{broker.port}"
    assert result.records == 2
    assert missing == set()


def test_tls_unknown_ca_stops_sync(
    db_path: Path, tls_broker: tuple[Mosquitto, TlsFiles]
) -> None:
    broker, _ = tls_broker
    add_queued_records(db_path, 1)

    # Without ca_bundle the system's trust store cannot verify the test CA.
    with open_uploader(db_path, broker.port, tls=True) as uploader:
        result = uploader.sync(deadline=time.monotonic() + SYNC_DEADLINE)

    assert result.records == 0
    assert result.remaining == 1
    assert result.last_error is not None
    assert "TLS verification" in result.last_error
    assert "[mqtt] ca_bundle" in result.last_error


def test_ca_bundle_without_tls_rejected(tmp_path: Path, db_path: Path) -> None:
    files = write_tls_files(tmp_path / "tls")

    with pytest.raises(SetupError, match="tls = true"):
        MqttUploader(db_path, HOST, ca_bundle=files.ca)


def test_missing_ca_bundle_rejected(tmp_path: Path, db_path: Path) -> None:
    with pytest.raises(SetupError, match="not found"):
        MqttUploader(db_path, HOST, tls=True, ca_bundle=tmp_path / "absent.pem")


# make_sink, the CLI and the daemon ----------------------------------------------------


def test_make_sink_selects_by_config(db_path: Path) -> None:
    http = make_sink(
        db_path,
        SyncConfig(url="http://127.0.0.1:9/ingest"),
        MqttConfig(host=HOST),
    )
    broker = make_sink(db_path, SyncConfig(sink="mqtt"), MqttConfig(host=HOST, port=9))
    try:
        assert isinstance(http, Uploader)
        assert isinstance(broker, MqttUploader)
        assert broker.url == f"mqtt://{HOST}:9"
    finally:
        http.close()
        broker.close()


def test_make_sink_needs_broker_host(db_path: Path) -> None:
    with pytest.raises(SetupError, match=r"\[mqtt\] host is empty"):
        make_sink(db_path, SyncConfig(sink="mqtt"), MqttConfig())


def test_make_sink_needs_http_url(db_path: Path) -> None:
    with pytest.raises(SetupError, match="no upload URL"):
        make_sink(db_path, SyncConfig(), MqttConfig(host=HOST))


def test_cli_sync_once_with_mqtt_config(
    tmp_path: Path, data_dir: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    source = tmp_path / "readings.jsonl"
    source.write_text(
        "".join(json.dumps({"sensor": "t1", "n": n}) + "\n" for n in range(20)),
        encoding="utf-8",
    )
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[sync]\nsink = "mqtt"\n\n[mqtt]\nhost = "{HOST}"\nport = {broker.port}\n'
        'client_id = "cli-relay"\ntopic = "plant/{link}"\n',
        encoding="utf-8",
    )
    replay = run_cli(
        "replay", str(source), "--kind", "json", "--data-dir", str(data_dir)
    )
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.strip() == "queued=20"

    sync = run_cli(
        "sync", "--once", "--config", str(config), "--data-dir", str(data_dir)
    )

    assert sync.returncode == 0, sync.stderr
    assert sync.stdout.startswith("uploaded 20 records in ")
    assert sync.stdout.strip().endswith("0 still queued")
    status = status_json(data_dir)
    assert status["records"]["uploaded"] == 20
    assert status["records"]["queued"] == 0
    assert status["sync"]["batches"] >= 1
    assert status["sync"]["last_success_at"] is not None
    assert consumer.wait_for_count(20, DELIVERY_TIMEOUT) == 20
    topics = {message.topic for message in consumer.messages}
    assert len(topics) == 1
    assert topics.pop().startswith("plant/replay:_")


def test_cli_sync_rejects_upload_url_with_mqtt(tmp_path: Path, data_dir: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[sync]\nsink = "mqtt"\n\n[mqtt]\nhost = "{HOST}"\n', encoding="utf-8"
    )

    sync = run_cli(
        "sync",
        "--once",
        "--config",
        str(config),
        "--upload-url",
        "http://127.0.0.1:9/ingest",
        "--data-dir",
        str(data_dir),
    )

    assert sync.returncode == 2
    assert "--upload-url" in sync.stderr
    assert 'sink = "mqtt"' in sync.stderr


def test_daemon_upload_loop_uses_mqtt(
    data_dir: Path, broker: Mosquitto, consumer: Consumer
) -> None:
    record_ids = add_queued_records(data_dir / DB_NAME, 10)
    options = RunOptions(
        sync=SyncConfig(sink="mqtt"),
        mqtt=MqttConfig(host=HOST, port=broker.port, client_id="daemon-relay"),
    )
    daemon = Daemon(data_dir, options)
    thread = threading.Thread(target=daemon._upload_loop, args=(None,), daemon=True)

    thread.start()
    try:
        missing = consumer.wait_for(set(record_ids), DELIVERY_TIMEOUT)
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline:
            if set(record_states(data_dir / DB_NAME).values()) == {"uploaded"}:
                break
            time.sleep(0.1)
    finally:
        daemon.request_stop()
        daemon.request_stop_sync()
        thread.join(timeout=30)

    assert not thread.is_alive()
    assert missing == set()
    assert set(record_states(data_dir / DB_NAME).values()) == {"uploaded"}
