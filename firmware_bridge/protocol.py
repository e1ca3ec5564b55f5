"""Both ends of the framed device protocol, as state machines without I/O.

``ApplianceEndpoint`` and ``DeviceEndpoint`` take received bytes and the
current time and return messages and bytes to send; the caller owns the port,
the clock and the database. Keeping I/O out makes the protocol testable with
any byte stream (property tests, fuzzing, test vectors) and lets the same code
run over serial, BLE or a loopback.

Delivery is go-back-N with cumulative acknowledgements. Each message has a
number in its device's *stream*; a stream lasts as long as the device keeps its
unacknowledged messages (a device with persistent storage keeps one stream
across reboots, one without starts a new stream at boot). The appliance
delivers only the next expected number, drops lower numbers as duplicates, asks
for a resend (NACK) on a gap, and acknowledges a number only after the caller
says it is committed. docs/protocol.md specifies every frame and state.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import os
import struct
import time
from collections.abc import Callable

from firmware_bridge import crypto
from firmware_bridge.errors import AuthenticationError, BridgeError, FrameError
from firmware_bridge.frames import (
    MAX_BODY,
    TAG_SIZE,
    Flag,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
    header_bytes,
)

logger = logging.getLogger(__name__)

U32 = struct.Struct(">I")
HELLO_FIELDS = crypto.DEVICE_ID_SIZE + crypto.STREAM_ID_SIZE + crypto.RANDOM_SIZE
HELLO_SIZE = HELLO_FIELDS + crypto.HELLO_TAG_SIZE

REKEY_FRAMES = 1 << 20
"""Frames a device sends under one session before it starts a new handshake."""
REKEY_SECONDS = 3600.0
"""Age of a session at which the device starts a new handshake."""
HARD_FRAME_LIMIT = 1 << 24
"""Frames after which the appliance refuses a session that was never re-keyed."""
NACK_INTERVAL = 0.25
"""Seconds after which a gap that is still open is NACKed again."""
RESET_INTERVAL = 0.5
"""Minimum seconds between two RESET frames the appliance sends unprompted."""


WARNING_INTERVAL = 10.0
"""Seconds between two log lines of the same kind of rejected frame."""


class _Throttle:
    """Limits repeated warnings, so a flood of bad frames cannot fill the disk.

    The first warning of a kind is logged; further ones within
    ``WARNING_INTERVAL`` are counted and reported with the next one logged.
    Counters in ``ProtocolStats`` stay exact either way.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < WARNING_INTERVAL:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, suppressed, now - last if last is not None else 0.0)
        logger.warning(message, *args)


class ResetReason(enum.IntEnum):
    """Why a RESET frame asks the peer to forget its session."""

    NO_SESSION = 1
    """The sender has no session matching the frame it received."""
    UNPAIRED = 2
    """The device id is not paired with this appliance."""
    REKEY_REQUIRED = 3
    """The session has carried too many frames; start a new handshake."""
    DEVICE_RESTART = 4
    """The device is about to start over (sent by the device)."""


