"""atheris fuzz target for FrameDecoder.feed and ApplianceEndpoint.receive.

Run it with ``make fuzz`` (``FUZZ_SECONDS``, default 60) or directly::

    .venv/bin/python fuzz/fuzz_frames.py -max_total_time=60

Each input is read as a script of steps. A step is raw bytes, a genuine frame
of one recorded session (HELLO, DATA, PING, RESET, or an appliance frame sent
the wrong way), a genuine frame with one byte changed with or without a fixed
CRC, or the caller's commit, rollback or clock. Every byte goes to one
``ApplianceEndpoint`` and to a separate ``FrameDecoder``, and the appliance's
replies go to a ``DeviceEndpoint``. None of the three documents an exception
on received bytes, so any exception is a crash. So is a delivered message that
is not the next genuine message of the stream.
"""

from __future__ import annotations

import logging
import struct
import sys

import atheris

with atheris.instrument_imports(include=["firmware_bridge"]):
    import google_crc32c

    from firmware_bridge import cobs, frames
    from firmware_bridge.frames import FrameDecoder, MessageType
    from firmware_bridge.protocol import ApplianceEndpoint, DeviceEndpoint, ResetReason

PSK = bytes(range(0x00, 0x20))
DEVICE_ID = bytes.fromhex("0011223344556677")
STREAM_ID = bytes.fromhex("8899aabbccddeeff")
BODIES = [b"reading %d " % number + bytes(number * 5) for number in range(12)]


def zeros(size: int) -> bytes:
    """Random source of the fuzz endpoints: fixed, so every run has the same keys."""
    return bytes(size)


def new_appliance() -> ApplianceEndpoint:
    return ApplianceEndpoint(
        lambda device_id: PSK if device_id == DEVICE_ID else None,
        lambda device_id, stream_id: 0,
        random=zeros,
    )


def new_device(device_id: bytes = DEVICE_ID) -> DeviceEndpoint:
    return DeviceEndpoint(device_id, PSK, random=zeros, stream_id=STREAM_ID)


def split_frames(wire: bytes) -> list[bytes]:
    return [b"\x00" + piece + b"\x00" for piece in wire.split(b"\x00") if piece]


def record_catalogue() -> list[bytes]:
    """Return genuine frames of one session with the fixed keys.

    The catalogue holds only frames the Python device can send. An authentic
    PING above the payload maximum, which a C device could send, makes the
    appliance raise. tests/test_cobs_frames.py keeps that as a failing test.
    """
    device, appliance = new_device(), new_appliance()
    catalogue = [device.poll(0.0)]
    appliance.receive(catalogue[0], 0.0)
    hello_ack = appliance.take_output()
    device.receive(hello_ack, 0.0)
    for body in BODIES:
        device.submit(body)
    catalogue += split_frames(device.poll(0.0))
    device.ping(b"ping")
    catalogue.append(device.take_output())

    appliance.receive(b"".join(catalogue[1:4]), 0.0)
    appliance.committed_up_to(3)
    appliance.receive(catalogue[6], 0.0)
    catalogue += split_frames(appliance.take_output())  # ACK and NACK
    catalogue.append(hello_ack)
    catalogue.append(new_device(bytes(8)).poll(0.0))  # an unpaired device
    for reason in ResetReason:
        header = frames.header_bytes(MessageType.RESET, 0, 0, 0, 1)
        catalogue.append(frames.encode_frame(header, bytes([reason])))
    return catalogue


CATALOGUE = record_catalogue()


def mutate(frame: bytes, position: int, value: int, fix_crc: bool) -> bytes:
    """Set one byte of a frame's packet and encode it again.

    With ``fix_crc`` the CRC is recomputed, so the change reaches the header,
    replay and AEAD checks instead of stopping at the CRC.
    """
    packet = bytearray(cobs.decode(frame[1:-1]))
    packet[position % len(packet)] = value
    if fix_crc:
        packet[-4:] = struct.pack(">I", google_crc32c.value(bytes(packet[:-4])))
    return cobs.encode(bytes(packet)) + b"\x00"


def next_chunk(provider: atheris.FuzzedDataProvider) -> bytes | str:
    """Return the bytes of the next step, or the name of a caller action.

    Steps: 0 raw bytes, 1 a genuine frame, 2 and 3 a changed frame without and
    with a fixed CRC, 4 commit, 5 rollback, 6 a clock tick of 0.3 s.
    """
    step = provider.ConsumeIntInRange(0, 6)
    if step == 0:
        return provider.ConsumeBytes(provider.ConsumeIntInRange(0, 400))
    if step == 4:
        return "commit"
    if step == 5:
        return "rollback"
    if step == 6:
        return "tick"
    frame = CATALOGUE[provider.ConsumeIntInRange(0, len(CATALOGUE) - 1)]
    if step == 1:
        return frame
    position = provider.ConsumeIntInRange(0, 2000)
    value = provider.ConsumeIntInRange(0, 255)
    return mutate(frame, position, value, fix_crc=step == 3)


def TestOneInput(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    appliance, decoder, device = new_appliance(), FrameDecoder(), new_device()
    device.poll(0.0)
    now = 0.0
    while provider.remaining_bytes():
        chunk = next_chunk(provider)
        if chunk == "commit":
            appliance.committed_up_to(appliance.expected)
            chunk = b""
        elif chunk == "rollback":
            appliance.rollback()
            chunk = b""
        elif chunk == "tick":
            now += 0.3
            chunk = b""
        assert isinstance(chunk, bytes)

        expected = appliance.expected
        messages = appliance.receive(chunk, now)
        decoder.feed(chunk)
        device.receive(appliance.take_output(), now)

        numbers = [message.number for message in messages]
        if numbers != list(range(expected, expected + len(numbers))):
            raise AssertionError(f"messages {numbers} delivered after {expected}")
        for message in messages:
            if message.body != BODIES[message.number]:
                raise AssertionError(f"message {message.number} has a forged body")


def main() -> None:
    # Forged and unpaired frames make the appliance log a warning each, which
    # would bury libFuzzer's own output.
    logging.disable(logging.WARNING)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
