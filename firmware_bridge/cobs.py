"""Consistent Overhead Byte Stuffing (COBS).

COBS rewrites a packet so it contains no 0x00 byte, at a cost of at most one
byte per 254 plus one, which lets 0x00 delimit frames on a byte stream: a
receiver that loses sync (noise, a cut cable, a reset mid-frame) finds the
next frame at the next 0x00. Reference: S. Cheshire and M. Baker, "Consistent
Overhead Byte Stuffing", IEEE/ACM Transactions on Networking 7(2), 1999.

Both functions work on whole slices rather than single bytes, so the cost is a
few Python operations per run of non-zero bytes, not per byte.
"""

from __future__ import annotations

from firmware_bridge.errors import FrameError

MAX_RUN = 254
"""Maximum run of non-zero bytes that one code byte can describe."""


def encode(packet: bytes) -> bytes:
    """Return ``packet`` COBS-encoded, without the trailing 0x00 delimiter."""
    out = bytearray()
    chunks = packet.split(b"\x00")
    for index, chunk in enumerate(chunks):
        # Each zero-separated chunk becomes runs of at most 254 bytes; a code
        # byte of 0xFF means "254 bytes follow and no zero was removed".
        full = len(chunk) >= MAX_RUN
        while len(chunk) >= MAX_RUN:
            out.append(0xFF)
            out += chunk[:MAX_RUN]
            chunk = chunk[MAX_RUN:]
        if full and not chunk and index == len(chunks) - 1:
            # Canonical COBS ends a packet on its last 0xFF block.
            break
        out.append(len(chunk) + 1)
        out += chunk
    return bytes(out)


def decode(body: bytes) -> bytes:
    """Return the packet that ``body`` (one frame without its delimiter) encodes.

    Raises:
        FrameError: ``body`` is empty, holds a 0x00 byte, or a code byte points
            past its end.
    """
    if not body:
        raise FrameError("empty COBS body")
    if 0 in body:
        raise FrameError(
            f"COBS body contains a 0x00 byte at offset {body.index(0)}; "
            "0x00 may only delimit frames"
        )
    out = bytearray()
    index, size = 0, len(body)
    while index < size:
        code = body[index]
        end = index + code
        if end > size:
            raise FrameError(
                f"COBS code byte {code} at offset {index} runs past the "
                f"{size}-byte body; the frame was cut short"
            )
        out += body[index + 1 : end]
        index = end
        if code != 0xFF and index < size:
            out.append(0)
    return bytes(out)
