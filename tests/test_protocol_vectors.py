"""The protocol test vectors in docs/protocol-vectors.json, checked both ways.

Encoding: tools/protocol_vectors.py regenerates the file byte for byte, each
accepted frame rebuilt from its listed inputs gives its exact wire bytes, and
the endpoints replying to the vector frames send exactly the vector replies.
Decoding: fresh endpoints accept the accepted frames and reject each rejected
frame with exactly the counters and reply the vector lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib.util
import json
from types import ModuleType
from typing import Any

import google_crc32c
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from firmware_bridge import cobs, crypto, frames
from firmware_bridge.frames import MessageType
from firmware_bridge.protocol import (
    ApplianceEndpoint,
    DeviceEndpoint,
    DeviceState,
    ResetReason,
)
from tests.conftest import REPO_ROOT

VECTORS_PATH = REPO_ROOT / "docs" / "protocol-vectors.json"


def load_generator() -> ModuleType:
    """Import tools/protocol_vectors.py, which is a script outside any package."""
    path = REPO_ROOT / "tools" / "protocol_vectors.py"
    spec = importlib.util.spec_from_file_location("protocol_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = load_generator()
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text())
ACCEPTED = {vector["name"]: vector for vector in VECTORS["accepted"]}
INPUTS = {
    name: bytes.fromhex(value)
    for name, value in VECTORS["inputs"].items()
    if isinstance(value, str)
}
NOW = generator.NOW


def wire(name: str) -> bytes:
    return bytes.fromhex(ACCEPTED[name]["wire"])


def counters(endpoint: ApplianceEndpoint | DeviceEndpoint) -> dict[str, int]:
    """Return every counter of an endpoint under its vector name."""
    prefix = "appliance" if isinstance(endpoint, ApplianceEndpoint) else "device"
    values = {
        f"decoder.{name}": value
        for name, value in dataclasses.asdict(endpoint.decoder.stats).items()
    }
    for name, value in dataclasses.asdict(endpoint.stats).items():
        values[f"{prefix}.{name}"] = value
    return values


def changed(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        name: after[name] - before[name]
        for name in after
        if after[name] != before[name]
    }


def session_keys() -> dict[str, bytes]:
    derivation = VECTORS["key_derivation"]
    return {
        "device_to_appliance": bytes.fromhex(derivation["device_to_appliance"]),
        "appliance_to_device": bytes.fromhex(derivation["appliance_to_device"]),
    }


# Encoding direction


def test_vectors_file_matches_generator() -> None:
    assert generator.render(generator.build_vectors()) == VECTORS_PATH.read_text()


def test_vector_constants_match_code() -> None:
    constants = VECTORS["constants"]
    assert constants["version"] == frames.VERSION
    assert constants["header_size"] == 10
    assert constants["max_body"] == frames.MAX_BODY
    assert constants["max_payload"] == frames.MAX_PAYLOAD
    assert constants["max_packet"] == frames.MAX_PACKET
    assert constants["max_encoded"] == frames.MAX_ENCODED
    assert constants["replay_window"] == crypto.REPLAY_WINDOW
    assert constants["message_types"] == {kind.name: kind for kind in MessageType}
    assert constants["reset_reasons"] == {r.name: r for r in ResetReason}


def test_crc32c_check_value() -> None:
    data = bytes.fromhex(VECTORS["crc32c"]["input"])
    assert data == b"123456789"
    assert google_crc32c.value(data) == int(VECTORS["crc32c"]["value"], 16)


@pytest.mark.parametrize(
    "vector", VECTORS["cobs"], ids=lambda vector: vector["packet"][:16] or "empty"
)
def test_cobs_vector_both_ways(vector: dict[str, str]) -> None:
    packet, encoded = bytes.fromhex(vector["packet"]), bytes.fromhex(vector["encoded"])
    assert cobs.encode(packet) == encoded
    assert cobs.decode(encoded) == packet


def test_cobs_noncanonical_vector_decodes() -> None:
    for vector in VECTORS["cobs_accepted_noncanonical"]:
        encoded = bytes.fromhex(vector["encoded"])
        assert cobs.decode(encoded) == bytes.fromhex(vector["packet"])


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF from RFC 5869, written out with hmac to check the library's result."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    output, block, counter = b"", b"", 1
    while len(output) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        output += block
        counter += 1
    return output[:length]


def test_key_derivation_vector() -> None:
    derivation = VECTORS["key_derivation"]
    salt = bytes.fromhex(derivation["salt"])
    info = bytes.fromhex(derivation["info"])
    okm = hkdf_sha256(INPUTS["psk"], salt, info, derivation["length"])
    keys = crypto.derive_session_keys(
        INPUTS["psk"],
        INPUTS["device_id"],
        INPUTS["stream_id"],
        INPUTS["device_random"],
        INPUTS["appliance_random"],
    )

    assert salt == INPUTS["device_random"] + INPUTS["appliance_random"]
    assert (
        info
        == b"field-relay/1 session keys" + INPUTS["device_id"] + INPUTS["stream_id"]
    )
    assert (
        okm.hex()
        == derivation["device_to_appliance"] + derivation["appliance_to_device"]
    )
    assert keys.device_to_appliance == okm[:32]
    assert keys.appliance_to_device == okm[32:]


def rebuild_payload(vector: dict[str, Any], header: bytes) -> bytes:
    """Build a frame's payload from the vector's inputs with the crypto module."""
    fields = vector.get("fields", {})
    kind = MessageType[vector["type"]]
    if kind == MessageType.HELLO:
        hello_fields = b"".join(
            bytes.fromhex(fields[name])
            for name in ("device_id", "stream_id", "device_random")
        )
        assert (header + hello_fields).hex() == vector["tag_input"]
        return hello_fields + crypto.hello_tag(INPUTS["psk"], header, hello_fields)
    if kind == MessageType.RESET:
        return bytes([ResetReason[fields["reason"]]])

    direction = crypto.DEVICE_TO_APPLIANCE
    if vector["key"] == "appliance_to_device":
        direction = crypto.APPLIANCE_TO_DEVICE
    nonce = crypto.nonce(direction, vector["header"]["seq"])
    assert nonce.hex() == vector["nonce"]
    aad = header
    prefix = b""
    if kind == MessageType.HELLO_ACK:
        prefix = bytes.fromhex(fields["appliance_random"])
        hello_payload = bytes.fromhex(ACCEPTED["hello"]["payload"])
        aad = header + hello_payload + prefix
    assert aad.hex() == vector["aad"]
    key = session_keys()[vector["key"]]
    plaintext = bytes.fromhex(vector["plaintext"])
    return prefix + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


@pytest.mark.parametrize("vector", VECTORS["accepted"], ids=lambda v: v["name"])
def test_accepted_frame_rebuilds_from_inputs(vector: dict[str, Any]) -> None:
    fields = vector["header"]
    header = frames.header_bytes(
        MessageType(fields["type"]),
        fields["flags"],
        fields["key_id"],
        fields["seq"],
        fields["length"],
    )
    payload = rebuild_payload(vector, header)
    packet = bytes.fromhex(vector["packet"])

    assert header.hex() == vector["header_hex"]
    assert payload.hex() == vector["payload"]
    assert google_crc32c.value(packet[:-4]).to_bytes(4, "big").hex() == vector["crc32c"]
    assert frames.encode_frame(header, payload).hex() == vector["wire"]


# Decoding direction, through the endpoints


def test_appliance_accepts_device_frames_and_replies() -> None:
    appliance = generator.new_appliance()
    script = [
        # (frame received, commit up to, message numbers, reply frames)
        ("hello", None, [], ["hello_ack"]),
        ("data_0", 1, [0], ["ack_1"]),
        ("data_2", None, [], ["nack_gap_1"]),
        ("data_1", 2, [1], ["ack_2"]),
        ("ping", None, [], ["pong"]),
    ]
    for name, commit, numbers, replies in script:
        messages = appliance.receive(wire(name), NOW)
        if commit is not None:
            appliance.committed_up_to(commit)

        assert [message.number for message in messages] == numbers, name
        assert appliance.take_output() == b"".join(map(wire, replies)), name

    assert appliance.stats.auth_failures == 0
    assert appliance.decoder.stats.crc_errors == 0


def test_appliance_delivers_vector_bodies() -> None:
    appliance = generator.new_appliance()
    appliance.receive(wire("hello"), NOW)
    messages = appliance.receive(wire("data_0") + wire("data_1"), NOW)

    assert [message.body for message in messages] == list(generator.BODIES[:2])
    assert messages[0].device_id == VECTORS["inputs"]["device_id"]
    assert messages[0].stream_id == VECTORS["inputs"]["stream_id"]


def test_device_sends_vector_frames_and_accepts_replies() -> None:
    device = generator.new_device()

    assert device.poll(NOW) == wire("hello")
    device.receive(wire("hello_ack"), NOW)
    assert device.state == DeviceState.ESTABLISHED

    for body in generator.BODIES:
        device.submit(body)
    assert device.poll(NOW) == wire("data_0") + wire("data_1") + wire("data_2")

    device.receive(wire("ack_1") + wire("nack_gap_1") + wire("ack_2"), NOW)
    assert device.acked == 2
    assert device.stats.acks == 2
    assert device.stats.nacks == 1

    device.ping(generator.PING_BODY)
    assert device.take_output() == wire("ping")
    device.receive(wire("pong"), NOW)
    assert device.stats.auth_failures == 0


def test_device_restarts_session_on_reset_vectors() -> None:
    device = generator.new_device()
    device.poll(NOW)
    device.receive(wire("hello_ack"), NOW)
    device.receive(wire("reset_no_session"), NOW)

    assert device.state == DeviceState.IDLE
    device.receive(wire("reset_unpaired"), NOW)
    assert device.state == DeviceState.REFUSED
    assert device.stats.resets_received == 2


def test_appliance_drops_session_on_device_reset_vector() -> None:
    appliance = generator.new_appliance()
    appliance.receive(wire("hello"), NOW)
    appliance.receive(wire("reset_device_restart"), NOW)

    assert not appliance.established
    assert appliance.stats.resets_received == 1


def prepare_receiver(vector: dict[str, Any]) -> ApplianceEndpoint | DeviceEndpoint:
    """Return a fresh receiver that has accepted the vector's ``after`` frames."""
    if vector["receiver"] == "appliance":
        appliance = generator.new_appliance()
        for name in vector["after"]:
            appliance.receive(wire(name), NOW)
            appliance.committed_up_to(appliance.expected)
        appliance.take_output()
        return appliance
    device = generator.new_device()
    device.poll(NOW)
    for name in vector["after"]:
        device.receive(wire(name), NOW)
    device.take_output()
    return device


