"""Generate docs/protocol-vectors.json, the test vectors of the framed device protocol.

The vectors come from running ``DeviceEndpoint`` and ``ApplianceEndpoint`` with
fixed keys, ids and random values, so every byte is reproducible. Each accepted
frame lists its inputs (header fields, key, nonce, associated data, plaintext)
and its exact wire bytes. Each rejected frame lists the wire bytes, the frames
the receiver must have accepted before it, the counters it must increase and
the reply it must send. The expected counters and replies are written here by
hand, not measured, so tests/test_protocol_vectors.py can check the endpoints
against them.

Usage::

    python tools/protocol_vectors.py                # rewrite the JSON file
    python tools/protocol_vectors.py --check        # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from firmware_bridge import cobs, crypto, frames
from firmware_bridge.frames import Flag, MessageType
from firmware_bridge.protocol import (
    HELLO_FIELDS,
    U32,
    ApplianceEndpoint,
    DeviceEndpoint,
    ResetReason,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs/protocol-vectors.json"

PSK = bytes(range(0x00, 0x20))
DEVICE_ID = bytes.fromhex("0011223344556677")
STREAM_ID = bytes.fromhex("8899aabbccddeeff")
DEVICE_RANDOM = bytes(range(0xA0, 0xB0))
APPLIANCE_RANDOM = bytes(range(0xB0, 0xC0))
UNPAIRED_DEVICE_ID = bytes.fromhex("f0f1f2f3f4f5f6f7")
UNPAIRED_PSK = bytes(range(0x40, 0x60))
HEADER_FIELDS = ("version", "type", "flags", "key_id", "seq", "length")
NOW = 1.0
"""Clock value passed to every endpoint call. No timer fires in the exchange."""
BODIES = (b"temp=21.5C", bytes(range(256)) * 4, b"")
"""Message bodies 0, 1 and 2: a short one, the maximum of 1024 bytes, an empty one."""
PING_BODY = b"ping 1"
TRUNCATED_LENGTH = 20
"""Bytes of data_0 kept by the truncated_frame vector, as a 20-byte BLE
notification (ATT_MTU 23 minus 3) would keep them."""

ABOUT = [
    "Test vectors of the Field Relay device protocol, version 1 (docs/protocol.md).",
    "Byte strings are lowercase hex. Integers in headers and payloads are big-endian.",
    "wire is the exact bytes on the link: 0x00, the COBS body, 0x00.",
    "packet is header || payload || CRC-32C before COBS encoding.",
    "A sealed frame's payload is ChaCha20-Poly1305(key, nonce, plaintext, aad): "
    "the ciphertext followed by the 16-byte tag.",
    "accepted frames are listed in the order of one exchange. Feeding the "
    "device_to_appliance frames to a fresh appliance in this order reproduces "
    "the appliance_to_device frames, and the reverse holds for the device.",
    "A rejected frame is fed to a fresh receiver after the accepted frames named "
    "in after. The receiver must deliver nothing, increase exactly the listed "
    "counters by the listed amounts and send exactly reply (hex, may be empty).",
    "Counter names are those of firmware_bridge: decoder.* is FrameStats, "
    "appliance.* is ProtocolStats and device.* is DeviceStats.",
]


def fixed_random(value: bytes) -> Callable[[int], bytes]:
    """Return a ``random`` callable for the endpoints that always yields ``value``."""

    def take(size: int) -> bytes:
        if size != len(value):
            raise ValueError(
                f"the fixed random value has {len(value)} bytes, {size} requested"
            )
        return value

    return take


def new_appliance() -> ApplianceEndpoint:
    """Return an appliance paired with DEVICE_ID whose store expects message 0."""
    return ApplianceEndpoint(
        lambda device_id: PSK if device_id == DEVICE_ID else None,
        lambda device_id, stream_id: 0,
        random=fixed_random(APPLIANCE_RANDOM),
        first_key_id=1,
    )


def new_device(device_id: bytes = DEVICE_ID, psk: bytes = PSK) -> DeviceEndpoint:
    """Return a device whose HELLO uses STREAM_ID and DEVICE_RANDOM."""
    return DeviceEndpoint(
        device_id, psk, stream_id=STREAM_ID, random=fixed_random(DEVICE_RANDOM)
    )


def split_frames(wire: bytes) -> list[bytes]:
    """Split endpoint output into frames, each between two 0x00 delimiters."""
    return [b"\x00" + piece + b"\x00" for piece in wire.split(b"\x00") if piece]


def session_keys() -> crypto.SessionKeys:
    return crypto.derive_session_keys(
        PSK, DEVICE_ID, STREAM_ID, DEVICE_RANDOM, APPLIANCE_RANDOM
    )


def run_exchange() -> dict[str, bytes]:
    """Run one handshake, three messages, a gap, a ping and the resets.

    Returns the wire bytes of each accepted frame by vector name, in the order
    they cross the link.
    """
    device, appliance = new_device(), new_appliance()
    wires: dict[str, bytes] = {}

    wires["hello"] = device.poll(NOW)
    appliance.receive(wires["hello"], NOW)
    wires["hello_ack"] = appliance.take_output()
    device.receive(wires["hello_ack"], NOW)

    for body in BODIES:
        device.submit(body)
    data = split_frames(device.poll(NOW))
    wires["data_0"], wires["data_1"], wires["data_2"] = data

    # Message 0 arrives and is committed. Message 2 overtakes message 1, so the
    # appliance drops it and requests a resend from 1 (NACK). Message 1 follows.
    appliance.receive(wires["data_0"], NOW)
    appliance.committed_up_to(1)
    wires["ack_1"] = appliance.take_output()
    appliance.receive(wires["data_2"], NOW)
    wires["nack_gap_1"] = appliance.take_output()
    appliance.receive(wires["data_1"], NOW)
    appliance.committed_up_to(2)
    wires["ack_2"] = appliance.take_output()
    device.receive(wires["ack_1"] + wires["nack_gap_1"] + wires["ack_2"], NOW)

    device.ping(PING_BODY)
    wires["ping"] = device.take_output()
    appliance.receive(wires["ping"], NOW)
    wires["pong"] = appliance.take_output()

    # A RESET(NO_SESSION) comes from an appliance that never saw the HELLO, and
    # RESET(UNPAIRED) from one that does not know the device id.
    stranger = new_appliance()
    stranger.receive(wires["data_0"], NOW)
    wires["reset_no_session"] = stranger.take_output()
    # One second later, so the appliance's limit of one RESET per 0.5 s allows it.
    stranger.receive(new_device(UNPAIRED_DEVICE_ID, UNPAIRED_PSK).poll(NOW), NOW + 1.0)
    wires["reset_unpaired"] = stranger.take_output()

    # Neither endpoint sends these two reasons in a short exchange, so their
    # frames are built from the same header and CRC functions.
    for name, reason in (
        ("reset_rekey_required", ResetReason.REKEY_REQUIRED),
        ("reset_device_restart", ResetReason.DEVICE_RESTART),
    ):
        header = frames.header_bytes(MessageType.RESET, 0, 0, 0, 1)
        wires[name] = frames.encode_frame(header, bytes([reason]))
    return wires


DIRECTIONS = {
    "hello": "device_to_appliance",
    "hello_ack": "appliance_to_device",
    "data_0": "device_to_appliance",
    "data_1": "device_to_appliance",
    "data_2": "device_to_appliance",
    "ack_1": "appliance_to_device",
    "nack_gap_1": "appliance_to_device",
    "ack_2": "appliance_to_device",
    "ping": "device_to_appliance",
    "pong": "appliance_to_device",
    "reset_no_session": "appliance_to_device",
    "reset_unpaired": "appliance_to_device",
    "reset_rekey_required": "appliance_to_device",
    "reset_device_restart": "device_to_appliance",
}


def describe_frame(name: str, wire: bytes, hello_payload: bytes) -> dict[str, Any]:
    """Return the vector of one accepted frame: its inputs and its bytes."""
    packet = cobs.decode(wire[1:-1])
    frame = frames.parse_packet(packet)
    header = frames.HEADER.unpack(frame.header)
    vector: dict[str, Any] = {
        "name": name,
        "type": frame.type.name,
        "direction": DIRECTIONS[name],
        "header": dict(zip(HEADER_FIELDS, header, strict=True)),
        "header_hex": frame.header.hex(),
    }
    vector.update(describe_payload(frame, hello_payload))
    vector["payload"] = frame.payload.hex()
    vector["crc32c"] = packet[-frames.CRC.size :].hex()
    vector["packet"] = packet.hex()
    vector["wire"] = wire.hex()
    return vector


def describe_payload(frame: frames.Frame, hello_payload: bytes) -> dict[str, Any]:
    """Return the payload inputs of one frame: fields, key, nonce, AAD, plaintext."""
    payload = frame.payload
    if frame.type == MessageType.HELLO:
        fields = payload[:HELLO_FIELDS]
        return {
            "fields": {
                "device_id": fields[:8].hex(),
                "stream_id": fields[8:16].hex(),
                "device_random": fields[16:32].hex(),
            },
            "tag_input": (frame.header + fields).hex(),
            "tag": payload[HELLO_FIELDS:].hex(),
        }
    if frame.type == MessageType.RESET:
        return {"fields": {"reason": ResetReason(payload[0]).name}}

    keys = session_keys()
    if frame.type in (MessageType.DATA, MessageType.PING):
        key, direction = keys.device_to_appliance, crypto.DEVICE_TO_APPLIANCE
    else:
        key, direction = keys.appliance_to_device, crypto.APPLIANCE_TO_DEVICE
    sealed, aad = payload, frame.header
    described: dict[str, Any] = {}
    if frame.type == MessageType.HELLO_ACK:
        appliance_random = payload[: crypto.RANDOM_SIZE]
        sealed = payload[crypto.RANDOM_SIZE :]
        aad = frame.header + hello_payload + appliance_random
        described["fields"] = {"appliance_random": appliance_random.hex()}
    nonce = crypto.nonce(direction, frame.seq)
    plaintext = ChaCha20Poly1305(key).decrypt(nonce, sealed, aad)
    described.setdefault("fields", {}).update(plaintext_fields(frame.type, plaintext))
    described.update(
        {
            "key": "device_to_appliance"
            if direction == crypto.DEVICE_TO_APPLIANCE
            else "appliance_to_device",
            "nonce": nonce.hex(),
            "aad": aad.hex(),
            "plaintext": plaintext.hex(),
            "sealed": sealed.hex(),
        }
    )
    return described


def plaintext_fields(kind: MessageType, plaintext: bytes) -> dict[str, Any]:
    if kind == MessageType.DATA:
        return {"number": U32.unpack_from(plaintext)[0], "body": plaintext[4:].hex()}
    if kind in (MessageType.HELLO_ACK, MessageType.ACK):
        return {"next_number": U32.unpack(plaintext)[0]}
    if kind == MessageType.NACK:
        return {"reason": "GAP", "next_number": U32.unpack_from(plaintext, 1)[0]}
    return {"body": plaintext.hex()}


def repack(wire: bytes, edit: Callable[[bytearray], None], fix_crc: bool) -> bytes:
    """Decode a frame, let ``edit`` change its packet, and encode it again.

    With ``fix_crc`` the CRC is recomputed over the edited header and payload,
    so the frame passes the CRC check and reaches the next one.
    """
    packet = bytearray(cobs.decode(wire[1:-1]))
    edit(packet)
    if fix_crc:
        body = bytes(packet[: -frames.CRC.size])
        packet[-frames.CRC.size :] = frames.CRC.pack(google_crc32c.value(body))
    return b"\x00" + cobs.encode(bytes(packet)) + b"\x00"


def flip(offset: int, mask: int = 0x01) -> Callable[[bytearray], None]:
    def edit(packet: bytearray) -> None:
        packet[offset] ^= mask

    return edit


def rejected_vectors(wires: dict[str, bytes]) -> list[dict[str, Any]]:
    """Return the rejected frames with the counters and reply each must cause."""
    data_0 = wires["data_0"]
    plaintext_data = frames.encode_frame(
        frames.header_bytes(MessageType.DATA, 0, 1, 0, 4 + len(BODIES[0])),
        U32.pack(0) + BODIES[0],
    )
    zero_inside = bytearray(data_0)
    zero_inside[10] = 0x00
    tag_end = -frames.CRC.size - 1
    cases: list[tuple[str, str, list[str], bytes, dict[str, int], bytes, str]] = [
        (
            "bad_crc",
            "appliance",
            ["hello"],
            repack(data_0, flip(-1), fix_crc=False),
            {"decoder.crc_errors": 1},
            b"",
            "data_0 with the last CRC byte changed.",
        ),
        (
            "forged_data_tag",
            "appliance",
            ["hello"],
            repack(data_0, flip(tag_end), fix_crc=True),
            {"decoder.frames": 1, "appliance.auth_failures": 1},
            b"",
            "data_0 with the last tag byte changed and a matching CRC. "
            "The sequence number stays unused, so the genuine data_0 is accepted after it.",
        ),
        (
            "replayed_seq",
            "appliance",
            ["hello", "data_0"],
            data_0,
            {"decoder.frames": 1, "appliance.replayed_frames": 1},
            b"",
            "data_0 received a second time.",
        ),
        (
            "plaintext_data",
            "appliance",
            ["hello"],
            plaintext_data,
            {"decoder.frames": 1, "appliance.plaintext_refused": 1},
            b"",
            "A DATA frame without the SEALED flag, its payload in clear.",
        ),
        (
            "unpaired_hello",
            "appliance",
            [],
            new_device(UNPAIRED_DEVICE_ID, UNPAIRED_PSK).poll(NOW),
            {
                "decoder.frames": 1,
                "appliance.unpaired_hellos": 1,
                "appliance.resets_sent": 1,
            },
            wires["reset_unpaired"],
            "A valid HELLO from device id f0f1f2f3f4f5f6f7, which is not paired.",
        ),
        (
            "forged_hello_tag",
            "appliance",
            [],
            repack(wires["hello"], flip(tag_end), fix_crc=True),
            {"decoder.frames": 1, "appliance.auth_failures": 1},
            b"",
            "hello with the last tag byte changed and a matching CRC.",
        ),
        (
            "stale_key_id",
            "appliance",
            ["hello"],
            repack(data_0, flip(3, 0x06), fix_crc=True),
            {
                "decoder.frames": 1,
                "appliance.stale_frames": 1,
                "appliance.resets_sent": 1,
            },
            wires["reset_no_session"],
            "data_0 with key id 7 instead of 1 and a matching CRC.",
        ),
        (
            "truncated_frame",
            "appliance",
            ["hello"],
            data_0[:TRUNCATED_LENGTH] + b"\x00",
            {"decoder.malformed_frames": 1},
            b"",
            "The first 20 bytes of data_0, then a delimiter.",
        ),
        (
            "zero_inside_body",
            "appliance",
            ["hello"],
            bytes(zero_inside),
            {"decoder.malformed_frames": 2},
            b"",
            "data_0 with byte 10 of its COBS body set to 0x00, which splits it "
            "into two invalid frames.",
        ),
        (
            "unsupported_version",
            "appliance",
            ["hello"],
            repack(data_0, flip(0, 0x03), fix_crc=True),
            {"decoder.malformed_frames": 1},
            b"",
            "data_0 with version 2 and a matching CRC.",
        ),
        (
            "unknown_type",
            "appliance",
            ["hello"],
            repack(data_0, flip(1, 0x0A), fix_crc=True),
            {"decoder.malformed_frames": 1},
            b"",
            "data_0 with message type 9 and a matching CRC.",
        ),
        (
            "length_mismatch",
            "appliance",
            ["hello"],
            repack(data_0, flip(9, 0x01), fix_crc=True),
            {"decoder.malformed_frames": 1},
            b"",
            "data_0 with its length field one higher than its payload and a matching CRC.",
        ),
        (
            "oversize_run",
            "appliance",
            [],
            b"\x01" * (frames.MAX_ENCODED + 1) + b"\x00",
            {"decoder.oversize_frames": 1},
            b"",
            f"{frames.MAX_ENCODED + 1} bytes before a delimiter, one more than "
            "the longest COBS body of a valid frame.",
        ),
        (
            "ack_to_appliance",
            "appliance",
            ["hello"],
            wires["ack_1"],
            {"decoder.frames": 1, "appliance.unexpected_frames": 1},
            b"",
            "An ACK, which only the appliance sends, received by the appliance.",
        ),
        (
            "forged_ack_tag",
            "device",
            ["hello_ack"],
            repack(wires["ack_1"], flip(tag_end), fix_crc=True),
            {"decoder.frames": 1, "device.auth_failures": 1},
            b"",
            "ack_1 with the last tag byte changed and a matching CRC.",
        ),
        (
            "replayed_ack",
            "device",
            ["hello_ack", "ack_1"],
            wires["ack_1"],
            {"decoder.frames": 1, "device.auth_failures": 1},
            b"",
            "ack_1 received a second time. The device counts replays as "
            "authentication failures.",
        ),
        (
            "hello_ack_other_random",
            "device",
            [],
            repack(wires["hello_ack"], flip(frames.HEADER.size), fix_crc=True),
            {"decoder.frames": 1, "device.auth_failures": 1},
            b"",
            "hello_ack with the first byte of the appliance random changed and a "
            "matching CRC: the keys and the associated data no longer match.",
        ),
    ]
    return [
        {
            "name": name,
            "receiver": receiver,
            "after": after,
            "wire": wire.hex(),
            "counters": counters,
            "reply": reply.hex(),
            "about": about,
        }
        for name, receiver, after, wire, counters, reply, about in cases
    ]


def cobs_vectors() -> list[dict[str, str]]:
    """Return COBS encodings of edge cases, each with its decoded packet."""
    packets = [
        b"",
        b"\x00",
        b"\x00\x00",
        b"\x11\x22\x00\x33",
        b"\x11\x22\x33\x44",
        b"\x11\x00\x00\x00",
        bytes(range(1, 255)),
        bytes(range(1, 256)),
        bytes(range(0, 255)),
        bytes(range(2, 256)) + b"\x00",
    ]
    return [
        {"packet": packet.hex(), "encoded": cobs.encode(packet).hex()}
        for packet in packets
    ]


def build_vectors() -> dict[str, Any]:
    """Return the whole vector document as JSON-ready data."""
    wires = run_exchange()
    hello_payload = cobs.decode(wires["hello"][1:-1])[frames.HEADER.size : -4]
    keys = session_keys()
    info = crypto.KDF_INFO + DEVICE_ID + STREAM_ID
    return {
        "about": ABOUT,
        "constants": {
            "version": frames.VERSION,
            "header_size": frames.HEADER.size,
            "crc_size": frames.CRC.size,
            "tag_size": frames.TAG_SIZE,
            "max_body": frames.MAX_BODY,
            "max_payload": frames.MAX_PAYLOAD,
            "max_packet": frames.MAX_PACKET,
            "max_encoded": frames.MAX_ENCODED,
            "replay_window": crypto.REPLAY_WINDOW,
            "flag_sealed": int(Flag.SEALED),
            "message_types": {kind.name: int(kind) for kind in MessageType},
            "reset_reasons": {reason.name: int(reason) for reason in ResetReason},
            "directions": {
                "device_to_appliance": crypto.DEVICE_TO_APPLIANCE,
                "appliance_to_device": crypto.APPLIANCE_TO_DEVICE,
            },
        },
        "crc32c": {"input": b"123456789".hex(), "value": "e3069283"},
        "cobs": cobs_vectors(),
        "cobs_accepted_noncanonical": [
            {
                "encoded": (cobs.encode(bytes(range(1, 255))) + b"\x01").hex(),
                "packet": bytes(range(1, 255)).hex(),
            }
        ],
        "inputs": {
            "psk": PSK.hex(),
            "device_id": DEVICE_ID.hex(),
            "stream_id": STREAM_ID.hex(),
            "device_random": DEVICE_RANDOM.hex(),
            "appliance_random": APPLIANCE_RANDOM.hex(),
            "store_next_number": 0,
            "unpaired_device_id": UNPAIRED_DEVICE_ID.hex(),
            "unpaired_psk": UNPAIRED_PSK.hex(),
        },
        "key_derivation": {
            "hash": "SHA-256",
            "ikm": PSK.hex(),
            "salt": (DEVICE_RANDOM + APPLIANCE_RANDOM).hex(),
            "info": info.hex(),
            "length": 64,
            "device_to_appliance": keys.device_to_appliance.hex(),
            "appliance_to_device": keys.appliance_to_device.hex(),
            "key_id": 1,
        },
        "accepted": [
            describe_frame(name, wire, hello_payload) for name, wire in wires.items()
        ],
        "rejected": rejected_vectors(wires),
    }


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="JSON file to write (default: docs/protocol-vectors.json).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="Write nothing, and exit with status 1 if the file differs from "
        "what this script generates.",
    )
    args = parser.parse_args(argv)

    # The rejected vectors (an unpaired device, forged tags) make the appliance
    # log warnings, which are expected here.
    logging.basicConfig(level=logging.ERROR)
    text = render(build_vectors())

    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is out of date: run tools/protocol_vectors.py "
                "and review the diff",
                file=sys.stderr,
            )
            return 1
        return 0

    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
