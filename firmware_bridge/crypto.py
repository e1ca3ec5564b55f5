"""Session keys, nonces, AEAD sealing and the replay window of the device link.

Only standard constructions from the ``cryptography`` package are used:

* pairing gives each device a random 32-byte pre-shared key (PSK);
* each session derives two fresh 32-byte keys, one per direction, with
  HKDF-SHA256 (RFC 5869) from the PSK, salted with a 16-byte random value
  from each side, so no two sessions share a key even when a device restarts
  its sequence numbers from zero;
* payloads are sealed with ChaCha20-Poly1305 (RFC 8439), the frame header
  as associated data; the 96-bit nonce is the direction byte, seven zero
  bytes and the 32-bit sequence number, so a nonce never repeats under a key
  as long as a session sends fewer than 2**32 frames per direction, which
  re-keying well before that guarantees;
* the device's HELLO carries an HMAC-SHA256 tag (RFC 2104), truncated to 16
  bytes, so unpaired or forged devices are refused before any key is derived.

docs/protocol.md explains the choices and what they do not protect against.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firmware_bridge.errors import AuthenticationError

PSK_SIZE = 32
DEVICE_ID_SIZE = 8
STREAM_ID_SIZE = 8
RANDOM_SIZE = 16
HELLO_TAG_SIZE = 16
KDF_INFO = b"field-relay/1 session keys"
"""HKDF info prefix; the device id and stream id follow it."""

DEVICE_TO_APPLIANCE = 0x01
APPLIANCE_TO_DEVICE = 0x02
REPLAY_WINDOW = 64
"""Sequence numbers this far behind the highest seen are still accepted once."""


def nonce(direction: int, seq: int) -> bytes:
    """Return the 12-byte AEAD nonce of frame ``seq`` sent in ``direction``."""
    return bytes([direction]) + bytes(7) + seq.to_bytes(4, "big")


def hello_tag(psk: bytes, header: bytes, fields: bytes) -> bytes:
    """Return the HELLO frame's tag: HMAC-SHA256 over header and fields, 16 bytes."""
    return hmac.new(psk, header + fields, hashlib.sha256).digest()[:HELLO_TAG_SIZE]


def check_hello_tag(psk: bytes, header: bytes, fields: bytes, tag: bytes) -> None:
    """Raise ``AuthenticationError`` unless ``tag`` is the HELLO's valid tag."""
    if not hmac.compare_digest(hello_tag(psk, header, fields), tag):
        raise AuthenticationError("HELLO tag does not match the paired key")


@dataclasses.dataclass(frozen=True)
class SessionKeys:
    """The two directional keys of one session."""

    device_to_appliance: bytes
    appliance_to_device: bytes


def derive_session_keys(
    psk: bytes,
    device_id: bytes,
    stream_id: bytes,
    device_random: bytes,
    appliance_random: bytes,
) -> SessionKeys:
    """Derive a session's keys with HKDF-SHA256.

    Input keying material is the PSK; the salt is the device's random value
    followed by the appliance's; the info binds the device and stream ids.
    """
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=device_random + appliance_random,
        info=KDF_INFO + device_id + stream_id,
    ).derive(psk)
    return SessionKeys(okm[:32], okm[32:])


class ReplayWindow:
    """Accepts each sequence number at most once, within a sliding window.

    The window is a bitmap of the ``REPLAY_WINDOW`` numbers below the highest
    seen, as in IPsec's anti-replay service (RFC 4303, section 3.4.3). A number
    is marked only after its frame authenticates, so a forged frame cannot
    burn a sequence number.
    """

    def __init__(self) -> None:
        self.highest = -1
        self._bits = 0

    def check(self, seq: int) -> None:
        """Raise ``AuthenticationError`` if ``seq`` was seen or is too old."""
        if seq > self.highest:
            return
        offset = self.highest - seq
        if offset >= REPLAY_WINDOW:
            raise AuthenticationError(
                f"sequence {seq} is more than {REPLAY_WINDOW} behind {self.highest}"
            )
        if self._bits >> offset & 1:
            raise AuthenticationError(f"sequence {seq} was already received")

    def mark(self, seq: int) -> None:
        """Record ``seq`` as received; call only after ``check`` and authentication."""
        if seq > self.highest:
            shift = seq - self.highest
            self._bits = (self._bits << shift | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = seq
        else:
            self._bits |= 1 << (self.highest - seq)


class Sealer:
    """Seals outgoing payloads under one direction's key with counting nonces."""

    def __init__(self, key: bytes, direction: int, first_seq: int = 0) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.direction = direction
        self.next_seq = first_seq

    def take_seq(self) -> int:
        """Return the next sequence number and advance it."""
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def seal(self, seq: int, header: bytes, plaintext: bytes) -> bytes:
        return self._aead.encrypt(nonce(self.direction, seq), plaintext, header)


class Opener:
    """Opens incoming payloads under one direction's key, rejecting replays."""

    def __init__(self, key: bytes, direction: int) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.direction = direction
        self.window = ReplayWindow()

    def open(self, seq: int, header: bytes, sealed: bytes) -> bytes:
        """Return the plaintext of an authentic, fresh frame.

        Raises:
            AuthenticationError: the sequence number is replayed or too old, or
                the tag does not verify (forged, truncated or under another key).
        """
        self.window.check(seq)
        try:
            plaintext = self._aead.decrypt(nonce(self.direction, seq), sealed, header)
        except InvalidTag:
            raise AuthenticationError(
                f"frame {seq} failed its ChaCha20-Poly1305 tag"
            ) from None
        self.window.mark(seq)
        return plaintext