class NackReason(enum.IntEnum):
    GAP = 1
    """A message arrived ahead of the next expected one."""


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A device message, authenticated and in stream order."""

    device_id: str
    """The device id in hex."""
    stream_id: str
    """The stream id in hex."""
    number: int
    body: bytes


@dataclasses.dataclass
class ProtocolStats:
    """Protocol-level counts of one link (frame-level ones are in FrameStats)."""

    handshakes: int = 0
    unpaired_hellos: int = 0
    """HELLO frames from device ids that are not paired."""
    key_errors: int = 0
    """HELLO frames from paired devices whose key file cannot be used."""
    auth_failures: int = 0
    """Frames whose HMAC or AEAD tag did not verify: forged or corrupted."""
    replayed_frames: int = 0
    """Frames with a sequence number already received or too far behind."""
    stale_frames: int = 0
    """Sealed frames for a session that is gone (before a re-key or restart)."""
    plaintext_refused: int = 0
    """Frames that must be sealed but were not."""
    unexpected_frames: int = 0
    """Well-formed frames that the current state does not expect."""
    messages: int = 0
    """Messages delivered in order."""
    duplicate_messages: int = 0
    """Messages already delivered, dropped (retransmissions)."""
    message_gaps: int = 0
    """Messages that arrived ahead of the expected one and were dropped."""
    acks_sent: int = 0
    nacks_sent: int = 0
    resets_sent: int = 0
    resets_received: int = 0


class _Session:
    """Keys and counters of one handshake."""

    def __init__(
        self,
        keys: crypto.SessionKeys,
        key_id: int,
        inbound: int,
        outbound: int,
        now: float,
    ) -> None:
        inbound_key, outbound_key = (
            (keys.device_to_appliance, keys.appliance_to_device)
            if inbound == crypto.DEVICE_TO_APPLIANCE
            else (keys.appliance_to_device, keys.device_to_appliance)
        )
        self.opener = crypto.Opener(inbound_key, inbound)
        self.sealer = crypto.Sealer(outbound_key, outbound)
        self.key_id = key_id
        self.started = now

    def sealed_frame(self, type_: MessageType, plaintext: bytes) -> bytes:
        seq = self.sealer.take_seq()
        length = len(plaintext) + TAG_SIZE
        header = header_bytes(type_, Flag.SEALED, self.key_id, seq, length)
        return encode_frame(header, self.sealer.seal(seq, header, plaintext))


def _plain_frame(type_: MessageType, payload: bytes, key_id: int = 0) -> bytes:
    return encode_frame(header_bytes(type_, 0, key_id, 0, len(payload)), payload)


class ApplianceEndpoint:
    """The appliance's side of one link.

    Args:
        lookup_key: returns a paired device's PSK by device id, or None when
            the device is not paired; it may raise ``BridgeError`` when the
            key exists but cannot be used (counted as ``key_errors``).
        next_number: returns the next message number the store expects for a
            (device id, stream id) pair: 0 for a new stream. The attribute of
            the same name may be replaced, for example by the thread that owns
            the database connection.
        random: source of random bytes (os.urandom; tests pass a fixed one).
        link: the link name, for log lines.
        first_key_id: the key id of the first session (None: random), for
            test vectors.
    """

    def __init__(
        self,
        lookup_key: Callable[[bytes], bytes | None],
        next_number: Callable[[str, str], int] = lambda device, stream: 0,
        random: Callable[[int], bytes] = os.urandom,
        link: str = "-",
        first_key_id: int | None = None,
    ) -> None:
        self.link = link
        self.decoder = FrameDecoder()
        self.stats = ProtocolStats()
        self._lookup_key = lookup_key
        self.next_number = next_number
        self._random = random
        self._session: _Session | None = None
        self._frames_in_session = 0
        # A random first session number makes it unlikely that a frame from
        # a session before an appliance restart carries the new session's id.
        self._key_counter = (
            os.urandom(1)[0] if first_key_id is None else (first_key_id - 1) & 0xFF
        )
        self._warn = _Throttle()
        self.device_id = ""
        self.stream_id = ""
        self.expected = 0
        """Next message number to deliver."""
        self.committed = 0
        """Next message number not yet committed; acknowledged up to here."""
        self._nacked_at: int | None = None
        self._nack_time = 0.0
        self._last_reset = -RESET_INTERVAL
        self._queue: collections.deque[Frame] = collections.deque()
        self._out = bytearray()

    @property
    def established(self) -> bool:
        return self._session is not None

    @property
    def pending(self) -> bool:
        """True when received frames wait behind a handshake for a commit."""
        return bool(self._queue)

    def receive(self, data: bytes, now: float) -> list[Message]:
        """Take bytes from the link; return the messages to commit, in order.

        Processing stops before a HELLO while delivered messages are not yet
        committed, because the handshake's reply acknowledges them; call
        ``committed_up_to`` and then ``receive(b"", now)`` to continue.
        """
        self._queue.extend(self.decoder.feed(data))
        messages: list[Message] = []
        while self._queue:
            frame = self._queue[0]
            if frame.type == MessageType.HELLO and self.expected != self.committed:
                break
            self._queue.popleft()
            message = self._handle(frame, now)
            if message is not None:
                messages.append(message)
        return messages

    def committed_up_to(self, number: int) -> None:
        """Record that messages below ``number`` are durable and acknowledge them."""
        if number <= self.committed or self._session is None:
            self.committed = max(self.committed, number)
            return
        self.committed = number
        self._out += self._session.sealed_frame(MessageType.ACK, U32.pack(number))
        self.stats.acks_sent += 1

    def rollback(self) -> None:
        """Forget deliveries that were not committed; the device will resend them."""
        self.expected = self.committed
        self._nacked_at = None

    def take_output(self) -> bytes:
        """Return and clear the bytes to write to the link."""
        out, self._out = bytes(self._out), bytearray()
        return out

    def _handle(self, frame: Frame, now: float) -> Message | None:
        kind = frame.type
        if kind == MessageType.HELLO:
            self._hello(frame, now)
            return None
        if kind == MessageType.RESET:
            self.stats.resets_received += 1
            logger.info(
                "link %s: device %s reset its session",
                self.link,
                self.device_id or "unknown",
            )
            self._session = None
            return None
        if kind not in (MessageType.DATA, MessageType.PING):
            self.stats.unexpected_frames += 1
            return None
        if not frame.sealed:
            self.stats.plaintext_refused += 1
            self._warn.warning(
                "plaintext",
                "link %s: rejected a plaintext %s frame; this link only accepts "
                "sealed frames",
                self.link,
                kind.name,
            )
            return None
        session = self._session
        if session is None or frame.key_id != session.key_id:
            self.stats.stale_frames += 1
            self._reset(ResetReason.NO_SESSION, now)
            return None
        plaintext = self._open(session, frame)
        if plaintext is None:
            return None
        self._frames_in_session += 1
        if self._frames_in_session > HARD_FRAME_LIMIT:
            logger.warning(
                "link %s: session of device %s was never re-keyed",
                self.link,
                self.device_id,
            )
            self._session = None
            self._reset(ResetReason.REKEY_REQUIRED, now, force=True)
            return None
        if kind == MessageType.PING:
            self._out += session.sealed_frame(MessageType.PONG, plaintext)
            return None
        return self._data(session, plaintext, now)

    def _open(self, session: _Session, frame: Frame) -> bytes | None:
        try:
            session.opener.window.check(frame.seq)
        except AuthenticationError as exc:
            self.stats.replayed_frames += 1
            logger.debug("link %s: frame dropped: %s", self.link, exc)
            return None
        try:
            return session.opener.open(frame.seq, frame.header, frame.payload)
        except AuthenticationError as exc:
            self.stats.auth_failures += 1
            self._warn.warning(
                "auth", "link %s: device %s: %s", self.link, self.device_id, exc
            )
            return None

    def _data(self, session: _Session, plaintext: bytes, now: float) -> Message | None:
        if len(plaintext) < U32.size:
            self.stats.unexpected_frames += 1
            return None
        if len(plaintext) > U32.size + MAX_BODY:
            self.stats.unexpected_frames += 1
            return None
        (number,) = U32.unpack_from(plaintext)
        if number == self.expected:
            self.expected += 1
            self._nacked_at = None
            self.stats.messages += 1
            return Message(self.device_id, self.stream_id, number, plaintext[4:])
        if number < self.expected:
            self.stats.duplicate_messages += 1
            if number < self.committed:
                # The ACK may have been lost; repeat it.
                self._out += session.sealed_frame(
                    MessageType.ACK, U32.pack(self.committed)
                )
                self.stats.acks_sent += 1
            return None
        self.stats.message_gaps += 1
        if self._nacked_at != self.expected or now - self._nack_time >= NACK_INTERVAL:
            # One NACK per gap, repeated if the gap outlives NACK_INTERVAL
            # (the resent frame was lost too).
            self._nacked_at = self.expected
            self._nack_time = now
            self._out += session.sealed_frame(
                MessageType.NACK, bytes([NackReason.GAP]) + U32.pack(self.expected)
            )
            self.stats.nacks_sent += 1
        return None

    def _hello(self, frame: Frame, now: float) -> None:
        payload = frame.payload
        if frame.sealed or len(payload) != HELLO_SIZE:
            self.stats.unexpected_frames += 1
            return
        fields, tag = payload[:HELLO_FIELDS], payload[HELLO_FIELDS:]
        device_id = fields[: crypto.DEVICE_ID_SIZE]
        stream_id = fields[crypto.DEVICE_ID_SIZE : crypto.DEVICE_ID_SIZE * 2]
        device_random = fields[crypto.DEVICE_ID_SIZE * 2 :]
        try:
            psk = self._lookup_key(device_id)
        except BridgeError as exc:
            # The key file exists but cannot be used: the fix is on this box.
            self.stats.key_errors += 1
            self._warn.warning(
                "key", "link %s: device %s: %s", self.link, device_id.hex(), exc
            )
            self._reset(ResetReason.UNPAIRED, now)
            return
        if psk is None:
            self.stats.unpaired_hellos += 1
            self._warn.warning(
                "unpaired",
                "link %s: rejected device %s: it is not paired with this appliance; "
                "run `appliance pair NAME --export FILE` and load FILE onto the device",
                self.link,
                device_id.hex(),
            )
            self._reset(ResetReason.UNPAIRED, now)
            return
        try:
            crypto.check_hello_tag(psk, frame.header, fields, tag)
        except AuthenticationError as exc:
            self.stats.auth_failures += 1
            self._warn.warning(
                "auth", "link %s: device %s: %s", self.link, device_id.hex(), exc
            )
            return
        same_stream = (device_id.hex(), stream_id.hex()) == (
            self.device_id,
            self.stream_id,
        )
        if not same_stream:
            self.device_id, self.stream_id = device_id.hex(), stream_id.hex()
            self.expected = self.committed = self.next_number(
                self.device_id, self.stream_id
            )
        appliance_random = self._random(crypto.RANDOM_SIZE)
        keys = crypto.derive_session_keys(
            psk, device_id, stream_id, device_random, appliance_random
        )
        self._key_counter = (self._key_counter + 1) & 0xFF
        session = _Session(
            keys,
            self._key_counter,
            crypto.DEVICE_TO_APPLIANCE,
            crypto.APPLIANCE_TO_DEVICE,
            now,
        )
        self._session = session
        self._frames_in_session = 0
        self._nacked_at = None
        self.stats.handshakes += 1
        seq = session.sealer.take_seq()
        length = crypto.RANDOM_SIZE + U32.size + TAG_SIZE
        header = header_bytes(MessageType.HELLO_ACK, 0, session.key_id, seq, length)
        confirm = session.sealer.seal(
            seq, header + payload + appliance_random, U32.pack(self.committed)
        )
        self._out += encode_frame(header, appliance_random + confirm)
        logger.info(
            "link %s: device %s stream %s: session %d established, next message %d",
            self.link,
            self.device_id,
            self.stream_id,
            session.key_id,
            self.committed,
        )

    def _reset(self, reason: ResetReason, now: float, force: bool = False) -> None:
        if not force and now - self._last_reset < RESET_INTERVAL:
            return
        self._last_reset = now
        self._out += _plain_frame(MessageType.RESET, bytes([reason]))
        self.stats.resets_sent += 1


class DeviceState(enum.StrEnum):
    IDLE = "idle"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    REFUSED = "refused"
    """The appliance reported the device as unpaired, so handshakes are retried slowly."""


@dataclasses.dataclass
class DeviceStats:
    handshakes: int = 0
    frames_sent: int = 0
    retransmissions: int = 0
    acks: int = 0
    nacks: int = 0
    resets_received: int = 0
    auth_failures: int = 0


class DeviceEndpoint:
    """The device's side of the link, as firmware would implement it.

    The simulator runs it; tests use it as the peer of ``ApplianceEndpoint``.
    Messages queued with ``submit`` stay in the send queue until the appliance
    acknowledges them, across reconnects, re-keys and restarts of this object
    that keep the queue (``restart``).

    Args:
        device_id: the 8-byte id given at pairing.
        psk: the 32-byte pre-shared key given at pairing.
        window: messages in flight before waiting for an acknowledgement.
        retransmit_after: seconds without progress before resending from the
            oldest unacknowledged message.
        handshake_timeout: seconds to wait for HELLO_ACK before a new HELLO.
        rekey_frames, rekey_seconds: start a new handshake after this many
            frames or this long.
        stream_id: the stream to continue; None starts a new random stream.
        first_number: the number the next submitted message gets, for a
            device that resumes a stream from persistent storage.
    """

    def __init__(
        self,
        device_id: bytes,
        psk: bytes,
        window: int = 32,
        retransmit_after: float = 1.0,
        handshake_timeout: float = 1.0,
        rekey_frames: int = REKEY_FRAMES,
        rekey_seconds: float = REKEY_SECONDS,
        random: Callable[[int], bytes] = os.urandom,
        stream_id: bytes | None = None,
        first_number: int = 0,
    ) -> None:
        if len(device_id) != crypto.DEVICE_ID_SIZE or len(psk) != crypto.PSK_SIZE:
            raise ValueError(
                f"device id of {len(device_id)} bytes and key of {len(psk)} bytes "
                f"given; they must be {crypto.DEVICE_ID_SIZE} and {crypto.PSK_SIZE}"
            )
        self.device_id = device_id
        self.psk = psk
        self.window = window
        self.retransmit_after = retransmit_after
        self.handshake_timeout = handshake_timeout
        self.rekey_frames = rekey_frames
        self.rekey_seconds = rekey_seconds
        self._random = random
        self.stream_id = stream_id or random(crypto.STREAM_ID_SIZE)
        self.stats = DeviceStats()
        self.decoder = FrameDecoder()
        self.queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self.next_number = first_number
        self.acked = first_number
        """Every message below this number is acknowledged."""
        self._send_from = first_number
        self._high_water = first_number
        """One past the highest message number ever sent; lower ones are resends."""
        self._progress_at = 0.0
        self._out = bytearray()
        self._restart_session()

    def _restart_session(self) -> None:
        self.state = DeviceState.IDLE
        self._session: _Session | None = None
        self._hello: tuple[bytes, bytes, bytes] | None = None
        self._hello_at = 0.0
        self._frames_in_session = 0

    def submit(self, body: bytes) -> int:
        """Queue a message body and return its number in the stream."""
        if len(body) > MAX_BODY:
            raise FrameError(
                f"message body of {len(body)} bytes exceeds {MAX_BODY} bytes"
            )
        number = self.next_number
        self.queue.append((number, body))
        self.next_number += 1
        return number

    def restart(self, new_stream: bool = False) -> None:
        """Simulate a reboot: the session is lost; the queue survives unless
        ``new_stream``, which models a device without persistent storage."""
        if new_stream:
            self.stream_id = self._random(crypto.STREAM_ID_SIZE)
            self.queue.clear()
            self.next_number = self.acked = self._send_from = self._high_water = 0
        self.decoder = FrameDecoder()
        self._restart_session()

    @property
    def unacknowledged(self) -> int:
        return len(self.queue)

    def take_output(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def poll(self, now: float) -> bytes:
        """Run timers and the send window; return the bytes to write."""
        if self.state in (DeviceState.IDLE, DeviceState.REFUSED):
            wait = 5.0 if self.state == DeviceState.REFUSED else 0.0
            if now - self._hello_at >= wait:
                self._send_hello(now)
        elif self.state == DeviceState.HANDSHAKING:
            if now - self._hello_at >= self.handshake_timeout:
                self._send_hello(now)
        else:
            session = self._session
            assert session is not None
            if (
                self._frames_in_session >= self.rekey_frames
                or now - session.started >= self.rekey_seconds
            ):
                self._send_hello(now)
            else:
                self._transmit(session, now)
        return self.take_output()

    def receive(self, data: bytes, now: float) -> None:
        for frame in self.decoder.feed(data):
            self._handle(frame, now)

    def ping(self, payload: bytes = b"") -> None:
        if self._session is not None:
            self._out += self._session.sealed_frame(MessageType.PING, payload)

    def _send_hello(self, now: float) -> None:
        device_random = self._random(crypto.RANDOM_SIZE)
        fields = self.device_id + self.stream_id + device_random
        header = header_bytes(MessageType.HELLO, 0, 0, 0, HELLO_SIZE)
        payload = fields + crypto.hello_tag(self.psk, header, fields)
        self._out += encode_frame(header, payload)
        self._hello = (device_random, payload, header)
        self._hello_at = now
        if self.state != DeviceState.REFUSED:
            self.state = DeviceState.HANDSHAKING

    def _transmit(self, session: _Session, now: float) -> None:
        if self.queue and self._send_from > self.acked:
            if now - self._progress_at >= self.retransmit_after:
                self._send_from = self.acked
                self._progress_at = now
        if not self.queue:
            self._progress_at = now
            return
        first = self.queue[0][0]
        limit = self.acked + self.window
        while self._send_from < min(self.next_number, limit):
            number = self._send_from
            body = self.queue[number - first][1]
            if number < self._high_water:
                self.stats.retransmissions += 1
            self._out += session.sealed_frame(MessageType.DATA, U32.pack(number) + body)
            self._frames_in_session += 1
            self.stats.frames_sent += 1
            self._send_from += 1
            self._high_water = max(self._high_water, self._send_from)

    def _acknowledge(self, number: int, now: float) -> None:
        if number > self.next_number:
            return
        if number > self.acked:
            while self.queue and self.queue[0][0] < number:
                self.queue.popleft()
            self.acked = number
            self._progress_at = now
        self._send_from = max(self._send_from, self.acked)

    def _handle(self, frame: Frame, now: float) -> None:
        if frame.type == MessageType.RESET:
            self.stats.resets_received += 1
            reason = frame.payload[:1]
            refused = reason == bytes([ResetReason.UNPAIRED])
            self._restart_session()
            if refused:
                self.state = DeviceState.REFUSED
                self._hello_at = now
            return
        if frame.type == MessageType.HELLO_ACK:
            self._hello_ack(frame, now)
            return
        session = self._session
        if session is None or not frame.sealed or frame.key_id != session.key_id:
            return
        try:
            plaintext = session.opener.open(frame.seq, frame.header, frame.payload)
        except AuthenticationError:
            self.stats.auth_failures += 1
            return
        if frame.type == MessageType.ACK and len(plaintext) == U32.size:
            self.stats.acks += 1
            self._acknowledge(U32.unpack(plaintext)[0], now)
        elif frame.type == MessageType.NACK and len(plaintext) == 1 + U32.size:
            # A NACK gives the number to resume sending from, not what is
            # durable. The appliance may still lose uncommitted messages below
            # it, so they stay queued until an ACK covers them.
            self.stats.nacks += 1
            (number,) = U32.unpack_from(plaintext, 1)
            self._send_from = min(max(number, self.acked), self.next_number)
            self._progress_at = now

    def _hello_ack(self, frame: Frame, now: float) -> None:
        if self._hello is None or frame.sealed:
            return
        device_random, hello_payload, _ = self._hello
        payload = frame.payload
        if len(payload) != crypto.RANDOM_SIZE + U32.size + TAG_SIZE:
            return
        appliance_random = payload[: crypto.RANDOM_SIZE]
        keys = crypto.derive_session_keys(
            self.psk, self.device_id, self.stream_id, device_random, appliance_random
        )
        session = _Session(
            keys,
            frame.key_id,
            crypto.APPLIANCE_TO_DEVICE,
            crypto.DEVICE_TO_APPLIANCE,
            now,
        )
        try:
            confirm = session.opener.open(
                frame.seq,
                frame.header + hello_payload + appliance_random,
                payload[crypto.RANDOM_SIZE :],
            )
        except AuthenticationError:
            self.stats.auth_failures += 1
            return
        self._session = session
        self._hello = None
        self._frames_in_session = 0
        self.state = DeviceState.ESTABLISHED
        self.stats.handshakes += 1
        (number,) = U32.unpack(confirm)
        self._acknowledge(number, now)
        # Everything not acknowledged is sent again under the new keys.
        self._send_from = self.acked
        self._progress_at = now