@pytest.mark.parametrize("vector", VECTORS["rejected"], ids=lambda v: v["name"])
def test_rejected_frame_counts_and_replies(vector: dict[str, Any]) -> None:
    receiver = prepare_receiver(vector)
    before = counters(receiver)
    delivered = receiver.receive(bytes.fromhex(vector["wire"]), NOW)

    assert not delivered
    assert changed(before, counters(receiver)) == vector["counters"]
    assert receiver.take_output().hex() == vector["reply"]


def test_forged_vector_leaves_sequence_unused() -> None:
    forged = next(v for v in VECTORS["rejected"] if v["name"] == "forged_data_tag")
    appliance = generator.new_appliance()
    appliance.receive(wire("hello"), NOW)
    appliance.receive(bytes.fromhex(forged["wire"]), NOW)
    messages = appliance.receive(wire("data_0"), NOW)

    assert [message.number for message in messages] == [0]


def test_truncated_vector_leaves_next_frame_intact() -> None:
    truncated = next(v for v in VECTORS["rejected"] if v["name"] == "truncated_frame")
    appliance = generator.new_appliance()
    appliance.receive(wire("hello"), NOW)
    messages = appliance.receive(bytes.fromhex(truncated["wire"]) + wire("data_0"), NOW)

    assert [message.number for message in messages] == [0]
