"""Frame layout of the device link: header, payload and CRC-32C, COBS on the wire.

A frame on the wire is ``0x00 || COBS(header || payload || crc) || 0x00``. The
header
is ten bytes, big-endian::

    offset  size  field
    0       1     version      (1)
    1       1     type         (MessageType)
    2       1     flags        (bit 0: payload sealed with the session's AEAD)
    3       1     key id       (session number, low 8 bits)
    4       4     seq          (per session and direction, from 0)
    8       2     length       (payload bytes)

The CRC-32C (Castagnoli) covers header and payload and is sent big-endian. It
catches line noise cheaply, so a corrupted frame is counted as noise rather than
as an authentication failure; it is no defence against forgery, which the AEAD
tag provides. docs/protocol.md is the full specification.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import struct

import google_crc32c

from firmware_bridge import cobs
from firmware_bridge.errors import FrameError

logger = logging.getLogger(__name__)

VERSION = 1
HEADER = struct.Struct(">BBBBIH")
CRC = struct.Struct(">I")
MAX_BODY = 1024
"""Largest message body a data frame carries."""
TAG_SIZE = 16
"""Bytes the AEAD adds to a sealed payload."""
MAX_PAYLOAD = MAX_BODY + 4 + TAG_SIZE
"""Largest payload: a data frame's message number, body and tag."""
MAX_PACKET = HEADER.size + MAX_PAYLOAD + CRC.size
MAX_ENCODED = MAX_PACKET + MAX_PACKET // cobs.MAX_RUN + 1
"""Longest COBS body of a valid frame; longer runs are discarded unread."""


class MessageType(enum.IntEnum):
    """What a frame carries; docs/protocol.md gives each payload's layout."""

    HELLO = 1
    HELLO_ACK = 2
    DATA = 3
    ACK = 4
    NACK = 5
    PING = 6
    PONG = 7
    RESET = 8


class Flag(enum.IntFlag):
    SEALED = 0x01


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame whose CRC matched; its payload is still sealed."""

    type: MessageType
    flags: int
    key_id: int
    seq: int
    payload: bytes
    header: bytes
    """The ten header bytes as received: the AEAD's associated data."""

    @property
    def sealed(self) -> bool:
        return bool(self.flags & Flag.SEALED)


def header_bytes(
    type_: MessageType, flags: int, key_id: int, seq: int, length: int
) -> bytes:
    """Pack a header; ``length`` is the payload size in bytes."""
    if length > MAX_PAYLOAD:
        raise FrameError(
            f"payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte maximum; "
            f"split message bodies above {MAX_BODY} bytes"
        )
    return HEADER.pack(VERSION, type_, flags, key_id, seq, length)


def encode_frame(header: bytes, payload: bytes) -> bytes:
    """Return the wire bytes of a frame: 0x00, the COBS body, 0x00.

    The leading delimiter ends whatever came before (a frame cut short by a
    reset or a notification limit, line noise), so that debris never merges
    with this frame; receivers skip the empty frame two delimiters make.
    """
    packet = header + payload
    packet += CRC.pack(google_crc32c.value(packet))
    return b"\x00" + cobs.encode(packet) + b"\x00"


def parse_packet(packet: bytes) -> Frame:
    """Check a decoded packet's length, CRC, version and type.

    Raises:
        FrameError: the packet is too short or too long, its length field
            disagrees with its size, its CRC does not match (``crc`` is set on
            the error), or it has an unknown version or type.
    """
    if len(packet) < HEADER.size + CRC.size:
        raise FrameError(f"frame of {len(packet)} bytes is shorter than 14 bytes")
    body, (crc,) = packet[: -CRC.size], CRC.unpack(packet[-CRC.size :])
    if google_crc32c.value(body) != crc:
        raise FrameError(
            f"CRC-32C mismatch: the frame carries {crc:#010x}, "
            f"bytes give {google_crc32c.value(body):#010x}",
            crc=True,
        )
    if len(packet) > MAX_PACKET:
        raise FrameError(
            f"frame of {len(packet)} bytes exceeds the {MAX_PACKET}-byte maximum"
        )
    version, type_, flags, key_id, seq, length = HEADER.unpack_from(body)
    if version != VERSION:
        raise FrameError(f"frame version {version} is not supported (only 1)")
    if length != len(body) - HEADER.size:
        raise FrameError(
            f"length field {length} disagrees with the "
            f"{len(body) - HEADER.size}-byte payload"
        )
    try:
        kind = MessageType(type_)
    except ValueError:
        raise FrameError(f"unknown message type {type_}") from None
    return Frame(kind, flags, key_id, seq, body[HEADER.size :], body[: HEADER.size])


@dataclasses.dataclass
class FrameStats:
    """Counts kept by ``FrameDecoder``; the link's counters include them."""

    frames: int = 0
    """Frames whose COBS body, length and CRC were valid."""
    crc_errors: int = 0
    malformed_frames: int = 0
    """Frames with bad COBS, a bad length, an unknown version or type."""
    oversize_frames: int = 0
    """Runs longer than the longest valid frame, discarded to the next 0x00."""


class FrameDecoder:
    """Splits a byte stream at 0x00 delimiters into CRC-checked frames.

    The decoder never raises on input: every bad frame is counted in ``stats``
    and skipped, and decoding resumes at the next delimiter. Bytes before the
    first delimiter after start or after a discarded run are treated as a
    frame like any other, so a stream that starts mid-frame costs one counted
    error at most.
    """

    def __init__(self) -> None:
        self.stats = FrameStats()
        self._partial = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes read from the link; return the complete valid frames."""
        frames: list[Frame] = []
        if not data:
            return frames
        pieces = data.split(b"\x00")
        # All pieces but the last end at a delimiter.
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            if self._discarding:
                if not last:
                    self._discarding = False
                continue
            if len(self._partial) + len(piece) > MAX_ENCODED:
                self.stats.oversize_frames += 1
                self._partial.clear()
                self._discarding = last
                continue
            if last:
                self._partial += piece
                break
            body = bytes(self._partial) + piece if self._partial else piece
            self._partial.clear()
            if body:
                frame = self._frame(body)
                if frame is not None:
                    frames.append(frame)
        return frames

    def _frame(self, body: bytes) -> Frame | None:
        try:
            frame = parse_packet(cobs.decode(body))
        except FrameError as exc:
            if exc.crc:
                self.stats.crc_errors += 1
            else:
                self.stats.malformed_frames += 1
            logger.debug("frame dropped: %s", exc)
            return None
        self.stats.frames += 1
        return frame
